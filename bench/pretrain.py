"""Does continued pretraining teach the model a domain, within 15 minutes on 2 cores?

    python -m bench.pretrain                 # 1.2 MB of the Python standard library's documentation
    python -m bench.pretrain --mb 1.2 --learning-rate 1e-4 --max-minutes 14

The corpus is built from the Python standard library installed here (PSF-licensed text every
machine has): the docstrings in its source, then pydoc's language-reference topics; cleaned by
training/corpus.py exactly as an upload is, then the embedded model is trained by
training/pretrain.py with its defaults. Reported: the corpus before and after cleaning,
perplexity on held-out documents (whole docstrings never trained on) and chat perplexity on
the held-out HH dialogues before and after (forgetting), and the wall time of each part.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import json
import sys
import time
from pathlib import Path

# Not documentation of the library itself: test packages (below), GUI demos, vendored or installed packages.
SKIP = {"idlelib", "turtledemo", "tkinter", "lib2to3", "pydoc_data", "site-packages",
        "dist-packages", "ensurepip", "venv"}


def stdlib_texts(max_bytes: int) -> list[str]:
    """The Python standard library's own documentation, in a fixed order: every docstring of 30
    words or more in its source (modules, classes, functions; read with ``ast``, nothing is
    imported: 1.09 MB with CPython 3.11), then the language-reference topics ``pydoc`` ships
    (``pydoc_data.topics``, 0.44 MB), until ``max_bytes``."""
    import ast
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    docs, size = [], 0

    def add(text: str) -> bool:
        nonlocal size
        docs.append(text)
        size += len(text.encode())
        return size >= max_bytes

    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if SKIP & set(parts) or any(p.startswith("test") for p in parts[:-1]):  # test packages
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):  # a few test fixtures are not valid Python
            continue
        for node in [tree] + [n for n in ast.walk(tree)
                              if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]:
            doc = ast.get_docstring(node)
            if doc and len(doc.split()) >= 30 and add(doc):
                return docs
    from pydoc_data.topics import topics

    for name in sorted(topics):
        if len(topics[name].split()) >= 30 and add(topics[name]):
            return docs
    return docs


def main() -> None:
    from model.moderation import build_moderator
    from model.weights import resolve_model
    from training.corpus import CorpusConfig, build_corpus
    from training.pretrain import PretrainConfig, run_pretrain
    from training.progress import Reporter, ReporterCallback

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=1.2, help="corpus size before cleaning")
    parser.add_argument("--epochs", type=float, default=PretrainConfig.epochs)
    parser.add_argument("--learning-rate", type=float, default=PretrainConfig.learning_rate)
    parser.add_argument("--max-minutes", type=float, default=PretrainConfig.max_minutes,
                        help="stop training after this many minutes (0 = the whole --epochs)")
    parser.add_argument("--out", type=Path, default=Path("data/bench-pretrain"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    raw = stdlib_texts(int(args.mb * 2**20))
    raw_path = args.out / "raw.jsonl"
    raw_path.write_text("".join(json.dumps({"text": d}) + "\n" for d in raw), encoding="utf-8")
    report = build_corpus([raw_path], args.out / "corpus", CorpusConfig(), moderator=build_moderator("rules,profanity"))
    t1 = time.monotonic()
    model = resolve_model("embedded", Path("data")).path
    cfg = PretrainConfig(epochs=args.epochs, learning_rate=args.learning_rate, max_minutes=args.max_minutes)
    _, m = run_pretrain(model, args.out / "corpus" / "corpus.jsonl", args.out / "run", cfg,
                        callbacks=[ReporterCallback(Reporter(), "pretrain")])
    t2 = time.monotonic()
    corpus_mb = (args.out / "corpus" / "corpus.jsonl").stat().st_size / 2**20
    print(f"\n| corpus | documents in / out | training tokens | held-out ppl before -> after | "
          f"chat ppl before -> after | steps | training s | cleaning s | pretraining s (with perplexity) |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| stdlib docs, lr {cfg.learning_rate:g}, {cfg.epochs:g} epoch(s), "
          f"{raw_path.stat().st_size / 2**20:.2f} MB -> {corpus_mb:.2f} MB | "
          f"{report['documents_in']} / {report['documents_out']} | {m['train_tokens']:,} | "
          f"{m['heldout_ppl_before']:.2f} -> {m['heldout_ppl_after']:.2f} "
          f"(x{m['heldout_ppl_after'] / m['heldout_ppl_before']:.3f}) | "
          f"{m['chat_ppl_before']:.2f} -> {m['chat_ppl_after']:.2f} (x{m['chat_ppl_after'] / m['chat_ppl_before']:.3f}) | "
          f"{m['steps']} / {m['steps_planned']} | {m['train_s']:.0f} | {t1 - t0:.0f} | {t2 - t1:.0f} |")
    print("removed by cleaning:", {k: v["documents"] for k, v in report["removed"].items()})


if __name__ == "__main__":
    main()

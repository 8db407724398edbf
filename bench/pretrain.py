"""Does continued pretraining teach the model a domain, within 15 minutes on 2 cores?

    python -m bench.pretrain                 # 1 MB of Python standard-library docstrings
    python -m bench.pretrain --mb 2 --epochs 1

The corpus is built from the docstrings of the Python standard library installed here
(public, PSF-licensed text every machine has; documents of at least 30 words), cleaned by
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

SKIP = {"antigravity", "this", "idlelib", "turtledemo", "tkinter", "turtle", "test", "lib2to3", "pydoc_data"}


def stdlib_docstrings(max_bytes: int) -> list[str]:
    """Docstrings of standard-library modules and their public members, in module order."""
    docs, size = [], 0
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in SKIP:
            continue
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                module = importlib.import_module(name)
        except Exception:  # platform modules that do not import here
            continue
        members = [module] + [obj for attr, obj in inspect.getmembers(module)
                              if not attr.startswith("_") and getattr(obj, "__module__", None) == name]
        for obj in members:
            doc = inspect.getdoc(obj) or ""
            if len(doc.split()) >= 30:
                docs.append(doc)
                size += len(doc.encode())
                if size >= max_bytes:
                    return docs
    return docs


def main() -> None:
    from model.moderation import build_moderator
    from model.weights import resolve_model
    from training.corpus import CorpusConfig, build_corpus
    from training.pretrain import PretrainConfig, run_pretrain
    from training.progress import Reporter, ReporterCallback

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=1.0, help="corpus size before cleaning")
    parser.add_argument("--epochs", type=float, default=PretrainConfig.epochs)
    parser.add_argument("--out", type=Path, default=Path("data/bench-pretrain"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    raw = stdlib_docstrings(int(args.mb * 2**20))
    raw_path = args.out / "raw.jsonl"
    raw_path.write_text("".join(json.dumps({"text": d}) + "\n" for d in raw), encoding="utf-8")
    report = build_corpus([raw_path], args.out / "corpus", CorpusConfig(), moderator=build_moderator("rules,profanity"))
    t1 = time.monotonic()
    model = resolve_model("embedded", Path("data")).path
    cfg = PretrainConfig(epochs=args.epochs)
    _, m = run_pretrain(model, args.out / "corpus" / "corpus.jsonl", args.out / "run", cfg,
                        callbacks=[ReporterCallback(Reporter(), "pretrain")])
    t2 = time.monotonic()
    corpus_mb = (args.out / "corpus" / "corpus.jsonl").stat().st_size / 2**20
    print(f"\n| corpus | documents in / out | training tokens | held-out ppl before -> after | "
          f"chat ppl before -> after | cleaning s | pretraining s |\n| --- | --- | --- | --- | --- | --- | --- |")
    print(f"| stdlib docstrings, {raw_path.stat().st_size / 2**20:.2f} MB -> {corpus_mb:.2f} MB | "
          f"{report['documents_in']} / {report['documents_out']} | {m['train_tokens']:,} | "
          f"{m['heldout_ppl_before']:.2f} -> {m['heldout_ppl_after']:.2f} "
          f"(x{m['heldout_ppl_after'] / m['heldout_ppl_before']:.3f}) | "
          f"{m['chat_ppl_before']:.2f} -> {m['chat_ppl_after']:.2f} (x{m['chat_ppl_after'] / m['chat_ppl_before']:.3f}) | "
          f"{t1 - t0:.0f} | {t2 - t1:.0f} |")
    print("removed by cleaning:", {k: v["documents"] for k, v in report["removed"].items()})


if __name__ == "__main__":
    main()

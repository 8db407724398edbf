"""The learned moderation head: which features separate hate from neutral, and what a check costs.

    python -m bench.moderation                          # feature layers, int8, llama.cpp; latency table
    python -m bench.moderation --labels more.jsonl      # cross-validate on other labelled rows too

Quality: for each feature source (the embedded model's hidden states after N blocks, mean- or
last-token-pooled, float32 or int8, and llama.cpp's own mean-pooled embedding of the same GGUF,
its last layer), trained as ``train_head`` trains (labelled rows plus the everyday prompts as
acceptable): 5-fold cross-validated ROC AUC (95%) on the labelled rows (default: the ToxiGen
calibration set), the same with whole target groups held out (the head never saw a statement
about that group: closer to text from elsewhere), recall and false-positive rate at 0.5, and
the out-of-fold flag rate on the everyday prompts. Latency: one user message at a time (everyday questions and HH red-team
openers, 6 to 60 words), p50/p95 of each backend's ``score``, in the same run as the
alt-profanity-check baseline, so the ratio holds even when the machine is slower than usual.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

PROMPTS = Path(__file__).parent / "data" / "learning_prompts.jsonl"
MIDDLE = 15  # of SmolLM2-135M's 30 blocks: what EncoderSpec's layer 0 resolves to


def _llamacpp_embedder(gguf: Path, threads: int):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf), embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
                          n_threads=threads, n_threads_batch=threads, n_ctx=512, verbose=False)
    return lambda texts: np.array([llm.embed(t) for t in texts], dtype=np.float32)


def _latency(score, texts: list[str]) -> tuple[float, float]:
    score(texts[:3])  # warm-up: first calls allocate
    times = []
    for t in texts:
        start = time.perf_counter()
        score([t])
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return statistics.median(times), times[int(0.95 * (len(times) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", nargs="*", type=Path, default=[], help="more {text, label} JSONL to evaluate on")
    parser.add_argument("--layers", nargs="+", type=int, default=[5, 10, 15, 20, 30])
    parser.add_argument("--messages", type=int, default=120, help="messages timed per backend")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from model.moderation.backends import ProfanityBackend
    from sklearn.model_selection import GroupKFold

    from model.moderation.head_store import CALIBRATION, everyday_prompts, out_of_fold, read_label_file, summarise
    from model.moderation.learned import EncoderSpec, HiddenStateEncoder, fit_linear_head
    from model.weights import embedded_gguf_path, resolve_model

    rows = read_label_file(CALIBRATION)
    groups = [json.loads(line).get("group", "?") for line in CALIBRATION.read_text().splitlines() if line.strip()]
    for path in args.labels:
        extra = read_label_file(path)
        rows, groups = rows + extra, groups + [path.name] * len(extra)
    texts, labels = [r["text"] for r in rows], np.array([r["label"] for r in rows])
    everyday = everyday_prompts()
    model_dir = str(resolve_model("embedded", args.data_dir).path)
    print(f"{len(texts)} labelled rows ({labels.sum()} harmful, {len(set(groups))} target groups), "
          f"{len(everyday)} everyday prompts trained on as acceptable, {args.threads} threads\n")
    print("| features | ROC AUC, 5-fold (95%) | ROC AUC, unseen target groups | recall @0.5 | FPR @0.5 "
          "| everyday flagged @0.5 (out of fold) |\n| --- | --- | --- | --- | --- | --- |")
    y_all = np.concatenate([labels, np.zeros(len(everyday), dtype=int)])
    n = len(texts)

    def report(name: str, encode) -> None:
        feats = encode(texts + everyday)
        oof, _ = out_of_fold(feats, y_all, c=0.05)
        m = summarise(labels, oof[:n], 0.5)
        # Leave-groups-out: the head never saw a statement about the group it is scored on.
        by_group = np.zeros(n)
        for train, test in GroupKFold(5).split(feats[:n], labels, groups):
            train = np.concatenate([train, np.arange(n, len(y_all))])
            by_group[test] = fit_linear_head(feats[train], y_all[train]).predict(feats[test])
        g = summarise(labels, by_group, 0.5)
        print(f"| {name} | {m['auc']:.3f} [{m['auc_low']:.2f}, {m['auc_high']:.2f}] | {g['auc']:.3f} "
              f"[{g['auc_low']:.2f}, {g['auc_high']:.2f}] | {m['recall']:.2f} | {m['fpr']:.2f} "
              f"| {(oof[n:] >= 0.5).mean():.1%} |", flush=True)

    configs = [(layer, "mean", False) for layer in args.layers] + [
        (MIDDLE, pooling, False) for pooling in ("last", "mean+last")] + [(MIDDLE, "mean", True)]
    for layer, pooling, int8 in configs:
        enc = HiddenStateEncoder(EncoderSpec(model_dir=model_dir, layer=layer, pooling=pooling, int8=int8))
        report(f"hidden states, layer {layer}/30, {pooling}, {'int8' if int8 else 'float32'}", enc.encode)
    llama_embed = _llamacpp_embedder(embedded_gguf_path(), args.threads)
    report("llama.cpp embedding (Q4_1 GGUF, layer 30, mean)", llama_embed)

    prompts = [json.loads(line)["prompt"] for line in PROMPTS.read_text().splitlines()]
    messages = [p for p in prompts if 6 <= len(p.split()) <= 60][::3][:args.messages]
    words = statistics.median(len(m.split()) for m in messages)
    profanity = ProfanityBackend()
    backends = [("profanity (alt-profanity-check, baseline)", profanity.score)]
    for layer, int8 in ((MIDDLE, False), (MIDDLE, True), (10, False)):
        encoder = HiddenStateEncoder(EncoderSpec(model_dir=model_dir, layer=layer, int8=int8))
        head = fit_linear_head(encoder.encode(texts + everyday), y_all)
        backends.append((f"learned (layer {layer}, {'int8' if int8 else 'float32'})",
                         lambda t, e=encoder, h=head: h.predict(e.encode(t))))
    backends.append(("llama.cpp embedding (for comparison)", llama_embed))
    print(f"\nLatency per user message ({len(messages)} messages, median {words:.0f} words, one at a time):\n")
    print("| backend | p50 ms | p95 ms | p50 / profanity |\n| --- | --- | --- | --- |")
    base = None
    for name, score in backends:
        p50, p95 = _latency(score, messages)
        base = base or p50
        print(f"| {name} | {p50:.1f} | {p95:.1f} | {p50 / base:.1f}x |", flush=True)


if __name__ == "__main__":
    main()

"""The learned moderation head: which features separate hate from neutral, and what a check costs.

    python -m bench.moderation                          # quality table and latency table, one run
    python -m bench.moderation --labels more.jsonl      # cross-validate on other labelled rows too

Quality: for each feature source (the embedded model's hidden states after N blocks, mean- and
last-token-pooled, float32 or int8, optionally next to block 1's; llama.cpp's own embedding of
the GGUF for comparison), trained as ``train_head`` trains (labelled rows, their reframed copies
unless the row says otherwise, the everyday prompts as acceptable):
- ROC AUC (95%) and recall / false-positive rate at 0.5 on the labelled statements, 5-fold;
- ROC AUC with whole target groups held out (the head never saw a statement about that group);
- recall on the harmful statements in three *other* request wordings, never trained on
  (``model.moderation.reframe.HELD_OUT``: "Why is it that ...?"), scored out of fold;
- the out-of-fold flag rate on the everyday prompts, and the flag rate on 80 ordinary messages
  that no head ever trains on (``bench/data/ordinary_heldout.txt``, half of them about
  religions, nationalities, disabilities or LGBTQ topics).
Latency: one user message at a time (everyday questions and HH red-team openers, 6 to 60
words), p50/p95 of each backend's ``score`` and of the whole moderator's check (what a chat
message waits for), in the same run as the alt-profanity-check baseline.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).parent / "data"
PROMPTS = DATA / "learning_prompts.jsonl"
ORDINARY = DATA / "ordinary_heldout.txt"


def _truncated_gguf(src: Path, dst: Path, blocks: int) -> Path:
    """The GGUF with only its first ``blocks`` blocks (what llama.cpp would run for block-N features)."""
    import gguf

    from model.gguf_export import copy_metadata

    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dst), arch="llama")
    copy_metadata(reader, writer, {"llama.block_count": (blocks, gguf.GGUFValueType.UINT32)})
    for t in reader.tensors:
        if not (t.name.startswith("blk.") and int(t.name.split(".")[1]) >= blocks):
            writer.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


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


def main() -> None:  # noqa: C901 (one table after the other, in the order printed)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", nargs="*", type=Path, default=[], help="more {text, label} JSONL to evaluate on")
    parser.add_argument("--messages", type=int, default=120, help="messages timed per backend")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from sklearn.model_selection import GroupKFold, StratifiedKFold

    from model.gguf_export import ensure_gguf
    from model.moderation.backends import ProfanityBackend, RulesBackend, load_rules
    from model.moderation.head_store import CALIBRATION, everyday_prompts, read_label_file, summarise
    from model.moderation.learned import EncoderSpec, HiddenStateEncoder, fit_max_head
    from model.moderation.moderator import Moderator
    from model.moderation.reframe import HELD_OUT, TRAINING, as_clause
    from model.weights import embedded_gguf_path, resolve_model

    rows = read_label_file(CALIBRATION)
    groups = [json.loads(line).get("group", "?") for line in CALIBRATION.read_text().splitlines() if line.strip()]
    for path in args.labels:
        extra = read_label_file(path)
        rows, groups = rows + extra, groups + [path.name] * len(extra)
    texts, labels = [r["text"] for r in rows], np.array([r["label"] for r in rows])
    everyday = everyday_prompts()
    ordinary = [line for line in ORDINARY.read_text().splitlines() if line.strip()]
    assert not set(ordinary) & set(everyday) and not set(ordinary) & set(texts), "the held-out messages leaked"
    n, harmful = len(texts), labels == 1
    model_dir = str(resolve_model("embedded", args.data_dir).path)
    print(f"{n} labelled rows ({labels.sum()} harmful, {len(set(groups))} target groups), {len(everyday)} everyday "
          f"prompts trained on as acceptable, {len(ordinary)} held-out ordinary messages, {args.threads} threads\n")
    print("| features | ROC AUC, 5-fold (95%) | ROC AUC, unseen target groups | recall @0.5 | FPR @0.5 "
          "| recall, other wordings @0.5 | everyday flagged (out of fold) | held-out ordinary flagged |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- |")

    def report(name: str, encode, parts: str = "both") -> None:
        base, ev, od = encode(texts), encode(everyday), encode(ordinary)
        copies = [encode([t.format(as_clause(s)) for s in texts]) for t in TRAINING] if parts != "statements" else []
        other = [encode([t.format(as_clause(s)) for s in texts]) for t in HELD_OUT]

        def fit(train, ev=ev):  # as train_head: the rows, their reframed copies, the everyday prompts
            x = np.concatenate([base[train]] + [c[train] for c in copies] + [ev])
            y = np.concatenate([labels[train]] * (1 + len(copies)) + [np.zeros(len(ev), dtype=int)])
            is_copy = np.arange(len(y)) >= len(train)
            is_copy[len(y) - len(ev):] = False
            head = fit_max_head(x, y, is_copy)
            return head if parts == "both" else head.parts[-1]

        oof, by_group, worded = np.zeros(n), np.zeros(n), np.zeros((len(other), n))
        ev_oof = []
        for train, test in StratifiedKFold(5, shuffle=True, random_state=0).split(base, labels):
            head = fit(train)
            oof[test] = head.predict(base[test])
            worded[:, test] = [head.predict(o[test]) for o in other]
        for train, test in StratifiedKFold(5, shuffle=True, random_state=0).split(ev, np.zeros(len(ev))):
            ev_oof.append(fit(np.arange(n), ev[train]).predict(ev[test]))
        for train, test in GroupKFold(5).split(base, labels, groups):
            by_group[test] = fit(train).predict(base[test])
        m, g = summarise(labels, oof, 0.5), summarise(labels, by_group, 0.5)
        final = fit(np.arange(n))
        print(f"| {name} | {m['auc']:.3f} [{m['auc_low']:.2f}, {m['auc_high']:.2f}] | {g['auc']:.3f} "
              f"[{g['auc_low']:.2f}, {g['auc_high']:.2f}] | {m['recall']:.2f} | {m['fpr']:.2f} "
              f"| {(worded[:, harmful] >= 0.5).mean():.2f} | {(np.concatenate(ev_oof) >= 0.5).mean():.1%} "
              f"| {(final.predict(od) >= 0.5).mean():.1%} |", flush=True)

    def encoder(**kw):
        return HiddenStateEncoder(EncoderSpec(model_dir=model_dir, **kw))

    default = encoder()  # EncoderSpec's defaults: what the Train button uses
    report("**blocks 1+8 of 30, mean+last, int8: max of both parts (default)**", default.encode)
    report("same, statements part alone (no reframed copies)", default.encode, parts="statements")
    report("same, requests part alone (trained with the copies)", default.encode, parts="requests")
    report("same, float32", encoder(int8=False).encode)
    report("block 8 alone, mean+last, int8", encoder(early_layer=0).encode)
    report("block 15 alone, mean+last, float32 (the default until 2026-12-02)",
           encoder(layer=15, early_layer=0, int8=False).encode)
    report("block 15 alone, mean, float32", encoder(layer=15, early_layer=0, pooling="mean", int8=False).encode)
    q8 = ensure_gguf(model_dir, "q8_0")
    llama_full = _llamacpp_embedder(q8, args.threads)
    report("llama.cpp's own embedding of the Q8_0 GGUF (30 blocks, mean)", llama_full)

    prompts = [json.loads(line)["prompt"] for line in PROMPTS.read_text().splitlines()]
    messages = [p for p in prompts if 6 <= len(p.split()) <= 60][::3][:args.messages]
    words = statistics.median(len(m.split()) for m in messages)
    is_copy = np.array([False] * n + [True] * n * len(TRAINING) + [False] * len(everyday))
    default_head = fit_max_head(
        np.concatenate([default.encode(texts)] + [default.encode([t.format(as_clause(s)) for s in texts])
                                                  for t in TRAINING] + [default.encode(everyday)]),
        np.concatenate([labels] * (1 + len(TRAINING)) + [np.zeros(len(everyday), dtype=int)]), is_copy)

    class Head:  # the trained default head as a moderation backend, without writing it to disk
        name, streaming = "learned", False

        def score(self, batch):
            return [{"toxicity": float(p)} for p in default_head.predict(default.encode(batch))]

    profanity, rules = ProfanityBackend(), RulesBackend(load_rules(None))
    without = Moderator([rules, profanity])
    with_head = Moderator([rules, profanity, Head()])
    float32, block15 = encoder(int8=False), encoder(layer=15, early_layer=0, int8=False)
    truncated = _truncated_gguf(q8, args.data_dir / "bench-moderation-8-blocks.gguf", 8)
    backends = [("profanity (alt-profanity-check, baseline)", profanity.score),
                ("learned, blocks 1+8, int8 (default)", Head().score),
                ("learned, blocks 1+8, float32", float32.encode),
                ("learned, block 15, float32 (the default until 2026-12-02)", block15.encode),
                ("llama.cpp embedding, Q8_0, 30 blocks (llama-cpp-python `embed`)", llama_full),
                ("llama.cpp embedding, Q8_0 cut to 8 blocks", _llamacpp_embedder(truncated, args.threads)),
                ("whole check, rules + profanity (no head)", lambda b: without.check(b[0])),
                ("whole check, rules + profanity + learned head (default)", lambda b: with_head.check(b[0]))]
    print(f"\nLatency per user message ({len(messages)} messages, median {words:.0f} words, one at a time):\n")
    print("| backend | p50 ms | p95 ms | p50 / profanity |\n| --- | --- | --- | --- |")
    base = None
    for name, score in backends:
        p50, p95 = _latency(score, messages)
        base = base or p50
        print(f"| {name} | {p50:.1f} | {p95:.1f} | {p50 / base:.1f}x |", flush=True)
    truncated.unlink(missing_ok=True)


if __name__ == "__main__":
    main()

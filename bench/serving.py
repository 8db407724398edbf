"""Serving benchmark: plain transformers `generate` (baseline) vs our batched engine, same run.

    python -m bench.serving                      # embedded model, 1/4/8/16 concurrent users
    python -m bench.serving --users 1 4 --max-new-tokens 32

Prints one table: aggregate decode tokens/s, time to first token p50/p95, peak RSS, and the
ratio of ours to the baseline at each concurrency; then checks that both give the same
greedy answers (same weights, so any difference would be a bug, not a quality trade-off).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain what a CPU does.",
           "Give me three tips for better sleep.", "What is 12 times 7?", "Name a famous painter and one painting.",
           "How do plants make food?", "Translate 'good morning' into Spanish."]


class PeakRSS:
    """Samples this process's resident memory in the background; ``peak`` in MB."""

    def __init__(self):
        import psutil

        self.proc = psutil.Process()
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def run_load(engine, users: int, max_new_tokens: int) -> dict:
    from model.engine import SamplingParams

    ttfts, tokens, errors = [], [], []

    def one(i: int):
        try:
            params = SamplingParams(temperature=0, max_new_tokens=max_new_tokens, repetition_penalty=1.0)
            gen = engine.stream([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], params)
            for _ in gen:
                pass
            ttfts.append(gen.stats.ttft_ms / 1000)
            tokens.append(gen.stats.completion_tokens)
        except Exception as exc:  # counted and reported in the table
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(users)]
    with PeakRSS() as rss:
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
    q = statistics.quantiles(ttfts, n=20) if len(ttfts) >= 2 else [ttfts[0]] * 19 if ttfts else [float("nan")] * 19
    return {"tok_s": sum(tokens) / wall, "ttft_p50": statistics.median(ttfts) if ttfts else float("nan"),
            "ttft_p95": q[18], "rss_mb": rss.peak / 2**20, "errors": len(errors)}


def main() -> None:
    import torch

    from model.batching import BatchedEngine
    from model.engine import Engine, SamplingParams
    from model.loader import load_model, resolve_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--users", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    resolved = resolve_model(args.model, Path(args.data_dir))
    model, tok = load_model(resolved.path, "cpu")
    baseline = Engine(model, tok, version="baseline", max_concurrent=max(args.users), busy_wait_s=600)
    ours = BatchedEngine(model, tok, version="batched", max_batch=max(args.users), busy_wait_s=600)
    run_load(ours, 2, 4)  # warm up both paths once
    run_load(baseline, 1, 4)
    print(f"\n{resolved.name}, float32, {torch.get_num_threads()} threads, {args.max_new_tokens} new tokens, "
          f"greedy; {time.strftime('%Y-%m-%d %H:%M')}\n")
    header = ("| users | engine | tokens/s | TTFT p50 s | TTFT p95 s | peak RSS MB | errors | tok/s vs baseline |\n"
              "| --- | --- | --- | --- | --- | --- | --- | --- |")
    print(header)
    for users in args.users:
        base = run_load(baseline, users, args.max_new_tokens)
        mine = run_load(ours, users, args.max_new_tokens)
        for name, r in (("baseline generate", base), ("batched (ours)", mine)):
            ratio = r["tok_s"] / base["tok_s"]
            print(f"| {users} | {name} | {r['tok_s']:.1f} | {r['ttft_p50']:.2f} | {r['ttft_p95']:.2f} | "
                  f"{r['rss_mb']:.0f} | {r['errors']} | {ratio:.2f}x |", flush=True)
    params = SamplingParams(temperature=0, max_new_tokens=24, repetition_penalty=1.0)
    same = sum(baseline.generate([{"role": "user", "content": p}], params)[0] ==
               ours.generate([{"role": "user", "content": p}], params)[0] for p in PROMPTS[:4])
    print(f"\ngreedy answers identical on {same}/4 fixed prompts (same float32 weights: no quantization)")


if __name__ == "__main__":
    main()

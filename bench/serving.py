"""Serving benchmark: the baseline, llama.cpp as its users run it, and our engines, in one run.

    python -m bench.serving                          # all engines, 1/4/8/16 concurrent users
    python -m bench.serving --users 1 16 --engines peer ours --max-new-tokens 32
    python -m bench.serving --skip-quality --skip-cold-start

Engines (same SmolLM2-135M-Instruct, same prompts, greedy):
  baseline    transformers ``generate``, float32, one call per request (threads)
  batched     our transformers engine with static batching, float32
  peer        llama-cpp-python's ``Llama`` on the shipped Q4_1 GGUF, one request at a time,
              as its own server runs it
  ours-q4_1   our llama.cpp engine (continuous batching) on the shipped Q4_1 GGUF
  ours        our llama.cpp engine on the Q8_0 GGUF we export (the default serving path)

Prints one table (aggregate tokens/s, time to first token p50/p95, peak RSS, ratio to the
baseline and to the peer), then quality next to speed: perplexity on a fixed held-out text
for float32 and each GGUF, and greedy answers to fixed prompts; then time to first token
turn by turn in one conversation with the prefix cache off and on; then cold start (a fresh
process, engine load to first token).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain what a CPU does.",
           "Give me three tips for better sleep.", "What is 12 times 7?", "Name a famous painter and one painting.",
           "How do plants make food?", "Translate 'good morning' into Spanish."]
REQUEST_IDS = itertools.count(1)  # next() on it is atomic in CPython: safe from the user threads
ENGINES = ("baseline", "batched", "peer", "ours-q4_1", "ours")


def request_prompt(index: int) -> str:
    """A fixed prompt made distinct at its start, so no engine gets a cached prompt for free
    (only the shared system prompt is common, as on a real server)."""
    return f"Request {next(REQUEST_IDS)}. {PROMPTS[index % len(PROMPTS)]}"


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


class LlamaPeer:
    """llama-cpp-python's high-level API behind one lock, as ``llama_cpp.server`` serves it."""

    def __init__(self, gguf: Path, threads: int):
        from llama_cpp import Llama

        self.llm = Llama(str(gguf), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
        self.lock = threading.Lock()

    def stream(self, messages, params):
        from model.engine import Generation, GenerationStats

        stats, cancel = GenerationStats(), threading.Event()

        def deltas():
            start = time.perf_counter()
            with self.lock:
                chunks = self.llm.create_chat_completion(
                    [{"role": "system", "content": "You are a helpful assistant."}, *messages], stream=True,
                    temperature=params.temperature, top_k=1, max_tokens=params.max_new_tokens,
                    repeat_penalty=params.repetition_penalty)
                for chunk in chunks:
                    text = chunk["choices"][0]["delta"].get("content") or ""
                    if text:
                        stats.completion_tokens += 1  # llama-cpp-python streams one token per chunk
                        if stats.ttft_ms is None:
                            stats.ttft_ms = (time.perf_counter() - start) * 1000
                        yield text
            stats.latency_ms = (time.perf_counter() - start) * 1000

        return Generation(deltas(), stats, cancel)

    def generate(self, messages, params):
        gen = self.stream(messages, params)
        for _ in gen:
            pass
        return gen.text, gen.stats


def run_load(engine, users: int, max_new_tokens: int) -> dict:
    """``users`` threads chat at once, each sending max(2, 16 // users) prompts one after another:
    a sustained load (new requests arrive while others decode), at least 16 answers per level."""
    from model.engine import SamplingParams

    ttfts, tokens, decode_rates, errors = [], [], [], []
    rounds = max(2, 16 // users)

    def one(i: int):
        for j in range(rounds):
            try:
                params = SamplingParams(temperature=0, max_new_tokens=max_new_tokens, repetition_penalty=1.0)
                gen = engine.stream([{"role": "user", "content": request_prompt(i + j * users)}], params)
                for _ in gen:
                    pass
                st = gen.stats
                ttfts.append(st.ttft_ms / 1000)
                tokens.append(st.completion_tokens)
                if st.completion_tokens > 1 and st.latency_ms > st.ttft_ms:
                    decode_rates.append((st.completion_tokens - 1) / ((st.latency_ms - st.ttft_ms) / 1000))
            except Exception as exc:  # counted and reported in the table
                errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(users)]
    before = dict(getattr(engine, "counters", {}))
    with PeakRSS() as rss:
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
    q = statistics.quantiles(ttfts, n=20) if len(ttfts) >= 2 else [ttfts[0]] * 19 if ttfts else [float("nan")] * 19
    after = getattr(engine, "counters", {})
    steps = {k: after[k] - before[k] for k in after}
    return {"steps": steps, "wall": wall, "tok_s": sum(tokens) / wall, "ttft_p50": statistics.median(ttfts) if ttfts else float("nan"),
            "ttft_p95": q[18], "rss_mb": rss.peak / 2**20, "errors": len(errors),
            "decode": statistics.median(decode_rates) if decode_rates else float("nan")}


def cold_start(engine: str, model_dir: Path, threads: int) -> float:
    """Seconds from a new Python process to the first streamed token (weights already converted)."""
    code = (
        "import time,sys; t0=float(sys.argv[1]);"
        "from model.loader import build_engine; from model.engine import SamplingParams;"
        f"e=build_engine(sys.argv[2], 'cold', kind='{engine}', threads={threads}, max_concurrent=16);"
        "g=e.stream([{'role':'user','content':'Hi'}], SamplingParams(temperature=0, max_new_tokens=4));"
        "next(iter(g)); print(time.time()-t0)")
    out = subprocess.run([sys.executable, "-c", code, str(time.time()), str(model_dir)], capture_output=True,
                         text=True, cwd=Path(__file__).resolve().parent.parent)
    try:  # the reading is printed before exit; how the process exits afterwards does not matter here
        return float(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise RuntimeError(f"cold start run failed: {out.stderr[-2000:]}") from None


def multi_turn(gguf: Path, threads: int, turns: int = 5) -> None:
    """Time to first token turn by turn in one growing conversation, prefix cache off vs on."""
    from model.engine import SamplingParams
    from model.llamacpp import LlamaCppEngine

    params = SamplingParams(temperature=0, max_new_tokens=64, repetition_penalty=1.0)
    question = "Here is some context about my garden: " + "tomatoes, beans and roses grow by the fence. " * 20
    rows = []
    for cache in (0, -1):
        engine = LlamaCppEngine(gguf, "multi-turn", max_batch=4, threads=threads, prefix_cache=cache)
        messages, ttfts, prompt_tokens = [], [], []
        for t in range(turns):
            messages.append({"role": "user", "content": question if t == 0 else f"Tell me more, part {t}."})
            reply, st = engine.generate(messages, params)
            messages.append({"role": "assistant", "content": reply})
            ttfts.append(st.ttft_ms / 1000)
            prompt_tokens.append(st.prompt_tokens)
        engine.close()
        rows.append((prompt_tokens, ttfts))
    print("\nOne conversation turn by turn (Q8_0, history re-sent each turn, 64 new tokens):\n\n"
          "| turn | prompt tokens | TTFT s, prefix cache off | TTFT s, on | speed-up |\n| --- | --- | --- | --- | --- |")
    for t in range(turns):
        off, on = rows[0][1][t], rows[1][1][t]
        print(f"| {t + 1} | {rows[0][0][t]} | {off:.2f} | {on:.2f} | {off / on:.1f}x |")


def reference(q41: Path, q8: Path, args, ours: dict) -> None:
    """llama.cpp's own batched generation (bench/llama_batched.py) at each load, next to ours."""
    from bench.llama_batched import LlamaBatched

    runners = {"Q4_1": LlamaBatched(q41, args.threads), "Q8_0": LlamaBatched(q8, args.threads)}
    print("\nllama.cpp's own batched generation (all prompts in one batch, every step decodes every running "
          "reply; no scheduler), same prompts, same threads:\n\n| users | llama.cpp batched Q4_1 tok/s | TTFT s "
          "| llama.cpp batched Q8_0 tok/s | TTFT s | ours Q8_0 vs batched Q4_1 | ours Q8_0 vs batched Q8_0 "
          "| ours Q4_1 vs batched Q4_1 |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
    for users in args.users:
        r = {}
        for name, runner in runners.items():  # as many answers as the load test: max(2, 16 // users) batches
            runs = [runner.run([request_prompt(i) for i in range(users)], args.max_new_tokens)
                    for _ in range(max(2, 16 // users))]
            r[name] = (sum(x["tokens"] for x in runs) / sum(x["wall"] for x in runs),
                       statistics.median(x["ttft"] for x in runs))
        ratio = lambda ours_name, ref: f"{ours[users][ours_name] / r[ref][0]:.2f}x" if ours_name in ours.get(users, {}) else "-"
        print(f"| {users} | {r['Q4_1'][0]:.1f} | {r['Q4_1'][1]:.2f} | {r['Q8_0'][0]:.1f} | {r['Q8_0'][1]:.2f} | "
              f"{ratio('ours', 'Q4_1')} | {ratio('ours', 'Q8_0')} | {ratio('ours-q4_1', 'Q4_1')} |", flush=True)
    for runner in runners.values():
        runner.close()


def main() -> None:
    import torch

    from model.batching import BatchedEngine
    from model.engine import Engine, SamplingParams
    from model.gguf_export import ensure_gguf
    from model.llamacpp import LlamaCppEngine
    from model.loader import embedded_gguf_path, load_model, resolve_model
    from model.perplexity import heldout_texts, perplexity_gguf, perplexity_hf

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--users", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for every engine")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-cold-start", action="store_true")
    parser.add_argument("--skip-multi-turn", action="store_true")
    parser.add_argument("--skip-reference", action="store_true", help="skip llama.cpp's own batched generation")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    resolved = resolve_model("embedded", Path(args.data_dir))
    q8 = ensure_gguf(resolved.path, "q8_0")
    q41 = embedded_gguf_path()
    model, tok = load_model(resolved.path, "cpu")
    top = max(args.users)
    factories = {
        "baseline": lambda: Engine(model, tok, version="baseline", max_concurrent=top, busy_wait_s=900),
        "batched": lambda: BatchedEngine(model, tok, version="batched", max_batch=top, busy_wait_s=900),
        "peer": lambda: LlamaPeer(q41, args.threads),
        "ours-q4_1": lambda: LlamaCppEngine(q41, "ours-q4_1", max_batch=top, threads=args.threads, busy_wait_s=900),
        "ours": lambda: LlamaCppEngine(q8, "ours", max_batch=top, threads=args.threads, busy_wait_s=900),
    }
    labels = {"baseline": "transformers generate f32 (baseline)", "batched": "transformers batched f32 (ours)",
              "peer": "llama-cpp-python Llama Q4_1 (peer)", "ours-q4_1": "llama.cpp continuous batching Q4_1 (ours)",
              "ours": "llama.cpp continuous batching Q8_0 (ours, default)"}
    engines = {name: factories[name]() for name in args.engines}
    for e in engines.values():  # warm up every path once
        run_load(e, 1, 4)
    print(f"\n{resolved.name}, {args.threads} threads, {args.max_new_tokens} new tokens, greedy, "
          f"{time.strftime('%Y-%m-%d %H:%M')}\n")
    print("| users | engine | tokens/s (all users) | decode tok/s per user | TTFT p50 s | TTFT p95 s | peak RSS MB "
          "| errors | tokens/s vs baseline | vs peer |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    step_rows, ours = [], {}
    for users in args.users:
        results = {name: run_load(e, users, args.max_new_tokens) for name, e in engines.items()}
        ours[users] = {name: results[name]["tok_s"] for name in ("ours-q4_1", "ours") if name in results}
        for name, r in results.items():
            base = results.get("baseline", {}).get("tok_s")
            peer = results.get("peer", {}).get("tok_s")
            vs_base = f"{r['tok_s'] / base:.2f}x" if base else "-"
            vs_peer = f"{r['tok_s'] / peer:.2f}x" if peer else "-"
            print(f"| {users} | {labels[name]} | {r['tok_s']:.1f} | {r['decode']:.1f} | {r['ttft_p50']:.2f} | "
                  f"{r['ttft_p95']:.2f} | "
                  f"{r['rss_mb']:.0f} | {r['errors']} | {vs_base} | {vs_peer} |", flush=True)
            if r["steps"].get("steps"):
                step_rows.append((users, name, r))
    if step_rows:  # where our scheduler's time went: is llama.cpp busy, and with how many rows?
        print("\nOur llama.cpp scheduler, per load level:\n\n| users | engine | forward passes | decode rows per pass "
              "| prompt tokens fed | wall in llama_decode | wall sampling + streaming | decode rows per second "
              "of llama_decode |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
        for users, name, r in step_rows:
            c = r["steps"]
            print(f"| {users} | {name} | {c['steps']} | {c['decode_rows'] / c['steps']:.1f} | {c['prefill_tokens']} | "
                  f"{100 * c['decode_s'] / r['wall']:.0f}% | {100 * c['sample_s'] / r['wall']:.0f}% | "
                  f"{c['decode_rows'] / c['decode_s']:.0f} |")

    if not args.skip_reference:
        reference(q41, q8, args, ours)

    if not args.skip_quality:
        texts = heldout_texts()
        ppl = {"float32 (transformers)": perplexity_hf(model, tok, texts),
               "Q4_1 GGUF (shipped)": perplexity_gguf(q41, texts, tok, args.threads),
               "Q8_0 GGUF (ours)": perplexity_gguf(q8, texts, tok, args.threads)}
        ref = ppl["float32 (transformers)"]
        print(f"\nPerplexity on {len(texts)} held-out HH texts (same token ids):\n\n| weights | perplexity | vs float32 |\n"
              "| --- | --- | --- |")
        for name, value in ppl.items():
            print(f"| {name} | {value:.3f} | {100 * (value / ref - 1):+.2f}% |")
        params = SamplingParams(temperature=0, max_new_tokens=24, repetition_penalty=1.0)
        f32 = Engine(model, tok, version="f32")
        ours = engines.get("ours") or factories["ours"]()
        print("\nGreedy answers, 24 tokens (float32 transformers vs our Q8_0 llama.cpp):\n")
        same = 0
        for p in PROMPTS[:4]:
            a = f32.generate([{"role": "user", "content": p}], params)[0]
            b = ours.generate([{"role": "user", "content": p}], params)[0]
            same += a == b
            print(f"- {p!r}\n  f32:  {a!r}\n  q8_0: {b!r}  {'(same)' if a == b else '(differs)'}")
        print(f"\nidentical on {same}/4 prompts")

    if not args.skip_multi_turn:
        multi_turn(q8, args.threads)

    if not args.skip_cold_start:
        for e in engines.values():
            if hasattr(e, "close"):
                e.close()
        print("\nCold start, new process to first token (weights already converted):\n\n| engine | seconds |\n"
              "| --- | --- |")
        for kind in ("llamacpp", "batched"):
            print(f"| {kind} | {cold_start(kind, resolved.path, args.threads):.1f} |", flush=True)


if __name__ == "__main__":
    main()

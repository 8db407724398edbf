"""The remote engine (CHAT_ENGINE=openai) against the engine it fronts, one and two replicas.

    python -m bench.remote                     # the embedded model, 8 requests per case
    python -m bench.remote --requests 16 --tokens 64

Every case in one run, the same prompts, seeds and reply length (``--tokens``, the server
stops there), on llama-cpp-python's OpenAI server (``python -m llama_cpp.server``):
  1. in process: model/llamacpp.py, what one machine serves by default (reference);
  2. direct: one user streaming straight from one server over HTTP (the overhead baseline);
  3. remote engine: the same user through model/remote.py to the same server (ratio to the
     mean of 2 and 2b, the direct case run again afterwards to show drift);
  4. concurrent users through the remote engine, one replica with all cores;
  5. the same users over two replicas, the cores split between them.
Reported: tokens per second of reply (per user in 1-3, total in 4-5) and time to first
token p50/p95. On a 2-core machine two replicas share the same cores, so case 5 cannot beat
case 4 by much: it measures the balancer's cost and that both replicas work, not scale.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain what a CPU does.",
           "Give three tips for sleeping well.", "Name a famous painter and one painting.",
           "What is 12 times 7? Explain.", "Describe a rainy day.", "How do plants make food?"]


def _p95(xs):
    return sorted(xs)[max(0, int(round(0.95 * len(xs))) - 1)] if xs else float("nan")


_CLIENT = None


def direct_stream(url: str, messages: list[dict], tokens: int, seed: int) -> tuple[int, float, float]:
    """(chunks, ttft_s, total_s) reading the server's SSE stream with nothing of ours in between
    (one kept-alive connection, as the remote engine keeps its own)."""
    import httpx

    global _CLIENT
    _CLIENT = _CLIENT or httpx.Client(timeout=300)
    from model.chat_prompt import with_system
    from model.engine import DEFAULT_SYSTEM_PROMPT

    body = {"messages": with_system(messages, DEFAULT_SYSTEM_PROMPT), "stream": True, "max_tokens": tokens,
            "temperature": 0.3, "top_p": 0.9, "top_k": 50, "repeat_penalty": 1.1, "seed": seed}
    start, first, n = time.perf_counter(), None, 0
    with _CLIENT.stream("POST", f"{url}/chat/completions", json=body) as resp:
        for line in resp.iter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            for choice in json.loads(line[5:]).get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    first = first or time.perf_counter() - start
                    n += 1
    return n, first or float("nan"), time.perf_counter() - start


def engine_stream(engine, messages, tokens: int, seed: int) -> tuple[int, float, float]:
    from model.engine import SamplingParams

    start, first = time.perf_counter(), None
    gen = engine.stream(messages, SamplingParams(max_new_tokens=tokens, seed=seed))
    for _ in gen:
        first = first or time.perf_counter() - start
    return gen.stats.completion_tokens, first or float("nan"), time.perf_counter() - start


def one_user(call, requests: int) -> dict:
    runs = [call([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], i) for i in range(requests)]
    tokens, seconds = sum(r[0] for r in runs), sum(r[2] - r[1] for r in runs)
    ttfts = [r[1] * 1000 for r in runs]
    return {"tok_s": tokens / seconds, "ttft_p50": statistics.median(ttfts), "ttft_p95": _p95(ttfts)}


def many_users(engine, users: int, requests: int, tokens: int) -> dict:
    results, lock = [], threading.Lock()

    def user(u):
        for i in range(u, requests, users):
            r = engine_stream(engine, [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], tokens, i)
            with lock:
                results.append(r)

    start = time.perf_counter()
    threads = [threading.Thread(target=user, args=(u,)) for u in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttfts = [r[1] * 1000 for r in results]
    return {"tok_s": sum(r[0] for r in results) / wall, "ttft_p50": statistics.median(ttfts), "ttft_p95": _p95(ttfts)}


def main() -> None:
    from model.llama_server import llama_servers
    from model.llamacpp import LlamaCppEngine
    from model.remote import RemoteEngine
    from model.weights import embedded_gguf_path

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--users", type=int, default=4, help="concurrent users in cases 4 and 5")
    args = parser.parse_args()
    cores = os.cpu_count() or 2
    gguf = embedded_gguf_path()
    rows = []
    local = LlamaCppEngine(gguf, "in-process", max_batch=args.users, threads=cores, context_tokens=1024,
                           prefix_cache=0)
    rows.append(("1. in process (llama.cpp, 1 user)", one_user(lambda m, s: engine_stream(local, m, args.tokens, s),
                                                             args.requests)))
    local.close()
    with llama_servers(gguf, n=1, threads=cores, n_ctx=1024) as (server,):
        remote = RemoteEngine([server.url], "remote")
        one_user(lambda m, s: direct_stream(server.url, m, 4, s), 2)  # warm the server up
        rows.append(("2. direct HTTP to one server (1 user)",
                     one_user(lambda m, s: direct_stream(server.url, m, args.tokens, s), args.requests)))
        rows.append(("3. remote engine, same server (1 user)",
                     one_user(lambda m, s: engine_stream(remote, m, args.tokens, s), args.requests)))
        rows.append(("2b. direct HTTP again (drift check)",
                     one_user(lambda m, s: direct_stream(server.url, m, args.tokens, s), args.requests)))
        rows.append((f"4. remote engine, 1 replica x {cores} threads ({args.users} users)",
                     many_users(remote, args.users, args.requests * 2, args.tokens)))
        remote.close()
    with llama_servers(gguf, n=2, threads=max(1, cores // 2), n_ctx=1024) as pair:
        remote = RemoteEngine([s.url for s in pair], "remote")
        rows.append((f"5. remote engine, 2 replicas x {max(1, cores // 2)} threads ({args.users} users)",
                     many_users(remote, args.users, args.requests * 2, args.tokens)))
        served = [r.served for r in remote.replicas]
        remote.close()
    print(f"\n{args.requests} requests x {args.tokens} tokens per single-user case; {cores} cores\n")
    print("| case | tokens/s | TTFT p50 ms | TTFT p95 ms |\n| --- | --- | --- | --- |")
    for name, r in rows:
        print(f"| {name} | {r['tok_s']:.1f} | {r['ttft_p50']:.0f} | {r['ttft_p95']:.0f} |")
    d = {k: (rows[1][1][k] + rows[3][1][k]) / 2 for k in rows[1][1]}  # direct, before and after
    e = rows[2][1]
    print(f"\nremote engine vs direct: tokens/s x{e['tok_s'] / d['tok_s']:.3f}, "
          f"TTFT p50 {e['ttft_p50'] - d['ttft_p50']:+.1f} ms")
    print(f"two replicas vs one: total tokens/s x{rows[5][1]['tok_s'] / rows[4][1]['tok_s']:.2f}; "
          f"requests per replica {served}")


if __name__ == "__main__":
    main()

"""Load test over loopback: simulated users chat through the OpenAI-compatible API (streaming).

    python -m bench.load                                # 30 users x 60 s on a fast fake engine,
                                                        # then 16 users x 60 s on the real model
    python -m bench.load --fake-users 30 --fake-seconds 20 --real-users 4 --real-seconds 30
    python -m bench.load --fake-users 0 --engine batched  # the transformers engine instead

Reports requests, lost messages (sent but not in the database), server errors, refusals
(busy / rate limit, which are answers, not errors) and time to first token p50/p95.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx


def simulate(base: str, users: int, seconds: float, max_tokens: int = 24) -> dict:
    """``users`` threads each send a message, read the streamed reply, and send the next until
    ``seconds`` are over; ``tokens`` sums the replies' usage.completion_tokens."""
    sent, ok, refused, errors, ttfts, tokens = [0], [0], [0], [0], [], [0]
    lock = threading.Lock()
    stop_at = time.time() + seconds

    def user(i: int):
        with httpx.Client(timeout=120) as client:
            n = 0
            while time.time() < stop_at:
                n += 1
                body = {"messages": [{"role": "user", "content": f"user {i} message {n}: tell me something"}],
                        "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
                start = time.perf_counter()
                first = None
                with lock:
                    sent[0] += 1
                try:
                    with client.stream("POST", base + "/v1/chat/completions", json=body) as res:
                        if res.status_code in (400, 429):
                            with lock:
                                refused[0] += 1
                            time.sleep(0.5)
                            continue
                        if res.status_code >= 500:
                            with lock:
                                errors[0] += 1
                            continue
                        for line in res.iter_lines():
                            if line.startswith("data: {") and first is None and '"content": "' in line \
                                    and '"content": ""' not in line:
                                first = time.perf_counter() - start
                            if line.startswith("data: {"):
                                chunk = json.loads(line[6:])
                                with lock:
                                    errors[0] += "error" in chunk
                                    tokens[0] += (chunk.get("usage") or {}).get("completion_tokens", 0)
                    with lock:
                        ok[0] += 1
                        if first is not None:
                            ttfts.append(first)
                except httpx.HTTPError:
                    with lock:
                        errors[0] += 1

    threads = [threading.Thread(target=user, args=(i,)) for i in range(users)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    q = statistics.quantiles(ttfts, n=20) if len(ttfts) >= 2 else [float("nan")] * 19
    return {"sent": sent[0], "completed": ok[0], "refused": refused[0], "errors": errors[0], "tokens": tokens[0], "elapsed": elapsed,
            "ttft_p50": statistics.median(ttfts) if ttfts else float("nan"), "ttft_p95": q[18]}


def run_case(name: str, engine, users: int, seconds: float, moderation: str = "auto") -> None:
    from sqlalchemy import func, select

    from app.service import ChatService
    from app.settings import Settings
    from feedback.db import make_engine, make_session_factory, migrate
    from feedback.models import Message
    from bench.inprocess import serve

    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'load.db'}"
        migrate(url)
        factory = make_session_factory(make_engine(url))
        settings = Settings(data_dir=tmp, database_url=url, messages_per_minute=0, max_queue=256,
                            moderation_backends=moderation)
        with serve(ChatService(engine, factory, settings)) as base:
            r = simulate(base, users, seconds)
        with factory() as s:
            logged = s.scalar(select(func.count(Message.id)).where(Message.role == "user")) or 0
    lost = r["completed"] - logged if logged < r["completed"] else 0
    print(f"| {name} | {users} | {seconds:.0f} | {r['sent']} | {r['completed']} | {lost} | {r['errors']} | "
          f"{r['refused']} | {r['ttft_p50']:.3f} | {r['ttft_p95']:.3f} |", flush=True)


def main() -> None:
    from model.loader import build_engine, resolve_model
    from bench.inprocess import ScriptedEngine

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fake-users", type=int, default=30)
    parser.add_argument("--fake-seconds", type=float, default=60)
    parser.add_argument("--real-users", type=int, default=16)
    parser.add_argument("--real-seconds", type=float, default=60)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--engine", default="auto", help="auto (llama.cpp on CPU), llamacpp, batched or simple")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--moderation", default="auto",
                        help="moderation backends for the real-model case (auto = with detoxify; 'rules' = cheap)")
    args = parser.parse_args()
    print("| engine | users | seconds | requests | completed | lost | server errors | refused | TTFT p50 s | "
          "TTFT p95 s |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    if args.fake_users:
        run_case("fake (instant)", ScriptedEngine("a fast fake reply with a few words"), args.fake_users,
                 args.fake_seconds)
    if args.real_users:
        import torch

        torch.set_num_threads(args.threads)
        resolved = resolve_model("embedded", Path(args.data_dir))
        engine = build_engine(resolved.path, resolved.name, kind=args.engine, device="cpu", max_concurrent=16,
                              threads=args.threads)
        run_case(f"{resolved.name} ({engine.backend}, moderation {args.moderation})", engine, args.real_users,
                 args.real_seconds, args.moderation)


if __name__ == "__main__":
    main()

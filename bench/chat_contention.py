"""Chat while the machine does background work: the candidate worker, and a retrain.

    python -m bench.chat_contention                         # both parts, 40 s per condition
    python -m bench.chat_contention --part retrain --seconds 60
    python -m bench.chat_contention --part worker

The serving stack in this process (ChatService on the embedded model's llama.cpp engine, behind
the OpenAI-compatible API on loopback) on a fresh database holding the shared HH sample's 600
pairs (preference data for the retrain, prompts for the worker). Simulated users stream replies
(bench.load.simulate: 64 tokens each, the next message as soon as a reply ends). Conditions, in
one run so the ratios share the machine's state:

- worker: one user, then 4, with no candidate worker, then with a worker that always has work
  (its lookahead set beyond the pool: the most it can ever compete). It waits for chat to be
  idle before each candidate (app.candidates), but a reply that starts during a candidate shares
  the batch with it.
- retrain: 4 users with no retrain, then beside a real retrain started as Admin > Retrain starts
  it (TrainingControl.start), measured once it trains (past the data snapshot: SFT on the imported
  pairs' best replies): as the app ran it before (nice 0, never waiting), at nice 19 only, and as it runs now
  (nice 19, and waiting between training steps while a reply streams: training.chat_busy).

Reported per condition: replies, tokens/s over all users, time to first token p50/p95, and the
ratio to the no-background row of its part. Run with the machine otherwise idle.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

from bench.load import simulate

HH = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "hh_harmless_sample.jsonl"
HEADER = ("| part | condition | users | replies | tokens/s | ratio | TTFT p50 s | TTFT p95 s | p95 ratio |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def row(part: str, name: str, users: int, seconds: float, r: dict, base: dict | None) -> dict:
    # Over the real window: replies started before the deadline are let finish.
    tps = r["tokens"] / r["elapsed"]
    ratio = f"x{tps / max(1e-9, base['tokens'] / base['elapsed']):.2f}" if base else "1.00 (baseline)"
    p95 = f"x{r['ttft_p95'] / base['ttft_p95']:.2f}" if base else "1.00"
    print(f"| {part} | {name} | {users} | {r['completed']} | {tps:.1f} | {ratio} | {r['ttft_p50']:.3f} | "
          f"{r['ttft_p95']:.3f} | {p95} |", flush=True)
    return r


def worker_part(service, base_url: str, seconds: float, max_tokens: int) -> None:
    from app.candidates import CandidateWorker

    for users in (1, 4):
        idle = row("worker", "no candidate worker", users, seconds, simulate(base_url, users, seconds, max_tokens), None)
        worker = CandidateWorker(service, k=service.settings.ranking_candidates, ahead=10**6, prioritize=False)
        stop = threading.Event()

        def busy():
            while not stop.is_set() and worker.run_once() > 0:
                pass

        thread = threading.Thread(target=busy, daemon=True)
        thread.start()
        time.sleep(3)  # the worker is mid-candidate when the first message arrives
        row("worker", "worker always busy", users, seconds, simulate(base_url, users, seconds, max_tokens), idle)
        worker.stop()
        stop.set()
        thread.join(timeout=120)


RETRAIN_CASES = [  # (condition, CHAT_RETRAIN_NICE, retrain settings)
    ("retrain, nice 0, no pauses (before)", 0, {"yield_to_chat_s": 0}),
    ("retrain, nice 19, no pauses", 19, {"yield_to_chat_s": 0}),
    ("retrain, nice 19, pauses while chat streams (default)", 19, {}),
]


def retrain_part(service, base_url: str, seconds: float, max_tokens: int) -> None:
    from app.training_control import TrainingControl
    from feedback import training_repo
    from feedback.db import session_scope

    idle = row("retrain", "no retrain", 4, seconds, simulate(base_url, 4, seconds, max_tokens), None)
    for name, nice, config in RETRAIN_CASES:
        service.settings.retrain_nice = nice
        control = TrainingControl(service)
        run_id = control.start("local", config)
        deadline = time.time() + 600
        while True:  # measured once the run trains: any stage after the data snapshot (stage 1)
            with session_scope(service.session_factory) as s:
                run = training_repo.get_run(session=s, run_id=run_id)
                stage, status = run.stage or "", run.status
            if int(stage.split("/")[0] or 0) >= 2 or status not in training_repo.ACTIVE_STATUSES \
                    or time.time() > deadline:
                break
            time.sleep(0.5)
        if status not in training_repo.ACTIVE_STATUSES:
            raise SystemExit(f"the retrain ended before it could be measured ({status}); see its log")
        time.sleep(5)  # well into its first training steps
        row("retrain", f"{name} [{stage}]", 4, seconds, simulate(base_url, 4, seconds, max_tokens), idle)
        control.cancel("local", run_id)
        control._procs[run_id].wait(timeout=120)


def main() -> None:
    from app.service import ChatService
    from app.settings import Settings, engine_options
    from bench.inprocess import serve
    from feedback.db import make_engine, make_session_factory, migrate, session_scope
    from feedback.importer import import_file
    from model.loader import build_engine, resolve_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["worker", "retrain", "both"], default="both")
    parser.add_argument("--seconds", type=float, default=40)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--pairs", type=Path, default=HH, help="preference JSONL to import (the retrain's data)")
    parser.add_argument("--model-cache", default="data", help="where the embedded model's files are unpacked")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'chat.db'}"
        migrate(url)
        factory = make_session_factory(make_engine(url))
        with session_scope(factory) as s:
            import_file(session=s, path=args.pairs)
        resolved = resolve_model("embedded", Path(args.model_cache))
        settings = Settings(data_dir=tmp, database_url=url, messages_per_minute=0, max_queue=256)
        engine = build_engine(str(resolved.path), resolved.name, **engine_options(settings))  # as the app builds it
        service = ChatService(engine, factory, settings)
        with session_scope(factory) as s:  # the retrain's base version, as the app registers it at start
            from feedback import training_repo

            training_repo.ensure_base_version(session=s, name=resolved.name, path=str(resolved.path))
        print(HEADER, flush=True)
        with serve(service) as base_url:
            if args.part in ("worker", "both"):
                worker_part(service, base_url, args.seconds, args.max_tokens)
            if args.part in ("retrain", "both"):
                retrain_part(service, base_url, args.seconds, args.max_tokens)


if __name__ == "__main__":
    main()

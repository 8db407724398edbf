"""What a blind A/B trial costs the serving path: memory of a second version, and TTFT of everyone else.

    python -m bench.ab_serving                       # 4 users, 40 s per case, the embedded model
    python -m bench.ab_serving --users 4 --seconds 20

Four cases in one run, each with the same simulated users sending chat turns one after
another through the real ChatService (llama.cpp engines, moderation off, SQLite):
  1. no trial (the baseline);
  2. a trial loaded but on no turns (share 0): the candidate's engine only sits in memory;
  3. a trial on ``--share`` of turns: those turns are side-by-side (two replies at once), the
     candidate's engine yielding to the serving engine's first tokens and running at a lower
     CPU priority (``CHAT_TRIAL_NICE``), as the app builds it;
  4. the same at the serving engine's priority (``CHAT_TRIAL_NICE=0``);
  5. the same, not yielding either (``CHAT_TRIAL_YIELDS=0``: the first trial engine).
TTFT is measured on the turns that are not side-by-side (the users a trial must not slow
down), as p50/p95 and as a ratio to case 1, with a bootstrap 95% interval of that ratio
(both cases' turns resampled: a p95 of ~100 turns is noisy). Memory is the process's resident set after
loading the serving engine and after loading the candidate (a copy of the weights in its own
directory, as a retrained version has): a trial adds one version's weights and cache, once,
however many users there are.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def run_case(service, users: int, seconds: float, share: float) -> dict:
    from model.engine import SamplingParams

    params = SamplingParams(max_new_tokens=32, temperature=0.7, seed=0)
    ttfts, ab_ttfts, lock = [], [], threading.Lock()
    stop_at = time.time() + seconds
    rng = random.Random(0)

    def user(i: int):
        n = 0
        while time.time() < stop_at:
            n += 1
            text = f"user {i} message {n}: tell me something about the sea"
            with lock:
                two = share > 0 and rng.random() < share
            start = time.perf_counter()
            sender = service.side_by_side.send if two else service.send
            first = None
            for up in sender(f"u{i}", text, None, params):
                if first is None and (getattr(up, "text", "") or getattr(up, "left", "") or getattr(up, "right", "")):
                    first = time.perf_counter() - start
            with lock:
                (ab_ttfts if two else ttfts).append(first if first is not None else float("nan"))

    threads = [threading.Thread(target=user, args=(i,)) for i in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    good = sorted(x for x in ttfts if x == x)
    return {"turns": len(ttfts), "ab_turns": len(ab_ttfts), "p50": statistics.median(good) if good else float("nan"),
            "p95": p95(good), "ttfts": good}


def p95(values: list[float]) -> float:
    """Nearest-rank 95th percentile (nan for no values)."""
    good = sorted(values)
    return good[round(0.95 * (len(good) - 1))] if good else float("nan")


def ratio_interval(case: list[float], base: list[float], draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Bootstrap 95% interval of p95(case) / p95(base), each resampled with replacement."""
    if not case or not base:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    ratios = sorted(p95(rng.choices(case, k=len(case))) / p95(rng.choices(base, k=len(base))) for _ in range(draws))
    return ratios[int(0.025 * draws)], ratios[int(0.975 * draws) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=40)
    parser.add_argument("--share", type=float, default=0.25, help="share of turns that are side by side in case 3")
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--trial-threads", type=int, default=None, help="override CHAT_TRIAL_THREADS (default 1)")
    args = parser.parse_args()

    from app.service import ChatService
    from app.settings import Settings, engine_options, trial_engine_options
    from feedback import training_repo
    from feedback import trial_repo
    from feedback.db import make_engine, make_session_factory, migrate, session_scope
    from model.loader import build_engine
    from model.weights import resolve_model

    work = Path(tempfile.mkdtemp(prefix="bench-ab-"))
    url = f"sqlite:///{work / 'bench.db'}"
    migrate(url)
    settings = Settings(data_dir=str(work), database_url=url, messages_per_minute=0)
    if args.trial_threads is not None:
        settings.trial_threads = args.trial_threads
    base = resolve_model(args.model, Path("data"))
    cand_dir = work / "candidate"
    shutil.copytree(base.path, cand_dir)  # its own files (nothing shared in the page cache), as a new version has
    factory = make_session_factory(make_engine(url))
    with session_scope(factory) as s:
        b = training_repo.ensure_base_version(session=s, name=base.name, path=str(base.path))
        c = training_repo.add_version(session=s, name="candidate", path=str(cand_dir), parent_id=b.id, stage="ppo",
                              metrics={}, config={}, snapshot_id=None, training_run_id=None)
        cand_id = c.id
    before = rss_mb()
    engine = build_engine(base.path, base.name, **engine_options(settings))
    service = ChatService(engine, factory, settings)
    run_case(service, 1, 3, 0)  # warm-up
    one = rss_mb()
    results = {"no trial": run_case(service, args.users, args.seconds, 0)}
    def pending() -> int:  # as app/training_control.py wires the candidate to the serving engine
        return engine.first_tokens_pending()

    candidate = build_engine(cand_dir, "candidate", **trial_engine_options(settings, args.share), yields_to=pending)
    with session_scope(factory) as s:
        trial_id = trial_repo.start_trial(session=s, candidate_version_id=cand_id, share=1.0, started_by="bench").id
    service.side_by_side.start(trial_id, candidate, 1.0)
    run_case(service, 1, 3, 1.0)  # warm the candidate too
    os.sync()  # the candidate's GGUF was just written: its write-back must not land in the next case
    two = rss_mb()
    results["trial loaded, share 0"] = run_case(service, args.users, args.seconds, 0)
    results[f"trial on {args.share:.0%} of turns, candidate yields (default)"] = run_case(
        service, args.users, args.seconds, args.share)
    yielded_s = candidate.counters["yield_s"]
    for name, options in (("same, candidate at the serving priority (CHAT_TRIAL_NICE=0)", {"yields_to": pending}),
                          ("same, candidate neither yields nor runs at a lower priority", {})):
        service.side_by_side.stop()
        other = build_engine(cand_dir, "candidate", **{**trial_engine_options(settings, args.share), "nice": 0},
                             **options)
        service.side_by_side.start(trial_id, other, 1.0)
        run_case(service, 1, 3, 1.0)
        results[name] = run_case(service, args.users, args.seconds, args.share)

    slots = trial_engine_options(settings, args.share)["max_concurrent"]
    print(f"\nresident memory: before engines {before:.0f} MB, serving one version {one:.0f} MB "
          f"({settings.max_concurrent} slots), with the candidate loaded {two:.0f} MB "
          f"(+{two - one:.0f} MB for {slots} slots, {settings.trial_threads or 'all'} thread(s); "
          f"x{two / one:.2f} of one version); the yielding candidate paused {yielded_s:.1f} s in all\n")
    baseline = results["no trial"]
    print("| case | non-trial turns | side-by-side turns | TTFT p50 s | TTFT p95 s | p95 vs no trial (95%) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        lo, hi = ratio_interval(r["ttfts"], baseline["ttfts"])
        print(f"| {name} | {r['turns']} | {r['ab_turns']} | {r['p50']:.3f} | {r['p95']:.3f} "
              f"| {r['p95'] / baseline['p95']:.2f}x [{lo:.2f}, {hi:.2f}] |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

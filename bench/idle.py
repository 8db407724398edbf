"""What the app costs while nobody uses it, with hundreds of imported prompts waiting to be ranked.

    python -m bench.idle                          # the shared HH sample (600 pairs), 60 s windows
    python -m bench.idle --seconds 30 --file my_pairs.jsonl

The real app (``python -m app.main``, the embedded model on llama.cpp, its candidate worker)
in a subprocess on a fresh data dir, measured by its CPU time over a window:
  0. empty, with Gradio's own queue polling (every 1 ms: the baseline);
  1. empty: no tasks at all (timers, the worker's polling, our 10 ms queue polling);
  2. the pairs imported (``python -m feedback.importer``): the worker prepares the lookahead
     (3 tasks x 4 candidates, 12 tasks once the preference head is fitted), then the window
     starts once no candidate has been made for 30 s;
Reported: CPU % of one core averaged over the window (100% = one core busy), and the
candidates made during it (0 expected: the worker prepares only what annotators open next).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def cpu_percent(pid: int, seconds: float) -> float:
    import psutil

    proc = psutil.Process(pid)
    before = proc.cpu_times()
    time.sleep(seconds)
    after = proc.cpu_times()
    return 100 * ((after.user - before.user) + (after.system - before.system)) / seconds


def candidates(url: str) -> int:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.connect() as conn:
        n = conn.execute(text("SELECT count(*) FROM candidates")).scalar()
    engine.dispose()
    return int(n)


def main() -> None:
    from bench.inprocess import ROOT, app_process

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--file", type=Path, default=ROOT.parent / "shared" / "data" / "hh_harmless_sample.jsonl")
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    data = Path(tempfile.mkdtemp(prefix="bench-idle-"))
    url = f"sqlite:///{data / 'chat.db'}"
    rows = []
    with app_process(data, "embedded", timeout=300, CHAT_QUEUE_POLL_S=0.001) as (_, proc):
        time.sleep(5)  # start-up work (conversion, first moderation load) is not idle time
        rows.append(("empty database, Gradio's own queue polling (1 ms)", cpu_percent(proc.pid, args.seconds), 0))
    with app_process(data, "embedded", timeout=300) as (_, proc):
        time.sleep(5)
        rows.append(("empty database (CHAT_QUEUE_POLL_S=0.01, the default)", cpu_percent(proc.pid, args.seconds), 0))
        out = subprocess.run([sys.executable, "-m", "feedback.importer", str(args.file), "--url", url], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout.strip()
        print(out)
        # The lookahead is 3 tasks until the preference head exists, then 12 (10 imported pairs are
        # enough for it): full once the count stops growing for three worker rounds (10 s each).
        start, last, still_since = time.monotonic(), -1, time.monotonic()
        while time.monotonic() - still_since < 30 and time.monotonic() - start < 900:
            time.sleep(2)
            if (n := candidates(url)) != last:
                last, still_since = n, time.monotonic()
        ready_s = still_since - start
        made = candidates(url)
        rows.append((f"{out.split(' pairs')[0].replace('imported ', '')} imported pairs, lookahead ready",
                     cpu_percent(proc.pid, args.seconds), candidates(url) - made))
    print(f"\nlookahead full ({made} candidates) {ready_s:.0f} s after the import\n")
    print(f"| case | CPU % of one core over {args.seconds:.0f} s | candidates made in the window |\n| --- | --- | --- |")
    for name, cpu, n in rows:
        print(f"| {name} | {cpu:.1f} | {n} |")


if __name__ == "__main__":
    main()

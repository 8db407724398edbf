"""Reward-model accuracy on a preference file, trained and split exactly as the default retrain does.

    python -m bench.reward_model ../shared/data/hh_harmless_sample.jsonl
    python -m bench.reward_model prefs.jsonl --retrain-json '{"rm_epochs": 2}'   # a setting to compare
    python -m bench.reward_model prefs.jsonl --compare-grouping   # pair by pair, then prompt groups

The file goes through the product's importer into a fresh SQLite database, the retrain's
snapshot splits it by prompt (held-out share and caps from RetrainConfig), and the reward stage
trains on the embedded model. Prints held-out pairwise accuracy with its 95% interval, how many
long pairs were left-truncated, and the time the stage took. ``--compare-grouping`` trains the
same split twice in one run: pair by pair (as TRL's RewardTrainer does, each candidate scored
once per pair it is in) and on prompt groups (``rm_group_by_prompt``: each candidate once a step).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from feedback.db import make_engine, make_session_factory, migrate, session_scope
from feedback.importer import import_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", type=Path)
    parser.add_argument("--retrain-json", default="{}", help="RetrainConfig overrides (default: none)")
    parser.add_argument("--compare-grouping", action="store_true",
                        help="train pair by pair and on prompt groups, on the same split in one run")
    parser.add_argument("--out", type=Path, default=Path("data/bench-reward"))
    args = parser.parse_args()

    from model.loader import resolve_model
    from training.config import RetrainConfig
    from training.data import take_snapshot
    from training.reward import run_reward

    cfg = RetrainConfig.from_dict(json.loads(args.retrain_json)).validate()
    args.out.mkdir(parents=True, exist_ok=True)
    db = (args.out / "bench.db").resolve()
    db.unlink(missing_ok=True)
    url = f"sqlite:///{db}"
    migrate(url)
    factory = make_session_factory(make_engine(url))
    with session_scope(factory) as s:
        print(import_file(session=s, path=args.file, add_tasks=False).summary())
    snap = take_snapshot(session_factory=factory, out_dir=args.out / "data", heldout_fraction=cfg.heldout_fraction,
                         seed=cfg.seed, max_pairs=cfg.max_pairs, max_prompts=cfg.max_prompts,
                         max_heldout_pairs=cfg.max_heldout_pairs)
    base = resolve_model("embedded", Path("data"))
    settings = [("prompt groups" if cfg.rm_group_by_prompt else "pair by pair", cfg)]
    if args.compare_grouping:
        settings = [("pair by pair", replace(cfg, rm_group_by_prompt=False)),
                    ("prompt groups", replace(cfg, rm_group_by_prompt=True))]
    rows = []
    for name, setting in settings:
        started = time.monotonic()
        _, m = run_reward(base.path, snap.path("preferences_train"), snap.path("preferences_heldout"),
                          args.out / "rm", setting)
        rows.append((name, m, time.monotonic() - started))
    print("\n| training | train pairs | truncated | held-out pairs | held-out accuracy (95%) | seconds |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, m, took in rows:
        print(f"| {name} | {m['rm_train_pairs']} | {m['rm_pairs_truncated']} | {m['rm_heldout_pairs']} "
              f"| {m['rm_heldout_accuracy']:.3f} [{m['rm_heldout_accuracy_lo']:.3f}, {m['rm_heldout_accuracy_hi']:.3f}] "
              f"| {took:.0f} |")
    if len(rows) == 2:
        print(f"prompt groups take {rows[1][2] / rows[0][2]:.2f}x the seconds of pair by pair")


if __name__ == "__main__":
    main()

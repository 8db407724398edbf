"""Stage 5, the evaluation's own judge: a reward model PPO never saw and never optimised.

    python -m training.judge --model data/models/smollm2-135m-instruct \
        --heldout prefs_heldout.jsonl --check prefs_train.jsonl --out data/runs/x/judge

The reward model that steered PPO is the worst possible referee of PPO's output: PPO was
paid to fool it. This judge is trained from the *current* model on the held-out pairs only,
and it is checked on the training pairs, which it never saw (a two-way split: each reward
model is tested on the other's data). Its score of the sampled replies of both versions is
the retrain's win rate when no gold preference exists; when it cannot rank the training pairs
above the accuracy gate, the evaluation says so and calls nothing better.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import replace
from pathlib import Path

from training.common import read_jsonl, write_jsonl
from training.config import RetrainConfig, field_help


def check_sample(rows: list[dict], n: int, seed: int) -> list[dict]:
    """At most ``n`` training pairs, drawn reproducibly, to check the judge on."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows[:n]


def train_judge(current_path, heldout_path, check_path, out_dir, cfg: RetrainConfig,
                callbacks=()) -> tuple[Path, dict]:
    """Train on ``heldout_path``, measure pairwise accuracy on ``check_path``. Returns the saved
    judge and ``judge_accuracy`` (+ ``_lo``/``_hi``), ``judge_train_pairs``, ``judge_check_pairs``."""
    from training.reward import run_reward

    # The held-out split is a fraction of the training split: more passes over fewer pairs.
    judge_cfg = replace(cfg, rm_epochs=cfg.judge_epochs)
    path, m = run_reward(current_path, heldout_path, check_path, out_dir, judge_cfg, callbacks)
    return path, {"judge_accuracy": m["rm_heldout_accuracy"], "judge_accuracy_lo": m["rm_heldout_accuracy_lo"],
                  "judge_accuracy_hi": m["rm_heldout_accuracy_hi"], "judge_train_pairs": m["rm_train_pairs"],
                  "judge_check_pairs": m["rm_heldout_pairs"], "judge_pairs_truncated": m["rm_pairs_truncated"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the current (serving) model to start from")
    parser.add_argument("--heldout", required=True, help="held-out preference pairs (the judge trains on these)")
    parser.add_argument("--check", required=True, help="training preference pairs (the judge is checked on these)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--reads-cut-replies", action="store_true", help=field_help("rm_reads_cut_replies"))
    args = parser.parse_args()
    cfg = RetrainConfig(rm_reads_cut_replies=args.reads_cut_replies)
    check = write_jsonl(Path(args.out).parent / "judge_check.jsonl",
                        check_sample(read_jsonl(args.check), cfg.judge_check_pairs, cfg.seed))
    path, metrics = train_judge(args.model, args.heldout, check, args.out, cfg)
    print(f"saved judge to {path}: {metrics}")


if __name__ == "__main__":
    main()

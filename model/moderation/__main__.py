"""Evaluate moderation backends on labelled text, or train a learned head.

    python -m model.moderation --eval ../shared/data/toxigen_calibration.jsonl
    python -m model.moderation --train [--labels mine.jsonl] [--activate]   # = python -m training.moderation_head

Rows are {"text", "label"}; label hate/toxic/offensive counts as positive, neutral as negative.
Prints ROC AUC, and recall and false-positive rate at the configured threshold, per backend
and for the combined verdict (the worst score over active backends). The backends and
thresholds are the app's: the CHAT_MODERATION_* and CHAT_DETOXIFY_* variables (and .env).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def read_rows(path: Path) -> tuple[list[str], list[int]]:
    from model.moderation.head_store import read_label_file

    try:
        rows = read_label_file(path)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    return [r["text"] for r in rows], [r["label"] for r in rows]


def evaluate(moderator, texts: list[str], labels: list[int]) -> list[dict]:
    from sklearn.metrics import roc_auc_score

    per_backend = {b.name: b.score(texts) for b in moderator.backends}
    results = []
    names = list(per_backend) + (["combined"] if len(per_backend) > 1 else [])
    for name in names:
        rows = per_backend.get(name) or [_worst(per_backend, i) for i in range(len(texts))]
        score = [max(r.values(), default=0.0) for r in rows]
        flagged = [any(v >= moderator.threshold(k) for k, v in r.items()) for r in rows]
        pos = sum(labels)
        neg = len(labels) - pos
        tp = sum(f and y for f, y in zip(flagged, labels))
        fp = sum(f and not y for f, y in zip(flagged, labels))
        auc = roc_auc_score(labels, score) if 0 < pos < len(labels) else float("nan")
        results.append({"backend": name, "auc": auc, "recall": tp / pos if pos else float("nan"),
                        "fpr": fp / neg if neg else float("nan"), "n": len(labels)})
    return results


def _worst(per_backend: dict, i: int) -> dict[str, float]:
    """The combined verdict's scores: the worst per category over backends."""
    merged: dict[str, float] = {}
    for scores in per_backend.values():
        for k, v in scores[i].items():
            merged[k] = max(merged.get(k, 0.0), v)
    return merged


def main() -> None:
    from model.moderation import moderator_from_env

    if "--train" in sys.argv[1:]:
        # Training reads the review queue from the database, which model/ never touches: hand the
        # other arguments to the training stage's own command, in a fresh interpreter.
        rest = [a for a in sys.argv[1:] if a != "--train"]
        os.execv(sys.executable, [sys.executable, "-m", "training.moderation_head", *rest])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval", required=True, type=Path, help="JSONL of {text, label}")
    parser.add_argument("--train", action="store_true", help="train a learned head instead (python -m "
                        "training.moderation_head; its --help lists the options)")
    parser.add_argument("--backends", default=None, help="override CHAT_MODERATION_BACKENDS")
    args = parser.parse_args()
    if Path(".env").is_file():  # the app's .env, as the app reads it (variables already set win)
        from dotenv import load_dotenv

        load_dotenv(".env", override=False)
    env = dict(os.environ)
    if args.backends:
        env["CHAT_MODERATION_BACKENDS"] = args.backends
    moderator = moderator_from_env(env)
    texts, labels = read_rows(args.eval)
    print(f"{args.eval.name}: {len(texts)} rows, {sum(labels)} positive; threshold {moderator.default_threshold}")
    print(f"{'backend':<12} {'ROC AUC':>8} {'recall':>8} {'FPR':>8}")
    for r in evaluate(moderator, texts, labels):
        print(f"{r['backend']:<12} {r['auc']:>8.3f} {r['recall']:>8.3f} {r['fpr']:>8.3f}")


if __name__ == "__main__":
    main()

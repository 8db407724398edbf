"""Train a learned moderation head from labels: the calibration set, the review queue, your files.

    python -m training.moderation_head                          # calibration set + review decisions
    python -m training.moderation_head --labels mine.jsonl --activate
    python -m training.moderation_head --layer 10 --pooling last   # another feature layer, for comparison

Labels come from the shipped ToxiGen calibration set (``model/data/toxigen_calibration.jsonl``),
every decision in Admin > Moderation's review queue (mark correct / false positive / missed),
and any JSONL of ``{"text", "label"[, "category"]}`` given with ``--labels``; a later label
for the same text wins (review decisions come last). Features are the base model's hidden
states (``model.moderation.learned``). The head is stored under ``<data_dir>/moderation/heads``
with its cross-validated metrics and the rows it learned from. ``auto`` moderation uses the newest
head from the next start on, unless one is pinned; ``--activate`` (or Admin > Switch on) pins
this one, so a later head is used only once it is switched on in turn.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from feedback import moderation_repo
from feedback.db import default_url, make_engine, make_session_factory, session_scope
from model.moderation.head_store import CALIBRATION, activate, read_label_file, train_head
from model.moderation.learned import POOLINGS, EncoderSpec, describe_encoder


def gather_rows(session_factory=None, label_files: list[Path] = (), calibration: bool = True,
                reviews: bool = True) -> list[dict]:
    """Every labelled row, in the order where later wins: calibration, files, review decisions.
    Files are read (and rejected whole on a bad line) before anything else happens."""
    rows = read_label_file(CALIBRATION, source="calibration") if calibration else []
    for path in label_files:
        rows += read_label_file(path, source=Path(path).name)
    if reviews and session_factory is not None:
        with session_scope(session_factory) as s:
            rows += moderation_repo.review_label_rows(session=s)
    return rows


def logged_chat(session_factory=None) -> list[str]:
    """Logged user messages nobody flagged: a head's flag rate on real chat (never trained on)."""
    if session_factory is None:
        return []
    with session_scope(session_factory) as s:
        return moderation_repo.unflagged_user_texts(session=s)


def encoder_model_dir(data_dir: Path, model: str) -> str:
    """The base model's weights (not a promoted version): a head must keep the features it learned on."""
    from model.weights import resolve_model

    return str(resolve_model(model, data_dir).path.resolve())


def flag_rate(m: dict, kind: str) -> str:
    rate = m.get(f"{kind}_flag_rate")
    return "-" if rate is None else f"{rate:.1%} of {m[f'{kind}_n']}"


def describe(meta: dict) -> str:
    lines = [f"{meta['name']}: {meta['data']['rows']} rows ({meta['data']['positives']} harmful), "
             f"sources {meta['data']['sources']}, features: {describe_encoder(meta['encoder'])}"]
    for category, m in meta["metrics"].items():
        lines.append(f"  {category}: ROC AUC {m['auc']:.3f} [{m['auc_low']:.3f}, {m['auc_high']:.3f}] "
                     f"({m['folds']}-fold), at threshold {meta['threshold']}: recall {m['recall']:.2f}, "
                     f"false positives {m['fpr']:.2f}; everyday prompts flagged {flag_rate(m, 'everyday')} "
                     f"(out of fold), logged chat flagged {flag_rate(m, 'logged')}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", nargs="*", type=Path, default=[], help="JSONL files of {text, label[, category]}")
    parser.add_argument("--no-calibration", action="store_true", help="leave out the shipped ToxiGen calibration set")
    parser.add_argument("--no-reviews", action="store_true", help="leave out the review queue's decisions")
    parser.add_argument("--layer", type=int, default=0, help="blocks run before pooling (0 = ~4/15 of the depth: 8 of 30)")
    parser.add_argument("--early-layer", type=int, default=EncoderSpec.early_layer,
                        help="a shallower block whose pooled states are appended (0 = none)")
    parser.add_argument("--float32", action="store_true", help="float32 weights instead of int8 (~4x slower a check)")
    parser.add_argument("--pooling", default=EncoderSpec.pooling, choices=list(POOLINGS))
    parser.add_argument("--c", type=float, default=0.05, help="inverse L2 strength of the logistic regression")
    parser.add_argument("--threshold", type=float, default=float(os.environ.get("CHAT_MODERATION_THRESHOLD", 0.5)))
    parser.add_argument("--activate", action="store_true", help="pin the new head (without a pin the app uses the "
                        "newest head from its next start)")
    parser.add_argument("--url", default=default_url(), help="database URL (for review decisions and logged chat)")
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("CHAT_DATA_DIR", "data")))
    parser.add_argument("--model", default=os.environ.get("CHAT_MODEL", "embedded"))
    args = parser.parse_args()
    factory = None if args.no_reviews else make_session_factory(make_engine(args.url))
    try:
        rows = gather_rows(factory, args.labels, calibration=not args.no_calibration, reviews=not args.no_reviews)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None
    spec = EncoderSpec(model_dir=encoder_model_dir(args.data_dir, args.model), layer=args.layer,
                       early_layer=args.early_layer, pooling=args.pooling, int8=not args.float32)
    try:
        meta = train_head(rows, spec, args.data_dir, ordinary=logged_chat(factory), c=args.c,
                          threshold=args.threshold, progress=lambda f, msg: print(f"[{f:4.0%}] {msg}", flush=True))
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(describe(meta))
    if not args.activate:
        from model.moderation.head_store import active_head_name, pinned_head_name

        in_use = active_head_name(args.data_dir)
        print(f"in use from the app's next start: {in_use}" + (" (pinned; --activate or Admin > Switch on "
              "pins another)" if pinned_head_name(args.data_dir) else " (the newest: no head is pinned)"))
    if args.activate:
        from model.moderation.learned import LearnedBackend

        LearnedBackend(Path(args.data_dir) / "moderation" / "heads" / meta["name"])  # loads: fails before switching
        activate(args.data_dir, meta["name"])
        print(f"switched on (pinned): {meta['name']} (restart the app, or switch it on in Admin > Moderation)")


if __name__ == "__main__":
    main()

"""The evaluation suite of registered versions, side by side, from what was stored with them.

    python -m training.evaluate --report base run3-ppo [--url sqlite:///data/chat.db]

Every registered version keeps the evaluation its retrain ran against its parent (perplexity on
held-out text, BLEU and chrF against held-out ideal replies, the judged win rate and verdict,
KL, length, repetition, replies stuck in a loop, moderation flags, refusal rates), its reward
model's accuracy, and (from the database at report time) its human score: the Bradley-Terry
leaderboard of A/B picks and rankings.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from feedback.leaderboard import leaderboard
from feedback.models import ModelVersion

ROWS = [  # (label, where, key): where = "eval" (the version's evaluation), "self" (its own metrics)
    ("evaluated against", "parent", ""),
    ("verdict", "eval", "verdict_text"),
    ("win rate (judge)", "eval", "win_rate"),
    ("judge", "eval", "win_rate_judge"),
    ("held-out pairs agree", "eval", "heldout_pref_acc"),
    ("reward-model accuracy", "self", "rm_heldout_accuracy"),
    ("PPO updates run", "self", "ppo_updates"),
    ("PPO update kept (loop guard)", "self", "ppo_kept_update"),
    ("perplexity, held-out text", "eval", "ppl_new"),
    ("BLEU vs ideal replies", "eval", "bleu_new"),
    ("chrF vs ideal replies", "eval", "chrf_new"),
    ("KL/token to its parent", "eval", "kl_to_current"),
    ("mean length (tokens)", "eval", "length_new"),
    ("repetition", "eval", "repetition_new"),
    ("replies stuck in a loop", "eval", "degenerate_new"),
    ("moderation flag rate", "eval", "flag_rate_new"),
    ("refuses held-out flagged prompts", "eval", "refusal_harmful_new"),
    ("refuses everyday questions", "eval", "refusal_ordinary_new"),
]


def _fmt(value) -> str:
    if value is None or value != value:
        return "—"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def version_report(session: Session, names: list[str]) -> str:
    """A Markdown table, one column per version name; LookupError names a version that is not registered."""
    versions = []
    for name in names:
        v = session.scalar(select(ModelVersion).where(ModelVersion.name == name))
        if v is None:
            known = ", ".join(session.scalars(select(ModelVersion.name).order_by(ModelVersion.id)))
            raise LookupError(f"No version named {name!r}; registered: {known or 'none'}.")
        versions.append(v)
    by_id = {v.id: v.name for v in session.scalars(select(ModelVersion))}
    ratings = {r.version: r for r in leaderboard(session)}
    lines = ["| | " + " | ".join(v.name for v in versions) + " |", "| --- |" + " --- |" * len(versions)]
    for label, where, key in ROWS:
        cells = []
        for v in versions:
            m = v.metrics or {}
            if where == "parent":
                cells.append(by_id.get(v.parent_id, "— (a base version)"))
            else:
                cells.append(_fmt((m.get("eval", {}) if where == "eval" else m).get(key)))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    human = []
    for v in versions:
        r = ratings.get(v.name)
        human.append(f"{r.score:.0f} [{r.lo:.0f}, {r.hi:.0f}] over {r.comparisons}" if r else "no comparisons yet")
    lines.append("| human score (Elo, 95%; A/B picks and rankings) | " + " | ".join(human) + " |")
    return "\n".join(lines)

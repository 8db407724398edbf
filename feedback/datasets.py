"""Build TRL-ready rows from the database, scrubbed, and record what went into them."""

from __future__ import annotations

import json
import re
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from feedback.models import DataSnapshot, Demonstration, RankingTask, User
from feedback.pairs import all_pairs

KINDS = ("preferences", "sft", "prompts")
EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
PHONE = re.compile(r"(?<!\w)(?:\+?\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)[\s.-]?)?\d{3,4}[\s.-]\d{3,4}(?:[\s.-]\d{2,4})?(?!\w)")


def scrub(text: str) -> str:
    """Replace e-mail addresses and phone numbers before anything leaves the database."""
    return PHONE.sub("[phone]", EMAIL.sub("[email]", text))


def _msgs(context: list[dict]) -> list[dict]:
    return [{"role": m["role"], "content": scrub(m["content"])} for m in context]


def preference_rows(session: Session) -> tuple[list[dict], dict, dict]:
    pairs = all_pairs(session)
    # "chosen_cut"/"rejected_cut" only where true: that reply was cut before it ended (SFT on it
    # must not teach ending the turn there; the reward model reads it as unfinished); other rows
    # stay plain TRL preference rows.
    rows = [{"prompt": _msgs(p.prompt), "chosen": [{"role": "assistant", "content": scrub(p.chosen)}],
             "rejected": [{"role": "assistant", "content": scrub(p.rejected)}]}
            | ({"chosen_cut": True} if p.chosen_cut else {}) | ({"rejected_cut": True} if p.rejected_cut else {})
            for p in pairs]
    refs: dict[str, set[int]] = {}
    by_source: dict[str, int] = {}
    for p in pairs:
        by_source[p.source] = by_source.get(p.source, 0) + 1
        for k, ids in p.refs.items():
            refs.setdefault(k, set()).update(ids)
    counts = {"pairs": len(rows), "by_source": by_source, "merged_duplicates": sum(p.count - 1 for p in pairs)}
    return rows, {k: sorted(v) for k, v in refs.items()}, counts


def sft_rows(session: Session) -> tuple[list[dict], dict, dict]:
    opted = set(session.scalars(select(User.id).where(User.opted_out.is_(True))))
    demos = [d for d in session.scalars(select(Demonstration).order_by(Demonstration.id)) if d.author_id not in opted]
    rows = [{"messages": _msgs(d.context) + [{"role": "assistant", "content": scrub(d.content)}]} for d in demos]
    return rows, {"demonstrations": [d.id for d in demos]}, {"demonstrations": len(rows)}


def prompt_rows(session: Session) -> tuple[list[dict], dict, dict]:
    opted = set(session.scalars(select(User.id).where(User.opted_out.is_(True))))
    tasks = [t for t in session.scalars(select(RankingTask).order_by(RankingTask.id)) if t.owner_id not in opted]
    rows = [{"prompt": _msgs(t.context)} for t in tasks]
    return rows, {"ranking_tasks": [t.id for t in tasks]}, {"prompts": len(rows)}


BUILDERS = {"preferences": preference_rows, "sft": sft_rows, "prompts": prompt_rows}


def export(*, session: Session, kind: str, out: str | Path) -> DataSnapshot:
    """Write ``kind`` rows as JSONL to ``out`` and record a data snapshot of the rows used."""
    if kind not in BUILDERS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}")
    rows, refs, counts = BUILDERS[kind](session)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    with tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(out)
    snap = DataSnapshot(kind=kind, rows=refs, counts=counts, path=str(out))
    session.add(snap)
    session.flush()
    return snap

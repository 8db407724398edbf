"""Validate and import preference pairs from a JSONL file, in one transaction (all valid rows or nothing).

    python -m feedback.importer ../shared/data/hh_harmless_sample.jsonl

Accepts TRL preference rows ({"prompt", "chosen", "rejected"}, strings or message lists,
or implicit-prompt message lists) and Anthropic HH-RLHF rows ({"chosen": "\\n\\nHuman: ...
\\n\\nAssistant: ...", "rejected": ...}). Reports every skipped row and why. Each prompt
also becomes a ranking task for annotators (deduplicated) unless --no-tasks.
The database is migrated to the latest schema first, as `make run` does at start-up, so a
fresh database works.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from feedback.annotation_repo import add_task
from feedback.db import DatabaseUnavailableError, default_url, make_engine, make_session_factory, migrate, session_scope
from feedback.models import ImportedPair

MAX_TEXT = 20000
_TURN = re.compile(r"\n\n(Human|Assistant): ")


class ImportFileError(ValueError):
    """The file cannot be imported at all (missing, not JSONL, nothing valid)."""


@dataclass
class ImportReport:
    imported: int = 0
    already_present: int = 0  # pairs the database (or an earlier line of the file) already holds
    tasks_added: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (line number, why)

    def summary(self) -> str:
        lines = [f"imported {self.imported} pairs ({self.already_present} already present, not added again), "
                 f"added {self.tasks_added} ranking prompts, skipped {len(self.skipped)} rows"]
        lines += [f"  line {n}: {why}" for n, why in self.skipped[:50]]
        if len(self.skipped) > 50:
            lines.append(f"  ... and {len(self.skipped) - 50} more")
        return "\n".join(lines)


def parse_hh(text: str) -> list[dict]:
    """'\\n\\nHuman: ...\\n\\nAssistant: ...' -> [{"role", "content"}, ...]."""
    parts = _TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise ValueError("not in '\\n\\nHuman: ... \\n\\nAssistant: ...' form")
    turns = []
    for who, content in zip(parts[1::2], parts[2::2]):
        turns.append({"role": "user" if who == "Human" else "assistant", "content": content.strip()})
    return turns


def _as_messages(value, role: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                       and m.get("role") in ("system", "user", "assistant") for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise ValueError(f"'{role}' must be a string or a list of {{role, content}} messages")


def normalise_row(row) -> tuple[list[dict], str, str]:
    """Return (prompt messages, chosen text, rejected text) or raise ValueError saying why."""
    if not isinstance(row, dict):
        raise ValueError("row is not a JSON object")
    if "chosen" not in row or "rejected" not in row:
        raise ValueError("needs 'chosen' and 'rejected'")
    if "prompt" in row:  # TRL: explicit prompt
        prompt = _as_messages(row["prompt"], "user")
        chosen = _as_messages(row["chosen"], "assistant")
        rejected = _as_messages(row["rejected"], "assistant")
        if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
            raise ValueError("'chosen' and 'rejected' must end with an assistant message")
        prompt = prompt + chosen[:-1]
        chosen_text, rejected_text = chosen[-1]["content"], rejected[-1]["content"]
    elif isinstance(row["chosen"], str) and isinstance(row["rejected"], str):  # HH-RLHF
        c, r = parse_hh(row["chosen"]), parse_hh(row["rejected"])
        if c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant":
            raise ValueError("the dialogue must end with an Assistant turn")
        if c[:-1] != r[:-1]:
            raise ValueError("'chosen' and 'rejected' differ before the last Assistant turn")
        prompt, chosen_text, rejected_text = c[:-1], c[-1]["content"], r[-1]["content"]
    else:  # TRL implicit prompt: message lists sharing a prefix
        c, r = _as_messages(row["chosen"], "assistant"), _as_messages(row["rejected"], "assistant")
        if c[:-1] != r[:-1] or c[-1]["role"] != "assistant":
            raise ValueError("implicit-prompt rows must share everything but the last assistant message")
        prompt, chosen_text, rejected_text = c[:-1], c[-1]["content"], r[-1]["content"]
    if not prompt or prompt[-1]["role"] != "user":
        raise ValueError("the prompt must end with a user message")
    # An empty reply can be a real preference (saying nothing beats a harmful answer); two can't.
    if not chosen_text.strip() and not rejected_text.strip():
        raise ValueError("both replies are empty")
    if chosen_text.strip() == rejected_text.strip():
        raise ValueError("chosen and rejected are identical")
    if max(len(chosen_text), len(rejected_text), sum(len(m["content"]) for m in prompt)) > MAX_TEXT:
        raise ValueError(f"text longer than {MAX_TEXT} characters")
    return prompt, chosen_text, rejected_text


def import_file(*, session: Session, path: str | Path, add_tasks: bool = True, wanted: int = 1) -> ImportReport:
    """Validate every row, then insert the valid ones in the caller's single transaction."""
    path = Path(path)
    if not path.is_file():
        raise ImportFileError(f"{path} does not exist")
    report = ImportReport()
    valid = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ImportFileError(f"{path} is not UTF-8 text: {exc}") from exc
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            valid.append(normalise_row(json.loads(line)))
        except json.JSONDecodeError as exc:
            report.skipped.append((n, f"not valid JSON ({exc.msg})"))
        except ValueError as exc:
            report.skipped.append((n, str(exc)))
    if not valid:
        raise ImportFileError(f"{path}: no valid rows.\n" + report.summary())
    # Importing a file twice must not double its pairs: a pair is its prompt and both replies.
    present = {_pair_key(*row) for row in session.execute(select(ImportedPair.prompt, ImportedPair.chosen,
                                                                 ImportedPair.rejected))}
    for prompt, chosen, rejected in valid:
        key = _pair_key(prompt, chosen, rejected)
        if key in present:
            report.already_present += 1
            continue
        present.add(key)
        session.add(ImportedPair(prompt=prompt, chosen=chosen, rejected=rejected, source=path.name))
        report.imported += 1
        if add_tasks and add_task(session=session, context=prompt, source="import", wanted=wanted):
            report.tasks_added += 1
    session.flush()
    return report


def _pair_key(prompt, chosen: str, rejected: str) -> str:
    return json.dumps([prompt, chosen, rejected], sort_keys=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file")
    parser.add_argument("--url", default=default_url(), help="database URL (default: DATABASE_URL or SQLite)")
    parser.add_argument("--no-tasks", action="store_true", help="do not add the prompts as ranking tasks")
    args = parser.parse_args()
    try:
        migrate(args.url)
    except DatabaseUnavailableError as exc:
        print(f"Nothing imported: {exc}", file=sys.stderr)
        sys.exit(1)
    factory = make_session_factory(make_engine(args.url))
    try:
        with session_scope(factory) as s:
            report = import_file(session=s, path=args.file, add_tasks=not args.no_tasks)
    except ImportFileError as exc:
        print(f"Nothing imported: {exc}", file=sys.stderr)
        sys.exit(1)
    print(report.summary())


if __name__ == "__main__":
    main()

"""Import preference pairs from a JSONL file, in one transaction (all valid rows or nothing).

    python -m feedback.import ../shared/data/hh_harmless_sample.jsonl

Accepts TRL preference rows ({"prompt", "chosen", "rejected"}, strings or message lists,
or implicit-prompt message lists) and Anthropic HH-RLHF rows ({"chosen": "\\n\\nHuman: ...
\\n\\nAssistant: ...", "rejected": ...}). Reports every skipped row and why. Each prompt
also becomes a ranking task for annotators (deduplicated) unless --no-tasks.
The database is migrated to the latest schema first, as `make run` does at start-up, so a
fresh database works.
"""

from __future__ import annotations

import argparse
import sys

from feedback.db import (
    DatabaseUnavailableError,
    default_url,
    make_engine,
    make_session_factory,
    migrate,
    session_scope,
)
from feedback.importer import ImportFileError, import_file


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

"""Export TRL-ready training data and record a data snapshot.

    python -m feedback.export --kind preferences --out data/exports/prefs.jsonl
    python -m feedback.export --kind sft --out data/exports/sft.jsonl
    python -m feedback.export --kind prompts --out data/exports/prompts.jsonl

Preferences use TRL's conversational format {"prompt": [...], "chosen": [...], "rejected": [...]};
SFT rows are {"messages": [...]}; prompts are {"prompt": [...]}. Users who opted out are
excluded; e-mail addresses and phone numbers are scrubbed.
"""

from __future__ import annotations

import argparse

from feedback.datasets import KINDS, export
from feedback.db import default_url, make_engine, make_session_factory, session_scope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=KINDS, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--url", default=default_url(), help="database URL (default: DATABASE_URL or SQLite)")
    args = parser.parse_args()
    factory = make_session_factory(make_engine(args.url))
    with session_scope(factory) as s:
        snap = export(session=s, kind=args.kind, out=args.out)
        print(f"wrote {args.out}: {snap.counts} (data snapshot {snap.id})")


if __name__ == "__main__":
    main()

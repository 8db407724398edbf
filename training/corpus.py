"""Stage 0, a text corpus cleaned for continued pretraining ("make it know our handbook").

    python -m training.corpus handbook.md faq.txt notes.jsonl --out data/corpora/handbook
    python -m training.corpus docs/*.md --out data/corpora/docs --no-toxicity-filter

Plain text and Markdown files are split into documents at blank lines; JSONL rows are
{"text": ...}. In order: Unicode NFKC and whitespace clean-up; boilerplate lines (page
numbers, copyright footers, and any line repeated across many documents, such as a running
header) removed; e-mail addresses, phone numbers and pasted keys scrubbed (the export's own
scrubber plus the key patterns moderation blocks); documents too short or mostly symbols
dropped; exact duplicates and near-duplicates (MinHash over word 5-grams, datasketch's LSH)
dropped; documents the moderation backends flag dropped. The report says, per filter, how many
documents went and shows examples, with tokens in and out. Written as corpus.jsonl and
report.json, and recorded as a data snapshot (kind ``corpus``) when a database is given.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from feedback.datasets import scrub

KEY = re.compile(r"\b(?:sk-[A-Za-z0-9_-]{20,}|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{30,}|xox[bpas]-[A-Za-z0-9-]{10,})"
                 r"|-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z ]*PRIVATE KEY-----|$)")
BOILERPLATE = re.compile(r"^(?:page \d+(?: of \d+)?|\d+ / \d+|(?:copyright|©|\(c\)).{0,80}|all rights reserved\.?|"
                         r"(?:click here|subscribe|share this|back to top|table of contents)\b.{0,40})$", re.I)
CONTROL = re.compile(r"[\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f\u200b\ufeff]")
SUFFIXES = (".txt", ".md", ".markdown", ".jsonl")


class CorpusError(ValueError):
    """A file that cannot be read as a corpus; the message names it and says what to do."""


@dataclass
class CorpusConfig:
    max_file_bytes: int = field(default=20_000_000, metadata={"help": "Larger files are refused (bytes)."})
    min_words: int = field(default=8, metadata={"help": "Shorter documents are dropped as fragments."})
    max_symbol_share: float = field(default=0.3, metadata={"help": "Documents with more non-letter, non-space "
                                                                    "characters than this share are dropped."})
    near_duplicate: float = field(default=0.7, metadata={"help": "Estimated Jaccard similarity of word 5-grams at "
                                                                 "which a document counts as a near-duplicate."})
    repeated_line_docs: int = field(default=3, metadata={"help": "A line found in at least this many documents (and "
                                                                 "5% of them) is boilerplate, such as a running header."})
    toxicity_filter: bool = field(default=True, metadata={"help": "Drop documents the moderation backends flag."})


def read_documents(path: str | Path, cfg: CorpusConfig) -> list[str]:
    """The documents of one file; a file that is empty, binary, too large, not UTF-8 or of an
    unknown kind raises CorpusError naming it."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise CorpusError(f"{path.name}: only {', '.join(SUFFIXES)} files can be a corpus")
    size = path.stat().st_size
    if size > cfg.max_file_bytes:
        raise CorpusError(f"{path.name}: {size:,} bytes is over the {cfg.max_file_bytes:,}-byte limit; split it")
    raw = path.read_bytes()
    if b"\x00" in raw:
        raise CorpusError(f"{path.name}: looks binary (it has NUL bytes); upload plain text")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CorpusError(f"{path.name}: not UTF-8 (byte {exc.start}); save it as UTF-8 and upload it again") from None
    if not text.strip():
        raise CorpusError(f"{path.name}: is empty")
    if path.suffix.lower() != ".jsonl":
        return [d for d in re.split(r"\n\s*\n", text.replace("\r\n", "\n")) if d.strip()]
    docs = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"{path.name}:{n}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise CorpusError(f"{path.name}:{n}: each row needs a \"text\" string")
        docs.append(row["text"])
    return docs


def normalise(text: str) -> str:
    """NFKC, no control or zero-width characters, single spaces, no blank or padded lines."""
    text = CONTROL.sub("", unicodedata.normalize("NFKC", text).replace("\r\n", "\n").replace("\t", " "))
    lines = (re.sub(r" {2,}", " ", line).strip() for line in text.split("\n"))
    return "\n".join(line for line in lines if line)


def _shingles(text: str) -> set[bytes]:
    words = re.findall(r"\w+", text.lower())
    return {" ".join(words[i:i + 5]).encode() for i in range(max(1, len(words) - 4))}


class _Report:
    def __init__(self):
        self.removed: dict[str, list[str]] = {}

    def drop(self, reason: str, doc: str) -> None:
        self.removed.setdefault(reason, []).append(doc)

    def as_dict(self) -> dict:
        return {reason: {"documents": len(docs), "examples": [d[:160] for d in docs[:3]]}
                for reason, docs in self.removed.items()}


def clean(docs: list[str], cfg: CorpusConfig, moderator=None, count_tokens=None) -> tuple[list[str], dict]:
    """The cleaned documents and the report. ``count_tokens(text)`` defaults to words."""
    from datasketch import MinHash, MinHashLSH

    count = count_tokens or (lambda t: len(t.split()))
    report, scrubbed = _Report(), Counter()
    docs = [normalise(d) for d in docs]
    line_docs = Counter(line for d in docs for line in set(d.split("\n")))
    repeated = {line for line, n in line_docs.items()
                if n >= max(cfg.repeated_line_docs, 0.05 * len(docs)) and len(docs) > 1}
    kept_lines = []
    for d in docs:
        lines = [line for line in d.split("\n") if not (BOILERPLATE.match(line) or line in repeated)]
        if len(lines) < len(d.split("\n")):
            report.drop("boilerplate lines removed from", "\n".join(set(d.split("\n")) - set(lines)))
        kept_lines.append("\n".join(lines))
    out, seen, lsh = [], set(), MinHashLSH(threshold=cfg.near_duplicate, num_perm=128)
    for i, d in enumerate(kept_lines):
        before = d
        d = KEY.sub("[key]", d)
        scrubbed["keys"] += d != before
        after = scrub(d)
        scrubbed["e-mails and phone numbers"] += after != d
        d = after
        if len(d.split()) < cfg.min_words:
            if d:
                report.drop("too short", d)
            continue
        symbols = sum(not (c.isalpha() or c.isspace()) for c in d) / len(d)
        if symbols > cfg.max_symbol_share:
            report.drop("mostly symbols", d)
            continue
        key = hashlib.sha1(re.sub(r"\W+", " ", d.lower()).strip().encode()).hexdigest()
        if key in seen:
            report.drop("exact duplicate", d)
            continue
        seen.add(key)
        mh = MinHash(num_perm=128, seed=1)
        mh.update_batch(list(_shingles(d)))
        if lsh.query(mh):
            report.drop("near duplicate", d)
            continue
        lsh.insert(str(i), mh)
        if cfg.toxicity_filter and moderator is not None:
            verdict = moderator.check(d, direction="in")
            if verdict.flagged:
                report.drop(f"flagged by moderation ({verdict.category})", d)
                continue
        out.append(d)
    summary = {"documents_in": len(docs), "documents_out": len(out),
               "tokens_in": sum(count(d) for d in docs), "tokens_out": sum(count(d) for d in out),
               "token_unit": "tokens" if count_tokens else "words", "scrubbed_documents": dict(scrubbed),
               "removed": report.as_dict(), "config": asdict(cfg)}
    return out, summary


def build_corpus(paths: list[str | Path], out_dir: str | Path, cfg: CorpusConfig, moderator=None, count_tokens=None,
                 session_factory=None) -> dict:
    """Read every file first (one bad file refuses the whole upload, nothing written), clean,
    write corpus.jsonl and report.json; with a database, record a ``corpus`` data snapshot."""
    docs, files = [], {}
    for p in paths:
        file_docs = read_documents(p, cfg)
        files[Path(p).name] = len(file_docs)
        docs.extend(file_docs)
    kept, report = clean(docs, cfg, moderator, count_tokens)
    report["files"] = files
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Written aside and renamed: a corpus is listed (and can be trained on) once corpus.jsonl exists.
    partial = out / ".corpus.jsonl.partial"
    partial.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in kept), encoding="utf-8")
    os.replace(partial, out / "corpus.jsonl")
    if session_factory is not None:
        from feedback.db import session_scope
        from feedback.models import DataSnapshot

        with session_scope(session_factory) as s:
            snap = DataSnapshot(kind="corpus", rows={"files": files}, path=str(out.resolve()),
                                counts={k: report[k] for k in ("documents_in", "documents_out", "tokens_in",
                                                               "tokens_out")})
            s.add(snap)
            s.flush()
            report["snapshot_id"] = snap.id
    (out / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
    return report


def main() -> None:
    from model.moderation import moderator_from_env

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+")
    parser.add_argument("--out", required=True)
    parser.add_argument("--url", default=None, help="database URL to record the snapshot in (default: none)")
    for f in fields(CorpusConfig):
        if f.type == "bool" or isinstance(f.default, bool):
            parser.add_argument(f"--no-{f.name.replace('_', '-')}", dest=f.name, action="store_false",
                                help=f.metadata["help"])
        else:
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default,
                                help=f.metadata["help"])
    args = parser.parse_args()
    cfg = CorpusConfig(**{f.name: getattr(args, f.name) for f in fields(CorpusConfig)})
    factory = None
    if args.url:
        from feedback.db import make_engine, make_session_factory

        factory = make_session_factory(make_engine(args.url))
    try:
        report = build_corpus(args.files, args.out, cfg, moderator_from_env() if cfg.toxicity_filter else None,
                              session_factory=factory)
    except CorpusError as exc:
        parser.exit(1, f"error: {exc}\n")
    print(f"{report['documents_in']} documents ({report['tokens_in']} {report['token_unit']}) in, "
          f"{report['documents_out']} ({report['tokens_out']}) out; written to {args.out}")
    for reason, r in report["removed"].items():
        print(f"  {reason}: {r['documents']}")
    for what, n in report["scrubbed_documents"].items():
        print(f"  scrubbed {what}: {n} documents")


if __name__ == "__main__":
    main()

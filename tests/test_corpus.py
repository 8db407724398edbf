"""Corpus cleaning for continued pretraining (training/corpus.py): every planted defect goes."""

import json
import random

import pytest

from training.corpus import CorpusConfig, CorpusError, build_corpus, normalise, read_documents

WORDS = ("the team keeps its handbook short so that every new colleague can read it in one sitting and ask "
         "about anything that is unclear before the first week ends while the office stays quiet in the morning "
         "and busy after lunch when the support queue fills up with questions from customers in other countries").split()


def _paragraph(seed: int, n: int = 60) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def test_every_planted_duplicate_near_duplicate_contact_key_toxic_and_boilerplate_line_is_removed(tmp_path,
                                                                                               session_factory):
    """A corpus with planted exact duplicates, near-duplicates (one word changed), e-mails, phone
    numbers, an API key, toxic lines, page numbers and a running header: each planted item is
    removed or scrubbed, the ordinary documents stay, the report counts each filter, and the
    corpus is recorded as a data snapshot."""
    from feedback.models import DataSnapshot
    from model.moderation import build_moderator

    ordinary = [_paragraph(i) for i in range(12)]
    near = ordinary[1].split()
    near[10] = "banana"
    planted = {
        "duplicate": ordinary[0],
        "near": " ".join(near),
        "contact": "Write to jane.doe@example.com or call +44 20 7946 0958 when the printer on floor two jams again.",
        "key": "The deploy script reads the token sk-abcdefghijklmnopqrstuvwxyz123456 from the vault every night.",
        "toxic": "You are a stupid idiot and everyone in this fucking office hates your worthless shitty work.",
        "short": "See above.",
        "symbols": "#### ---- **** ==== ++++ |||| //// \\\\\\\\ ~~~~ ^^^^ %%%% $$$$ @@@@ !!!!",
    }
    header = "ACME Handbook - internal"
    docs = [f"{header}\n{d}\nPage {i} of 12" for i, d in enumerate(ordinary)] + list(planted.values())
    (tmp_path / "handbook.md").write_text("\n\n".join(docs[:10]), encoding="utf-8")
    (tmp_path / "more.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[10:]), encoding="utf-8")

    report = build_corpus([tmp_path / "handbook.md", tmp_path / "more.jsonl"], tmp_path / "out", CorpusConfig(),
                          moderator=build_moderator("rules,profanity"), session_factory=session_factory)
    kept = [json.loads(line)["text"] for line in (tmp_path / "out" / "corpus.jsonl").read_text().splitlines()]
    body = "\n".join(kept)
    assert len(kept) == len(ordinary) + 2  # the ordinary ones, and the contact and key documents, scrubbed
    for d in ordinary:
        assert d in kept
    for planted_text in ("jane.doe@example.com", "7946 0958", "sk-abcdef", "idiot", "See above", "####", "banana",
                         header, "Page 3 of 12"):
        assert planted_text not in body, planted_text
    assert "[email]" in body and "[phone]" in body and "[key]" in body
    removed = report["removed"]
    assert removed["exact duplicate"]["documents"] == 1 and removed["near duplicate"]["documents"] == 1
    assert removed["too short"]["documents"] == 1 and removed["mostly symbols"]["documents"] == 1
    assert sum(r["documents"] for k, r in removed.items() if k.startswith("flagged by moderation")) == 1
    assert report["documents_in"] == len(docs) and report["documents_out"] == len(kept)
    assert report["tokens_out"] < report["tokens_in"] and report["files"] == {"handbook.md": 10, "more.jsonl": 9}
    with session_factory() as s:
        snap = s.get(DataSnapshot, report["snapshot_id"])
        assert snap.kind == "corpus" and snap.counts["documents_out"] == len(kept)


@pytest.mark.parametrize("name, content, message", [
    ("empty.txt", b"  \n\n ", "is empty"),
    ("blob.txt", b"PK\x03\x04\x00\x00binary", "looks binary"),
    ("latin.txt", "caf\u00e9 cr\u00e8me".encode("latin-1"), "not UTF-8"),
    ("table.csv", b"a,b\n1,2\n", "only .txt"),
    ("rows.jsonl", b'{"text": "fine"}\n{"body": "no text"}\n', "rows.jsonl:2"),
    ("huge.txt", b"word " * 300, "over the 1,000-byte limit"),
])
def test_a_bad_file_is_refused_with_a_clear_message_and_nothing_is_written(tmp_path, name, content, message):
    """Empty, binary, wrongly encoded, unknown-kind, malformed JSONL and oversized files each raise
    CorpusError naming the file; the good file uploaded with it is not written either."""
    (tmp_path / "good.txt").write_text(_paragraph(1), encoding="utf-8")
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CorpusError, match=message) as err:
        build_corpus([tmp_path / "good.txt", tmp_path / name], tmp_path / "out", CorpusConfig(max_file_bytes=1000))
    assert name in str(err.value) and not (tmp_path / "out").exists()


def test_normalise_folds_unicode_and_whitespace_and_drops_control_characters():
    """NFKC (ligatures, full-width letters), no zero-width or control characters, single spaces."""
    assert normalise("\ufb01ne  \uff21BC\u200b\x07\r\n\n   next\tline ") == "fine ABC\nnext line"


def test_markdown_and_text_split_into_documents_at_blank_lines(tmp_path):
    """Paragraphs separated by blank lines (any line ending) are documents."""
    (tmp_path / "a.md").write_bytes(b"# Title\r\nfirst para\r\n\r\nsecond para\n \nthird")
    assert read_documents(tmp_path / "a.md", CorpusConfig()) == ["# Title\r\nfirst para".replace("\r\n", "\n"),
                                                                  "second para", "third"]


@pytest.mark.slow
def test_admin_cleans_an_uploaded_corpus_in_the_running_app_and_a_bad_file_writes_nothing(tiny_model_dir, tmp_path):
    """Admin > Data > Clean corpus through the real app's Gradio API: two uploaded files (one
    document repeated, one with an e-mail) give a report with the duplicate removed, the e-mail
    scrubbed and a corpus snapshot; adding a binary file refuses the whole upload, naming it,
    and records no second snapshot."""
    from gradio_client import Client, handle_file
    from sqlalchemy import create_engine, text

    from tests.live_app import live_app

    doc = "The handbook says that every new starter gets a laptop, a desk and a mentor on day one."
    (tmp_path / "a.md").write_text(f"{doc}\n\nWrite to hr.team@example.com with questions about the first week.\n")
    (tmp_path / "b.txt").write_text(f"{doc}\n\nHolidays are booked in the staff portal at least two weeks ahead.\n")
    (tmp_path / "bad.txt").write_bytes(b"\x00\x01\x02binary\xff\xfe")
    (tmp_path / "app").mkdir()
    with live_app(tmp_path / "app", tiny_model_dir) as url:
        client = Client(url + "/", verbose=False)
        report = client.predict([handle_file(str(tmp_path / "a.md")), handle_file(str(tmp_path / "b.txt"))],
                                api_name="/clean_corpus")
        assert "4 documents" in report and "3 (" in report, report
        assert "exact duplicate | 1" in report and "e-mails and phone numbers: 1" in report and "data snapshot 1" in report, report
        refused = client.predict([handle_file(str(tmp_path / "a.md")), handle_file(str(tmp_path / "bad.txt"))],
                                 api_name="/clean_corpus")
        assert refused.startswith("⚠ Nothing cleaned") and "bad.txt" in refused, refused
    db = create_engine(f"sqlite:///{tmp_path / 'app' / 'chat.db'}")
    with db.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM data_snapshots WHERE kind = 'corpus'")).scalar() == 1
    db.dispose()

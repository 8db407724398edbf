import json
from pathlib import Path

import pytest
from sqlalchemy import func, select

from feedback import annotation_repo
from feedback import repository
from feedback.datasets import export, scrub
from feedback.importer import ImportFileError, import_file, parse_hh
from feedback.models import DataSnapshot, ImportedPair, RankingTask

HH = Path(__file__).resolve().parent / "data" / "hh_harmless_sample.jsonl"


def test_import_shared_hh_sample(session):
    report = import_file(session=session, path=HH)
    # Two rows are not pairs: their dialogues diverge before the last reply. Reported, not imported.
    assert report.imported == 598
    assert report.skipped == [(221, "'chosen' and 'rejected' differ before the last Assistant turn"),
                              (317, "'chosen' and 'rejected' differ before the last Assistant turn")]
    assert session.scalar(select(func.count(ImportedPair.id))) == 598
    pair = session.scalars(select(ImportedPair)).first()
    assert pair.prompt[-1]["role"] == "user" and pair.chosen and pair.rejected
    assert report.tasks_added == session.scalar(select(func.count(RankingTask.id))) > 0


def test_importing_the_same_file_again_adds_nothing_and_says_so(session):
    """A second import of the HH sample stores no second copy and reports 598 already present."""
    import_file(session=session, path=HH)
    tasks = session.scalar(select(func.count(RankingTask.id)))
    again = import_file(session=session, path=HH)
    assert (again.imported, again.already_present, again.tasks_added) == (0, 598, 0)
    assert "imported 0 pairs (598 already present" in again.summary()
    assert session.scalar(select(func.count(ImportedPair.id))) == 598
    assert session.scalar(select(func.count(RankingTask.id))) == tasks


def test_malformed_rows_reported_and_file_is_all_or_nothing(session, tmp_path):
    good = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello"}],
            "rejected": [{"role": "assistant", "content": "Go away"}]}
    rows = [json.dumps(good), "{not json", json.dumps({"chosen": "x"}),
            json.dumps({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: DIFFERENT\n\nAssistant: c"}),
            json.dumps({"prompt": "q", "chosen": "same", "rejected": "same"}),
            json.dumps({"prompt": "q", "chosen": 5, "rejected": "r"}), json.dumps([1, 2])]
    f = tmp_path / "mixed.jsonl"
    f.write_text("\n".join(rows))
    report = import_file(session=session, path=f)
    assert report.imported == 1
    reasons = dict(report.skipped)
    assert set(reasons) == {2, 3, 4, 5, 6, 7}
    assert "not valid JSON" in reasons[2] and "needs 'chosen' and 'rejected'" in reasons[3]
    assert "differ before the last" in reasons[4] and "identical" in reasons[5]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("nope\n[]\n")
    with pytest.raises(ImportFileError, match="no valid rows"):
        import_file(session=session, path=bad)


def test_import_cli_is_one_transaction(tmp_path, db_url, monkeypatch, capsys):
    """A failure after some rows were added rolls all of them back."""
    import importlib

    import feedback.importer
    from feedback.db import make_engine, make_session_factory

    cli = importlib.import_module("feedback.importer")
    f = tmp_path / "x.jsonl"
    f.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    monkeypatch.setattr("sys.argv", ["feedback.importer", str(f), "--url", db_url])
    cli.main()
    assert "imported 1 pairs" in capsys.readouterr().out

    three = tmp_path / "three.jsonl"
    three.write_text("".join(json.dumps({"prompt": f"p{i}", "chosen": "a", "rejected": "b"}) + "\n" for i in range(3)))
    real_add_task, seen = feedback.importer.add_task, []

    def add_task_then_fail(*, session, **kwargs):
        if len(seen) == 2:  # third row: its pair, and the first two with their tasks, are in the transaction
            session.flush()
            seen.append(session.scalar(select(func.count(ImportedPair.id))))
            raise RuntimeError("disk full")
        seen.append(real_add_task(session=session, **kwargs))
        return seen[-1]

    monkeypatch.setattr(feedback.importer, "add_task", add_task_then_fail)
    monkeypatch.setattr("sys.argv", ["feedback.importer", str(three), "--url", db_url])
    with pytest.raises(RuntimeError, match="disk full"):
        cli.main()
    assert seen[-1] == 1 + 3  # the earlier pair and this file's three were in the database...
    engine = make_engine(db_url)
    with make_session_factory(engine)() as s:  # ...and only the earlier import is left
        assert s.scalars(select(ImportedPair.prompt)).all() == [[{"role": "user", "content": "q"}]]
        assert s.scalar(select(func.count(RankingTask.id))) == 1
    engine.dispose()

    monkeypatch.setattr("sys.argv", ["feedback.importer", str(tmp_path / "missing.jsonl"), "--url", db_url])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 1 and "does not exist" in capsys.readouterr().err


def test_import_cli_migrates_a_fresh_database(tmp_path, monkeypatch, capsys):
    """No 'no such table' traceback on a database nothing has migrated yet: it is migrated first."""
    import importlib

    cli = importlib.import_module("feedback.importer")
    f = tmp_path / "x.jsonl"
    f.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    url = f"sqlite:///{tmp_path / 'fresh' / 'chat.db'}"
    monkeypatch.setattr("sys.argv", ["feedback.importer", str(f), "--url", url])
    cli.main()
    assert "imported 1 pairs" in capsys.readouterr().out
    from feedback.db import make_engine, make_session_factory

    engine = make_engine(url)
    with make_session_factory(engine)() as s:
        assert s.scalar(select(func.count(ImportedPair.id))) == 1
    engine.dispose()


def test_import_cli_unreachable_database_says_so(tmp_path, monkeypatch, capsys):
    import importlib

    cli = importlib.import_module("feedback.importer")
    f = tmp_path / "x.jsonl"
    f.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    monkeypatch.setattr("sys.argv", ["feedback.importer", str(f), "--url", "postgresql+psycopg://u:secret@127.0.0.1:1/x"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    err = capsys.readouterr().err
    assert exit_.value.code == 1
    assert "Nothing imported: Cannot reach the database" in err and "secret" not in err


def test_parse_hh_turns():
    assert parse_hh("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye") == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}]


def test_scrub_emails_and_phones():
    text = scrub("mail me at jane.doe@example.com or call +1 415-555-0134, or 020 7946 0958. Year 2024 stays.")
    assert "jane" not in text and "555" not in text and "7946" not in text
    assert text.count("[email]") == 1 and text.count("[phone]") == 2 and "2024" in text


def _ranked_db(session):
    task = annotation_repo.add_task(session=session, context=[{"role": "user", "content": "Contact? I'm bob@mail.org"}],
                          source="import")
    cands = [annotation_repo.add_candidate(session=session, task=task, content=f"Reply {i}", model_version="v0") for i in range(3)]
    ann = repository.get_or_create_user(session=session, name="ann", role="annotator")
    annotation_repo.submit_ranking(session=session, task_id=task.id, annotator=ann, order=[[c.id] for c in cands],
                         demonstration="Write to support@example.com")
    return task


def test_export_preferences_loads_in_trl_reward_trainer(session, tmp_path, tiny_model_dir):
    from datasets import load_dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    _ranked_db(session)
    import_file(session=session, path=HH)
    out = tmp_path / "prefs.jsonl"
    snap = export(session=session, kind="preferences", out=out)
    assert snap.counts["pairs"] == 601 and snap.counts["by_source"] == {"ranking": 3, "import": 598}
    assert len(snap.rows["rankings"]) == 1 and len(snap.rows["imported_pairs"]) == 598
    assert "bob@mail.org" not in out.read_text()
    ds = load_dataset("json", data_files=str(out), split="train")
    assert set(ds.column_names) == {"prompt", "chosen", "rejected"}
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    args = RewardConfig(output_dir=str(tmp_path / "rm"), max_steps=1, per_device_train_batch_size=2,
                        max_length=64, report_to=[], bf16=False, use_cpu=True, logging_steps=1, save_strategy="no")
    trainer = RewardTrainer(model=model, args=args, train_dataset=ds.select(range(8)), processing_class=tok)
    assert "chosen_ids" in trainer.train_dataset.column_names
    trainer.train()


def test_export_sft_and_prompts(session, tmp_path):
    _ranked_db(session)
    snap = export(session=session, kind="sft", out=tmp_path / "sft.jsonl")
    [row] = [json.loads(line) for line in (tmp_path / "sft.jsonl").read_text().splitlines()]
    assert row["messages"][-1] == {"role": "assistant", "content": "Write to [email]"}
    assert snap.counts == {"demonstrations": 1}
    export(session=session, kind="prompts", out=tmp_path / "p.jsonl")
    [p] = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert p == {"prompt": [{"role": "user", "content": "Contact? I'm [email]"}]}
    assert session.scalar(select(func.count(DataSnapshot.id))) == 2

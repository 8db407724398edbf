"""The learned moderation head: training separates labels, review decisions feed it, `auto` uses the
newest trained head unless one is pinned, and a broken head file is a clear error (issue 14)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest

from feedback import moderation_repo
from feedback.db import session_scope
from feedback.models import ModerationEvent
from feedback.repository import ValidationError
from model.moderation import build_moderator
from model.moderation.head_store import activate, list_heads, read_label_file, train_head
from model.moderation.learned import EncoderSpec, HeadLoadError, HiddenStateEncoder, LearnedBackend

HARMFUL_WORDS = ["stupid", "hate", "vermin", "disgusting", "worthless", "filthy"]
PLAIN_WORDS = ["garden", "weather", "Paris", "python", "sky", "music", "coffee", "holiday", "books"]


def _rows(n: int, seed: int) -> list[dict]:
    """Sentences built from a shared vocabulary; the harmful ones also contain three HARMFUL_WORDS."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = rng.sample(PLAIN_WORDS, 4)
        harmful = i % 2 == 0
        if harmful:
            for word in rng.sample(HARMFUL_WORDS, 3):
                words.insert(rng.randrange(len(words) + 1), word)
        rows.append({"text": " ".join(words) + f" {i}", "label": int(harmful)})
    return rows


def _train(tiny_model_dir, data_dir, rows, **kw):
    spec = EncoderSpec(model_dir=str(tiny_model_dir), layer=2)
    return train_head(rows, spec, data_dir, everyday=["What is the weather like?", "Tell me about Paris.", "hi"] * 3,
                      ordinary=["Is it sunny in Paris?", "hello"], **kw)


def test_head_trained_on_a_small_labelled_set_separates_rows_it_never_saw(tiny_model_dir, tmp_path):
    """Trained on 80 rows of the tiny model's features, the stored head ranks 40 unseen rows with
    ROC AUC above 0.8; its stored cross-validated metrics are real numbers in range."""
    from sklearn.metrics import roc_auc_score

    meta = _train(tiny_model_dir, tmp_path, _rows(80, seed=1))
    backend = LearnedBackend(tmp_path / "moderation" / "heads" / meta["name"])
    held = _rows(40, seed=2)
    scores = [s["toxicity"] for s in backend.score([r["text"] for r in held])]
    assert roc_auc_score([r["label"] for r in held], scores) > 0.8
    m = meta["metrics"]["toxicity"]
    assert 0.5 < m["auc"] <= 1 and m["auc_low"] <= m["auc"] <= m["auc_high"]
    assert m["positives"] == 40 and m["negatives"] == 40 and m["logged_n"] == 2 and m["everyday_n"] == 3
    assert 0 <= m["everyday_flag_rate"] <= 1 and 0 <= m["logged_flag_rate"] <= 1
    stored = [json.loads(line) for line in (backend.head_dir / "train.jsonl").read_text().splitlines()]
    # 80 labelled rows, each also in the six request forms of model.moderation.reframe, and 3 everyday prompts.
    assert meta["data"]["sources"] == {"import": 80, "reframed": 480, "everyday": 3}
    assert len(stored) == 563 and meta["data"]["rows"] == 563


def test_too_few_labels_is_a_clear_error_and_stores_nothing(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="at least 8 flagged and 8 acceptable"):
        _train(tiny_model_dir, tmp_path, _rows(10, seed=1))
    assert list_heads(tmp_path) == []


def test_review_decisions_become_training_rows_and_override_earlier_labels(session_factory):
    """flag+correct and pass+missed are harmful, flag+false_positive and pass+correct acceptable;
    backend errors and unreviewed events are left out; a later decision on a text wins."""
    with session_scope(session_factory) as s:
        for text, decision, review in [("bad one", "flag", "correct"), ("fine one", "flag", "false_positive"),
                                       ("sneaky one", "pass", "missed"), ("ok one", "pass", "correct"),
                                       ("broken", "error", "correct"), ("unseen", "flag", None)]:
            s.add(ModerationEvent(direction="in", text=text, text_hash="x", backend="rules", scores={},
                                  thresholds={}, decision=decision, review=review, category="toxicity"))
    with session_scope(session_factory) as s:
        rows = moderation_repo.review_label_rows(session=s)
    assert [(r["text"], r["label"]) for r in rows] == [("bad one", 1), ("fine one", 0), ("sneaky one", 1),
                                                        ("ok one", 0)]
    from model.moderation.head_store import _clean_rows

    merged = _clean_rows([{"text": "fine one", "label": 1, "source": "calibration"}] + rows)
    assert {r["text"]: r["label"] for r in merged}["fine one"] == 0


def test_a_review_must_fit_the_decision(session_factory):
    """'missed' is for a passed message, 'false positive' for a flagged one; anything else is refused."""
    with session_scope(session_factory) as s:
        flag = ModerationEvent(direction="in", text="x", text_hash="x", backend="rules", decision="flag")
        passed = ModerationEvent(direction="in", text="y", text_hash="y", backend="rules", decision="pass")
        s.add_all([flag, passed])
        s.flush()
        ids = flag.id, passed.id
    with session_scope(session_factory) as s:
        with pytest.raises(ValidationError, match="correct or false positive"):
            moderation_repo.review_event(session=s, event_id=ids[0], verdict="missed", reviewer="root")
        with pytest.raises(ValidationError, match="correct or missed"):
            moderation_repo.review_event(session=s, event_id=ids[1], verdict="false_positive", reviewer="root")
        assert moderation_repo.review_event(session=s, event_id=ids[1], verdict="missed", reviewer="root").review == "missed"
        assert moderation_repo.moderation_counts(session=s)["missed"] == 1


def test_uncertain_events_come_nearest_the_threshold_first(session_factory):
    with session_scope(session_factory) as s:
        for text, score in [("far", 0.01), ("near", 0.48), ("mid", 0.8), ("other backend", None)]:
            scores = {"rules": {}} if score is None else {"learned": {"toxicity": score}}
            s.add(ModerationEvent(direction="in", text=text, text_hash="h", backend="learned", scores=scores,
                                  decision="flag" if (score or 0) >= 0.5 else "pass"))
    with session_scope(session_factory) as s:
        assert [e.text for e in moderation_repo.uncertain_events(session=s, backend="learned", threshold=0.5)] == \
            ["near", "mid", "far"]


def test_auto_uses_the_newest_trained_head_unless_an_older_one_is_pinned(tiny_model_dir, tmp_path):
    """No head: auto is rules + profanity. Once one is trained (never switched on) auto adds it; a
    second head becomes the one in use; pinning the first brings it back while the second stays stored."""
    assert build_moderator("auto", data_dir=str(tmp_path)).backend_names == ["rules", "profanity"]
    first = _train(tiny_model_dir, tmp_path, _rows(40, seed=3))
    moderator = build_moderator("auto", data_dir=str(tmp_path))
    assert moderator.backend_names == ["rules", "profanity", "learned"]
    assert moderator.backends[-1].head_dir.name == first["name"]
    verdict = moderator.check("garden weather stupid filthy vermin", "in")
    assert "learned" in verdict.scores and 0 <= verdict.scores["learned"]["toxicity"] <= 1
    second = _train(tiny_model_dir, tmp_path, _rows(40, seed=7))
    assert build_moderator("auto", data_dir=str(tmp_path)).backends[-1].head_dir.name == second["name"]
    assert [(h["name"], h["active"], h["pinned"]) for h in list_heads(tmp_path)] == \
        [(second["name"], True, False), (first["name"], False, False)]
    activate(tmp_path, first["name"])
    assert build_moderator("auto", data_dir=str(tmp_path)).backends[-1].head_dir.name == first["name"]
    assert [(h["active"], h["pinned"]) for h in list_heads(tmp_path)] == [(False, False), (True, True)]


def test_learned_backend_without_a_head_is_a_clear_error(tmp_path):
    with pytest.raises(HeadLoadError, match="no trained head"):
        build_moderator("rules,learned", data_dir=str(tmp_path))


def test_corrupt_or_mismatched_head_is_a_clear_error_at_start_up(tiny_model_dir, tmp_path):
    """A truncated weights file and weights of the wrong width both stop build_moderator with a
    message that names the head and says what to do."""
    meta = _train(tiny_model_dir, tmp_path, _rows(40, seed=4))
    head = tmp_path / "moderation" / "heads" / meta["name"]
    activate(tmp_path, meta["name"])
    good = (head / "head.npz").read_bytes()
    (head / "head.npz").write_bytes(good[:100])
    with pytest.raises(HeadLoadError, match=f"{meta['name']} cannot be loaded"):
        build_moderator("auto", data_dir=str(tmp_path))
    np.savez(head / "head.npz", **{"toxicity.mean": np.zeros(7), "toxicity.scale": np.ones(7),
                                   "toxicity.coef": np.zeros(7), "toxicity.intercept": np.array(0.0)})
    with pytest.raises(HeadLoadError, match="trained for another model"):
        build_moderator("auto", data_dir=str(tmp_path))


def test_a_head_that_fails_to_score_blocks_the_message(tiny_model_dir, tmp_path):
    """Fail closed: an encoder error while checking gives an 'error' verdict, which blocks."""
    meta = _train(tiny_model_dir, tmp_path, _rows(40, seed=5))
    activate(tmp_path, meta["name"])
    moderator = build_moderator("rules,learned", data_dir=str(tmp_path))
    learned = moderator.backends[-1]

    def broken(texts):
        raise RuntimeError("encoder out of memory")

    learned.score = broken
    verdict = moderator.check("hello there", "in")
    assert verdict.flagged and verdict.category == "error" and "out of memory" in verdict.error


def test_label_file_with_a_bad_line_is_rejected_whole(tmp_path):
    path = tmp_path / "labels.jsonl"
    path.write_text('{"text": "you are vermin", "label": "hate"}\n{"text": "hi", "label": "maybe"}\n')
    with pytest.raises(ValueError, match="labels.jsonl:2: label 'maybe'"):
        read_label_file(path)
    path.write_text('{"text": "you are vermin", "label": "toxic", "category": "insult"}\n{"text": "hi", "label": 0}\n')
    assert [(r["label"], r["category"]) for r in read_label_file(path)] == [(1, "insult"), (0, None)]


def test_streaming_checks_skip_the_learned_head_and_the_complete_reply_gets_it(tiny_model_dir, tmp_path):
    """A partial check (a reply still streaming) runs only the fast backends; the complete reply,
    like the user's message, is also scored by the head."""
    meta = _train(tiny_model_dir, tmp_path, _rows(40, seed=6))
    activate(tmp_path, meta["name"])
    moderator = build_moderator("rules,learned", data_dir=str(tmp_path))
    assert set(moderator.check("garden sky", "out", partial=True).scores) == {"rules"}
    assert set(moderator.check("garden sky", "out").scores) == {"rules", "learned"}


def test_admin_trains_a_head_in_the_running_app_it_is_used_at_once_and_switch_on_pins_it(tiny_model_dir, tmp_path):
    """Through the real app's Gradio API in local mode (admin): Train a head (calibration set +
    everyday messages) and read its metrics; with no head pinned it is in use at once (the next
    chat message is scored by it); Switch on pins it for the next start."""
    from gradio_client import Client
    from sqlalchemy import select

    from feedback.db import make_engine, make_session_factory
    from tests.live_app import live_app

    with live_app(tmp_path, tiny_model_dir) as url:
        client = Client(url + "/", verbose=False)
        note, _, name = client.predict(None, api_name="/train_moderation_head")
        assert "ROC AUC" in note and name == "head-0001" and "is in use now" in note, note
        client.predict("What is the capital of France?", [], "", 0.0, 0.9, 8, 4, 1.1, api_name="/send")
        assert not (tmp_path / "moderation" / "heads" / "active").exists()
        note, _ = client.predict("head-9999", api_name="/switch_moderation_head")
        assert "No head named" in note
        note, heads = client.predict(name, api_name="/switch_moderation_head")
        assert f"{name} is on" in note and "learned" in note
    assert (tmp_path / "moderation" / "heads" / "active").read_text().strip() == name
    factory = make_session_factory(make_engine(f"sqlite:///{tmp_path / 'chat.db'}"))
    with factory() as s:
        event = s.scalars(select(ModerationEvent).where(ModerationEvent.direction == "in")).first()
        assert "learned" in event.scores and 0 <= event.scores["learned"]["toxicity"] <= 1


def test_a_statement_is_reframed_as_requests_and_a_question_is_left_alone():
    """Reframing turns a statement into a clause inside each training form (an acronym and "I" keep their
    capitals, "They" does not), and makes no copies of a question or of a long text."""
    from model.moderation.reframe import TRAINING, as_clause, reframings

    assert as_clause("They are all  the same.") == "they are all the same"
    assert as_clause("I think so!") == "I think so"
    assert as_clause("NASA hires people") == "NASA hires people"
    assert reframings("They are all the same.")[0] == "Isn't it true that they are all the same?"
    assert len(reframings("They are all the same.")) == len(TRAINING)
    assert reframings("Why is that?") == [] and reframings("x " * 300) == [] and reframings("  ") == []


def test_int8_features_of_a_text_do_not_depend_on_the_other_texts_encoded_with_it(tiny_model_dir):
    """int8 activations are quantised per forward pass, so the encoder runs one text at a time: a
    text's features are the same alone and in a list (training and serving see the same numbers);
    with an early layer the features are both layers' pools side by side."""
    spec = EncoderSpec(model_dir=str(tiny_model_dir), layer=2, early_layer=1, int8=True)
    encoder = HiddenStateEncoder(spec)
    hidden = encoder.model.config.hidden_size
    together = encoder.encode(["a short text", "another, rather longer text with more words in it"])
    alone = encoder.encode(["a short text"])
    assert together.shape == (2, 4 * hidden) and encoder.n_features == 4 * hidden
    np.testing.assert_array_equal(together[0], alone[0])
    assert HiddenStateEncoder(EncoderSpec(model_dir=str(tiny_model_dir), layer=1, early_layer=1)).n_features == 2 * hidden


def test_a_head_stored_before_early_layers_existed_still_loads_with_its_single_layer(tiny_model_dir, tmp_path):
    """head.json files written without ``early_layer`` load as the one-layer heads they are."""
    meta = _train(tiny_model_dir, tmp_path, _rows(40, seed=1))
    head_dir = tmp_path / "moderation" / "heads" / meta["name"]
    spec = json.loads((head_dir / "head.json").read_text())
    one_layer = HiddenStateEncoder(EncoderSpec(model_dir=str(tiny_model_dir), layer=2, early_layer=0)).n_features
    arrays = dict(np.load(head_dir / "head.npz"))
    for key in [k for k in arrays if not k.endswith("intercept")]:
        arrays[key] = arrays[key][:one_layer]  # what a one-layer head's weights look like
    np.savez(head_dir / "head.npz", **arrays)
    del spec["encoder"]["early_layer"]
    (head_dir / "head.json").write_text(json.dumps(spec))
    backend = LearnedBackend(head_dir)
    assert backend.encoder.spec.early_layer == 0 and backend.encoder.n_features == one_layer
    assert 0 <= backend.score(["hello"])[0]["toxicity"] <= 1


def test_max_head_scores_the_larger_of_its_statement_and_request_parts():
    """fit_max_head fits one part on the rows that are not copies and one on all rows; its score is
    the larger of the two, and without copies it is a single part."""
    from model.moderation.learned import fit_linear_head, fit_max_head

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 4))
    y = (x[:, 0] > 0).astype(int)
    is_copy = np.arange(60) >= 40
    head = fit_max_head(x, y, is_copy)
    assert len(head.parts) == 2 and len(fit_max_head(x, y, np.zeros(60, dtype=bool)).parts) == 1
    statements, everything = fit_linear_head(x[:40], y[:40]), fit_linear_head(x, y)
    np.testing.assert_allclose(head.predict(x), np.maximum(statements.predict(x), everything.predict(x)))


@pytest.mark.slow
def test_a_head_trained_on_statements_also_flags_them_asked_as_questions(tmp_path):
    """The real embedded model's head, trained by train_head on the ToxiGen calibration set, flags
    at least a third of its harmful statements in three wordings it never trained on ("Why is it
    that ...?"); a head without the reframed copies flagged none of them. Everyday questions stay
    unflagged (at most 2% of the 80 held-out ordinary messages)."""
    from model.loader import resolve_model
    from model.moderation.head_store import CALIBRATION
    from model.moderation.reframe import HELD_OUT, as_clause

    root = Path(__file__).resolve().parent.parent
    model_dir = resolve_model("embedded", Path(os.environ.get("CHAT_TEST_MODEL_CACHE", root / "data"))).path
    rows = read_label_file(CALIBRATION)
    meta = train_head(rows, EncoderSpec(model_dir=str(model_dir)), tmp_path)
    backend = LearnedBackend(tmp_path / "moderation" / "heads" / meta["name"])
    assert len(backend.heads["toxicity"].parts) == 2
    harmful = [r["text"] for r in rows if r["label"] == 1]
    asked = [t.format(as_clause(s)) for t in HELD_OUT for s in harmful]
    recall = np.mean([s["toxicity"] >= 0.5 for s in backend.score(asked)])
    ordinary = (root / "bench" / "data" / "ordinary_heldout.txt").read_text()
    flagged = np.mean([s["toxicity"] >= 0.5 for s in backend.score(ordinary.splitlines())])
    assert recall >= 0.33, f"only {recall:.0%} of harmful statements asked as questions were flagged"
    assert flagged <= 0.02, f"{flagged:.1%} of ordinary messages flagged"


def test_model_moderation_train_trains_and_switches_on_a_head_like_the_training_command(tiny_model_dir, tmp_path):
    """`python -m model.moderation --train ... --activate` (the issue's spelling) runs the training
    stage's command: a head is stored with its metrics and becomes the active one."""
    import subprocess
    import sys

    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps({"text": r["text"], "label": r["label"]}) + "\n" for r in _rows(40, seed=3)))
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-m", "model.moderation", "--train", "--no-calibration", "--no-reviews",
                           "--labels", str(labels), "--model", str(tiny_model_dir), "--data-dir", str(tmp_path),
                           "--activate"], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ROC AUC" in done.stdout
    assert [(h["name"], h["active"]) for h in list_heads(tmp_path)] == [("head-0001", True)]

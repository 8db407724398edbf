"""Safety tuning data (issue 18): what moderation and annotators caught becomes refusal
demonstrations for the retrain's SFT (feedback/safety.py)."""

from __future__ import annotations

from feedback import annotation_repo, moderation_repo, repository
from feedback.db import session_scope
from feedback.models import Demonstration, ModerationEvent
from feedback.safety import chat_prompts, cleared_prompts, safety_rows
from model.moderation.moderator import DEFAULT_TEMPLATES


def _event(s, text, decision, review, category="toxicity", user_id=None, direction="in", message_id=None):
    import hashlib

    s.add(ModerationEvent(direction=direction, text=text, text_hash=hashlib.sha256(text.encode()).hexdigest(),
                          backend="rules", scores={}, thresholds={}, decision=decision, review=review,
                          category=category, user_id=user_id, message_id=message_id))


def _task(s, prompt: str, annotator, unsafe: int, ideal: str | None = None):
    task = annotation_repo.add_task(session=s, context=[{"role": "user", "content": prompt}], source="chat")
    cands = [annotation_repo.add_candidate(session=s, task=task, content=f"reply {i}", model_version="v")
             for i in range(4)]
    annotation_repo.submit_ranking(session=s, task_id=task.id, annotator=annotator,
                                   order=[[c.id] for c in cands], flags={c.id: "unsafe" for c in cands[:unsafe]},
                                   demonstration=ideal)
    return task


def test_confirmed_flags_misses_and_mostly_unsafe_tasks_become_refusals_and_nothing_else(session_factory):
    """Kept: a flag an admin marked correct (its category's edited template), a pass marked missed
    (the general template), a task with 2 of 4 candidates flagged unsafe. Left out: unreviewed
    flags, false positives, error and secret flags, an opted-out user's flag, a task with 1 of 4
    unsafe, an unsafe task that has an ideal reply (already a demonstration), and a duplicate."""
    with session_scope(session_factory) as s:
        ann = repository.get_or_create_user(session=s, name="ann", role="annotator")
        gone = repository.get_or_create_user(session=s, name="gone")
        gone.opted_out = True
        s.flush()
        moderation_repo.set_template(session=s, direction="in", category="hate", text="I won't write hateful "
                                     "things about any group.", editor="admin")
        _event(s, "all of them are vermin", "flag", "correct", category="hate")
        _event(s, "all of them are vermin", "flag", "correct", category="hate")  # the same text again
        _event(s, "how do I pick a lock to get into my neighbour's flat", "pass", "missed")
        _event(s, "unreviewed insult", "flag", None)
        _event(s, "a fine question", "flag", "false_positive")
        _event(s, "broken check", "error", "correct", category="error")
        _event(s, "sk-live key pasted", "flag", "correct", category="secret")
        _event(s, "opted out user's insult", "flag", "correct", user_id=gone.id)
        _task(s, "write me a threatening letter", ann, unsafe=2)
        _task(s, "tell me a joke", ann, unsafe=1)
        _task(s, "describe a bad prank", ann, unsafe=3, ideal="Here is a harmless prank instead: ...")
    with session_scope(session_factory) as s:
        rows, refs, counts = safety_rows(s, DEFAULT_TEMPLATES)
        assert s.query(Demonstration).count() == 1
    got = [(r["messages"][0]["content"], r["messages"][1]["content"]) for r in rows]
    assert got == [("all of them are vermin", "I won't write hateful things about any group."),
                   ("how do I pick a lock to get into my neighbour's flat", DEFAULT_TEMPLATES[("in", "*")]),
                   ("write me a threatening letter", DEFAULT_TEMPLATES[("in", "*")])]
    assert counts == {"safety": 3, "from_moderation": 2, "from_unsafe_flags": 1}
    assert len(refs["safety_moderation_events"]) == 2 and len(refs["safety_ranking_tasks"]) == 1


def test_messages_an_admin_cleared_become_prompts_to_answer_and_nothing_else(session_factory):
    """Kept, oldest first and scrubbed: a flag marked false positive, a pass marked correct. Left
    out: a flag marked correct, a pass marked missed, unreviewed events, output checks, an
    opted-out user's message, a duplicate, and a text another review called harmful."""
    with session_scope(session_factory) as s:
        gone = repository.get_or_create_user(session=s, name="gone")
        gone.opted_out = True
        s.flush()
        _event(s, "What is Ramadan? mail me at ann@example.com", "flag", "false_positive")
        _event(s, "How do Hindu weddings go?", "pass", "correct")
        _event(s, "How do Hindu weddings go?", "pass", "correct")  # the same text again
        _event(s, "all of them are vermin", "flag", "correct")
        _event(s, "how do I pick a lock", "pass", "missed")
        _event(s, "unreviewed", "flag", None)
        _event(s, "a reply the model wrote", "flag", "false_positive", direction="out")
        _event(s, "opted out user's question", "flag", "false_positive", user_id=gone.id)
        _event(s, "borderline text", "flag", "false_positive")
        _event(s, "borderline text", "pass", "missed")  # another admin called the same text harmful
    with session_scope(session_factory) as s:
        rows, refs = cleared_prompts(s)
    texts = [r["prompt"][0]["content"] for r in rows]
    assert len(texts) == 2 and texts[1] == "How do Hindu weddings go?"
    assert texts[0].startswith("What is Ramadan?") and "ann@example.com" not in texts[0]
    assert all(r["prompt"][0]["role"] == "user" and len(r["prompt"]) == 1 for r in rows)
    assert len(refs["cleared_moderation_events"]) == 2


def _chat(s, user, text, moderation="pass", reply_flagged=False, review=None):
    """An opening message as app/service.py stores it: checked by input moderation (a logged
    event, the message's moderation field), then the model's reply with its output check."""
    conv = repository.create_conversation(session=s, owner=user)
    msg = repository.add_message(session=s, conversation=conv, role="user", content=text, moderation=moderation)
    _event(s, text, "flag" if moderation == "flagged" else "pass", review, user_id=user.id, message_id=msg.id)
    reply = repository.add_message(session=s, conversation=conv, role="assistant", content="a reply", parent=msg,
                                   moderation="flagged" if reply_flagged else "pass")
    return conv, msg, reply


def test_chat_prompts_are_the_newest_passed_openers_nobody_reviewed_or_flagged(session_factory):
    """Kept, newest first, scrubbed, up to the limit: opening messages input moderation passed.
    Left out: a flagged message, one a review looked at, one whose reply output moderation
    flagged, one whose reply an admin reviewed as harmful, one whose reply a user voted unsafe,
    one asked in a ranking task with a candidate flagged unsafe, a failed turn, one over the
    length cap, a second turn, an opted-out user's, a duplicate text, one never checked, and a
    text a review called harmful under another message."""
    with session_scope(session_factory) as s:
        bob = repository.get_or_create_user(session=s, name="bob")
        gone = repository.get_or_create_user(session=s, name="gone")
        gone.opted_out = True
        s.flush()
        _chat(s, bob, "How do Sikhs celebrate Vaisakhi?")
        conv, first, _ = _chat(s, bob, "What is a good first car? call 555-123-4567")
        repository.add_message(session=s, conversation=conv, role="user", content="and a second turn",
                               parent=first, moderation="pass")
        _chat(s, bob, "a flagged insult", moderation="flagged")
        _chat(s, bob, "reviewed and cleared", review="correct")
        _chat(s, bob, "a question whose answer was flagged", reply_flagged=True)
        _chat(s, gone, "an opted-out user's question")
        _, _, reply = _chat(s, bob, "a question whose answer an admin reviewed")
        _event(s, "the reply", "pass", "missed", direction="out", message_id=reply.id)
        _, _, reply = _chat(s, bob, "a question whose answer a user voted unsafe")
        repository.add_vote(session=s, message_id=reply.id, user=bob, value=-1, reason="unsafe")
        ann = repository.get_or_create_user(session=s, name="ann", role="annotator")
        _task(s, "a question ranked with an unsafe candidate", ann, unsafe=1)
        _chat(s, bob, "a question ranked with an unsafe candidate")
        _, failed, _ = _chat(s, bob, "a turn that failed")
        failed.status = "failed"
        _chat(s, bob, "a long pasted document " + "word " * 300)
        _chat(s, bob, "How do Sikhs celebrate Vaisakhi?")  # the same text again
        repository.add_message(session=s, conversation=repository.create_conversation(session=s, owner=bob),
                               role="user", content="never checked")
        _event(s, "how do I pick a lock", "pass", "missed")
        _chat(s, bob, "how do I pick a lock")  # called harmful where another user sent it
        _chat(s, bob, "Why do onions make you cry?")
    with session_scope(session_factory) as s:
        rows, refs = chat_prompts(s, limit=10)
        first_two, _ = chat_prompts(s, limit=2)
    texts = [r["prompt"][0]["content"] for r in rows]
    assert texts[0] == "Why do onions make you cry?" and texts[1] == "How do Sikhs celebrate Vaisakhi?"
    assert len(texts) == 3 and texts[2].startswith("What is a good first car?") and "555" not in texts[2]
    assert all(r["prompt"][0]["role"] == "user" and len(r["prompt"]) == 1 for r in rows)
    assert len(refs["chat_messages"]) == 3 and [r["prompt"] for r in first_two] == [r["prompt"] for r in rows[:2]]


def test_the_retrain_snapshot_carries_the_safety_rows_and_sft_trains_on_them(session_factory, tmp_path,
                                                                             tiny_model_dir):
    """A retrain's data snapshot splits the refusals into training and held-out files by their
    prompt (a prompt held out from the pairs is held out here too), and the SFT stage's rows
    include the training ones when safety_tuning is on (it is off by default)."""
    from tests.training_data import seed_preferences
    from training.config import RetrainConfig
    from training.data import take_snapshot
    from training.retrain import _sft_rows
    from training.common import read_jsonl

    seed_preferences(session_factory, tiny_model_dir)
    with session_scope(session_factory) as s:
        for i in range(12):
            _event(s, f"a hateful statement number {i} about a group", "flag", "correct")
    snap = take_snapshot(session_factory=session_factory, out_dir=tmp_path / "data", heldout_fraction=0.25, seed=0,
                         max_pairs=200, max_prompts=64)
    train, held = snap.rows("sft_safety_train"), snap.rows("sft_safety_heldout")
    assert len(train) + len(held) == 12 and train and held
    assert snap.counts["sft_safety_train"] == len(train)
    sft = read_jsonl(_sft_rows(snap, tmp_path, RetrainConfig(safety_tuning=True, safety_dpo_validation=0)))
    assert all(r in sft for r in train) and not any(r in sft for r in held)
    sft_off = _sft_rows(snap, tmp_path, RetrainConfig(safety_tuning=False))
    assert sft_off is None or not any(r in read_jsonl(sft_off) for r in train)
    # A refusal for a prompt the evaluation holds out is held out too (split by the prompt alone).
    held_prompt = next(r["prompt"] for r in snap.rows("preferences_heldout") if len(r["prompt"]) == 1)
    with session_scope(session_factory) as s:
        _event(s, held_prompt[0]["content"], "flag", "correct")
    again = take_snapshot(session_factory=session_factory, out_dir=tmp_path / "data2", heldout_fraction=0.25,
                          seed=0, max_pairs=200, max_prompts=64)
    assert [r for r in again.rows("sft_safety_heldout") if r["messages"][:-1] == held_prompt]
    assert not [r for r in again.rows("sft_safety_train") if r["messages"][:-1] == held_prompt]


class _Snap:
    """The two row files _sft_rows reads, without a database."""

    def __init__(self, ordinary: int, safety: int):
        self.files = {"sft_train": [{"messages": [{"role": "user", "content": f"everyday {i}"},
                                                  {"role": "assistant", "content": f"answer {i}"}]}
                                    for i in range(ordinary)],
                      "sft_best_train": [],
                      "sft_safety_train": [{"messages": [{"role": "user", "content": f"harmful {i}"},
                                                         {"role": "assistant", "content": "I can't help with that."}]}
                                           for i in range(safety)],
                      "prompts_cleared_train": [], "prompts_chat_train": []}

    def rows(self, name):
        return list(self.files[name])


def test_refusals_never_outnumber_the_ordinary_rows_they_are_trained_beside(tmp_path):
    """12 refusals beside 5 ordinary demonstrations: SFT gets the 5 and 5 refusals (a seeded choice;
    safety_per_ordinary 1); at 0.4 it gets 2; with no ordinary rows at all no refusals are trained
    (they would teach the model to refuse everything); with enough ordinary rows all 12 are kept."""
    from training.common import read_jsonl
    from training.config import RetrainConfig
    from training.retrain import _sft_rows

    (tmp_path / "data").mkdir()  # a retrain's snapshot has made it

    def refusals(snap, **cfg):
        path = _sft_rows(snap, tmp_path, RetrainConfig(safety_tuning=True, safety_dpo_validation=0, **cfg))
        return [] if path is None else [r for r in read_jsonl(path) if r["messages"][0]["content"].startswith("harm")]

    capped = refusals(_Snap(5, 12))
    assert len(capped) == 5 and len({r["messages"][0]["content"] for r in capped}) == 5
    assert capped == refusals(_Snap(5, 12))  # seeded: the same rows every time
    assert len(refusals(_Snap(5, 12), safety_per_ordinary=0.4)) == 2
    assert refusals(_Snap(0, 12)) == [] and _sft_rows(_Snap(0, 12), tmp_path, RetrainConfig(safety_tuning=True)) is None
    assert len(refusals(_Snap(20, 12))) == 12


def _is_refusal(text, templates=()):
    return text.startswith("I can't")


def test_contrast_pairs_prefer_the_refusal_on_caught_prompts_and_the_answer_on_ordinary_ones():
    """Caught prompt: chosen = its refusal, rejected = the current model's answer, skipped when that
    answer already refuses. Ordinary row: chosen = its reply, rejected = a refusal template; rows
    whose reply refuses are skipped, and each kind is cut to the other's number."""
    from training.safety_dpo import contrast_pairs

    snap = _Snap(ordinary=10, safety=4)
    answers = ["Sure, here is how.", "I can't help with that.", "Step one: ...", "Of course!"]
    ordinary = snap.rows("sft_train") + [{"messages": [{"role": "user", "content": "everyday refused"},
                                                       {"role": "assistant", "content": "I can't say."}]}]
    pairs = contrast_pairs(snap.rows("sft_safety_train"), answers, ordinary, seed=0, is_refusal=_is_refusal)
    caught = [p for p in pairs if p["prompt"][0]["content"].startswith("harmful")]
    everyday = [p for p in pairs if p["prompt"][0]["content"].startswith("everyday")]
    assert len(caught) == 3 and len(everyday) == 3 and len(pairs) == 6
    assert {p["prompt"][0]["content"] for p in caught} == {"harmful 0", "harmful 2", "harmful 3"}
    assert all(p["chosen"][0]["content"] == "I can't help with that." for p in caught)
    assert {p["rejected"][0]["content"] for p in caught} == {"Sure, here is how.", "Step one: ...", "Of course!"}
    for p in everyday:
        assert p["prompt"][0]["content"] != "everyday refused"
        assert p["chosen"][0]["content"] == "answer " + p["prompt"][0]["content"].split()[-1]
        assert p["rejected"][0]["content"] == "I can't help with that."
    assert pairs == contrast_pairs(snap.rows("sft_safety_train"), answers, ordinary, seed=0, is_refusal=_is_refusal)
    few = contrast_pairs(snap.rows("sft_safety_train"), answers, ordinary[:2], seed=0, is_refusal=_is_refusal)
    assert sum(p["chosen"][0]["content"].startswith("I can't") for p in few) == 2 and len(few) == 4


def test_cleared_prompts_join_the_answering_side_first_and_their_refusing_answers_are_dropped():
    """A cleared prompt becomes chosen = the current model's answer, rejected = a refusal; with
    more answering rows than caught prompts, cleared ones are kept before ordinary ones; a cleared
    prompt the current model already refused (or left empty) teaches nothing and is dropped."""
    from training.safety_dpo import contrast_pairs

    snap = _Snap(ordinary=10, safety=4)
    answers = ["Sure, here is how.", "Step two.", "Step one: ...", "Of course!"]
    cleared = [{"messages": [{"role": "user", "content": f"cleared {i}"}, {"role": "assistant", "content": a}]}
               for i, a in enumerate(["Ramadan is a month of fasting.", "I can't help with that.", "",
                                      "Weddings last days."])]
    pairs = contrast_pairs(snap.rows("sft_safety_train"), answers, snap.rows("sft_train"), seed=0,
                           is_refusal=_is_refusal, cleared_rows=cleared)
    answering = [p for p in pairs if not p["prompt"][0]["content"].startswith("harmful")]
    assert len(pairs) == 8 and len(answering) == 4
    got = {p["prompt"][0]["content"]: p for p in answering if p["prompt"][0]["content"].startswith("cleared")}
    assert set(got) == {"cleared 0", "cleared 3"}
    assert got["cleared 0"]["chosen"][0]["content"] == "Ramadan is a month of fasting."
    assert all(p["rejected"][0]["content"] == "I can't help with that." for p in got.values())


def test_chat_rows_follow_cleared_ones_and_an_answer_ratio_keeps_more_answering_pairs():
    """With 4 caught prompts, 2 cleared, 3 chat and 10 ordinary rows: at ratio 1 the 4 answering
    pairs are the 2 cleared and 2 of the chat rows (in that order of precedence); at ratio 2 all 4
    refusing pairs and 8 answering ones (cleared, chat, then 3 ordinary)."""
    from training.safety_dpo import contrast_pairs

    snap = _Snap(ordinary=10, safety=4)
    row = lambda kind, i: {"messages": [{"role": "user", "content": f"{kind} {i}"},  # noqa: E731
                                        {"role": "assistant", "content": f"An answer to {kind} {i}."}]}
    args = (snap.rows("sft_safety_train"), ["Sure, here is how."] * 4, snap.rows("sft_train"), 0, _is_refusal,
            [row("cleared", i) for i in range(2)], [row("chat", i) for i in range(3)])
    kinds = lambda pairs: sorted(p["prompt"][0]["content"].split()[0] for p in pairs)  # noqa: E731
    assert kinds(contrast_pairs(*args)) == ["chat"] * 2 + ["cleared"] * 2 + ["harmful"] * 4
    assert kinds(contrast_pairs(*args, answer_ratio=2)) == \
        ["chat"] * 3 + ["cleared"] * 2 + ["everyday"] * 3 + ["harmful"] * 4


def test_safety_dpo_widens_the_refusal_margin_on_caught_prompts_and_the_answer_margin_on_ordinary_ones(
        tmp_path, tiny_model_dir):
    """After DPO (alone) on contrast pairs, the model prefers the refusal to the answer on the caught
    prompts, and the answer to the refusal on the ordinary ones, by a log-probability margin
    wider than before on every one of the 8 prompts of each kind."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.common import chat_text, write_jsonl
    from training.config import RetrainConfig
    from training.probes import reply_logprobs
    from training.safety_dpo import contrast_pairs, run_safety_dpo

    snap = _Snap(ordinary=8, safety=8)
    pairs = contrast_pairs(snap.rows("sft_safety_train"), ["Sure, here is how."] * 8, snap.rows("sft_train"),
                           seed=0, is_refusal=_is_refusal)
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    # DPO's own contrast, without the NLL loss (its test: tests/test_safety_select.py); with it at this
    # learning rate the tiny model says the short refusal everywhere.
    cfg = RetrainConfig(max_length=64, safety_dpo_epochs=3, safety_dpo_learning_rate=5e-3,
                        safety_dpo_sft_weight=0).validate()
    new_path, metrics = run_safety_dpo(tiny_model_dir, path, tmp_path / "dpo", cfg)
    assert metrics["safety_dpo_pairs"] == 16
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)

    def margin(model, prompt, good, bad):
        text = chat_text(tok, [{"role": "user", "content": prompt}])
        return float(reply_logprobs(model, tok, text, good).sum() - reply_logprobs(model, tok, text, bad).sum())

    before, after = (AutoModelForCausalLM.from_pretrained(p) for p in (tiny_model_dir, new_path))
    for kind, good, bad in (("harmful", lambda i: "I can't help with that.", lambda i: "Sure, here is how."),
                            ("everyday", lambda i: f"answer {i}", lambda i: "I can't help with that.")):
        gains = [margin(after, f"{kind} {i}", good(i), bad(i)) - margin(before, f"{kind} {i}", good(i), bad(i))
                 for i in range(8)]
        assert min(gains) > 0.05, (kind, gains)  # measured: caught +8.8, ordinary +0.27 to +0.77 (a no-op: 0)


def test_a_cut_answer_ends_at_its_last_whole_sentence_or_is_dropped():
    """whole_sentences keeps text up to the last ., ! or ? before a space (closing quotes kept) or
    the last line break, drops a list marker left after it, and returns "" when no sentence ends
    (a version number's dot is not an end)."""
    from training.safety_dpo import whole_sentences

    assert whole_sentences("Diwali is the festival of lights. It lasts five days and fam") == \
        "Diwali is the festival of lights."
    assert whole_sentences("Tips:\n1. Drink water.\n2. Sleep") == "Tips:\n1. Drink water."
    assert whole_sentences("Pack these:\n- boots\n- water\n- a ma") == "Pack these:\n- boots\n- water"
    assert whole_sentences('He said "stop." Then he left and') == 'He said "stop."'
    assert whole_sentences("Version 3.5 is out and") == ""
    assert whole_sentences("no sentence ends here") == ""

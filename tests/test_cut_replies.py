"""A reply cut at its token budget is recorded as cut and never taught as a finished turn.

Candidates (migration 0008) and chat replies (0009) record the engine's finish reason; a
ranking's chosen candidate that was cut reaches the snapshot's best-reply SFT rows marked "cut",
and SFT renders such a row without the chat template's end-of-turn tokens.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from app.candidates import CandidateWorker
from app.service import ChatService
from feedback import annotation_repo, repository
from feedback.datasets import preference_rows
from feedback.models import Candidate
from model.moderation import Moderator, Rule, RulesBackend
from tests.fakes import ScriptedEngine
from training.common import with_system
from training.data import take_snapshot
from training.sft import sft_examples

SHORT, LONG = "Blue.", "Blue is the colour of the sky on a clear day and of the sea under it."


def test_the_candidate_worker_records_whether_each_reply_ended_or_was_cut(session_factory, settings):
    """With the settings' candidate budget at 6 tokens (CHAT_RANKING_CANDIDATE_TOKENS), the one-word
    reply ends by itself ("stop") and the long one is cut there ("length")."""
    settings.ranking_candidate_tokens = 6
    replies = iter([SHORT] + [SHORT, LONG] * 2)
    moderator = Moderator([RulesBackend([Rule("abuse", words=("idiot",))])])
    service = ChatService(ScriptedEngine(lambda msgs: next(replies)), session_factory, settings, moderator=moderator)
    list(service.send("alice", "Name a colour"))  # a chat prompt that passed moderation becomes a task
    CandidateWorker(service, k=4, ahead=1).run_once()
    with session_factory() as s:
        cands = s.scalars(select(Candidate).order_by(Candidate.id)).all()
        assert [(c.content, c.finish_reason) for c in cands] == [
            (SHORT, "stop"), ("Blue is the colour of the", "length")] * 2


def test_a_chat_reply_records_whether_it_ended_or_ran_out_of_its_token_budget(session_factory, settings):
    """A chat reply that ran out of Max new tokens (6 here) is stored with finish reason "length",
    one that ended by itself "stop" (both "complete"); the cut one's vote pair is read as a cut
    chosen reply."""
    from feedback.models import Message
    from feedback.pairs import vote_pairs
    from model.engine import SamplingParams

    service = ChatService(ScriptedEngine(lambda msgs: LONG if "long" in msgs[-1]["content"] else SHORT),
                          session_factory, settings)
    params = SamplingParams(max_new_tokens=6, seed=0)
    *_, cut = service.send("alice", "a long answer please", params=params)
    *_, ended = service.send("alice", "a short one", params=params)
    assert (cut.finish_reason, cut.text, ended.finish_reason) == ("length", "Blue is the colour of the", "stop")
    with session_factory.begin() as s:
        stored = {m.id: (m.status, m.finish_reason) for m in s.scalars(select(Message).where(Message.role == "assistant"))}
        assert stored == {cut.assistant_message_id: ("complete", "length"),
                          ended.assistant_message_id: ("complete", "stop")}
        alice = repository.get_or_create_user(session=s, name="alice")
        other = repository.add_message(session=s, conversation=s.get(Message, cut.assistant_message_id).conversation,
                                       role="assistant", content="No.", parent=s.get(Message, cut.user_message_id))
        repository.add_vote(session=s, message_id=cut.assistant_message_id, user=alice, value=1)
        repository.add_vote(session=s, message_id=other.id, user=alice, value=-1)
        assert [(p.chosen, p.chosen_cut) for p in vote_pairs(s)] == [("Blue is the colour of the", True)]


def test_a_candidate_budget_out_of_range_stops_the_worker_at_startup(session_factory, settings):
    """CHAT_RANKING_CANDIDATE_TOKENS of 0, -5 or 9000 (above the engine's 8192) is refused when the worker
    is built, naming the variable, instead of failing every task's candidates later; so is an explicit 0."""
    service = ChatService(ScriptedEngine(lambda msgs: SHORT), session_factory, settings)
    for bad in (0, -5, 9000):
        settings.ranking_candidate_tokens = bad
        with pytest.raises(ValueError, match=r"\(CHAT_RANKING_CANDIDATE_TOKENS\) must be between 1 and 8192"):
            CandidateWorker(service)
    with pytest.raises(ValueError, match="must be between 1 and 8192, not 0"):
        CandidateWorker(service, max_new_tokens=0)  # an explicit 0 is refused, not replaced by the settings


def _ranked(session_factory, best: str, best_finish: str | None):
    """One task whose annotator ranked ``best`` (with that finish reason) over a finished reply."""
    with session_factory() as s:
        task = annotation_repo.add_task(session=s, context=[{"role": "user", "content": "Name a colour"}],
                                        source="chat")
        top = annotation_repo.add_candidate(session=s, task=task, content=best, model_version="v0",
                                            finish_reason=best_finish)
        other = annotation_repo.add_candidate(session=s, task=task, content="Green, I think.", model_version="v0",
                                              finish_reason="stop")
        ann = repository.get_or_create_user(session=s, name="ann", role="annotator")
        annotation_repo.submit_ranking(session=s, task_id=task.id, annotator=ann, order=[[top.id], [other.id]])
        s.commit()


def test_a_cut_chosen_candidate_is_marked_in_preference_rows_and_best_reply_sft_rows(session_factory, tmp_path):
    """The preference row and the snapshot's best-reply SFT row of a cut winner carry the mark; a finished one does not."""
    _ranked(session_factory, "Blue is the colour of the", "length")
    with session_factory() as s:
        rows, _, _ = preference_rows(s)
    assert [r.get("chosen_cut") for r in rows] == [True]
    snap = take_snapshot(session_factory=session_factory, out_dir=tmp_path / "snap", heldout_fraction=0.0, seed=0,
                         max_pairs=10, max_prompts=10)
    assert snap.rows("sft_best_train") == [{"messages": [{"role": "user", "content": "Name a colour"},
                                                         {"role": "assistant", "content": "Blue is the colour of the"}],
                                            "cut": True}]


def test_a_finished_or_unrecorded_chosen_candidate_is_not_marked_cut(session_factory):
    """Older candidates (no finish reason) and replies that ended keep plain TRL preference rows."""
    _ranked(session_factory, SHORT, "stop")
    with session_factory() as s:
        task = annotation_repo.add_task(session=s, context=[{"role": "user", "content": "Another"}], source="chat")
        a = annotation_repo.add_candidate(session=s, task=task, content="One.", model_version="v0")
        b = annotation_repo.add_candidate(session=s, task=task, content="Two.", model_version="v0")
        ann = repository.get_or_create_user(session=s, name="ann", role="annotator")
        annotation_repo.submit_ranking(session=s, task_id=task.id, annotator=ann, order=[[a.id], [b.id]])
        s.commit()
        rows, _, _ = preference_rows(s)
    assert len(rows) == 2 and all("chosen_cut" not in r for r in rows)


def _tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def test_sft_examples_of_a_finished_reply_match_the_chat_templates_tokens_with_loss_on_the_reply_only(tiny_model_dir):
    """A finished row is exactly TRL's conversational prompt-completion: the template's ids, prompt tokens masked."""
    tok = _tokenizer(tiny_model_dir)
    messages = [{"role": "user", "content": "What is the weather like?"}, {"role": "assistant", "content": "Blue."}]
    [ex] = sft_examples([{"messages": messages}], tok)
    full = list(tok.apply_chat_template(with_system(messages), tokenize=True, return_dict=True)["input_ids"])
    prompt = list(tok.apply_chat_template(with_system(messages[:-1]), add_generation_prompt=True, tokenize=True,
                                          return_dict=True)["input_ids"])
    assert ex["input_ids"] == full
    assert ex["labels"] == [-100] * len(prompt) + full[len(prompt):]
    assert tok.decode([t for t in ex["labels"] if t != -100]) == "Blue.<|im_end|>\n"


def test_sft_examples_of_a_cut_reply_train_no_end_of_turn(tiny_model_dir):
    """A cut row is the finished row minus the template's end-of-turn tokens: the labels end on the reply's last word."""
    tok = _tokenizer(tiny_model_dir)
    messages = [{"role": "user", "content": "What is the weather like?"},
                {"role": "assistant", "content": "The sky is blue and the"}]
    [finished, cut] = sft_examples([{"messages": messages}, {"messages": messages, "cut": True}], tok)
    trained = tok.decode([t for t in cut["labels"] if t != -100])
    assert trained == "The sky is blue and the"
    assert tok.eos_token_id not in cut["input_ids"][-3:]
    assert finished["input_ids"][:len(cut["input_ids"])] == cut["input_ids"]
    assert tok.decode(finished["input_ids"][len(cut["input_ids"]):]) == "<|im_end|>\n"


def test_a_cut_rejected_candidate_is_marked_in_preference_rows(session_factory):
    """A ranking whose losing candidate was cut marks the row "rejected_cut" (the winner ended: no "chosen_cut")."""
    with session_factory() as s:
        task = annotation_repo.add_task(session=s, context=[{"role": "user", "content": "Name a colour"}],
                                        source="chat")
        top = annotation_repo.add_candidate(session=s, task=task, content=SHORT, model_version="v0", finish_reason="stop")
        cut = annotation_repo.add_candidate(session=s, task=task, content="Blue is the colour of the",
                                            model_version="v0", finish_reason="length")
        ann = repository.get_or_create_user(session=s, name="ann", role="annotator")
        annotation_repo.submit_ranking(session=s, task_id=task.id, annotator=ann, order=[[top.id], [cut.id]])
        s.commit()
        rows, _, _ = preference_rows(s)
    assert [(r.get("chosen_cut"), r.get("rejected_cut")) for r in rows] == [(None, True)]


def test_the_reward_model_reads_a_cut_reply_at_a_cut_marker_and_a_finished_one_at_its_end_of_turn(tiny_model_dir):
    """With rm_reads_cut_replies a cut reply's training ids are the prompt as served, the reply's
    text and the cut marker (the template's turn-opening token, never the end-of-turn); the finished
    reply of the same pair still ends on the end-of-turn; off, both end on it."""
    from training.common import chat_text
    from training.reward import cut_marker
    from training.reward_groups import group_dataset

    tok = _tokenizer(tiny_model_dir)
    prompt = [{"role": "user", "content": "Name a colour"}]
    row = {"prompt": prompt, "chosen": [{"role": "assistant", "content": SHORT}],
           "rejected": [{"role": "assistant", "content": "Blue is the colour of the"}], "rejected_cut": True}
    [aware] = group_dataset(tok, [row], 256, read_cut=True)[0]
    [plain] = group_dataset(tok, [row], 256, read_cut=False)[0]
    chosen, rejected = aware["reply_ids"]
    marker = cut_marker(tok)
    assert tok.convert_ids_to_tokens(marker) == "<|im_start|>" and marker not in (tok.eos_token_id, tok.pad_token_id)
    assert chosen[-1] == tok.eos_token_id
    assert rejected == tok(chat_text(tok, prompt) + "Blue is the colour of the", add_special_tokens=False).input_ids \
        + [marker]
    assert [ids[-1] for ids in plain["reply_ids"]] == [tok.eos_token_id] * 2


def test_a_reply_marked_cut_is_read_at_the_marker_only_by_a_reward_model_whose_saved_config_says_it_learnt_cut_replies(
        tiny_model_dir, tmp_path):
    """score_conversations reads a reply marked cut as finished with a reward model that never
    learnt cut replies (the same score as unmarked), and at the cut marker with one whose config
    says ``reads_cut_replies`` (another score); the flag survives saving and loading, which is how
    PPO, the evaluation and the one-stage CLIs learn it."""
    import torch

    from training.reward import load_reward_model, reads_cut_replies, score_conversations

    torch.manual_seed(0)
    rm, tok = load_reward_model(tiny_model_dir)
    prompt = [{"role": "user", "content": "Name a colour"}]
    finished = prompt + [{"role": "assistant", "content": "Blue is the colour of the"}]
    marked = prompt + [{"role": "assistant", "content": "Blue is the colour of the", "cut": True}]
    assert not reads_cut_replies(rm)
    plain = score_conversations(rm, tok, [finished, marked])
    assert plain[0] == pytest.approx(plain[1], abs=1e-6)

    rm.config.reads_cut_replies = True
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    loaded, loaded_tok = load_reward_model(tmp_path / "rm")
    assert reads_cut_replies(loaded)
    aware = score_conversations(loaded, loaded_tok, [finished, marked])
    assert aware[0] == pytest.approx(plain[0], abs=1e-4)
    assert abs(aware[1] - aware[0]) > 1e-3

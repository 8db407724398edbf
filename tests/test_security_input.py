"""Issue 13: input that once got through validation, and background work that one bad row stopped."""

import logging

import pytest
from sqlalchemy import func, select

from app.candidates import CandidateWorker
from app.service import ChatError, ChatService
from feedback import annotation_repo
from feedback import repository
from feedback.models import Candidate, Message, RankingTask
from model.engine import ContextTooLongError
from model.moderation import Moderator, RulesBackend
from tests.fakes import ScriptedEngine


def _count(factory, model=Message):
    with factory() as s:
        return s.scalar(select(func.count(model.id)))


@pytest.mark.parametrize("text", ["\x00", "\x00\x00 \n\x00", " \x01\x7f\x1b\t"])
def test_message_of_only_control_characters_is_refused_before_any_write(session_factory, settings, text):
    """A user message made only of NULs or other control characters (and white space) is refused
    as empty by send() and complete(), and no row is written."""
    service = ChatService(ScriptedEngine("ok"), session_factory, settings)
    with pytest.raises(ChatError, match="empty"):
        list(service.send("alice", text))
    with pytest.raises(ChatError, match="empty"):
        list(service.complete("alice", [{"role": "user", "content": text}]))
    assert _count(session_factory) == 0


def test_control_characters_are_removed_from_every_stored_message(session_factory, settings):
    """NULs and control characters in system, earlier and last messages of an API call, and in a
    chat system prompt, are removed before storing (PostgreSQL refuses NUL in text)."""
    service = ChatService(ScriptedEngine("ok"), session_factory, settings)
    list(service.complete("alice", [{"role": "system", "content": "be\x00 brief"},
                                    {"role": "user", "content": "fir\x00st"},
                                    {"role": "assistant", "content": "ok\x07"},
                                    {"role": "user", "content": "\x00second\x00"}]))
    list(service.send("alice", "third\x00", system_prompt="sys\x00tem"))
    with session_factory() as s:
        contents = [m.content for m in s.scalars(select(Message).order_by(Message.id))]
        from feedback.models import Conversation

        prompts = [c.system_prompt for c in s.scalars(select(Conversation).order_by(Conversation.id))]
    assert contents == ["first", "ok", "second", "ok", "third", "ok"]
    assert prompts == ["be brief", "system"]


def _pass_everything():
    return Moderator([RulesBackend([])])  # checks every prompt, flags none: prompts are marked "pass"


def test_worker_skips_a_prompt_that_cannot_become_a_task_and_goes_on(session_factory, settings, caplog):
    """An empty chat prompt already in the database (as the NUL bug stored them) is marked skipped
    and logged once; the prompts after it still become tasks with candidates, on every later round."""
    service = ChatService(ScriptedEngine("ok"), session_factory, settings, moderator=_pass_everything())
    with session_factory.begin() as s:
        alice = repository.get_or_create_user(session=s, name="alice")
        conv = repository.create_conversation(session=s, owner=alice)
        bad = repository.add_message(session=s, conversation=conv, role="user", content="", moderation="pass").id
    list(service.send("alice", "Name a colour"))
    worker = CandidateWorker(service, k=2, ahead=2)
    with caplog.at_level(logging.INFO, logger="app.candidates"):
        assert worker.run_once() == 2
        list(service.send("alice", "Name a fruit"))
        assert worker.run_once() == 2
    skipped = [r for r in caplog.records if "cannot become a ranking task" in r.getMessage()]
    assert len(skipped) == 1 and str(bad) in skipped[0].getMessage()
    with session_factory() as s:
        assert s.get(Message, bad).ranking_state == "skipped"
        assert [t.context[-1]["content"] for t in s.scalars(select(RankingTask).order_by(RankingTask.id))] == [
            "Name a colour", "Name a fruit"]


class _PoisonedEngine(ScriptedEngine):
    """Answers every prompt except "poison", for which generation always fails."""

    poisoned_calls = 0

    def generate(self, messages, params=None):
        if messages[-1]["content"] == "poison":
            self.poisoned_calls += 1
            raise ContextTooLongError("too long")
        return super().generate(messages, params)


def test_worker_gives_up_on_a_task_whose_candidates_keep_failing(session_factory, settings, caplog):
    """A task whose candidate generation always fails does not hold back the task after it; after
    three rounds (the default max_failures) it is marked skipped (with the error), logged once,
    and never tried again."""
    engine = _PoisonedEngine("ok")
    service = ChatService(engine, session_factory, settings)
    with session_factory.begin() as s:
        bad = annotation_repo.add_task(session=s, context=[{"role": "user", "content": "poison"}], source="import").id
        good = annotation_repo.add_task(session=s, context=[{"role": "user", "content": "fine"}], source="import").id
    worker = CandidateWorker(service, k=2, ahead=2)  # max_failures=3 by default
    with caplog.at_level(logging.INFO, logger="app.candidates"):
        assert worker.run_once() == 2  # the good task is filled in the first round
        assert worker.run_once() == 0 and worker.run_once() == 0
        assert engine.poisoned_calls == 3
        assert worker.run_once() == 0
    assert engine.poisoned_calls == 3  # not tried again
    gave_up = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(gave_up) == 1 and f"task {bad}" in gave_up[0].getMessage()
    with session_factory() as s:
        assert "ContextTooLongError" in s.get(RankingTask, bad).skipped_reason
        assert s.get(RankingTask, good).skipped_reason is None
        assert s.scalar(select(func.count(Candidate.id)).where(Candidate.task_id == good)) == 2
        ann = repository.get_or_create_user(session=s, name="ann", role="annotator")
        assert annotation_repo.open_task_count(session=s, annotator=ann, k=2) == (1, 0)  # skipped is not "waiting"

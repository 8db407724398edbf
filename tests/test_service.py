import pytest
from sqlalchemy import func, select

from app.service import ChatError, ChatService
from feedback import repository
from feedback.models import Message, ModerationEvent
from model.engine import SamplingParams
from model.moderation import Moderator, Rule, RulesBackend
from tests.fakes import ExplodingBackend, ScriptedEngine


def _count(factory, model=Message):
    with factory() as s:
        return s.scalar(select(func.count(model.id)))


def test_send_streams_and_logs_everything(tiny_engine, session_factory, settings):
    service = ChatService(tiny_engine, session_factory, settings)
    updates = list(service.send("alice", "Hello there", params=SamplingParams(max_new_tokens=8, seed=0)))
    assert len(updates) >= 2 and updates[-1].done and not updates[0].done
    final = updates[-1]
    with session_factory() as s:
        reply = s.get(Message, final.assistant_message_id)
        user_msg = s.get(Message, final.user_message_id)
        assert reply.parent_id == user_msg.id and user_msg.content == "Hello there"
        assert reply.content == final.text and user_msg.status == "answered"
        assert reply.model_version == "tiny-v0" and reply.sampling["max_new_tokens"] == 8
        assert reply.prompt_tokens > 0 and reply.completion_tokens > 0 and reply.latency_ms > 0


def test_a_reply_with_control_characters_is_streamed_and_stored_without_them(session_factory, settings):
    """A model can sample a NUL or a bell: the user sees the reply without them and exactly that is
    stored (PostgreSQL refuses NUL in text; the Gradio fuzz found it)."""
    service = ChatService(ScriptedEngine("tab\there a\x00b\x07c"), session_factory, settings)
    updates = list(service.send("alice", "Hello"))
    assert all("\x00" not in u.text and "\x07" not in u.text for u in updates)
    with session_factory() as s:
        stored = s.get(Message, updates[-1].assistant_message_id).content
    assert stored == updates[-1].text == "tab\there abc"


def test_multi_turn_keeps_context(session_factory, settings):
    engine = ScriptedEngine("ok")
    service = ChatService(engine, session_factory, settings)
    first = list(service.send("alice", "one", system_prompt="Be terse."))[-1]
    list(service.send("alice", "two", conversation_id=first.conversation_id))
    assert [m["content"] for m in engine.calls[-1]] == ["Be terse.", "one", "ok", "two"]


def test_regenerate_makes_a_sibling(tiny_engine, session_factory, settings):
    service = ChatService(tiny_engine, session_factory, settings)
    p = SamplingParams(max_new_tokens=6, seed=0)
    first = list(service.send("alice", "Hi", params=p))[-1]
    second = list(service.regenerate("alice", first.conversation_id, params=p))[-1]
    with session_factory() as s:
        a, b = s.get(Message, first.assistant_message_id), s.get(Message, second.assistant_message_id)
        assert a.id != b.id and a.parent_id == b.parent_id == first.user_message_id
        assert len(repository.siblings(session=s, message=b)) == 2


def test_stop_saves_partial_reply_as_stopped(session_factory, settings):
    service = ChatService(ScriptedEngine("w " * 50), session_factory, settings)
    updates = service.send("alice", "talk", cancel_key="sess")
    for i, up in enumerate(updates):
        if i == 3:
            service.stop("sess")
    with session_factory() as s:
        reply = s.get(Message, up.assistant_message_id)
        assert up.status == "stopped" and reply.status == "stopped"
        assert 0 < len(reply.content) < len("w " * 50)


@pytest.mark.parametrize("text,match", [("", "empty"), ("   \n", "empty"), ("x" * 8001, "limit is 8,000")])
def test_bad_messages_refused_and_nothing_written(session_factory, settings, text, match):
    service = ChatService(ScriptedEngine(), session_factory, settings)
    with pytest.raises(ChatError, match=match):
        next(service.send("alice", text))
    assert _count(session_factory) == 0


def test_other_users_conversation_is_not_reachable(session_factory, settings):
    service = ChatService(ScriptedEngine(), session_factory, settings)
    done = list(service.send("alice", "secret plans"))[-1]
    with pytest.raises(ChatError, match="not found"):
        next(service.send("mallory", "hi", conversation_id=done.conversation_id))
    with pytest.raises(ChatError, match="not found"):
        service.open_conversation("mallory", done.conversation_id)
    with pytest.raises(repository.NotFoundError):
        service.vote("mallory", done.assistant_message_id, 1)


def test_rate_limit(session_factory, settings):
    settings.messages_per_minute = 2
    service = ChatService(ScriptedEngine(), session_factory, settings)
    list(service.send("alice", "1"))
    list(service.send("alice", "2"))
    with pytest.raises(ChatError, match="2 messages a minute"):
        next(service.send("alice", "3"))
    list(service.send("bob", "1"))  # limits are per user


def test_vote_through_service_and_change(session_factory, settings):
    service = ChatService(ScriptedEngine(), session_factory, settings)
    done = list(service.send("alice", "hi"))[-1]
    service.vote("alice", done.assistant_message_id, 1)
    service.vote("alice", done.assistant_message_id, -1, reason="wrong", comment="not true")
    with session_factory() as s:
        user = repository.get_user(session=s, name="alice")
        v = repository.get_vote(session=s, message_id=done.assistant_message_id, user=user)
        assert (v.value, v.reason, v.comment) == (-1, "wrong", "not true")


# moderation in the pipeline -------------------------------------------------------------

def _moderator(*extra):
    return Moderator([RulesBackend([Rule("abuse", words=("idiot",))]), *extra])


def test_flagged_input_never_reaches_engine(session_factory, settings):
    engine = ScriptedEngine()
    service = ChatService(engine, session_factory, settings, moderator=_moderator())
    final = list(service.send("alice", "you are an idiot"))[-1]
    assert engine.calls == []
    assert final.blocked and final.text == service.moderator.template("in", "abuse")
    with session_factory() as s:
        ev = s.scalars(select(ModerationEvent)).all()
        assert [(e.direction, e.decision, e.category) for e in ev] == [("in", "flag", "abuse")]
        assert ev[0].scores == {"rules": {"abuse": 1.0}} and ev[0].message_id == final.user_message_id
        assert s.get(Message, final.user_message_id).moderation == "flagged"


def test_flagged_output_replaced_and_never_shown(session_factory, settings):
    settings.moderation_stream_every = 5
    engine = ScriptedEngine("Sure thing, you absolute idiot and more words after that")
    service = ChatService(engine, session_factory, settings, moderator=_moderator())
    updates = list(service.send("alice", "hello"))
    assert all("idiot" not in u.text for u in updates)
    final = updates[-1]
    assert final.blocked and final.text == service.moderator.template("out", "abuse")
    with session_factory() as s:
        reply = s.get(Message, final.assistant_message_id)
        assert reply.moderation == "flagged" and "idiot" in reply.content  # kept for review only
        out = s.scalars(select(ModerationEvent).where(ModerationEvent.direction == "out")).one()
        assert out.decision == "flag" and out.message_id == reply.id


def test_clean_exchange_logs_pass_events(session_factory, settings):
    service = ChatService(ScriptedEngine("Paris is the capital."), session_factory, settings, moderator=_moderator())
    final = list(service.send("alice", "capital of France?"))[-1]
    assert not final.blocked and final.text == "Paris is the capital."
    with session_factory() as s:
        decisions = sorted((e.direction, e.decision) for e in s.scalars(select(ModerationEvent)))
        assert decisions == [("in", "pass"), ("out", "pass")]


def test_backend_error_fails_closed(session_factory, settings):
    engine = ScriptedEngine()
    service = ChatService(engine, session_factory, settings, moderator=_moderator(ExplodingBackend()))
    final = list(service.send("alice", "a perfectly fine question"))[-1]
    assert engine.calls == [] and final.blocked
    assert final.text == service.moderator.template("in", "error")
    with session_factory() as s:
        ev = s.scalars(select(ModerationEvent)).one()
        assert ev.decision == "error" and "classifier crashed" in ev.error


def test_first_requests_of_a_new_user_at_once(session_factory, settings):
    """Found by bench/load.py: concurrent first requests raced on creating the user row."""
    import threading

    service = ChatService(ScriptedEngine("ok"), session_factory, settings)
    errors = []

    def send(i):
        try:
            list(service.send("newcomer", f"hello {i}"))
        except Exception as exc:  # collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert _count(session_factory) == 16


def test_user_exports_and_deletes_their_data(session_factory, settings, tmp_path):
    from feedback.datasets import export

    replies = iter(["ok", "better", "fine"])
    service = ChatService(ScriptedEngine(lambda m: next(replies)), session_factory, settings)
    a = list(service.send("alice", "one"))[-1]
    b = list(service.regenerate("alice", a.conversation_id))[-1]
    service.vote("alice", a.assistant_message_id, 1)
    service.vote("alice", b.assistant_message_id, -1)
    list(service.send("bob", "bob's"))
    data = service.my_data("alice")
    assert [m["content"] for m in data["conversations"][0]["messages"]] == ["one", "ok", "better"]
    assert sorted(v["value"] for v in data["votes"]) == [-1, 1]
    service.set_opt_out("alice", True)
    with session_factory() as s:
        assert repository.get_user(session=s, name="alice").opted_out
    service.set_opt_out("alice", False)
    with session_factory.begin() as s:
        assert export(session=s, kind="preferences", out=tmp_path / "p.jsonl").counts["pairs"] == 1
    counts = service.delete_my_data("alice")
    assert counts["conversations"] == 1 and counts["votes"] == 2
    assert service.my_data("alice")["conversations"] == [] and service.conversations("bob")
    with session_factory.begin() as s:
        assert export(session=s, kind="preferences", out=tmp_path / "p.jsonl").counts["pairs"] == 0


def test_conversations_are_searched_renamed_and_deleted_only_by_their_owner(session_factory, settings):
    """Search matches titles and messages in any case, with % and _ taken literally, never a
    withheld reply's text; rename and delete act on the owner's conversation only and refuse bad
    input with a clear error; deleting removes its messages and the ranking tasks made from it."""
    from feedback.models import Conversation, RankingTask

    service = ChatService(ScriptedEngine("Fine weather today"), session_factory, settings)
    paris = list(service.send("alice", "Plans for a trip to Paris"))[-1].conversation_id
    python = list(service.send("alice", "Sorting lists in Python"))[-1].conversation_id
    list(service.send("bob", "Paris for bob"))
    assert [c for _, c in service.conversations("alice", "PARIS")] == [paris]
    assert {c for _, c in service.conversations("alice", "weather")} == {paris, python}  # in a reply
    assert service.conversations("alice", "100%") == [] and service.conversations("alice", "_") == []
    assert len(service.conversations("alice")) == 2
    with pytest.raises(ChatError, match="Type a new title"):
        service.rename_conversation("alice", python, "   ")
    with pytest.raises(ChatError, match="not found"):
        service.rename_conversation("bob", python, "Mine now")
    with pytest.raises(ChatError, match="whole number"):
        service.delete_conversation("alice", "1; DROP TABLE")
    assert service.rename_conversation("alice", python, "Python notes") == "Python notes"
    assert ("Python notes", python) in service.conversations("alice")
    with session_factory() as s:
        first_user_msg = s.scalars(select(Message).where(Message.conversation_id == python)).first()
        s.add(RankingTask(context=[{"role": "user", "content": "Sorting lists in Python"}], prompt_hash="x" * 64,
                          source_message_id=first_user_msg.id, source="chat"))
        s.commit()
    with pytest.raises(ChatError, match="not found"):
        service.delete_conversation("bob", python)
    assert service.delete_conversation("alice", python) == {"messages": 2, "ranking_tasks": 1}
    with session_factory() as s:
        assert s.get(Conversation, python) is None and s.get(Conversation, paris) is not None
        assert s.scalar(select(func.count(Message.id)).where(Message.conversation_id == python)) == 0
        assert s.scalar(select(func.count(RankingTask.id))) == 0


def test_the_gradio_queue_polls_at_the_configured_interval_not_every_millisecond(session_factory, settings):
    """Gradio's idle queue looks for work every 1 ms (9% of a core with nobody there, bench.idle);
    the app sets CHAT_QUEUE_POLL_S (10 ms by default) and five times that for progress updates."""
    from gradio.routes import App as GradioApp

    from app.main import create_app

    settings.queue_poll_s = 0.02
    app = create_app(ChatService(ScriptedEngine("ok"), session_factory, settings))
    gradio = next(r.app for r in app.routes if isinstance(getattr(r, "app", None), GradioApp))
    queue = gradio.get_blocks()._queue
    assert (queue.sleep_when_free, queue.progress_update_sleep_when_free) == (0.02, 0.1)


def test_stepping_back_to_an_older_reply_version_shows_it_with_its_vote_and_continues_from_it(session_factory,
                                                                                              settings):
    """Regenerate keeps the old reply; < 1/2 > brings it back with the user's vote on it, the next
    message continues from the version shown (the model sees it), and the ends, another user's
    conversation and a bad step are refused without changing what is shown."""
    replies = iter(["First answer.", "Second answer.", "Reply to the follow-up."])
    engine = ScriptedEngine(lambda messages: next(replies))
    service = ChatService(engine, session_factory, settings)
    first = list(service.send("alice", "Question"))[-1]
    cid = first.conversation_id
    assert service.reply_version("alice", cid) == (1, 1)
    service.vote("alice", first.assistant_message_id, 1)
    second = list(service.regenerate("alice", cid))[-1]
    assert service.reply_version("alice", cid) == (2, 2)
    with pytest.raises(ChatError, match="already version 2 of 2"):
        service.step_reply_version("alice", cid, 1)
    assert service.step_reply_version("alice", cid, -1) == (1, 2)
    msgs, _ = service.open_conversation("alice", cid)
    assert [(m["content"], m["vote"]) for m in msgs] == [("Question", None), ("First answer.", 1)]
    for who, step, error in (("bob", -1, "not found"), ("alice", 5, "by -1 or \\+1"),
                             ("alice", -1, "already version 1 of 2")):
        with pytest.raises(ChatError, match=error):
            service.step_reply_version(who, cid, step)
    assert service.reply_version("alice", cid) == (1, 2)
    follow = list(service.send("alice", "And then?", conversation_id=cid))[-1]
    assert engine.calls[-1][-2:] == [{"role": "assistant", "content": "First answer."},
                                     {"role": "user", "content": "And then?"}]
    with session_factory() as s:
        assert s.get(Message, follow.user_message_id).parent_id == first.assistant_message_id
    msgs, _ = service.open_conversation("alice", cid)
    assert [m["content"] for m in msgs] == ["Question", "First answer.", "And then?", "Reply to the follow-up."]
    assert service.reply_version("alice", cid) == (1, 1)  # the new reply has one version
    assert second.assistant_message_id not in [m["id"] for m in msgs]

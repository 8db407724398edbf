import pytest

from feedback import repository
from feedback.models import Message, Vote


def _conv(session, name="alice"):
    user = repository.get_or_create_user(session=session, name=name)
    return user, repository.create_conversation(session=session, owner=user, system_prompt="Be brief.")


def test_conversation_message_vote_round_trip(session):
    user, conv = _conv(session)
    q = repository.add_message(session=session, conversation=conv, role="user", content="Hi?")
    a = repository.add_message(session=session, conversation=conv, role="assistant", content="Hello!", parent=q,
                         model_version="v1", sampling={"temperature": 0.7}, prompt_tokens=5,
                         completion_tokens=2, ttft_ms=12.5, latency_ms=40.0)
    repository.add_vote(session=session, message_id=a.id, user=user, value=1, reason=None, comment="nice")
    session.commit()
    session.expire_all()
    stored = session.get(Message, a.id)
    assert (stored.parent_id, stored.model_version, stored.completion_tokens) == (q.id, "v1", 2)
    assert stored.sampling == {"temperature": 0.7}
    assert [m.content for m in repository.latest_thread(session=session, conversation=conv)] == ["Hi?", "Hello!"]
    vote = repository.get_vote(session=session, message_id=a.id, user=user)
    assert (vote.value, vote.comment) == (1, "nice")
    assert [c.id for c in repository.list_conversations(session=session, owner=user)] == [conv.id]


def test_changing_a_vote_keeps_one_row(session):
    user, conv = _conv(session)
    q = repository.add_message(session=session, conversation=conv, role="user", content="Hi")
    a = repository.add_message(session=session, conversation=conv, role="assistant", content="Yo", parent=q)
    repository.add_vote(session=session, message_id=a.id, user=user, value=1)
    repository.add_vote(session=session, message_id=a.id, user=user, value=-1, reason="rude")
    session.commit()
    votes = session.query(Vote).filter_by(message_id=a.id).all()
    assert len(votes) == 1 and votes[0].value == -1 and votes[0].reason == "rude"


@pytest.mark.parametrize("value", [0, 2, -2, "1", None, 1.0001])
def test_vote_value_must_be_plus_or_minus_one(session, value):
    user, conv = _conv(session)
    q = repository.add_message(session=session, conversation=conv, role="user", content="Hi")
    a = repository.add_message(session=session, conversation=conv, role="assistant", content="Yo", parent=q)
    with pytest.raises(repository.ValidationError, match="vote is \\+1 or -1"):
        repository.add_vote(session=session, message_id=a.id, user=user, value=value)


def test_vote_on_missing_message_is_clear(session):
    user, _ = _conv(session)
    with pytest.raises(repository.NotFoundError, match="message 999 does not exist"):
        repository.add_vote(session=session, message_id=999, user=user, value=1)


def test_vote_reason_validated(session):
    user, conv = _conv(session)
    q = repository.add_message(session=session, conversation=conv, role="user", content="Hi")
    a = repository.add_message(session=session, conversation=conv, role="assistant", content="Yo", parent=q)
    with pytest.raises(repository.ValidationError, match="reason"):
        repository.add_vote(session=session, message_id=a.id, user=user, value=-1, reason="because")


def test_users_only_see_their_own_conversations(session):
    _, conv = _conv(session, "alice")
    bob = repository.get_or_create_user(session=session, name="bob")
    with pytest.raises(repository.NotFoundError):
        repository.get_conversation(session=session, conversation_id=conv.id, owner=bob)
    assert repository.list_conversations(session=session, owner=bob) == []


def test_siblings_after_regenerate(session):
    _, conv = _conv(session)
    q = repository.add_message(session=session, conversation=conv, role="user", content="Hi")
    a1 = repository.add_message(session=session, conversation=conv, role="assistant", content="A", parent=q)
    a2 = repository.add_message(session=session, conversation=conv, role="assistant", content="B", parent=q)
    assert [m.id for m in repository.siblings(session=session, message=a2)] == [a1.id, a2.id]
    assert repository.latest_thread(session=session, conversation=conv)[-1].id == a2.id

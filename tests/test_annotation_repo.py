import pytest

from feedback import annotation_repo as arepo
from feedback import repository as repo
from feedback.models import Demonstration, Message
from feedback.stats import data_counts


def _ready_task(session, text="Say hi", k=4, wanted=1):
    task = arepo.add_task(session=session, context=[{"role": "user", "content": text}], source="import",
                          wanted=wanted)
    for i in range(k):
        arepo.add_candidate(session=session, task=task, content=f"{text} reply {i}", model_version="v0")
    return task


def test_queue_never_repeats_a_task_for_an_annotator(session):
    t1, t2 = _ready_task(session, "one"), _ready_task(session, "two")
    ann = repo.get_or_create_user(session=session, name="ann", role="annotator")
    seen = []
    for _ in range(3):
        task = arepo.next_task(session=session, annotator=ann, k=4)
        if task is None:
            break
        seen.append(task.id)
        arepo.submit_ranking(session=session, task_id=task.id, annotator=ann, skipped=True)
    assert seen == [t1.id, t2.id]
    with pytest.raises(repo.ValidationError, match="already answered"):
        arepo.submit_ranking(session=session, task_id=t1.id, annotator=ann, skipped=True)


def test_task_wants_n_annotations(session):
    task = _ready_task(session, wanted=2)
    ids = [c.id for c in task.candidates]
    a, b, c = (repo.get_or_create_user(session=session, name=n, role="annotator") for n in "abc")
    arepo.submit_ranking(session=session, task_id=task.id, annotator=a, order=[[i] for i in ids])
    assert arepo.next_task(session=session, annotator=b, k=4).id == task.id
    arepo.submit_ranking(session=session, task_id=task.id, annotator=b, order=[ids[::-1]])
    assert arepo.next_task(session=session, annotator=c, k=4) is None  # it has its two rankings


def test_tasks_without_enough_candidates_are_not_served(session):
    _ready_task(session, k=2)
    ann = repo.get_or_create_user(session=session, name="ann", role="annotator")
    assert arepo.next_task(session=session, annotator=ann, k=4) is None
    assert arepo.open_task_count(session=session, annotator=ann, k=4) == (0, 1)
    assert len(arepo.tasks_needing_candidates(session=session, k=4)) == 1


def test_duplicate_prompts_are_merged(session):
    assert arepo.add_task(session=session, context=[{"role": "user", "content": "Hello  World"}], source="import")
    assert arepo.add_task(session=session, context=[{"role": "user", "content": "hello world"}], source="chat") is None


def test_parse_order():
    assert arepo.parse_order("B > A = C > D", list("ABCD")) == [["B"], ["A", "C"], ["D"]]
    assert arepo.parse_order("bacd", list("ABCD")) == [["B"], ["A"], ["C"], ["D"]]
    for bad in ["", "ABC", "AABCD", "A>B>C>E"]:
        with pytest.raises(repo.ValidationError):
            arepo.parse_order(bad, list("ABCD"))


def test_submit_validates_and_saves_demonstration(session):
    task = _ready_task(session)
    ids = [c.id for c in task.candidates]
    ann = repo.get_or_create_user(session=session, name="ann", role="annotator")
    with pytest.raises(repo.ValidationError, match="every candidate"):
        arepo.submit_ranking(session=session, task_id=task.id, annotator=ann, order=[[ids[0]]])
    with pytest.raises(repo.ValidationError, match="flag"):
        arepo.submit_ranking(session=session, task_id=task.id, annotator=ann, order=[ids], flags={ids[0]: "ugly"})
    arepo.submit_ranking(session=session, task_id=task.id, annotator=ann, order=[ids], demonstration="Hi there!")
    demo = session.query(Demonstration).one()
    assert demo.content == "Hi there!" and demo.context == task.context
    assert arepo.done_today(session=session, annotator=ann) == 1


def test_sync_tasks_only_from_moderation_passed_prompts(session):
    alice = repo.get_or_create_user(session=session, name="alice")
    conv = repo.create_conversation(session=session, owner=alice)
    repo.add_message(session=session, conversation=conv, role="user", content="nice question", moderation="pass")
    repo.add_message(session=session, conversation=conv, role="user", content="abuse", moderation="flagged")
    [prompt] = arepo.chat_prompts_to_sync(session=session)
    assert arepo.task_from_message(session=session, message_id=prompt).context[-1]["content"] == "nice question"
    assert arepo.chat_prompts_to_sync(session=session) == []  # each prompt is looked at once


def test_duplicate_chat_prompt_is_marked_and_not_looked_at_again(session):
    """A chat prompt whose task exists already is marked "duplicate" and leaves the sync queue, so
    many repeats of one prompt cannot fill the sync window and starve new prompts."""
    alice = repo.get_or_create_user(session=session, name="alice")
    for _ in range(2):
        conv = repo.create_conversation(session=session, owner=alice)
        repo.add_message(session=session, conversation=conv, role="user", content="hi", moderation="pass")
    first, second = arepo.chat_prompts_to_sync(session=session)
    assert arepo.task_from_message(session=session, message_id=first) is not None
    assert arepo.task_from_message(session=session, message_id=second) is None
    assert session.get(Message, second).ranking_state == "duplicate"
    assert arepo.chat_prompts_to_sync(session=session) == []


def test_agreement_kendall_tau(session):
    task = _ready_task(session, wanted=2)
    ids = [c.id for c in task.candidates]
    a, b = (repo.get_or_create_user(session=session, name=n, role="annotator") for n in "ab")
    arepo.submit_ranking(session=session, task_id=task.id, annotator=a, order=[[i] for i in ids])
    arepo.submit_ranking(session=session, task_id=task.id, annotator=b, order=[[i] for i in ids])
    counts = data_counts(session)
    assert counts["agreement_tau"] == pytest.approx(1.0) and counts["rankings"] == 2
    assert counts["pairs_by_source"] == {"ranking": 6}

import pytest

from feedback import annotation_repo
from feedback import repository
from feedback.models import Demonstration, Message
from feedback.stats import data_counts


def _ready_task(session, text="Say hi", k=4, wanted=1):
    task = annotation_repo.add_task(session=session, context=[{"role": "user", "content": text}], source="import",
                          wanted=wanted)
    for i in range(k):
        annotation_repo.add_candidate(session=session, task=task, content=f"{text} reply {i}", model_version="v0")
    return task


def test_queue_never_repeats_a_task_for_an_annotator(session):
    t1, t2 = _ready_task(session, "one"), _ready_task(session, "two")
    ann = repository.get_or_create_user(session=session, name="ann", role="annotator")
    seen = []
    for _ in range(3):
        task = annotation_repo.next_task(session=session, annotator=ann, k=4)
        if task is None:
            break
        seen.append(task.id)
        annotation_repo.submit_ranking(session=session, task_id=task.id, annotator=ann, skipped=True)
    assert seen == [t1.id, t2.id]
    with pytest.raises(repository.ValidationError, match="already answered"):
        annotation_repo.submit_ranking(session=session, task_id=t1.id, annotator=ann, skipped=True)


def test_task_wants_n_annotations(session):
    task = _ready_task(session, wanted=2)
    ids = [c.id for c in task.candidates]
    a, b, c = (repository.get_or_create_user(session=session, name=n, role="annotator") for n in "abc")
    annotation_repo.submit_ranking(session=session, task_id=task.id, annotator=a, order=[[i] for i in ids])
    assert annotation_repo.next_task(session=session, annotator=b, k=4).id == task.id
    annotation_repo.submit_ranking(session=session, task_id=task.id, annotator=b, order=[ids[::-1]])
    assert annotation_repo.next_task(session=session, annotator=c, k=4) is None  # it has its two rankings


def test_tasks_without_enough_candidates_are_not_served(session):
    _ready_task(session, k=2)
    ann = repository.get_or_create_user(session=session, name="ann", role="annotator")
    assert annotation_repo.next_task(session=session, annotator=ann, k=4) is None
    assert annotation_repo.open_task_count(session=session, annotator=ann, k=4) == (0, 1)
    assert len(annotation_repo.tasks_needing_candidates(session=session, k=4)) == 1


def test_duplicate_prompts_are_merged(session):
    assert annotation_repo.add_task(session=session, context=[{"role": "user", "content": "Hello  World"}], source="import")
    assert annotation_repo.add_task(session=session, context=[{"role": "user", "content": "hello world"}], source="chat") is None


def test_parse_order():
    assert annotation_repo.parse_order("B > A = C > D", list("ABCD")) == [["B"], ["A", "C"], ["D"]]
    assert annotation_repo.parse_order("bacd", list("ABCD")) == [["B"], ["A"], ["C"], ["D"]]
    for bad in ["", "ABC", "AABCD", "A>B>C>E"]:
        with pytest.raises(repository.ValidationError):
            annotation_repo.parse_order(bad, list("ABCD"))


def test_submit_validates_and_saves_demonstration(session):
    task = _ready_task(session)
    ids = [c.id for c in task.candidates]
    ann = repository.get_or_create_user(session=session, name="ann", role="annotator")
    with pytest.raises(repository.ValidationError, match="every candidate"):
        annotation_repo.submit_ranking(session=session, task_id=task.id, annotator=ann, order=[[ids[0]]])
    with pytest.raises(repository.ValidationError, match="flag"):
        annotation_repo.submit_ranking(session=session, task_id=task.id, annotator=ann, order=[ids], flags={ids[0]: "ugly"})
    annotation_repo.submit_ranking(session=session, task_id=task.id, annotator=ann, order=[ids], demonstration="Hi there!")
    demo = session.query(Demonstration).one()
    assert demo.content == "Hi there!" and demo.context == task.context
    assert annotation_repo.done_today(session=session, annotator=ann) == 1


def test_sync_tasks_only_from_moderation_passed_prompts(session):
    alice = repository.get_or_create_user(session=session, name="alice")
    conv = repository.create_conversation(session=session, owner=alice)
    repository.add_message(session=session, conversation=conv, role="user", content="nice question", moderation="pass")
    repository.add_message(session=session, conversation=conv, role="user", content="abuse", moderation="flagged")
    [prompt] = annotation_repo.chat_prompts_to_sync(session=session)
    assert annotation_repo.task_from_message(session=session, message_id=prompt).context[-1]["content"] == "nice question"
    assert annotation_repo.chat_prompts_to_sync(session=session) == []  # each prompt is looked at once


def test_duplicate_chat_prompt_is_marked_and_not_looked_at_again(session):
    """A chat prompt whose task exists already is marked "duplicate" and leaves the sync queue, so
    many repeats of one prompt cannot fill the sync window and starve new prompts."""
    alice = repository.get_or_create_user(session=session, name="alice")
    for _ in range(2):
        conv = repository.create_conversation(session=session, owner=alice)
        repository.add_message(session=session, conversation=conv, role="user", content="hi", moderation="pass")
    first, second = annotation_repo.chat_prompts_to_sync(session=session)
    assert annotation_repo.task_from_message(session=session, message_id=first) is not None
    assert annotation_repo.task_from_message(session=session, message_id=second) is None
    assert session.get(Message, second).ranking_state == "duplicate"
    assert annotation_repo.chat_prompts_to_sync(session=session) == []


def test_agreement_kendall_tau(session):
    task = _ready_task(session, wanted=2)
    ids = [c.id for c in task.candidates]
    a, b = (repository.get_or_create_user(session=session, name=n, role="annotator") for n in "ab")
    annotation_repo.submit_ranking(session=session, task_id=task.id, annotator=a, order=[[i] for i in ids])
    annotation_repo.submit_ranking(session=session, task_id=task.id, annotator=b, order=[[i] for i in ids])
    counts = data_counts(session)
    assert counts["agreement_tau"] == pytest.approx(1.0) and counts["rankings"] == 2
    assert counts["pairs_by_source"] == {"ranking": 6}


def test_data_counts_rebuild_pairs_only_when_the_data_behind_them_changes(session, monkeypatch):
    """The admin panels poll data_counts every 2 s: an unchanged database must not rebuild every
    pair again, and a new ranking, an edited vote or an import must show at the next poll."""
    import feedback.stats as stats
    from feedback.models import ImportedPair

    builds = []
    real = stats.all_pairs
    monkeypatch.setattr(stats, "all_pairs", lambda s: builds.append(1) or real(s))
    task = _ready_task(session, wanted=2)
    ids = [c.id for c in task.candidates]
    ann = repository.get_or_create_user(session=session, name="ann", role="annotator")
    annotation_repo.submit_ranking(session=session, task_id=task.id, annotator=ann, order=[[i] for i in ids])
    assert data_counts(session)["pairs"] == 6 and data_counts(session)["pairs"] == 6
    assert len(builds) == 1  # the second poll reused the summary
    session.add(ImportedPair(prompt=[{"role": "user", "content": "q"}], chosen="a", rejected="b", source="test"))
    session.flush()
    assert data_counts(session)["pairs_by_source"] == {"ranking": 6, "import": 1} and len(builds) == 2
    bob = repository.get_or_create_user(session=session, name="bob", role="annotator")
    annotation_repo.submit_ranking(session=session, task_id=task.id, annotator=bob, order=[[i] for i in ids])
    assert data_counts(session)["rankings"] == 2 and data_counts(session)["agreement_tau"] == pytest.approx(1.0)
    assert len(builds) == 3

from sqlalchemy import select

from app.auth import PermissionDenied, require_role
from app.candidates import CandidateWorker
from app.service import ChatService
from feedback import annotation_repo
from feedback import repository
from feedback.models import AuditLog, Candidate
from model.moderation import Moderator, Rule, RulesBackend
from tests.fakes import ScriptedEngine


def test_worker_fills_tasks_from_chat_and_imports(session_factory, settings):
    replies = iter(["Blue.", "Red, you idiot.", "Green.", "Yellow."] * 3)
    engine = ScriptedEngine(lambda msgs: next(replies))
    moderator = Moderator([RulesBackend([Rule("abuse", words=("idiot",))])])
    service = ChatService(engine, session_factory, settings, moderator=moderator)
    list(service.send("alice", "Name a colour"))  # a chat prompt that passed moderation
    worker = CandidateWorker(service, k=4, ahead=2)
    made = worker.run_once()
    assert made == 4  # the chat reply used one scripted answer; the task got four candidates
    with session_factory() as s:
        cands = s.scalars(select(Candidate)).all()
        assert [c.moderation for c in cands].count("flagged") == 1
        assert len({c.sampling["temperature"] for c in cands}) == 4  # varied sampling
        ann = repository.get_or_create_user(session=s, name="ann", role="annotator")
        task = annotation_repo.next_task(session=s, annotator=ann, k=4)
        assert task is not None and task.context == [{"role": "user", "content": "Name a colour"}]
    assert worker.run_once() == 0  # nothing left to do


def test_role_check_denies_and_audits(session_factory):
    with session_factory.begin() as s:
        repository.get_or_create_user(session=s, name="bob", role="user")
    try:
        require_role(session_factory, "bob", ("annotator", "admin"), "rank")
        raise AssertionError("bob should be refused")
    except PermissionDenied as exc:
        assert "needs the annotator or admin role" in str(exc)
    require_role(session_factory, "local", ("admin",), "retrain")  # single-user local mode
    with session_factory() as s:
        rows = [(a.user_name, a.action, a.allowed) for a in s.scalars(select(AuditLog).order_by(AuditLog.id))]
    assert rows == [("bob", "rank", False), ("local", "retrain", True)]


def test_worker_fills_only_the_lookahead_and_tops_it_up_after_each_ranking(session_factory, settings):
    """With 20 imported prompts and ahead=3, the worker prepares the 3 oldest tasks (what annotators
    open next) and then makes nothing, round after round; once an annotator ranks one, the next
    round prepares exactly one more. An annotator waiting (limit=1) still gets one made at once."""
    engine = ScriptedEngine("A reply.")
    service = ChatService(engine, session_factory, settings)
    with session_factory.begin() as s:
        ids = [annotation_repo.add_task(session=s, context=[{"role": "user", "content": f"Prompt {i}"}], source="import").id
               for i in range(20)]
    worker = CandidateWorker(service, k=2, ahead=3)
    assert worker.run_once() == 6
    assert worker.run_once() == 0 and worker.run_once() == 0  # idle: the lookahead is full
    with session_factory() as s:
        filled = sorted({c.task_id for c in s.scalars(select(Candidate))})
    assert filled == ids[:3]
    with session_factory.begin() as s:
        ann = repository.get_or_create_user(session=s, name="ann", role="annotator")
        task = annotation_repo.next_task(session=s, annotator=ann, k=2)
        order = [[c.id] for c in task.candidates]
        annotation_repo.submit_ranking(session=s, task_id=task.id, annotator=ann, order=order)
    assert worker.run_once() == 2 and worker.run_once() == 0
    assert worker.run_once(limit=1) == 2  # an annotator is waiting: one more, lookahead or not

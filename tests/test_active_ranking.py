"""Which ranking task next: the preference head, its task scores (uncertainty, spread, committee), the
queue's order, and the worker ordering real tasks with the real encoder on a tiny model."""

import math

import numpy as np
import pytest

from app.active_ranking import TaskPrioritizer
from app.service import ChatService
from feedback import annotation_repo, repository, training_repo
from feedback.db import session_scope
from model.preference_head import committee_disagreement, fit_preference_head, score_spread, uncertainty
from tests.fakes import ScriptedEngine
from tests.training_data import seed_preferences


def test_uncertainty_of_hand_worked_scores():
    """Equal scores: no idea (1). Scores 0 and ln 3: sigmoid = 0.75, confidence |2*0.75-1| = 0.5,
    uncertainty 0.5. Three candidates average their three pairs."""
    assert uncertainty([1.0, 1.0]) == pytest.approx(1.0)
    assert uncertainty([0.0, math.log(3)]) == pytest.approx(0.5)
    assert uncertainty([0.0, 0.0, math.log(3)]) == pytest.approx(1 - (0 + 0.5 + 0.5) / 3)
    assert uncertainty([5.0]) == 0.0 and uncertainty([-40.0, 40.0]) == pytest.approx(0.0)


def test_the_preference_head_learns_a_direction_from_pairs_and_ranks_unseen_replies():
    """Replies whose first feature is larger are preferred; 40 noisy pairs teach it, and it ranks
    200 unseen pairs right (a head that learned nothing would score 0.5)."""
    rng = np.random.default_rng(0)

    def pairs(n):
        a, b = rng.normal(size=(n, 16)), rng.normal(size=(n, 16))
        better = np.where((a[:, 0] > b[:, 0])[:, None], a, b)
        return better, np.where((a[:, 0] > b[:, 0])[:, None], b, a)

    head = fit_preference_head(*pairs(40))
    assert head.pairs == 40 and head.accuracy(*pairs(200)) > 0.9
    alike, apart = np.zeros((4, 16)), np.zeros((4, 16))
    apart[:, 0] = [-2.0, -1.0, 1.0, 2.0]  # candidates that differ in what it learned to prefer
    assert score_spread(head, apart) > 10 * score_spread(head, alike + 1e-3)
    with pytest.raises(ValueError, match="one or more"):
        fit_preference_head(np.zeros((0, 16)), np.zeros((0, 16)))


def test_a_committee_disagrees_where_the_rankings_left_the_order_open_not_where_replies_are_alike():
    """Pairs that only ever differ in feature 0 (the better one larger) teach feature 0 firmly;
    feature 1 varies independently of the preference, so bootstrap heads weigh it differently.
    Candidates apart only in feature 1 get the committee's disagreement; candidates apart only
    in feature 0 (every head agrees) and alike candidates (every head says 0.5) get little."""
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(30, 4)), rng.normal(size=(30, 4))
    a[:, 2:], b[:, 2:] = 0.0, 0.0
    better = np.where((a[:, 0] > b[:, 0])[:, None], a, b)
    worse = np.where((a[:, 0] > b[:, 0])[:, None], b, a)
    head = fit_preference_head(better, worse, c=1.0, committee=8, seed=0)
    assert head.committee.shape == (8, 4) and head.pairs == 30
    learned, open_, alike = np.zeros((3, 4)), np.zeros((3, 4)), np.zeros((3, 4))
    learned[:, 0] = [-2.0, 0.0, 2.0]
    open_[:, 1] = [-2.0, 0.0, 2.0]
    assert committee_disagreement(head, open_) > 2 * committee_disagreement(head, learned)
    assert committee_disagreement(head, alike) == pytest.approx(0.0)
    assert fit_preference_head(better, worse, committee=8, seed=0).committee.tolist() == \
        fit_preference_head(better, worse, committee=8, seed=0).committee.tolist()  # seeded
    with pytest.raises(ValueError, match="committee"):
        committee_disagreement(fit_preference_head(better, worse), open_)


def _task(session, text, priority=None):
    task = annotation_repo.add_task(session=session, context=[{"role": "user", "content": text}], source="import")
    for i in range(4):
        annotation_repo.add_candidate(session=session, task=task, content=f"{text} reply {i}", model_version="v0")
    annotation_repo.set_priority(session=session, task_id=task.id, priority=priority,
                                 reason=None if priority is None else f"priority {priority}")
    return task


def test_the_queue_serves_the_highest_priority_first_then_unscored_tasks_in_arrival_order(session):
    unscored, low, high, unscored2 = (_task(session, "a"), _task(session, "b", 0.2), _task(session, "c", 0.9),
                                      _task(session, "d"))
    ann = repository.get_or_create_user(session=session, name="ann", role="annotator")
    served = []
    for _ in range(4):
        task = annotation_repo.next_task(session=session, annotator=ann, k=4)
        served.append(task.id)
        annotation_repo.submit_ranking(session=session, task_id=task.id, annotator=ann,
                                       order=[[c.id] for c in task.candidates])
    assert served == [high.id, low.id, unscored.id, unscored2.id]
    assert annotation_repo.next_task(session=session, annotator=ann, k=4) is None


def test_the_worker_scores_ready_tasks_with_the_real_encoder_once_there_are_enough_pairs(session_factory, settings,
                                                                                       tiny_model_dir):
    """Below 10 pairs tasks keep arrival order; with 48 imported pairs the head is fitted on the tiny
    model's hidden states and the ready tasks are served in turns: an even task id by the spread
    of its candidates' scores, then an odd one in arrival order; each says why in its reason."""
    from app.candidates import CandidateWorker

    service = ChatService(ScriptedEngine("ok"), session_factory, settings)
    with session_scope(session_factory) as s:
        training_repo.ensure_base_version(session=s, name="tiny-base", path=str(tiny_model_dir))
        ids = [_task(s, f"question {i}").id for i in range(3)]
    prioritizer = TaskPrioritizer(service, k=4)
    assert prioritizer.update() == 0 and prioritizer.head is None
    seed_preferences(session_factory, tiny_model_dir, n=48)
    worker = CandidateWorker(service, k=4, ahead=3, pool=12)
    assert worker._lookahead() == 3
    worker.prioritizer = prioritizer
    worker._prioritize()
    assert prioritizer.head is not None and prioritizer.head.pairs == 48 and worker._lookahead() == 12
    with session_factory() as s:
        from feedback.models import RankingTask

        tasks = sorted((s.get(RankingTask, i) for i in ids), key=lambda t: -t.priority)
        assert [t.id % 2 for t in tasks] == [0, 1, 1] and [t.id for t in tasks[1:]] == sorted(t.id for t in tasks[1:])
        assert "differ most" in tasks[0].priority_reason and "48 pairs" in tasks[0].priority_reason
        assert all("arrival order" in t.priority_reason for t in tasks[1:])
    assert prioritizer.update() == 0  # nothing new: no refit, every ready task already scored

"""Blind A/B trials: the leaderboard's arithmetic, the trial repository's refusals, and side-by-side
turns through the real ChatService (scripted engines, a migrated SQLite database)."""

from __future__ import annotations

import math
import random

import pytest
from sqlalchemy import func, select

from app.service import ChatError, ChatService
from app.side_by_side import SideBySide
from feedback import pairs as pairs_mod
from feedback import repository
from feedback import training_repo
from feedback import trial_repo
from feedback.leaderboard import ELO_PER_UNIT, Comparison, bradley_terry, leaderboard, preference_share
from feedback.models import AbTrial, AbTurn, Message
from feedback.repository import NotFoundError, ValidationError
from model.moderation import Moderator, Rule, RulesBackend
from tests.fakes import ScriptedEngine


def test_bradley_terry_matches_the_hand_worked_two_version_example():
    """A beats B 3 times of 4. With B anchored at 0 the maximum-likelihood strength of A is ln 3, and
    its variance is the inverse Fisher information 1 / (n p (1 - p)) = 1 / (4 * 0.75 * 0.25) = 4/3."""
    comps = [Comparison("A", "B", 1.0, "ab")] * 3 + [Comparison("A", "B", 0.0, "ab")]
    ratings = {r.version: r for r in bradley_terry(comps, anchor="B", prior=0.0)}
    a, b = ratings["A"], ratings["B"]
    assert b.score == b.lo == b.hi == 1000
    assert a.score == pytest.approx(1000 + ELO_PER_UNIT * math.log(3), abs=1e-6)  # 1190.85
    half = 1.96 * math.sqrt(4 / 3) * ELO_PER_UNIT  # 393.2 Elo points
    assert a.hi - a.score == pytest.approx(half, abs=1e-6) and a.score - a.lo == pytest.approx(half, abs=1e-6)
    assert (a.comparisons, a.wins, b.wins) == (4, 3.0, 1.0)


def test_bradley_terry_counts_ties_half_and_ranks_a_chain_of_three():
    """Two ties between A and B leave them equal; each beats C in 4 of 5, so by hand each is ln 4
    above C (P = 0.8 = 4 / (4 + 1)), 240.8 Elo points, and C ranks last."""
    comps = [Comparison("A", "B", 0.5, "ab")] * 2 + [Comparison("A", "C", 1.0, "ab")] * 4 + \
            [Comparison("C", "A", 1.0, "ab")] + [Comparison("B", "C", 1.0, "ab")] * 4 + [Comparison("C", "B", 1.0, "ab")]
    ratings = bradley_terry(comps, anchor="C", prior=0.0)
    by = {r.version: r for r in ratings}
    assert by["A"].score == pytest.approx(by["B"].score, abs=1e-6) and ratings[-1].version == "C"
    assert by["A"].score == pytest.approx(1000 + ELO_PER_UNIT * math.log(4), abs=1e-6)


def test_preference_share_interval_is_the_normal_approximation():
    share, lo, hi, n = preference_share([1.0] * 6 + [0.0] * 3 + [0.5])
    sd = math.sqrt(sum((x - 0.65) ** 2 for x in [1.0] * 6 + [0.0] * 3 + [0.5]) / 9)
    assert (share, n) == (0.65, 10) and hi - share == pytest.approx(1.96 * sd / math.sqrt(10))


@pytest.fixture
def versions(session_factory, tmp_path):
    """A serving base version and a registered candidate, each with a directory on disk."""
    for name in ("base", "cand"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")  # what a version directory must hold
    with session_factory.begin() as s:
        base = training_repo.ensure_base_version(session=s, name="base", path=str(tmp_path / "base"))
        cand = training_repo.add_version(session=s, name="cand", path=str(tmp_path / "cand"), parent_id=base.id, stage="ppo",
                                 metrics={}, config={}, snapshot_id=None, training_run_id=None)
        return base.id, cand.id


def test_a_bad_trial_is_refused_before_anything_is_written(session_factory, versions, tmp_path):
    """Share out of range or not a number, an unknown or serving version, a version whose files are
    gone, a second trial: each a clear error, and no trial row is left behind by a refusal."""
    base_id, cand_id = versions
    with session_factory() as s:
        for share in (0, -0.1, 1.5, float("nan"), "lots", None):
            with pytest.raises(ValidationError, match="share of turns"):
                trial_repo.start_trial(session=s, candidate_version_id=cand_id, share=share, started_by="admin")
        with pytest.raises(NotFoundError):
            trial_repo.start_trial(session=s, candidate_version_id=999, share=0.1, started_by="admin")
        with pytest.raises(ValidationError, match="already serving"):
            trial_repo.start_trial(session=s, candidate_version_id=base_id, share=0.1, started_by="admin")
        assert s.scalar(select(func.count()).select_from(AbTrial)) == 0
    (tmp_path / "cand").rename(tmp_path / "cand-moved")
    with session_factory() as s:
        with pytest.raises(ValidationError, match="is gone"):
            trial_repo.start_trial(session=s, candidate_version_id=cand_id, share=0.1, started_by="admin")
    (tmp_path / "cand-moved").rename(tmp_path / "cand")
    with session_factory.begin() as s:
        trial_repo.start_trial(session=s, candidate_version_id=cand_id, share=0.1, started_by="admin")
    with session_factory() as s:
        with pytest.raises(ValidationError, match="still running"):
            trial_repo.start_trial(session=s, candidate_version_id=cand_id, share=0.1, started_by="admin")


def _service(session_factory, settings, versions, moderator=None, share=1.0):
    base = ScriptedEngine("the serving reply", version="base")
    cand = ScriptedEngine("the candidate reply", version="cand")
    service = ChatService(base, session_factory, settings, moderator=moderator)
    service.side_by_side = SideBySide(service, rng=random.Random(1))
    with session_factory.begin() as s:
        trial_id = trial_repo.start_trial(session=s, candidate_version_id=versions[1], share=share,
                                          started_by="admin").id
    service.side_by_side.start(trial_id, cand, share)
    return service, base, cand


def test_a_side_by_side_turn_streams_both_replies_and_continues_with_the_pick(session_factory, settings, versions):
    """Both versions answer the same message; the pick is stored with both versions, the next message
    continues from the picked reply, and the pick becomes a preference pair and a leaderboard score."""
    service, base, cand = _service(session_factory, settings, versions)
    sbs = service.side_by_side
    assert sbs.wanted("alice")
    updates = list(sbs.send("alice", "Which is better?", None))
    final = updates[-1]
    assert final.done and final.turn_id and len(updates) > 2
    assert {final.left, final.right} == {"the serving reply", "the candidate reply"}
    with session_factory() as s:
        turn = s.get(AbTurn, final.turn_id)
        assert (turn.candidate_version, turn.baseline_version, turn.pick) == ("cand", "base", None)
        left_is_candidate = turn.left == "candidate"
    result = sbs.pick("alice", final.turn_id, "left")
    assert result.text == final.left
    assert result.reveal.startswith("Left was cand" if left_is_candidate else "Left was base (serving)")
    list(service.send("alice", "And then?", final.conversation_id))
    assert base.calls[-1][-2]["content"] == final.left  # the model saw the picked reply as the last answer
    with session_factory() as s:
        ab = pairs_mod.ab_pairs(s)
        assert [(p.chosen, p.rejected) for p in ab] == [(final.left, final.right)]
        board = {r.version: r for r in leaderboard(s, anchor="base")}
        assert board["cand"].comparisons == 1 and (board["cand"].score > 1000) == left_is_candidate


def test_an_ab_reply_cut_at_its_token_budget_stays_cut_in_the_pair_after_it_lost(session_factory, settings, versions):
    """Both versions' replies run out of Max new tokens (2 words here); after the pick the loser's
    status is "unpicked" but its finish reason is still "length", and the A/B pair marks both the
    chosen and the rejected reply cut."""
    from model.engine import SamplingParams

    service, _, _ = _service(session_factory, settings, versions)
    final = list(service.side_by_side.send("alice", "Which is better?", None,
                                           params=SamplingParams(max_new_tokens=2, seed=0)))[-1]
    service.side_by_side.pick("alice", final.turn_id, "left")
    with session_factory() as s:
        turn = s.get(AbTurn, final.turn_id)
        loser = s.get(Message, turn.baseline_message_id if turn.left == "candidate" else turn.candidate_message_id)
        assert (loser.status, loser.finish_reason) == ("unpicked", "length")
        assert [(p.chosen, p.chosen_cut, p.rejected_cut) for p in pairs_mod.ab_pairs(s)] == [(final.left, True, True)]


def test_wrong_picks_are_refused_and_change_nothing(session_factory, settings, versions):
    """A pick on a turn that is not a trial turn, by another user, a second pick, or an unknown
    choice: clear errors, and the stored pick stays the first one."""
    service, _, _ = _service(session_factory, settings, versions)
    sbs = service.side_by_side
    final = list(sbs.send("alice", "Hello", None))[-1]
    with pytest.raises(NotFoundError, match="does not exist"):
        sbs.pick("bob", final.turn_id, "left")
    with pytest.raises(NotFoundError):
        sbs.pick("alice", final.turn_id + 1000, "left")
    with pytest.raises(ValidationError):
        sbs.pick("alice", final.turn_id, "middle")
    with pytest.raises(ValidationError):
        sbs.pick("alice", 10**30, "left")
    sbs.pick("alice", final.turn_id, "tie")
    with pytest.raises(ValidationError, match="already decided"):
        sbs.pick("alice", final.turn_id, "right")
    with session_factory() as s:
        assert s.get(AbTurn, final.turn_id).pick == "tie"


def test_going_on_without_a_pick_continues_with_the_serving_reply(session_factory, settings, versions):
    """No pick and a new message: the turn is closed as "none" (no comparison, no pair) and the thread
    continues with the serving version's reply."""
    service, base, _ = _service(session_factory, settings, versions)
    final = list(service.side_by_side.send("alice", "Hi", None))[-1]
    list(service.send("alice", "Next", final.conversation_id))
    assert base.calls[-1][-2]["content"] == "the serving reply"
    with session_factory() as s:
        assert s.get(AbTurn, final.turn_id).pick == "none" and pairs_mod.ab_pairs(s) == []
        assert leaderboard(s) == []


def test_opted_out_users_and_flagged_input_get_one_reply(session_factory, settings, versions):
    """A user who turned A/B off never gets a side-by-side turn; a flagged message gets the one
    template reply and no trial turn; the API's stateless path never makes one either."""
    mod = Moderator([RulesBackend([Rule("abuse", words=("idiot",))])])
    service, _, _ = _service(session_factory, settings, versions, moderator=mod)
    sbs = service.side_by_side
    sbs.set_opt_out("carol", True)
    assert not sbs.wanted("carol") and sbs.wanted("alice")
    updates = list(sbs.send("alice", "you idiot", None))
    assert len(updates) == 1 and updates[0].single is not None and updates[0].single.blocked
    list(service.complete("alice", [{"role": "user", "content": "hello"}]))
    with session_factory() as s:
        assert s.scalar(select(func.count()).select_from(AbTurn)) == 0


def test_a_stopped_trial_makes_no_more_side_by_side_turns(session_factory, settings, versions):
    service, _, _ = _service(session_factory, settings, versions)
    with session_factory.begin() as s:
        trial_repo.end_trial(session=s, trial_id=service.side_by_side.trial_id)
    service.side_by_side.stop()
    assert not service.side_by_side.wanted("alice")
    with pytest.raises(ChatError, match="No trial is running"):
        list(service.side_by_side.send("alice", "Hi", None))
    with session_factory() as s:
        assert s.scalar(select(func.count()).select_from(Message)) == 0  # refused before any write


def test_trial_actions_need_the_admin_role_and_a_version_that_loads(session_factory, settings, versions, tmp_path):
    """A non-admin cannot start, stop or promote a trial (each attempt audited, nothing written); a
    version that fails to load never goes on trial; promoting from a trial serves the candidate and
    ends the trial; a restart serves a running trial again, or stops it when its files are gone."""
    from app.auth import PermissionDenied
    from app.training_control import TrainingControl
    from feedback.models import AuditLog

    with session_factory.begin() as s:
        repository.get_or_create_user(session=s, name="bob", role="annotator")
    service = ChatService(ScriptedEngine(version="base"), session_factory, settings)

    def broken(path, name):
        raise OSError(f"cannot load {name}")

    control = TrainingControl(service, engine_loader=broken)
    for action in (lambda: control.start_trial("bob", versions[1], 0.5), lambda: control.stop_trial("bob", 1),
                   lambda: control.promote_trial("bob", 1)):
        with pytest.raises(PermissionDenied):
            action()
    with pytest.raises(OSError):
        control.start_trial("local", versions[1], 0.5)
    with session_factory() as s:
        assert s.scalar(select(func.count()).select_from(AbTrial)) == 0 and service.side_by_side.trial_id is None
        denied = s.scalars(select(AuditLog.action).where(AuditLog.allowed.is_(False))).all()
        assert denied == ["start trial", "stop trial", "promote trial"]

    control = TrainingControl(service, engine_loader=lambda path, name: ScriptedEngine(version=name))
    trial_id = control.start_trial("local", versions[1], 0.5)
    assert service.side_by_side.trial_id == trial_id
    restarted = ChatService(ScriptedEngine(version="base"), session_factory, settings)
    TrainingControl(restarted, engine_loader=lambda path, name: ScriptedEngine(version=name)).recover()
    assert restarted.side_by_side.trial_id == trial_id  # served again after a restart
    assert control.promote_trial("local", trial_id) == "cand"
    assert service.engine.version == "cand" and service.side_by_side.trial_id is None
    with session_factory() as s:
        assert s.get(AbTrial, trial_id).status == "promoted"
        assert training_repo.active_version(session=s).name == "cand"

    with session_factory.begin() as s:  # a trial whose version vanished is stopped at start-up
        trial = trial_repo.start_trial(session=s, candidate_version_id=versions[0], share=0.2, started_by="local")
        gone_id = trial.id
    (tmp_path / "base").rename(tmp_path / "base-gone")
    again = ChatService(ScriptedEngine(version="cand"), session_factory, settings)
    TrainingControl(again, engine_loader=lambda path, name: ScriptedEngine(version=name)).recover()
    with session_factory() as s:
        assert again.side_by_side.trial_id is None and s.get(AbTrial, gone_id).status == "stopped"


def test_a_users_picks_are_in_their_data_export_and_gone_with_delete_my_data(session_factory, settings, versions):
    """"Download all my data" lists the user's A/B picks; "Delete all my data" removes them, and the
    preference pair they gave leaves the training data."""
    service, _, _ = _service(session_factory, settings, versions)
    final = list(service.side_by_side.send("alice", "Hi there", None))[-1]
    service.side_by_side.pick("alice", final.turn_id, "right")
    assert [p["pick"] for p in service.my_data("alice")["ab_picks"]] in (["candidate"], ["baseline"])
    counts = service.delete_my_data("alice")
    assert counts["ab_turns"] == 1
    with session_factory() as s:
        assert s.scalar(select(func.count()).select_from(AbTurn)) == 0 and pairs_mod.ab_pairs(s) == []


def test_rankings_across_versions_are_leaderboard_comparisons(session):
    """An annotator's order "v2 > v1 = v2b > v1b" over candidates of two versions gives v2 one win over
    each v1 candidate, a tie for the v1/v2b group, and v2b one win over v1b; same-version pairs count nothing."""
    from feedback import annotation_repo
    from feedback.leaderboard import ranking_comparisons

    user = repository.get_or_create_user(session=session, name="ann", role="annotator")
    task = annotation_repo.add_task(session=session, context=[{"role": "user", "content": "Name a colour"}], source="import")
    a, b, c, d = (annotation_repo.add_candidate(session=session, task=task, content=text, model_version=version)
                  for text, version in (("Blue", "v2"), ("Red", "v1"), ("Green", "v2"), ("Grey", "v1")))
    annotation_repo.submit_ranking(session=session, task_id=task.id, annotator=user, order=[[a.id], [b.id, c.id], [d.id]])
    comps = sorted((x.first, x.second, x.outcome) for x in ranking_comparisons(session))
    assert comps == [("v1", "v2", 0.5), ("v2", "v1", 1.0), ("v2", "v1", 1.0), ("v2", "v1", 1.0)]


def test_ab_serving_bench_p95_ratio_interval_brackets_the_ratio_of_the_samples():
    """bench.ab_serving's bootstrap interval of p95(case)/p95(no trial): around 1 for the same
    latencies, around 2 for latencies twice as long, never inverted, nan without turns."""
    from bench.ab_serving import p95, ratio_interval

    base = [i / 100 for i in range(1, 201)]
    assert p95(base) == base[189]  # nearest rank: index round(0.95 * 199)
    lo, hi = ratio_interval(base, base)
    assert lo < 1.0 < hi and hi - lo < 0.3
    lo, hi = ratio_interval([2 * x for x in base], base)
    assert lo < 2.0 < hi and 1.7 < lo <= hi < 2.3
    assert all(x != x for x in ratio_interval([], base))

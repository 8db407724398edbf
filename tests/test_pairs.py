from feedback import annotation_repo
from feedback import repository
from feedback.pairs import all_pairs, merge, pairs_from_order, ranking_pairs, vote_pairs


def test_pairs_from_order_with_ties():
    # A > B = C > D : ties (B, C) give no pair
    assert sorted(pairs_from_order([[1], [2, 3], [4]], set())) == [(1, 2), (1, 3), (1, 4), (2, 4), (3, 4)]


def test_flagged_candidate_is_never_chosen():
    assert sorted(pairs_from_order([[1], [2], [3]], {1})) == [(2, 3)]


def _task(session, k=4, wanted=1):
    task = annotation_repo.add_task(session=session, context=[{"role": "user", "content": "Name a colour"}], source="import",
                          wanted=wanted)
    cands = [annotation_repo.add_candidate(session=session, task=task, content=c, model_version="v0")
             for c in ["Red.", "Blue.", "Green.", "Yellow."][:k]]
    return task, cands


def test_ranking_pairs_exclude_flags_and_moderation(session):
    task, (a, b, c, d) = _task(session)
    d.moderation = "flagged"
    ann = repository.get_or_create_user(session=session, name="ann", role="annotator")
    annotation_repo.submit_ranking(session=session, task_id=task.id, annotator=ann, order=[[d.id], [a.id], [b.id, c.id]],
                         flags={b.id: "false"})
    pairs = {(p.chosen, p.rejected) for p in ranking_pairs(session)}
    # d is best-ranked but moderation-flagged: never chosen; b and c tie: no pair between them
    assert pairs == {("Red.", "Blue."), ("Red.", "Green.")}
    assert all(p.prompt == [{"role": "user", "content": "Name a colour"}] for p in ranking_pairs(session))


def test_sibling_votes_give_pairs(session):
    alice = repository.get_or_create_user(session=session, name="alice")
    conv = repository.create_conversation(session=session, owner=alice)
    q = repository.add_message(session=session, conversation=conv, role="user", content="Hi")
    good = repository.add_message(session=session, conversation=conv, role="assistant", content="Hello!", parent=q)
    bad = repository.add_message(session=session, conversation=conv, role="assistant", content="Go away.", parent=q)
    lone = repository.add_message(session=session, conversation=conv, role="assistant", content="Hey", parent=q)
    repository.add_vote(session=session, message_id=good.id, user=alice, value=1)
    repository.add_vote(session=session, message_id=bad.id, user=alice, value=-1)
    pairs = vote_pairs(session)
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [([{"role": "user", "content": "Hi"}], "Hello!", "Go away.")]
    # a moderation-flagged reply is never chosen even when up-voted
    good.moderation = "flagged"
    repository.add_vote(session=session, message_id=lone.id, user=alice, value=-1)
    assert vote_pairs(session) == []


def test_an_up_voted_reply_the_user_stopped_or_the_budget_cut_is_a_cut_chosen_reply(session):
    """A stopped reply, or one cut at its token budget (finish reason "length"), did not end by
    itself: its vote pair is marked chosen_cut; one that ended ("stop") is not. A reply stored
    before messages had a finish reason is cut when its tokens reached its budget."""
    alice = repository.get_or_create_user(session=session, name="alice")
    conv = repository.create_conversation(session=session, owner=alice)
    q = repository.add_message(session=session, conversation=conv, role="user", content="Hi")
    stopped = repository.add_message(session=session, conversation=conv, role="assistant", content="Hello, I can",
                                     parent=q, status="stopped")
    bad = repository.add_message(session=session, conversation=conv, role="assistant", content="Go away.", parent=q)
    repository.add_vote(session=session, message_id=stopped.id, user=alice, value=1)
    repository.add_vote(session=session, message_id=bad.id, user=alice, value=-1)
    assert [(p.chosen, p.chosen_cut) for p in vote_pairs(session)] == [("Hello, I can", True)]
    stopped.status = "complete"
    assert [(p.chosen, p.chosen_cut) for p in vote_pairs(session)] == [("Hello, I can", False)]
    stopped.sampling, stopped.completion_tokens = {"max_new_tokens": 4}, 4  # an older row at its budget
    assert [(p.chosen, p.chosen_cut) for p in vote_pairs(session)] == [("Hello, I can", True)]
    stopped.finish_reason = "stop"  # the engine said it ended, exactly at its budget
    assert [(p.chosen, p.chosen_cut) for p in vote_pairs(session)] == [("Hello, I can", False)]
    stopped.finish_reason = "length"
    assert [(p.chosen, p.chosen_cut) for p in vote_pairs(session)] == [("Hello, I can", True)]


def test_opted_out_users_excluded(session):
    task, (a, b, *_rest) = _task(session, k=2)
    ann = repository.get_or_create_user(session=session, name="ann", role="annotator")
    annotation_repo.submit_ranking(session=session, task_id=task.id, annotator=ann, order=[[a.id], [b.id]])
    assert len(ranking_pairs(session)) == 1
    ann.opted_out = True
    session.flush()
    assert ranking_pairs(session) == []


def test_duplicates_merge_with_count(session):
    task, (a, b, *_rest) = _task(session, k=2, wanted=2)
    for name in ("ann", "bob"):
        user = repository.get_or_create_user(session=session, name=name, role="annotator")
        annotation_repo.submit_ranking(session=session, task_id=task.id, annotator=user, order=[[a.id], [b.id]])
    [pair] = all_pairs(session)
    assert pair.count == 2 and len(pair.refs["rankings"]) == 2
    assert len(merge(ranking_pairs(session) * 2)) == 1

"""Retrain end to end on a tiny random model and a seeded SQLite database."""

import pytest
from sqlalchemy import select

from feedback import repository, training_repo
from feedback.models import ModelVersion, TrainingRun
from tests.training_data import seed_preferences
from training.config import RetrainConfig
from training.common import read_jsonl
from training.retrain import execute
from training.safety_select import RefusalCheckpoints

FAST = dict(max_length=64, bon_samples=2, bon_max_new_tokens=8, rm_epochs=6, rm_learning_rate=2e-3, rm_batch_size=8, ppo_episodes=8, ppo_batch_size=4,
            response_length=8, ppo_epochs=1, eval_prompts=4, eval_max_new_tokens=8, accuracy_gate=0.6,
            eval_refusal_prompts=4)


def _run(session_factory, tmp_path, cfg):
    with session_factory.begin() as s:
        run_id = training_repo.create_run(session=s, config=cfg.to_dict(), requested_by="test", base_version_id=None).id
    status = execute(run_id, cfg, session_factory, tmp_path / "data")
    with session_factory() as s:
        return status, s.get(TrainingRun, run_id)


def test_retrain_end_to_end_registers_a_version(session_factory, tmp_path, tiny_model_dir):
    """A retrain with pairs, admin-confirmed moderation flags, two messages an admin cleared and
    everyday chat openers moderation passed, safety tuning on, runs the safety-DPO stage on
    contrast pairs (the cleared and chat prompts on the answering side), keeps the checkpoint the
    chooser ranks first on validation prompts held out of it (within the ordinary-refusal budget
    over the current model, measured first), and
    registers a version whose evaluation carries every probe, the refusal
    probe on held-out flagged prompts and on everyday questions included."""
    from feedback.models import ModerationEvent

    seed_preferences(session_factory, tiny_model_dir)
    with session_factory.begin() as s:
        for i in range(40):  # enough that a fifth of the training ones can choose the DPO checkpoint
            s.add(ModerationEvent(direction="in", text=f"tell me how to hurt person number {i}", text_hash=str(i),
                                  backend="rules", scores={}, thresholds={}, decision="flag", review="correct",
                                  category="violence"))
        for i in range(2):
            s.add(ModerationEvent(direction="in", text=f"what do people eat at festival number {i}",
                                  text_hash=f"c{i}", backend="rules", scores={}, thresholds={}, decision="flag",
                                  review="false_positive", category="hate"))
        user = repository.get_or_create_user(session=s, name="chatter")
        for i in range(20):
            conv = repository.create_conversation(session=s, owner=user)
            repository.add_message(session=s, conversation=conv, role="user", content=f"how do I bake bread number {i}",
                                   moderation="pass")
    cfg = RetrainConfig(**FAST, safety_tuning=True, safety_dpo_answer_tokens=8, ppo_loop_penalty=10.0,
                        ppo_loop_guard=True, ppo_loop_check_tokens=32)
    status, run = _run(session_factory, tmp_path, cfg)
    assert status == "done", run.error
    # every PPO rollout went through the loop check once
    assert run.metrics["ppo_scored_rollouts"] == cfg.ppo_episodes and "ppo_looping_rollouts" in run.metrics
    # the loop guard sampled the final weights (2 updates of 4 episodes) once: no loop, so they were kept
    assert run.metrics["ppo_looping_checks"] == {"2": 0} and run.metrics["ppo_kept_update"] == 2
    assert run.metrics["ppo_reward_kept"] == run.metrics["ppo_reward_last"] and "ppo_loop_guard_note" not in run.metrics
    ppo_prompts = read_jsonl(tmp_path / "data" / "runs" / f"run-{run.id}" / "data" / "prompts_ppo.jsonl")
    assert run.metrics["ppo_loop_check_prompts"] == min(16, len(ppo_prompts))
    m = run.metrics
    # the tiny model's answers and the best replies never refuse: n refusing pairs and about
    # r * n answering ones (r = safety_dpo_answer_ratio), n as large as both sides allow
    ordinary = m["data"]["sft_train"] + m["data"]["sft_best_train"]
    assert m["data"]["prompts_cleared_train"] == 2
    # cleared prompts join the answering side (unless the tiny model's answer to one is empty)
    # ... less the validation prompts that choose the DPO checkpoint (training/safety_select.py)
    caught = m["data"]["sft_safety_train"] - m.get("safety_dpo_validation_caught", 0)
    ordinary -= m.get("safety_dpo_validation_ordinary", 0)
    cleared = 2 - m.get("safety_dpo_validation_cleared", 0)
    chat = m["data"]["prompts_chat_train"] - m.get("safety_dpo_validation_chat", 0)
    assert 10 <= m["data"]["prompts_chat_train"] < 20  # the evaluation's held-out share is left out
    r = cfg.safety_dpo_answer_ratio
    fewest, most = min(caught, int(ordinary / r)), min(caught, int((ordinary + cleared + chat) / r))
    assert 0 < fewest + round(fewest * r) <= m["safety_dpo_pairs"] <= most + round(most * r)
    assert m["safety_dpo_validation_caught"] >= 5 and m["safety_dpo_validation_ordinary"] >= 1
    history = m["safety_dpo_check_history"]  # the SFT model and evenly spaced steps, the best one kept
    assert history[0]["step"] == 0 and len(history) >= 2
    assert m["safety_dpo_chosen_step"] == max(history, key=RefusalCheckpoints._rank)["step"]
    assert m["safety_dpo_ordinary_limit"] == pytest.approx(
        m["safety_dpo_current_rates"][1] + cfg.safety_dpo_select_ordinary_budget, abs=1e-4)
    pairs = read_jsonl(tmp_path / "data" / "runs" / f"run-{run.id}" / "data" / "safety_dpo_pairs.jsonl")
    assert any(p["prompt"][-1]["content"].startswith("how do I bake bread") for p in pairs)
    assert "safety_dpo" in m["timings_s"]
    assert m["rm_heldout_accuracy"] > 0.6  # learned "blue beats red", above chance
    ev = m["eval"]
    for key in ("reward_new", "reward_current", "win_rate", "kl_to_current", "length_new", "ppl_new", "ppl_current",
                "bleu_new", "bleu_current", "chrf_new", "chrf_current", "refusal_harmful_new",
                "refusal_harmful_current", "refusal_ordinary_new", "refusal_ordinary_current", "degenerate_new",
                "degenerate_current"):
        assert key in ev and ev[key] == ev[key], key  # present and not NaN
    # the evaluation times each of its steps (where its minutes go), every one measured
    assert set(ev["eval_seconds"]) == {"sample_current", "sample_new", "kl_and_flags", "perplexity", "reward_scores",
                                       "heldout_pairs", "judge_scores"} and min(ev["eval_seconds"].values()) >= 0
    assert ev["refusal_ordinary_n"] == 4 and 1 <= ev["refusal_harmful_n"] == m["data"]["sft_safety_heldout"] <= 4
    with session_factory() as s:
        version = s.get(ModelVersion, run.version_id)
        assert version.stage == "ppo" and version.parent_id is not None and version.snapshot_id is not None
        assert version.metrics["eval"]["win_rate"] == ev["win_rate"] and not version.is_active
        assert {h["stage"].split(" ")[1] for h in run.history} >= {"sft", "safety_dpo", "reward", "best_of_n", "ppo"}
    assert m["bon_samples"] == 2 and m["bon_prompts"] >= 4 and "best_of_n" in m["timings_s"]
    assert (tmp_path / "data" / "versions" / version.name / "config.json").is_file()
    assert ev["reference_n"] == min(16, m["data"]["preferences_heldout"])  # chosen replies when no demonstrations
    from training.report import version_report

    with session_factory() as s:
        table = version_report(s, [version.name])
        with pytest.raises(LookupError, match="No version named 'nope'"):
            version_report(s, ["nope"])
    assert f"| BLEU vs ideal replies | {ev['bleu_new']:.3f} |" in table and "no comparisons yet" in table
    assert f"| PPO update kept (loop guard) | {m['ppo_kept_update']} |" in table


def test_the_win_rate_is_judged_by_a_reward_model_trained_only_on_held_out_pairs(session_factory, tmp_path,
                                                                               tiny_model_dir):
    """The evaluation's judge is trained on the held-out pairs and checked on training pairs it never
    saw; its score of both versions' sampled replies is the win rate, reported with its accuracy."""
    import json

    seed_preferences(session_factory, tiny_model_dir)
    status, run = _run(session_factory, tmp_path, RetrainConfig(**FAST))
    assert status == "done", run.error
    m, ev = run.metrics, run.metrics["eval"]
    assert m["judge_train_pairs"] == m["data"]["preferences_heldout"]
    assert m["judge_check_pairs"] == min(100, m["data"]["preferences_train"])
    data = tmp_path / "data" / "runs" / f"run-{run.id}" / "data"
    rows = lambda name: [json.dumps(json.loads(line), sort_keys=True)  # noqa: E731
                         for line in (data / name).read_text().splitlines()]
    check, train, heldout = rows("judge_check.jsonl"), rows("preferences_train.jsonl"), rows("preferences_heldout.jsonl")
    assert set(check) <= set(train) and not set(check) & set(heldout)
    assert ev["win_rate_judge"] == "held-out reward model" and ev["win_rate"] == ev["judge_win_rate"]
    assert 0 <= ev["judge_accuracy"] <= 1 and ev["judge_accuracy_lo"] <= ev["judge_accuracy"] <= ev["judge_accuracy_hi"]
    assert "judge" in m["timings_s"] and not (data.parent / "judge").exists()  # scratch removed after use


def test_accuracy_gate_stops_random_label_run(session_factory, tmp_path, tiny_model_dir):
    """With sft_when_gated off, a reward model below the gate stops the run and registers nothing."""
    seed_preferences(session_factory, tiny_model_dir, random_labels=True)
    status, run = _run(session_factory, tmp_path, RetrainConfig(**{**FAST, "accuracy_gate": 0.75,
                                                                   "sft_when_gated": False}))
    assert status == "gated" and "cannot rank" in run.error
    with session_factory() as s:
        assert s.scalars(select(ModelVersion).where(ModelVersion.stage != "base")).all() == []


def test_gated_reward_model_skips_ppo_and_registers_the_evaluated_sft_model(session_factory, tmp_path,
                                                                           tiny_model_dir):
    """By default a reward model below the gate never steers PPO, but the best-reply SFT model is
    still judged on held-out pairs and registered as an "sft" version that says why."""
    seed_preferences(session_factory, tiny_model_dir, random_labels=True)
    status, run = _run(session_factory, tmp_path, RetrainConfig(**{**FAST, "accuracy_gate": 0.75}))
    assert status == "done", run.error
    assert "cannot rank must not steer PPO" in run.metrics["ppo_skipped"]
    assert "ppo" not in run.metrics["timings_s"] and run.metrics["policy_from"] == "sft"
    assert run.metrics["eval"]["win_rate_judge"] == "held-out reward model"
    with session_factory() as s:
        version = s.get(ModelVersion, run.version_id)
        assert version.stage == "sft" and version.name.endswith("-sft") and not version.is_active
    assert (tmp_path / "data" / "versions" / version.name / "config.json").is_file()


def test_preference_dpo_trains_the_policy_on_every_training_pair_before_the_reward_model_and_ppo(
        session_factory, tmp_path, tiny_model_dir):
    """With pref_dpo on, the retrain runs DPO on every training pair after SFT and before the
    reward model, PPO goes on from the DPO model, and the version records the stage, its pairs and
    its time; the stage's scratch directory is removed once the version is registered."""
    seed_preferences(session_factory, tiny_model_dir)
    cfg = RetrainConfig(**{**FAST, "bon_samples": 0, "pref_dpo": True, "pref_dpo_learning_rate": 1e-3})
    status, run = _run(session_factory, tmp_path, cfg)  # no best-of-N: PPO starts from the DPO model itself
    assert status == "done", run.error
    m = run.metrics
    assert m["pref_dpo_pairs"] + m["pref_dpo_skipped"] == m["data"]["preferences_train"] and m["pref_dpo_pairs"] > 0
    assert 0 <= m["pref_dpo_last_epoch_accuracy"] <= 1 and "pref_dpo" in m["timings_s"]
    assert m["policy_from"] == "pref_dpo"  # the model PPO started from
    order = [h["stage"].split(" ")[1] for h in run.history]
    assert any("pref_dpo" in h["stage"] and "loss" in h and "accuracy" in h for h in run.history)
    assert order.index("sft") < order.index("pref_dpo") < order.index("reward") < order.index("ppo")
    with session_factory() as s:
        assert s.get(ModelVersion, run.version_id).stage == "ppo"
    assert not (tmp_path / "data" / "runs" / f"run-{run.id}" / "pref_dpo").exists()


def test_a_gated_retrain_with_preference_dpo_registers_the_dpo_model_under_its_own_stage(session_factory, tmp_path,
                                                                                       tiny_model_dir):
    """When the reward model fails the gate after preference DPO, the DPO model (not the SFT one) is
    evaluated and registered, as a "pref_dpo" version whose note names it."""
    seed_preferences(session_factory, tiny_model_dir, random_labels=True)
    status, run = _run(session_factory, tmp_path, RetrainConfig(**{**FAST, "accuracy_gate": 0.75, "pref_dpo": True}))
    assert status == "done", run.error
    assert "the preference-DPO model was evaluated and registered" in run.metrics["ppo_skipped"]
    assert run.metrics["policy_from"] == "pref_dpo" and run.metrics["pref_dpo_pairs"] > 0  # the model registered
    with session_factory() as s:
        version = s.get(ModelVersion, run.version_id)
        assert version.stage == "pref_dpo" and version.name.endswith("-pref_dpo")


def test_not_enough_data_is_clear(session_factory, tmp_path, tiny_model_dir):
    seed_preferences(session_factory, tiny_model_dir, n=3)
    status, run = _run(session_factory, tmp_path, RetrainConfig(**FAST))
    assert status == "failed" and "rank more tasks or import pairs" in run.error


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of ppo_batch_size"):
        RetrainConfig(ppo_episodes=10, ppo_batch_size=4).validate()
    with pytest.raises(ValueError, match="Unknown retrain settings"):
        RetrainConfig.from_dict({"nope": 1})
    with pytest.raises(ValueError, match="ppo_gae_lambda"):
        RetrainConfig(ppo_gae_lambda=1.5).validate()
    with pytest.raises(ValueError, match="ppo_loop_penalty"):
        RetrainConfig(ppo_loop_penalty=-1).validate()
    with pytest.raises(ValueError, match="ppo_loop_check_prompts"):
        RetrainConfig(ppo_loop_check_prompts=1).validate()
    with pytest.raises(ValueError, match="ppo_loop_check_tokens"):
        RetrainConfig(ppo_loop_check_tokens=100000).validate()
    with pytest.raises(ValueError, match="multiple of ppo_mini_batches"):
        RetrainConfig(ppo_batch_size=8, ppo_mini_batches=3).validate()


def test_one_logged_prompt_is_topped_up_for_ppo(session_factory, tmp_path, tiny_model_dir):
    """Regression: with fewer prompts than one PPO batch, TRL's loader looped forever."""
    from feedback import annotation_repo

    seed_preferences(session_factory, tiny_model_dir)
    with session_factory.begin() as s:
        annotation_repo.add_task(session=s, context=[{"role": "user", "content": "hi as alice"}], source="chat")
    status, run = _run(session_factory, tmp_path, RetrainConfig(**FAST))
    assert status == "done", run.error


def test_a_retrain_that_reads_cut_replies_saves_it_with_its_reward_models_and_gives_ppo_the_marker(
        session_factory, tmp_path, tiny_model_dir, monkeypatch):
    """rm_reads_cut_replies on: the saved reward model records it in its config.json, every reward
    model that scores anything in the run (the reward model, the evaluation's judge) reads cut
    replies, the evaluation hands them its replies that reached the 8-token limit marked cut, PPO's
    reward model is built with the tokenizer's cut marker (its 8-token rollouts are cut), and the
    run still trains, evaluates and registers a PPO version."""
    import json

    import training.evaluate
    import training.ppo
    import training.reward
    from training.common import load_tokenizer
    from training.reward import cut_marker, reads_cut_replies

    markers, scored, evaluated = [], [], []
    real_scorer, real_score = training.ppo.scored_at_end_of_turn, training.reward.score_conversations
    real_scores = training.evaluate._scores

    def eval_scores(path, convs, cfg):  # the evaluation's replies, cut at eval_max_new_tokens (8)
        evaluated.extend(c[-1].get("cut", False) for cs in convs.values() for c in cs)
        return real_scores(path, convs, cfg)

    def scorer(*args, **kwargs):
        markers.append(kwargs.get("cut_token_id"))
        return real_scorer(*args, **kwargs)

    def score(model, tokenizer, conversations, *args, **kwargs):
        scored.append((reads_cut_replies(model), any(c[-1].get("cut") for c in conversations)))
        return real_score(model, tokenizer, conversations, *args, **kwargs)

    monkeypatch.setattr(training.ppo, "scored_at_end_of_turn", scorer)
    monkeypatch.setattr(training.reward, "score_conversations", score)
    monkeypatch.setattr(training.evaluate, "_scores", eval_scores)
    seed_preferences(session_factory, tiny_model_dir)
    status, run = _run(session_factory, tmp_path, RetrainConfig(**FAST, rm_reads_cut_replies=True))
    assert status == "done", run.error
    assert markers == [cut_marker(load_tokenizer(tiny_model_dir))] and markers[0] is not None
    config = json.loads((tmp_path / "data" / "runs" / f"run-{run.id}" / "reward" / "config.json").read_text())
    assert config["reads_cut_replies"] is True
    assert len(scored) >= 3 and all(reads for reads, _ in scored)  # reward model, judge, evaluation
    assert any(evaluated)
    assert run.metrics["ppo_updates"] >= 1
    with session_factory() as s:
        assert s.get(ModelVersion, run.version_id).stage == "ppo"


def test_registration_never_overwrites_an_existing_version_directory(session_factory, tmp_path, tiny_model_dir):
    """A data dir reused with a fresh database (run ids start again at 1): the new version gets its own
    directory and the old one is left as it was."""
    seed_preferences(session_factory, tiny_model_dir)
    old = tmp_path / "data" / "versions" / "run1-ppo"
    old.mkdir(parents=True)
    (old / "keep.txt").write_text("an older version")
    status, run = _run(session_factory, tmp_path, RetrainConfig(**FAST))
    assert status == "done", run.error
    with session_factory() as s:
        assert s.get(ModelVersion, run.version_id).name == "run1-ppo-2"
    assert (old / "keep.txt").read_text() == "an older version"
    assert (tmp_path / "data" / "versions" / "run1-ppo-2" / "config.json").is_file()


def test_a_retrain_can_start_with_continued_pretraining_on_a_cleaned_corpus(session_factory, tmp_path,
                                                                          tiny_model_dir):
    """pretrain_corpus names a corpus under data/corpora: the run's first training stage is
    pretraining on it (perplexity before and after stored with the version), SFT starts from that
    model, its time budget is pretrain_max_minutes, and a corpus that is not there, a path instead
    of a name, or a negative budget is refused before the run."""
    import json

    from training.config import corpus_file

    corpora = tmp_path / "data" / "corpora" / "handbook"
    corpora.mkdir(parents=True)
    docs = [f"Rule {i}: the blue kettle stays on the left shelf and the red cup goes on the right." for i in range(30)]
    (corpora / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    with pytest.raises(ValueError, match="No cleaned corpus named 'other'"):
        corpus_file(tmp_path / "data", "other")
    with pytest.raises(ValueError, match="must be the name of a corpus"):
        RetrainConfig(pretrain_corpus="../../etc").validate()
    with pytest.raises(ValueError, match="pretrain_max_minutes must be >= 0"):
        RetrainConfig(pretrain_max_minutes=-1).validate()
    seed_preferences(session_factory, tiny_model_dir, random_labels=True)
    cfg = RetrainConfig(**{**FAST, "accuracy_gate": 0.75, "pretrain_corpus": "handbook"})  # gated: no PPO, faster
    status, run = _run(session_factory, tmp_path, cfg)
    assert status == "done", run.error
    pre = run.metrics["pretrain"]
    assert pre["corpus"] == "handbook" and pre["documents_train"] + pre["documents_heldout"] == 30
    assert pre["heldout_ppl_after"] < pre["heldout_ppl_before"]
    assert pre["config"]["max_minutes"] == cfg.pretrain_max_minutes == 14.0  # the retrain's time budget is passed on
    assert [h["stage"] for h in run.history][0].endswith("pretrain") and "pretrain" in run.metrics["timings_s"]
    assert not (tmp_path / "data" / "runs" / f"run-{run.id}" / "pretrain").exists()  # the version keeps the weights

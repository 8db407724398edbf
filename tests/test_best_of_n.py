"""Best-of-N before PPO (training/best_of_n.py): the reward model's winners are what the policy learns."""

import json

from training.best_of_n import pick_best
from training.config import RetrainConfig

FAST = dict(max_length=64, rm_epochs=6, rm_learning_rate=2e-3, rm_batch_size=8, eval_engine="simple",
            bon_samples=4, bon_max_new_tokens=8, bon_min_margin=0.0, bon_epochs=3, bon_learning_rate=1e-3)


def test_pick_best_keeps_the_top_scored_reply_only_where_it_beats_the_mean_by_the_margin():
    """Per prompt the highest-scored non-empty reply is kept, and only when it beats the prompt's mean
    score by more than the margin; a prompt with fewer than two non-empty replies is skipped."""
    p = [[{"role": "user", "content": f"q{i}"}] for i in range(4)]
    replies = [["a", "b", "c"], ["x", "y", "z"], ["", "only"], ["  ", "best", "ok"]]
    scores = [[0.0, 2.0, 1.0], [1.0, 1.05, 1.0], [9.0, 0.0], [99.0, 1.0, 0.0]]
    rows = pick_best(p, replies, scores, min_margin=0.1)
    assert [r["messages"][-1]["content"] for r in rows] == ["b", "best"]
    assert rows[0]["messages"][:-1] == p[0] and rows[0]["messages"][-1]["role"] == "assistant"
    assert len(pick_best(p, replies, scores, min_margin=0.0)) == 3  # "y" beats its mean by 0.033


def test_a_winner_cut_at_its_budget_is_marked_so_sft_trains_no_end_of_turn_after_it():
    """pick_best marks a winning reply that used its whole budget "cut" (training/sft.py then drops the
    end-of-turn after it); a winner that ended keeps a plain row."""
    p = [[{"role": "user", "content": f"q{i}"}] for i in range(2)]
    replies, scores = [["a", "b"], ["x", "y"]], [[0.0, 2.0], [3.0, 1.0]]
    rows = pick_best(p, replies, scores, min_margin=0.1, cut=[[False, True], [False, True]])
    assert [(r["messages"][-1]["content"], r.get("cut")) for r in rows] == [("b", True), ("x", None)]


def test_best_of_n_fine_tunes_the_policy_on_the_reward_models_winners(tmp_path, tiny_model_dir):
    """After the stage, the policy's log-probability of every prompt's winning sample rose: the fine-tune
    trained on what the reward model preferred (a stage that trained on nothing fails). Not asserted:
    that the winners rose more than the losers. This random model's samples are byte noise, the reward
    model's winners among them are arbitrary, and that margin's sign moved with which noise won. The
    returned policy is a new directory; the samples and their scores are kept beside it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.best_of_n import run_best_of_n
    from training.common import chat_text, read_jsonl
    from training.probes import reply_logprobs
    from training.reward import run_reward

    rows = [{"prompt": [{"role": "user", "content": f"Question {i}: what colour is the sky?"}],
             "chosen": [{"role": "assistant", "content": "blue blue blue"}],
             "rejected": [{"role": "assistant", "content": "red red red"}]} for i in range(24)]
    for name, part in (("train", rows[:18]), ("held", rows[18:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows[:8]))
    cfg = RetrainConfig(**FAST).validate()
    rm_path, _ = run_reward(tiny_model_dir, tmp_path / "train.jsonl", tmp_path / "held.jsonl", tmp_path / "rm", cfg)
    seen = []
    new_path, metrics = run_best_of_n(tiny_model_dir, rm_path, tmp_path / "prompts.jsonl", tmp_path / "bon", cfg,
                                      progress=lambda i, n: seen.append((i, n)))
    assert metrics["bon_prompts"] == 8 and metrics["bon_samples"] == 4 and metrics["bon_kept"] >= 6, metrics
    assert metrics["bon_reward_best"] > metrics["bon_reward_mean"]
    assert str(new_path) != str(tiny_model_dir) and seen[-1] == (32, 32)
    samples = read_jsonl(tmp_path / "bon" / "samples.jsonl")
    assert [len(s["replies"]) for s in samples] == [4] * 8

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    before, after = AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoModelForCausalLM.from_pretrained(new_path)
    gains = []
    for s in samples:
        best = max(range(4), key=lambda i: s["scores"][i])
        prompt = chat_text(tok, s["prompt"])
        lp = lambda m, t: float(reply_logprobs(m, tok, prompt, t).sum()) if t.strip() else 0.0  # noqa: E731
        gain = [lp(after, t) - lp(before, t) for t in s["replies"]]
        gains.append(gain[best])
    assert min(gains) > 0 and sum(gains) / len(gains) > 0.5, gains

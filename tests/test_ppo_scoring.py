"""PPO's rollouts are scored as the reward model was trained: at the reply's end-of-turn token,
with every end-of-turn marker of the prompt visible (not taken for padding)."""

from __future__ import annotations

import pytest


def _rm_and_tokenizer(tiny_model_dir):
    import torch

    from training.reward import load_reward_model

    torch.manual_seed(0)
    return load_reward_model(tiny_model_dir)


def test_the_training_pad_token_never_occurs_in_a_rendered_chat(tiny_model_dir, tmp_path):
    """A tokenizer whose pad is its end-of-turn token (as SmolLM2 ships) gets another pad."""
    from transformers import AutoTokenizer

    from training.common import chat_text, load_tokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    tok.pad_token = tok.eos_token
    tok.save_pretrained(tmp_path)
    fixed = load_tokenizer(tmp_path, padding_side="left")
    ids = fixed(chat_text(fixed, [{"role": "user", "content": "hello there"}]), add_special_tokens=False).input_ids
    assert fixed.pad_token_id != fixed.eos_token_id
    assert fixed.pad_token_id not in ids and fixed.eos_token_id in ids
    assert fixed.padding_side == "left"


@pytest.mark.parametrize("finished", [True, False])
def test_ppo_reads_the_same_reward_as_scoring_the_whole_conversation(tiny_model_dir, finished):
    """TRL's get_reward through scored_at_end_of_turn equals score_conversations on the same reply,
    for a rollout that ended with eos and for one cut mid-reply (scored as if it ended there)."""
    import torch
    from trl.experimental.utils import get_reward

    from training.common import chat_text
    from training.ppo_reward import scored_at_end_of_turn
    from training.reward import score_conversations

    rm, tok = _rm_and_tokenizer(tiny_model_dir)
    prompts = [[{"role": "user", "content": "hello there"}], [{"role": "user", "content": "a much longer question here"}]]
    replies = ["the cat sat", "a dog ran far away"]
    queries = [tok(chat_text(tok, p), add_special_tokens=False).input_ids for p in prompts]
    answers = [tok(r, add_special_tokens=False).input_ids + ([tok.eos_token_id] if finished else []) for r in replies]
    pad, width, span = tok.pad_token_id, max(map(len, queries)), max(map(len, answers)) + 2
    rows = [[pad] * (width - len(q)) + q + a + [pad] * (span - len(a)) for q, a in zip(queries, answers)]
    _, scores, _ = get_reward(scored_at_end_of_turn(rm, tok.eos_token_id), torch.tensor(rows), pad, width)
    expected = score_conversations(rm, tok, [p + [{"role": "assistant", "content": r}] for p, r in zip(prompts, replies)])
    assert scores.squeeze(-1).tolist() == pytest.approx(expected, abs=1e-4)


def test_a_cut_rollout_gets_the_cut_marker_when_the_reward_model_learnt_cut_replies(tiny_model_dir):
    """With cut_token_id (rm_reads_cut_replies), TRL's get_reward on a rollout cut mid-reply equals
    score_conversations on the reply marked cut (read at the cut marker), and differs from reading
    it as finished; a rollout that ended with eos is read at its eos either way."""
    import torch
    from trl.experimental.utils import get_reward

    from training.common import chat_text
    from training.ppo_reward import scored_at_end_of_turn
    from training.reward import cut_marker, score_conversations

    rm, tok = _rm_and_tokenizer(tiny_model_dir)
    rm.config.reads_cut_replies = True  # as run_reward saves a model trained with rm_reads_cut_replies
    prompts = [[{"role": "user", "content": "hello there"}], [{"role": "user", "content": "a much longer question here"}]]
    replies = ["the cat sat on the", "a dog ran far away"]
    queries = [tok(chat_text(tok, p), add_special_tokens=False).input_ids for p in prompts]
    answers = [tok(replies[0], add_special_tokens=False).input_ids,  # cut
               tok(replies[1], add_special_tokens=False).input_ids + [tok.eos_token_id]]  # finished
    pad, width, span = tok.pad_token_id, max(map(len, queries)), max(map(len, answers)) + 2
    rows = [[pad] * (width - len(q)) + q + a + [pad] * (span - len(a)) for q, a in zip(queries, answers)]
    scorer = scored_at_end_of_turn(rm, tok.eos_token_id, cut_token_id=cut_marker(tok))
    _, scores, _ = get_reward(scorer, torch.tensor(rows), pad, width)
    convs = [p + [{"role": "assistant", "content": r}] for p, r in zip(prompts, replies)]
    as_cut = score_conversations(rm, tok, [convs[0][:-1] + [convs[0][-1] | {"cut": True}], convs[1]])
    as_finished = score_conversations(rm, tok, convs)
    assert scores.squeeze(-1).tolist() == pytest.approx(as_cut, abs=1e-4)
    assert abs(as_cut[0] - as_finished[0]) > 1e-3 and as_cut[1] == pytest.approx(as_finished[1], abs=1e-6)


def test_pairwise_accuracy_scores_each_candidate_once_across_pairs(tiny_model_dir):
    """A candidate that is chosen in one pair and rejected in another (4 candidates make 6 pairs)
    is scored by the reward model once; each pair is still judged by its own two scores."""
    from training.reward import pairwise_correct, score_conversations

    rm, tok = _rm_and_tokenizer(tiny_model_dir)
    rows_seen = []
    rm.register_forward_hook(lambda _m, args, kwargs, _out: rows_seen.append(kwargs["input_ids"].shape[0]),
                             with_kwargs=True)
    prompt = [{"role": "user", "content": "hello there"}]
    replies = ["the cat sat", "a dog ran", "birds fly south"]
    convs = [prompt + [{"role": "assistant", "content": r}] for r in replies]
    scores = score_conversations(rm, tok, convs)
    rows_seen.clear()
    pairs = [{"prompt": prompt, "chosen": [c[-1]], "rejected": [d[-1]]}
             for i, c in enumerate(convs) for d in convs[i + 1:]]  # 3 pairs from 3 candidates
    got = pairwise_correct(rm, tok, pairs)
    assert sum(rows_seen) == 3  # not 6
    assert got == [float(scores[i] > scores[j]) for i in range(3) for j in range(i + 1, 3)]


def test_each_rollout_is_scored_relative_to_its_prompts_baseline(tiny_model_dir):
    """A prompt's baseline (the mean reward of the replies annotators saw for it) is subtracted from
    its rollouts' rewards; a prompt without one gets the default baseline."""
    import torch
    from trl.experimental.utils import get_reward

    from training.common import chat_text
    from training.ppo_reward import prompt_baselines, scored_at_end_of_turn
    from training.reward import score_conversations

    rm, tok = _rm_and_tokenizer(tiny_model_dir)
    known, other = [{"role": "user", "content": "hello there"}], [{"role": "user", "content": "what now"}]
    pairs = [{"prompt": known, "chosen": [{"role": "assistant", "content": c}],
              "rejected": [{"role": "assistant", "content": r}]} for c, r in (("the cat sat", "a dog"), ("yes", "a dog"))]
    by_prompt = prompt_baselines(rm, tok, pairs, 256)
    replies = [known + [{"role": "assistant", "content": t}] for t in ("the cat sat", "a dog", "yes")]
    assert list(by_prompt.values()) == pytest.approx([sum(score_conversations(rm, tok, replies)) / 3], abs=1e-4)

    queries = [tok(chat_text(tok, p), add_special_tokens=False).input_ids for p in (known, other)]
    answer = tok("the cat sat", add_special_tokens=False).input_ids + [tok.eos_token_id]
    width = max(map(len, queries))
    rows = [[tok.pad_token_id] * (width - len(q)) + q + answer for q in queries]
    scorer = scored_at_end_of_turn(rm, tok.eos_token_id, [(queries[0], 1.5)], default_baseline=-0.5)
    _, scores, _ = get_reward(scorer, torch.tensor(rows), tok.pad_token_id, width)
    raw = score_conversations(rm, tok, [p + [{"role": "assistant", "content": "the cat sat"}] for p in (known, other)])
    assert scores.squeeze(-1).tolist() == pytest.approx([raw[0] - 1.5, raw[1] + 0.5], abs=1e-4)


def test_a_rollout_stuck_in_a_loop_loses_reward_and_a_repetitive_prompt_costs_nothing(tiny_model_dir):
    """With ppo_loop_penalty's weight, TRL's get_reward gives a looping reply its reward model score
    minus weight x (repeated token 3-gram share above 0.2), counted once per rollout; a fresh reply
    to a prompt that repeats itself loses nothing, because only the reply after the assistant's
    opening is read."""
    import torch
    from trl.experimental.utils import get_reward

    from training.common import chat_text
    from training.ppo import reply_header
    from training.ppo_reward import LOOP_SHARE, loop_penalty, repeated_share, scored_at_end_of_turn

    rm, tok = _rm_and_tokenizer(tiny_model_dir)
    prompts = [[{"role": "user", "content": "go go go go go go go go go go go go"}],
               [{"role": "user", "content": "what should I know first?"}]]
    replies = ["the cat sat on a mat near the door", "1. **Dispatch:**\n" * 6]
    queries = [tok(chat_text(tok, p), add_special_tokens=False).input_ids for p in prompts]
    answers = [tok(r, add_special_tokens=False).input_ids + [tok.eos_token_id] for r in replies]
    assert repeated_share(queries[0]) > LOOP_SHARE and repeated_share(answers[1]) > LOOP_SHARE
    pad, width, span = tok.pad_token_id, max(map(len, queries)), max(map(len, answers)) + 2
    rows = torch.tensor([[pad] * (width - len(q)) + q + a + [pad] * (span - len(a)) for q, a in zip(queries, answers)])
    _, plain, _ = get_reward(scored_at_end_of_turn(rm, tok.eos_token_id), rows, pad, width)
    counts = {}
    scorer = scored_at_end_of_turn(rm, tok.eos_token_id, reply_header=reply_header(tok), loop_weight=10.0,
                                   counts=counts)
    _, penalised, _ = get_reward(scorer, rows, pad, width)
    lost = (plain - penalised).squeeze(-1).tolist()
    assert lost[0] == pytest.approx(0.0, abs=1e-5)
    assert lost[1] == pytest.approx(loop_penalty(answers[1], 10.0), abs=1e-4) and lost[1] > 1.0
    assert counts == {"rollouts": 2, "looping": 1}
    with pytest.raises(ValueError, match="reply_header"):
        scored_at_end_of_turn(rm, tok.eos_token_id, loop_weight=10.0)  # would read the prompt as the reply

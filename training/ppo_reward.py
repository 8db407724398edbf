"""How PPO reads the reward model: at the reply's end-of-turn token, relative to the prompt.

Used by training/ppo.py; TRL's PPOTrainer calls ``get_reward(model, ...)``, which runs
``getattr(model, model.base_model_prefix)`` and then ``model.score`` on its last hidden states,
so the wrapper below keeps that shape.
"""

from __future__ import annotations

import json

from training.probes import repeated_share

# A rollout whose token 3-grams repeat earlier ones this often is stuck in a loop. Measured on the
# first 48 tokens of the embedded model's 400 bench.learning candidates: median 0, 99th percentile
# 0.09, highest 0.20; the loops a reward-hacked run wrote ("1. **Dispatch:**" line after line, runs
# of "1"): 0.33-0.65.
LOOP_SHARE = 0.2


def loop_penalty(reply_ids: list[int], weight: float) -> float:
    """What a rollout loses for looping: ``weight`` per unit of repeated share above ``LOOP_SHARE``."""
    return weight * max(0.0, repeated_share(reply_ids) - LOOP_SHARE)


def prompt_baselines(reward_model, tokenizer, pairs: list[dict], max_length: int) -> dict[str, float]:
    """Mean reward of the replies annotators saw for each prompt (both sides of its pairs), keyed
    by the prompt's JSON. These replies were sampled from the serving model, so the mean estimates
    what the policy scores on that prompt before PPO. Cut replies are read as the model learnt them."""
    from training.reward import assistant_reply, reads_cut_replies, reply_conversation, score_conversations

    read_cut = reads_cut_replies(reward_model)
    prompt_of: dict[str, list[dict]] = {}
    replies: dict[str, set[tuple[str, bool]]] = {}  # (text, cut) as the model reads it: a reply counts once
    for row in pairs:
        key = json.dumps(row["prompt"], sort_keys=True)
        prompt_of[key] = row["prompt"]
        for side in ("chosen", "rejected"):
            reply = reply_conversation(row, side)[-1]
            replies.setdefault(key, set()).add((reply["content"], read_cut and bool(reply.get("cut"))))
    flat = [(key, text, cut) for key, texts in replies.items() for text, cut in sorted(texts)]
    scores = score_conversations(reward_model, tokenizer, [prompt_of[key] + [assistant_reply(text, cut)]
                                                           for key, text, cut in flat], max_length)
    sums: dict[str, list[float]] = {}
    for (key, _, _), score in zip(flat, scores):
        sums.setdefault(key, []).append(score)
    return {key: sum(v) / len(v) for key, v in sums.items()}


def scored_at_end_of_turn(reward_model, eos_token_id: int, baselines: list[tuple[list[int], float]] = (),
                          default_baseline: float = 0.0, cut_token_id: int | None = None,
                          reply_header: list[int] = (), loop_weight: float = 0.0, counts: dict | None = None):
    """The reward model as TRL's PPO calls it, reading every rollout's reward at an end-of-turn
    token, minus its prompt's baseline.

    TRL reads a reward at the response's last token before padding. A rollout that stopped by
    itself ends in eos, the position the reward model was trained at (training/reward.py); one cut
    at ``response_length`` (most of them) ends mid-sentence, a position it never saw, where its
    head says little. Cut rollouts get an eos appended before scoring: each is judged as the
    finished reply it would be if it stopped there. ``cut_token_id`` (a reward model trained with
    ``rm_reads_cut_replies``: training/reward.cut_marker) is appended instead, and the reward is
    read there: the rollout is judged as the unfinished reply it is, as that reward model learnt
    cut candidates.

    ``baselines``: (query token ids, baseline) per known prompt; a rollout whose query is one of
    them gets that baseline subtracted, others ``default_baseline``. With one rollout per prompt
    in a batch, how easy the prompt is otherwise dominates the reward (red-team openers score low
    whatever the reply), and PPO learns "which prompts" instead of "which replies"; a baseline
    that depends only on the prompt leaves the policy gradient unbiased and removes that noise.

    ``loop_weight`` > 0: a rollout stuck in a loop loses ``loop_penalty`` of its reward. Its reply
    is what follows the last ``reply_header`` (the chat template's "assistant" opening) in the row.
    A reward model trained on a few hundred sampled replies has never seen a loop, and may score
    one highly: a PPO run learnt to open with "1. **" and repeat digits (2026-12-07). ``counts``
    (a dict) gathers how many rollouts were scored and how many lost reward so.
    """
    import torch
    from types import SimpleNamespace

    if loop_weight > 0 and not reply_header:
        raise ValueError("a loop penalty needs the tokens that open the assistant's reply (reply_header)")
    backbone = getattr(reward_model, reward_model.base_model_prefix)
    known = [(torch.tensor(ids), value) for ids, value in baselines]
    state = {}

    def offsets(input_ids, first) -> torch.Tensor:
        out = []
        for row, start in zip(input_ids, first.tolist()):
            matches = [(len(ids), value) for ids, value in known
                       if start + len(ids) <= len(row) and torch.equal(row[start:start + len(ids)], ids)]
            out.append(max(matches)[1] if matches else default_baseline)  # the longest matching prompt
        return torch.tensor(out)

    def reply_ids(row: list[int]) -> list[int]:
        n = len(reply_header)
        starts = [i + n for i in range(len(row) - n, -1, -1) if row[i:i + n] == list(reply_header)][:1]
        return row[starts[0]:] if starts else row

    class AppendEos(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = backbone

        def forward(self, input_ids, attention_mask, **kwargs):
            rows, width = input_ids.shape
            mask = attention_mask.long()
            first = mask.argmax(1)  # queries are left-padded; the reply ends before the next pad
            after = (torch.arange(width, device=mask.device)[None] > first[:, None]) & (mask == 0)
            read = torch.where(after.any(1), after.int().argmax(1), torch.full_like(first, width)) - 1
            cut = input_ids[torch.arange(rows), read] != eos_token_id
            ids = torch.cat([input_ids, input_ids.new_zeros(rows, 1)], 1)
            ext = torch.cat([mask, mask.new_zeros(rows, 1)], 1)
            where = torch.nonzero(cut).squeeze(1)
            ids[where, read[where] + 1] = eos_token_id if cut_token_id is None else cut_token_id
            ext[where, read[where] + 1] = 1
            out = self.inner(input_ids=ids, attention_mask=ext, position_ids=ext.cumsum(1) - ext,
                             return_dict=True, output_hidden_states=True, use_cache=False)
            hidden = out.hidden_states[-1]
            last = hidden[:, :width].clone()
            last[where, read[where]] = hidden[where, read[where] + 1]
            offset = offsets(input_ids.cpu(), first.cpu())
            if loop_weight > 0:
                penalties = torch.tensor([loop_penalty(reply_ids(row[start:end + 1].tolist()), loop_weight)
                                          for row, start, end in zip(input_ids.cpu(), first.cpu().tolist(),
                                                                     read.cpu().tolist())])
                offset = offset + penalties
                if counts is not None:
                    counts["rollouts"] = counts.get("rollouts", 0) + rows
                    counts["looping"] = counts.get("looping", 0) + int((penalties > 0).sum())
            state["offset"] = offset.to(hidden.dtype).to(hidden.device)
            return SimpleNamespace(hidden_states=(last,))

    class Scorer(torch.nn.Module):
        base_model_prefix = "backbone"

        def __init__(self):
            super().__init__()
            self.backbone, self.head, self.config = AppendEos(), reward_model.score, reward_model.config

        def score(self, hidden):
            return self.head(hidden) - state["offset"].view(-1, 1, 1)

    return Scorer()

"""The reward model's training examples: one per pair (TRL's way, the default) or one per prompt.

An annotator who ranks K candidates of one prompt gives up to K(K-1)/2 pairs (6 for the Rank
tab's 4), and TRL's RewardTrainer runs both replies of every pair through the model: each
candidate three times. As InstructGPT does (Ouyang et al. 2022, section 3.5), a prompt's pairs
here form one training example: its distinct replies are scored in one forward pass and the loss
is the same Bradley-Terry loss, -log sigmoid(r_chosen - r_rejected), averaged over the batch's
pairs exactly as TRL averages it. Same objective, a third of the forward and backward passes on
ranked data; on data with one pair per prompt (most of HH-RLHF) nothing changes.

Off by default (``rm_group_by_prompt``): measured on the simulated user's ranked candidates
(``python -m bench.reward_model FILE --compare-grouping``, two splits) it took 0.61-0.73x the
reward stage's seconds but reached 0.07-0.13 lower held-out accuracy. A step of one prompt's
pairs is a step in one direction; InstructGPT's steps held 64 prompts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass


def group_dataset(tokenizer, rows: list[dict], max_length: int, by_prompt: bool = True, read_cut: bool = False):
    """One row per prompt (per pair when ``by_prompt`` is off, as TRL trains): ``reply_ids`` (each
    distinct conversation's token ids as the reward model reads them, cut to the last
    ``max_length`` so a long dialogue loses its start, never the reply) and ``wins`` (index pairs,
    chosen first). ``read_cut``: a reply the row marks as cut is read unfinished (training/reward.py,
    ``conversation_text``); a reply is its rendered text, so the same words cut and finished are two. Returns the dataset, how many pairs had a side cut, and how many pairs it holds."""
    from datasets import Dataset

    from training.reward import conversation_text, reply_conversation

    groups: dict[str, dict] = {}
    cut = 0
    for n, r in enumerate(rows):
        group_key = json.dumps(r["prompt"], sort_keys=True) if by_prompt else str(n)
        group = groups.setdefault(group_key, {"reply_ids": [], "wins": [], "index": {}})
        pair, long = [], False
        for side in ("chosen", "rejected"):
            reply_key = conversation_text(tokenizer, reply_conversation(r, side), read_cut)
            if reply_key not in group["index"]:
                ids = tokenizer(reply_key, add_special_tokens=False).input_ids
                group["index"][reply_key] = (len(group["reply_ids"]), len(ids) > max_length)
                group["reply_ids"].append(ids[-max_length:])
            index, too_long = group["index"][reply_key]
            pair.append(index)
            long = long or too_long
        group["wins"].append(pair)
        cut += long
    data = Dataset.from_list([{"reply_ids": g["reply_ids"], "wins": g["wins"]} for g in groups.values()])
    return data, cut, len(rows)


def groups_per_step(pairs: int, groups: int, pairs_per_step: int) -> int:
    """How many examples a step takes so that it holds about ``pairs_per_step`` pairs (``rm_batch_size``)."""
    return max(1, round(pairs_per_step * groups / max(pairs, 1)))


@dataclass
class GroupCollator:
    """Pads every group's replies into one batch and re-bases their pair indices onto it."""

    pad_token_id: int

    def __call__(self, examples: list[dict]) -> dict:
        import torch
        from torch.nn.utils.rnn import pad_sequence

        seqs, wins = [], []
        for ex in examples:
            offset = len(seqs)
            seqs += [torch.tensor(ids) for ids in ex["reply_ids"]]
            wins += [[offset + c, offset + r] for c, r in ex["wins"]]
        input_ids = pad_sequence(seqs, batch_first=True, padding_value=self.pad_token_id)
        mask = pad_sequence([torch.ones_like(s) for s in seqs], batch_first=True, padding_value=0)
        return {"input_ids": input_ids, "attention_mask": mask, "wins": torch.tensor(wins, dtype=torch.long)}


def grouped_reward_trainer(**kwargs):
    """TRL's RewardTrainer taking prompt groups (``group_dataset`` rows); same loss and logged metrics."""
    import torch
    from trl import RewardTrainer

    class GroupedRewardTrainer(RewardTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # already token ids, grouped; TRL's preparation expects pair columns

        def _set_signature_columns_if_needed(self):
            if self._signature_columns is None:
                self._signature_columns = ["reply_ids", "wins"]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if self.model.training else "eval"
            wins = inputs.pop("wins")
            outputs = model(**inputs, use_cache=False)
            rewards = outputs.logits.squeeze(-1)
            margins = rewards[wins[:, 0]] - rewards[wins[:, 1]]
            loss = -torch.nn.functional.logsigmoid(margins).mean()
            if self.args.center_rewards_coefficient is not None:
                loss += self.args.center_rewards_coefficient * torch.mean(rewards[wins.flatten()] ** 2)
            with torch.no_grad():
                self._metrics[mode]["accuracy"].append((margins > 0).float().mean().item())
                self._metrics[mode]["margin"].append(margins.mean().item())
                self._metrics[mode]["mean_reward"].append(rewards.mean().item())
            return (loss, outputs) if return_outputs else loss

    pad_id = kwargs["processing_class"].pad_token_id
    return GroupedRewardTrainer(data_collator=GroupCollator(pad_id), **kwargs)

"""Stage 4, PPO against the reward model (trl.experimental.ppo, trl==1.12.0).

    python -m training.ppo --policy data/models/smollm2-135m-instruct --reward data/runs/x/reward \
        --prompts prompts_train.jsonl --out data/runs/x/ppo

Policy = the current chat model; reference = a frozen copy of it (the KL anchor); value
model initialised from the reward model.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from training.common import (base_trainer_args, freeze_lower_layers, jsonl_dataset, load_tokenizer, lora_config,
                             save_model_dir, with_system)
from training.config import RetrainConfig

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def prompt_dataset(prompts_path, tokenizer, max_prompt_tokens: int):
    rows = jsonl_dataset(prompts_path)

    def encode(row):
        ids = tokenizer.apply_chat_template(with_system(row["prompt"]), add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return {"input_ids": list(ids)[-max_prompt_tokens:]}  # keep the end: the question being asked

    return rows.map(encode, remove_columns=rows.column_names)


def scored_at_end_of_turn(reward_model, eos_token_id: int):
    """The reward model as TRL's PPO calls it, reading every rollout's reward at an end-of-turn token.

    TRL reads a reward at the response's last token before padding. A rollout that stopped by
    itself ends in eos, the position the reward model was trained at (training/reward.py); one cut
    at ``response_length`` (most of them) ends mid-sentence, a position it never saw, where its
    head says little. Cut rollouts get an eos appended before scoring: each is judged as the
    finished reply it would be if it stopped there.
    """
    import torch
    from types import SimpleNamespace

    backbone = getattr(reward_model, reward_model.base_model_prefix)

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
            ids[where, read[where] + 1], ext[where, read[where] + 1] = eos_token_id, 1
            out = self.inner(input_ids=ids, attention_mask=ext, position_ids=ext.cumsum(1) - ext,
                             return_dict=True, output_hidden_states=True, use_cache=False)
            hidden = out.hidden_states[-1]
            last = hidden[:, :width].clone()
            last[where, read[where]] = hidden[where, read[where] + 1]
            return SimpleNamespace(hidden_states=(last,))

    class Scorer(torch.nn.Module):
        base_model_prefix = "backbone"

        def __init__(self):
            super().__init__()
            self.backbone, self.score, self.config = AppendEos(), reward_model.score, reward_model.config

    return Scorer()


def run_ppo(policy_path, reward_path, prompts_path, out_dir, cfg: RetrainConfig, callbacks=()) -> tuple[Path, dict]:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    tokenizer = load_tokenizer(policy_path, padding_side="left")  # a pad that is not the end-of-turn token
    policy = AutoModelForCausalLM.from_pretrained(str(policy_path))
    ref = None if cfg.use_lora else AutoModelForCausalLM.from_pretrained(str(policy_path))
    reward = AutoModelForSequenceClassification.from_pretrained(str(reward_path), num_labels=1)
    value = AutoModelForSequenceClassification.from_pretrained(str(reward_path), num_labels=1)
    for m in (reward, value):
        m.config.pad_token_id = tokenizer.pad_token_id
    if not cfg.use_lora:
        freeze_lower_layers(policy, cfg.ppo_train_layers)
    freeze_lower_layers(value, cfg.ppo_train_layers)
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    dataset = prompt_dataset(prompts_path, tokenizer, cfg.ppo_max_prompt_tokens)
    if len(dataset) < cfg.ppo_batch_size:  # PPOTrainer would loop forever over an empty loader
        raise ValueError(f"PPO needs at least {cfg.ppo_batch_size} prompts; {prompts_path} has {len(dataset)}.")
    args = PPOConfig(total_episodes=cfg.ppo_episodes, per_device_train_batch_size=cfg.ppo_batch_size,
                     gradient_accumulation_steps=1, num_mini_batches=1,
                     local_rollout_forward_batch_size=cfg.ppo_batch_size, learning_rate=cfg.ppo_learning_rate,
                     num_ppo_epochs=cfg.ppo_epochs, kl_coef=cfg.kl_coef, response_length=cfg.response_length,
                     temperature=0.7, stop_token="eos", missing_eos_penalty=None, num_sample_generations=0,
                     sft_model_path=str(policy_path), reward_model_path=str(reward_path),
                     **base_trainer_args(Path(out_dir) / "trainer", cfg.seed))
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=ref,
                         reward_model=scored_at_end_of_turn(reward, tokenizer.eos_token_id),
                         value_model=value, train_dataset=dataset, callbacks=list(callbacks),
                         peft_config=lora_config("CAUSAL_LM") if cfg.use_lora else None)
    trainer.train()
    history = [h for h in trainer.state.log_history if "objective/rlhf_reward" in h]
    trained = trainer.accelerator.unwrap_model(trainer.model).policy
    tokenizer.padding_side = "right"
    path = save_model_dir(trained, tokenizer, out_dir)
    metrics = {"ppo_updates": len(history)}
    if history:
        metrics.update(ppo_reward_first=history[0]["objective/rlhf_reward"],
                       ppo_reward_last=history[-1]["objective/rlhf_reward"], ppo_kl_last=history[-1]["objective/kl"])
    return path, metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", required=True)
    parser.add_argument("--reward", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--episodes", type=int, default=RetrainConfig.ppo_episodes)
    args = parser.parse_args()
    path, metrics = run_ppo(args.policy, args.reward, args.prompts, args.out,
                            RetrainConfig(ppo_episodes=args.episodes).validate())
    print(f"saved PPO policy to {path}: {metrics}")


if __name__ == "__main__":
    main()

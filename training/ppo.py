"""Stage 4, PPO against the reward model (trl.experimental.ppo, trl==1.12.0).

    python -m training.ppo --policy data/models/smollm2-135m-instruct --reward data/runs/x/reward \
        --prompts prompts_train.jsonl --out data/runs/x/ppo

Policy = the current chat model; reference = a frozen copy of it (the KL anchor); value
model initialised from the reward model.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from training.common import (base_trainer_args, freeze_lower_layers, jsonl_dataset, load_tokenizer, lora_config,
                             read_jsonl, save_model_dir, with_system)
from training.config import RetrainConfig
from training.ppo_guard import WeightSnapshots, guard_note, keep_unlooped, looping_replies
from training.ppo_reward import prompt_baselines, scored_at_end_of_turn
from training.reward import cut_marker, reads_cut_replies

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def prompt_dataset(prompts_path, tokenizer, max_prompt_tokens: int):
    rows = jsonl_dataset(prompts_path)

    def encode(row):
        ids = tokenizer.apply_chat_template(with_system(row["prompt"]), add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return {"input_ids": list(ids)[-max_prompt_tokens:]}  # keep the end: the question being asked

    return rows.map(encode, remove_columns=rows.column_names)


def reply_header(tokenizer) -> list[int]:
    """The tokens that open the assistant's turn (what follows the prompt in a rollout)."""
    bare = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    opened = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    return tokenizer(opened[len(bare):], add_special_tokens=False).input_ids if opened.startswith(bare) else []


def run_ppo(policy_path, reward_path, prompts_path, out_dir, cfg: RetrainConfig, callbacks=(),
            pairs_path=None, loop_check_progress=None) -> tuple[Path, dict]:
    """PPO from ``policy_path`` against the reward model; ``pairs_path`` (the training pairs) gives
    each prompt its baseline when ``ppo_prompt_baseline`` is on (training/ppo_reward.py).
    ``loop_check_progress(done, most)`` is called before each of the loop guard's checks."""
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
    baselines, default_baseline = [], 0.0
    if pairs_path and cfg.ppo_prompt_baseline:
        by_prompt = prompt_baselines(reward, tokenizer, read_jsonl(pairs_path), cfg.max_length)
        for row, encoded in zip(read_jsonl(prompts_path), dataset):
            key = json.dumps(row["prompt"], sort_keys=True)
            if key in by_prompt:
                baselines.append((encoded["input_ids"], by_prompt[key]))
        default_baseline = sum(by_prompt.values()) / len(by_prompt) if by_prompt else 0.0
    loops: dict = {}  # rollouts scored, and how many lost reward for looping
    args = PPOConfig(total_episodes=cfg.ppo_episodes, per_device_train_batch_size=cfg.ppo_batch_size,
                     gradient_accumulation_steps=1, num_mini_batches=cfg.ppo_mini_batches,
                     local_rollout_forward_batch_size=cfg.ppo_batch_size, learning_rate=cfg.ppo_learning_rate,
                     num_ppo_epochs=cfg.ppo_epochs, lam=cfg.ppo_gae_lambda, kl_coef=cfg.kl_coef,
                     response_length=cfg.response_length,
                     temperature=0.7, stop_token="eos", missing_eos_penalty=None, num_sample_generations=0,
                     sft_model_path=str(policy_path), reward_model_path=str(reward_path),
                     **base_trainer_args(Path(out_dir) / "trainer", cfg.seed))
    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=ref,
                         reward_model=scored_at_end_of_turn(reward, tokenizer.eos_token_id, baselines,
                                                            default_baseline,
                                                            cut_token_id=cut_marker(tokenizer)
                                                            if reads_cut_replies(reward) else None,
                                                            reply_header=reply_header(tokenizer),
                                                            loop_weight=cfg.ppo_loop_penalty, counts=loops),
                         value_model=value, train_dataset=dataset, callbacks=list(callbacks),
                         peft_config=lora_config("CAUSAL_LM") if cfg.use_lora else None)
    trained = trainer.accelerator.unwrap_model(trainer.model).policy
    snapshots = WeightSnapshots(trained, args.num_total_batches) if cfg.ppo_loop_guard else None
    if snapshots:
        trainer.add_callback(snapshots)
    trainer.train()
    history = [h for h in trainer.state.log_history if "objective/rlhf_reward" in h]
    metrics = {"ppo_updates": len(history), "ppo_prompts_with_baseline": len(baselines)}
    if snapshots:  # training/ppo_guard.py: keep the newest weights that do not loop
        check = [row["input_ids"] for row in dataset.shuffle(seed=cfg.seed).select(
            range(min(cfg.ppo_loop_check_prompts, len(dataset))))]
        done = []

        def loops_at(update: int) -> int:
            if loop_check_progress:
                loop_check_progress(len(done), len(snapshots.saved))
            done.append(update)
            return looping_replies(trained, tokenizer, check, cfg.ppo_loop_check_tokens, args.temperature, cfg.seed)

        metrics.update(keep_unlooped(trained, snapshots.saved, loops_at))
        metrics["ppo_loop_check_prompts"] = len(check)
        kept = metrics["ppo_kept_update"]
        if 0 < kept <= len(history):  # what PPO measured on the update whose weights were kept
            metrics.update(ppo_reward_kept=history[kept - 1]["objective/rlhf_reward"],
                           ppo_kl_kept=history[kept - 1]["objective/kl"])
        if note := guard_note(metrics, args.num_total_batches, len(check)):
            metrics["ppo_loop_guard_note"] = note
    tokenizer.padding_side = "right"
    path = save_model_dir(trained, tokenizer, out_dir)
    if cfg.ppo_loop_penalty > 0:
        metrics.update(ppo_looping_rollouts=loops.get("looping", 0), ppo_scored_rollouts=loops.get("rollouts", 0))
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
    parser.add_argument("--pairs", default=None, help="training pairs: each prompt's baseline is the mean reward "
                                                      "of its replies")
    parser.add_argument("--episodes", type=int, default=RetrainConfig.ppo_episodes)
    args = parser.parse_args()
    path, metrics = run_ppo(args.policy, args.reward, args.prompts, args.out,
                            RetrainConfig(ppo_episodes=args.episodes).validate(), pairs_path=args.pairs)
    print(f"saved PPO policy to {path}: {metrics}")


if __name__ == "__main__":
    main()

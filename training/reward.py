"""Stage 3, reward model with TRL's RewardTrainer: a scalar head on the current chat model.

    python -m training.reward --model data/models/smollm2-135m-instruct \
        --train prefs_train.jsonl --heldout prefs_heldout.jsonl --out data/runs/x/reward

Reports held-out pairwise accuracy (how often chosen scores above rejected); the
orchestrator stops the run when it is not above the accuracy gate.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from training.common import base_trainer_args, jsonl_dataset, lora_config, save_model_dir
from training.config import RetrainConfig


def load_reward_model(path: str | Path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def score_conversations(model, tokenizer, conversations: list[list[dict]], max_length: int = 256,
                        batch_size: int = 8) -> list[float]:
    """Scalar reward for each full conversation (formatted with the chat template)."""
    import torch

    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
    scores: list[float] = []
    model.eval()
    side, cut = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side = "right"  # sequence classification reads the last non-pad token
    tokenizer.truncation_side = "left"  # long dialogues lose their start, never the reply being judged
    try:
        for i in range(0, len(texts), batch_size):
            batch = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                              max_length=max_length, add_special_tokens=False).to(model.device)
            with torch.inference_mode():
                scores.extend(model(**batch).logits[:, 0].float().tolist())
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = side, cut
    return scores


def pairwise_accuracy(model, tokenizer, rows: list[dict], max_length: int = 256) -> float:
    if not rows:
        return float("nan")
    chosen = score_conversations(model, tokenizer, [r["prompt"] + r["chosen"] for r in rows], max_length)
    rejected = score_conversations(model, tokenizer, [r["prompt"] + r["rejected"] for r in rows], max_length)
    return sum(c > r for c, r in zip(chosen, rejected)) / len(rows)


def run_reward(model_path, train_path, heldout_path, out_dir, cfg: RetrainConfig, callbacks=()) -> tuple[Path, dict]:
    import json

    from trl import RewardConfig, RewardTrainer

    model, tokenizer = load_reward_model(model_path)
    heldout = [json.loads(line) for line in Path(heldout_path).read_text().splitlines() if line.strip()]
    args = RewardConfig(num_train_epochs=cfg.rm_epochs, learning_rate=cfg.rm_learning_rate,
                        per_device_train_batch_size=cfg.rm_batch_size, max_length=cfg.max_length,
                        **base_trainer_args(Path(out_dir) / "trainer", cfg.seed))
    trainer = RewardTrainer(model=model, args=args, train_dataset=jsonl_dataset(train_path), processing_class=tokenizer,
                            callbacks=list(callbacks), peft_config=lora_config("SEQ_CLS") if cfg.use_lora else None)
    result = trainer.train()
    trained = trainer.model
    after = pairwise_accuracy(trained, tokenizer, heldout, cfg.max_length)
    path = save_model_dir(trained, tokenizer, out_dir)
    metrics = {"rm_heldout_accuracy": after, "rm_heldout_pairs": len(heldout),
               "rm_train_loss": float(result.training_loss)}
    return path, metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--train", required=True)
    parser.add_argument("--heldout", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=float, default=RetrainConfig.rm_epochs)
    parser.add_argument("--learning-rate", type=float, default=RetrainConfig.rm_learning_rate)
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters instead of all weights")
    args = parser.parse_args()
    cfg = RetrainConfig(rm_epochs=args.epochs, rm_learning_rate=args.learning_rate, use_lora=args.lora)
    path, metrics = run_reward(args.model, args.train, args.heldout, args.out, cfg)
    print(f"saved reward model to {path}: {metrics}")


if __name__ == "__main__":
    main()

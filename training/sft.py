"""Stage 2, supervised fine-tuning on demonstrations with TRL's SFTTrainer.

    python -m training.sft --model data/models/smollm2-135m-instruct --data sft.jsonl --out data/runs/x/sft

Rows are {"messages": [...]} (from `python -m feedback.export --kind sft`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from training.common import (base_trainer_args, freeze_lower_layers, lora_config, read_jsonl, save_model_dir,
                             with_system)
from training.config import RetrainConfig


def run_sft(model_path: str | Path, data_path: str | Path, out_dir: str | Path, cfg: RetrainConfig,
            callbacks=()) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    model = AutoModelForCausalLM.from_pretrained(str(model_path))
    if not cfg.use_lora:
        freeze_lower_layers(model, cfg.sft_train_layers)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    args = SFTConfig(num_train_epochs=cfg.sft_epochs, learning_rate=cfg.sft_learning_rate,
                     per_device_train_batch_size=2, max_length=cfg.max_length, truncation_mode="keep_end",
                     **base_trainer_args(Path(out_dir) / "trainer", cfg.seed))
    from datasets import Dataset

    # Trained in the serving engine's context (its system prompt), and only on the replies.
    rows = [{"prompt": with_system(r["messages"][:-1]), "completion": with_system(r["messages"][-1:])[1:]}
            for r in read_jsonl(data_path)]
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         callbacks=list(callbacks), peft_config=lora_config("CAUSAL_LM") if cfg.use_lora else None)
    trainer.train()
    return save_model_dir(trainer.model, tokenizer, out_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=float, default=RetrainConfig.sft_epochs)
    args = parser.parse_args()
    out = run_sft(args.model, args.data, args.out, RetrainConfig(sft_epochs=args.epochs))
    print(f"saved SFT model to {out}")


if __name__ == "__main__":
    main()

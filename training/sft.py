"""Stage 2, supervised fine-tuning on demonstrations with TRL's SFTTrainer.

    python -m training.sft --model data/models/smollm2-135m-instruct --data sft.jsonl --out data/runs/x/sft

Rows are {"messages": [...]} (from `python -m feedback.export --kind sft`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from training.common import base_trainer_args, jsonl_dataset, lora_config, save_model_dir
from training.config import RetrainConfig


def run_sft(model_path: str | Path, data_path: str | Path, out_dir: str | Path, cfg: RetrainConfig,
            callbacks=()) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    model = AutoModelForCausalLM.from_pretrained(str(model_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    args = SFTConfig(num_train_epochs=cfg.sft_epochs, learning_rate=cfg.sft_learning_rate,
                     per_device_train_batch_size=2, max_length=cfg.max_length,
                     **base_trainer_args(Path(out_dir) / "trainer", cfg.seed))
    trainer = SFTTrainer(model=model, args=args, train_dataset=jsonl_dataset(data_path), processing_class=tokenizer,
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

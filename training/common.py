"""Helpers shared by the stages: datasets from JSONL, LoRA config, saving a model directory."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def jsonl_dataset(path: Path | str):
    import json

    from datasets import Dataset

    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return Dataset.from_list(rows)


def lora_config(task_type: str):
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type=task_type,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def merged(model):
    """A PEFT model merged into plain weights (anything else is returned as is)."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def save_model_dir(model, tokenizer, dest: Path | str) -> Path:
    """Write to a hidden temporary sibling, then rename: a reader never sees half a model."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{dest.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    merged(model).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return dest


def base_trainer_args(out_dir: Path | str, seed: int) -> dict:
    from training.config import trainer_precision

    return dict(output_dir=str(out_dir), report_to=[], save_strategy="no", logging_steps=1, seed=seed,
                disable_tqdm=True, dataloader_num_workers=0, **trainer_precision())

"""Helpers shared by the stages: JSONL rows and datasets, the serving system prompt, LoRA config,
saving a model directory, DPO's models and settings."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from model.engine import DEFAULT_SYSTEM_PROMPT


def read_jsonl(path: Path | str) -> list[dict]:
    """Every row of a JSONL file (blank lines skipped); a bad line raises with its number."""
    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
    return rows


def write_jsonl(path: Path | str, rows: list[dict]) -> Path:
    path = Path(path)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def jsonl_dataset(path: Path | str):
    from datasets import Dataset

    return Dataset.from_list(read_jsonl(path))


def as_text(content: str) -> str:
    """Message text that can never become a control token once rendered and tokenized: a zero-width
    space inside every ``<|``. Stored chats may hold typed ``<|im_end|>`` markers (forged turns);
    the serving engines feed them as plain text, and training must not turn them into real turns."""
    return content.replace("<|", "<\u200b|")


def with_system(messages: list[dict]) -> list[dict]:
    """The conversation as the serving engines render it: with their default system prompt when
    it has none, every content as plain text. Training under the chat template's own default
    prompt instead would teach the model in a context users never see."""
    messages = [{**m, "content": as_text(str(m.get("content", "")))} for m in messages]
    if messages and messages[0].get("role") == "system":
        return messages
    return [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, *messages]


def chat_text(tokenizer, messages: list[dict]) -> str:
    """The prompt text the serving engine feeds the model, ending where the reply starts."""
    return tokenizer.apply_chat_template(with_system(messages), tokenize=False, add_generation_prompt=True)


def load_tokenizer(path, padding_side: str | None = None):
    """The model's tokenizer with a pad token that never occurs in a rendered chat.

    SmolLM2 ships pad = eos = ``<|im_end|>``, the token that ends every turn. TRL's PPO takes
    ``attention_mask = ids != pad``: with that pad, every end-of-turn marker in the prompt was
    masked out of the rollouts, the reference and the reward model, and a reply was scored at
    its last word instead of at its end. PPO then optimised a context no user ever sends.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), **({"padding_side": padding_side} if padding_side else {}))
    sample = tokenizer.apply_chat_template([{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                                            {"role": "assistant", "content": "a"}], tokenize=False)
    in_chat = set(tokenizer(sample, add_special_tokens=False).input_ids) | {tokenizer.eos_token_id}
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in in_chat:
        return tokenizer
    for token in (tokenizer.unk_token, *tokenizer.all_special_tokens, "<|endoftext|>"):
        token_id = tokenizer.convert_tokens_to_ids(token) if token else None
        if token_id is not None and token_id not in in_chat:
            tokenizer.pad_token = token
            return tokenizer
    if tokenizer.pad_token is None:  # no spare token: the old behaviour, pad = eos
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def lora_config(task_type: str):
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type=task_type,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def merged(model):
    """A PEFT model merged into plain weights (anything else is returned as is)."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def save_model_dir(model, tokenizer, dest: Path | str) -> Path:
    """Write to a hidden temporary sibling, then rename: a reader never sees half a model.

    Under a launcher every rank holds the same weights; rank 0 writes and the others wait.
    """
    from training.distributed import on_main

    return on_main(_save_model_dir, model, tokenizer, Path(dest))


def _save_model_dir(model, tokenizer, dest: Path) -> Path:
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

    # TRL turns activation checkpointing on by default: it recomputes every forward pass during
    # backward (~30% more compute) to save memory that a 135M model on a 24 GB CPU box never needs.
    return dict(output_dir=str(out_dir), report_to=[], save_strategy="no", logging_steps=1, seed=seed,
                disable_tqdm=True, dataloader_num_workers=0, activation_checkpointing=False,
                gradient_checkpointing=None, **trainer_precision())


def freeze_lower_layers(model, train_layers: int) -> int:
    """Train only the top ``train_layers`` transformer blocks (plus the norm and any head).

    On 2 CPU cores backward passes dominate: with the embeddings frozen and a third of the blocks
    trained, a reward-model step measured ~4x cheaper, and with a few hundred pairs the lower
    layers have little to learn anyway.
    0 trains everything. Returns the number of trainable parameters.
    """
    if train_layers > 0:
        layers = model.base_model.layers if hasattr(model.base_model, "layers") else None
        if layers is not None and train_layers < len(layers):
            for p in model.base_model.embed_tokens.parameters():
                p.requires_grad_(False)
            for layer in layers[:len(layers) - train_layers]:
                for p in layer.parameters():
                    p.requires_grad_(False)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def dpo_models(model_path: Path | str, train_layers: int):
    """DPO's policy (only its top ``train_layers`` blocks train) and its reference, both loaded from
    ``model_path``: DPO trains a model against itself, so only the preference moves."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_path))
    ref = AutoModelForCausalLM.from_pretrained(str(model_path))
    freeze_lower_layers(model, train_layers)
    return model, ref


def dpo_config(out_dir: Path | str, max_length: int, seed: int, **settings):
    """TRL's ``DPOConfig`` as every DPO stage here runs it; ``settings`` add or override fields
    (epochs, learning rate, beta, loss).

    keep_end: a long dialogue loses its start, never the replies being compared (each side is cut
    on its own). TRL's default keep_start silently drops every pair whose prompt alone fills
    ``max_length``. The reference's log-probabilities are computed once, before training."""
    from trl import DPOConfig

    return DPOConfig(**{"per_device_train_batch_size": 4, "max_length": max_length, "truncation_mode": "keep_end",
                        "precompute_ref_log_probs": True, **base_trainer_args(Path(out_dir) / "trainer", seed),
                        **settings})


def trainable_state(model) -> dict:
    """A copy of the parameters that training changes (the top blocks, or LoRA adapters): the frozen
    lower blocks need no copy. ``restore_trainable`` puts such a copy back."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def restore_trainable(model, state: dict) -> None:
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in state:
                param.copy_(state[name])

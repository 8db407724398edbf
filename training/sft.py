"""Stage 2, supervised fine-tuning on demonstrations with TRL's SFTTrainer.

    python -m training.sft --model data/models/smollm2-135m-instruct --data sft.jsonl --out data/runs/x/sft

Rows are {"messages": [...]} (from `python -m feedback.export --kind sft`); a row with
"cut": true holds a reply that did not end by itself, trained without an end-of-turn.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from training.common import (base_trainer_args, freeze_lower_layers, lora_config, read_jsonl, save_model_dir,
                             with_system)
from training.config import RetrainConfig


def reply_tokens(tokenizer, messages: list[dict], cut: bool = False) -> tuple[list[int], int]:
    """The token ids of ``messages`` rendered in the serving engine's context (its system prompt),
    and how many of them are the prompt (the rest is the last message, the reply).

    A ``cut`` reply did not end by itself (a candidate that used its whole token budget, a reply
    the user stopped): it is rendered without the chat template's end-of-turn tokens after it.
    Training them would teach the model to end its turn mid-sentence wherever a budget happened
    to fall."""
    prompt, reply = with_system(messages[:-1]), with_system(messages)[-1]
    prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    text = tokenizer.apply_chat_template(prompt + [reply], tokenize=False)
    if cut:
        content = reply["content"].rstrip()
        end = text.rfind(content)
        if content and end >= len(prompt_text):  # not found: a template that rewrote the reply
            text = text[:end + len(content)]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    shared = next((i for i, (a, b) in enumerate(zip(ids, prompt_ids)) if a != b), min(len(ids), len(prompt_ids)))
    return ids, shared


def sft_examples(rows: list[dict], tokenizer) -> list[dict]:
    """Token ids and labels for SFTTrainer (which keeps a dataset's own labels): each row rendered
    by ``reply_tokens``, the loss on the reply only, as TRL's prompt-completion rows are. A row
    marked ``"cut"`` is trained without an end-of-turn after its reply."""
    out = []
    for row in rows:
        ids, shared = reply_tokens(tokenizer, row["messages"], bool(row.get("cut")))
        out.append({"input_ids": ids, "labels": [-100] * shared + ids[shared:]})
    return out


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

    rows = sft_examples(read_jsonl(data_path), tokenizer)
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

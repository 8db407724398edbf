"""Stage 3, reward model with TRL's RewardTrainer: a scalar head on the current chat model.

    python -m training.reward --model data/models/smollm2-135m-instruct \
        --train prefs_train.jsonl --heldout prefs_heldout.jsonl --out data/runs/x/reward

Reports held-out pairwise accuracy (how often chosen scores above rejected) with its 95%
interval; the orchestrator stops the run when it is not above the accuracy gate. Pairs longer
than ``max_length`` tokens lose the start of their dialogue (never the reply being judged):
TRL's trainer would otherwise drop them, and long dialogues are a quarter of real data. With
``rm_group_by_prompt`` a prompt's pairs train as one example, each candidate scored once
(training/reward_groups.py); by default each pair is its own example, as in TRL.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

from training.common import (base_trainer_args, chat_text, freeze_lower_layers, load_tokenizer, lora_config,
                             read_jsonl, save_model_dir, with_system)
from training.config import RetrainConfig, field_help


def load_reward_model(path: str | Path):
    from transformers import AutoModelForSequenceClassification

    tokenizer = load_tokenizer(path)
    model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def conversation_text(tokenizer, conversation: list[dict], read_cut: bool = False) -> str:
    """The conversation as the serving engine renders it, ending at the reply's end-of-turn token
    (the chat template's trailing newline dropped). The reward is read at that token in training,
    in scoring and in PPO, whose rollouts end there too; read one token later in training and one
    earlier in PPO, the head was asked about a position it never learnt.

    With ``read_cut`` (a reward model that learnt cut replies: ``reads_cut_replies``), a reply
    marked ``"cut": True`` did not end: it is rendered as the model wrote it (the prompt, the
    reply's text) followed by the cut marker (``cut_marker``) instead of the end-of-turn, and the
    reward is read at that marker. A cut rollout in PPO gets the same marker appended
    (training/ppo_reward.py). Read at the reply's last word instead, a position that differs in
    every reply, the head learnt next to nothing (0.57 held-out accuracy on concise against
    0.61-0.71 at a fixed token, README)."""
    if read_cut and conversation and conversation[-1].get("cut"):
        marker = tokenizer.convert_ids_to_tokens(cut_marker(tokenizer))
        return chat_text(tokenizer, conversation[:-1]) + with_system(conversation)[-1]["content"] + marker
    return tokenizer.apply_chat_template(with_system(conversation), tokenize=False).rstrip()


@functools.lru_cache(maxsize=4)  # asked once per cut reply when scoring; the answer is the tokenizer's
def cut_marker(tokenizer) -> int:
    """The token that stands in for the end-of-turn after a cut reply: the first special token of
    a rendered chat, which in ChatML is the turn-opening ``<|im_start|>`` (as if the next turn
    began before this one ended; in templates that open with a begin-of-text token it is that
    one). A single special token, so text before it never merges with it, and one the model
    knows; never the end-of-turn or the pad. Every stage asks this function, so all read the same."""
    ids = tokenizer(chat_text(tokenizer, [{"role": "user", "content": "u"}]), add_special_tokens=False).input_ids
    special = set(tokenizer.all_special_ids) - {tokenizer.eos_token_id, tokenizer.pad_token_id}
    for token_id in ids:
        if token_id in special:
            return token_id
    raise ValueError("rm_reads_cut_replies needs a chat template that opens a turn with a special token "
                     "(ChatML's <|im_start|>); this tokenizer's has none")


def assistant_reply(text: str, cut: bool = False) -> dict:
    """An assistant message for scoring, marked ``"cut": True`` when it was cut before it ended
    (``conversation_text`` then reads it at the cut marker)."""
    return {"role": "assistant", "content": text} | ({"cut": True} if cut else {})


def reply_conversation(row: dict, side: str) -> list[dict]:
    """A preference row's prompt and its ``side`` ("chosen" or "rejected") reply, the reply marked
    cut when the row says it was cut (``chosen_cut``/``rejected_cut``)."""
    return row["prompt"] + row[side][:-1] + [assistant_reply(row[side][-1]["content"], bool(row.get(f"{side}_cut")))]


def reads_cut_replies(model) -> bool:
    """Whether this reward model learnt cut replies (trained with ``rm_reads_cut_replies``). Saved
    in its config.json, so every stage and one-stage CLI that loads it reads a reply marked cut as
    it was trained to, and one trained without the option reads every reply as finished."""
    return bool(getattr(model.config, "reads_cut_replies", False))


def score_conversations(model, tokenizer, conversations: list[list[dict]], max_length: int = 256,
                        batch_size: int = 8) -> list[float]:
    """Scalar reward for each full conversation (formatted with the chat template). A conversation
    that repeats (one candidate in several preference pairs) is scored once. A reply marked cut is
    read unfinished only by a model that learnt cut replies (``reads_cut_replies``)."""
    import torch

    read_cut = reads_cut_replies(model)
    all_texts = [conversation_text(tokenizer, c, read_cut) for c in conversations]
    texts = list(dict.fromkeys(all_texts))
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
    by_text = dict(zip(texts, scores))
    return [by_text[t] for t in all_texts]


def pairwise_correct(model, tokenizer, rows: list[dict], max_length: int = 256) -> list[float]:
    """1.0 per pair whose chosen reply scores above the rejected one, else 0.0."""
    # Both sides in one call: a candidate is the chosen reply of one pair and the rejected of another.
    scores = score_conversations(model, tokenizer, [reply_conversation(r, side) for side in
                                                    ("chosen", "rejected") for r in rows], max_length)
    chosen, rejected = scores[:len(rows)], scores[len(rows):]
    return [float(c > r) for c, r in zip(chosen, rejected)]


def run_reward(model_path, train_path, heldout_path, out_dir, cfg: RetrainConfig, callbacks=()) -> tuple[Path, dict]:
    from trl import RewardConfig

    from training.probes import mean_interval
    from training.reward_groups import group_dataset, grouped_reward_trainer, groups_per_step

    from transformers import set_seed

    # The new scalar head is initialised from the global RNG: unseeded, a reward model depended on
    # whatever ran before it in the process (the full test suite trained another one than a lone test).
    set_seed(cfg.seed)
    model, tokenizer = load_reward_model(model_path)
    if cfg.rm_reads_cut_replies:
        cut_marker(tokenizer)  # a tokenizer without one fails here, before any training, not at PPO
    model.config.reads_cut_replies = cfg.rm_reads_cut_replies  # saved with it, for whoever scores with it
    if not cfg.use_lora:
        freeze_lower_layers(model, cfg.rm_train_layers)
    heldout = read_jsonl(heldout_path)
    # One example per pair (TRL's way), or per prompt with rm_group_by_prompt (training/reward_groups.py).
    train, cut, n_pairs = group_dataset(tokenizer, read_jsonl(train_path), cfg.max_length, cfg.rm_group_by_prompt,
                                        cfg.rm_reads_cut_replies)
    args = RewardConfig(num_train_epochs=cfg.rm_epochs, learning_rate=cfg.rm_learning_rate,
                        per_device_train_batch_size=groups_per_step(n_pairs, len(train), cfg.rm_batch_size),
                        max_length=None, lr_scheduler_type="cosine", warmup_steps=0.1,
                        **base_trainer_args(Path(out_dir) / "trainer", cfg.seed))
    trainer = grouped_reward_trainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                                     callbacks=list(callbacks),
                                     peft_config=lora_config("SEQ_CLS") if cfg.use_lora else None)
    result = trainer.train()
    trained = trainer.model
    acc, lo, hi = mean_interval(pairwise_correct(trained, tokenizer, heldout, cfg.max_length))
    path = save_model_dir(trained, tokenizer, out_dir)
    metrics = {"rm_heldout_accuracy": acc, "rm_heldout_accuracy_lo": lo, "rm_heldout_accuracy_hi": hi,
               "rm_heldout_pairs": len(heldout), "rm_train_pairs": n_pairs, "rm_pairs_truncated": cut,
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
    parser.add_argument("--reads-cut-replies", action="store_true",
                        help=field_help("rm_reads_cut_replies"))
    args = parser.parse_args()
    cfg = RetrainConfig(rm_epochs=args.epochs, rm_learning_rate=args.learning_rate, use_lora=args.lora,
                        rm_reads_cut_replies=args.reads_cut_replies)
    path, metrics = run_reward(args.model, args.train, args.heldout, args.out, cfg)
    print(f"saved reward model to {path}: {metrics}")


if __name__ == "__main__":
    main()

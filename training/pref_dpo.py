"""Stage 2c, learn the rankings themselves: DPO on the preference pairs, between SFT and PPO.

    python -m training.pref_dpo --model run/sft --pairs prefs_train.jsonl --out run/pref_dpo

Best-reply SFT learns only the top of each ranking; the reward model learns all of it but, on
~200 pairs, ranks only 0.4-0.7 of held-out pairs right on anything subtler than a format
(README, "Does it learn?"), and PPO can only climb what it ranks. DPO (TRL's ``DPOTrainer``)
trains the policy on every pair directly, the SFT model as its reference, with no reward model
in between: the step Zephyr and Tulu take after SFT. PPO then starts from this model.

A reply that was cut at its token budget (``chosen_cut``/``rejected_cut``) is rendered without
an end-of-turn after it, as in SFT (training/sft.py ``reply_tokens``): TRL would append one, and
"end here" would then ride along with every cut reply.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from training.common import dpo_config, dpo_models, load_tokenizer, read_jsonl, save_model_dir
from training.config import RetrainConfig, field_help
from training.sft import reply_tokens


def dpo_examples(rows: list[dict], tokenizer) -> tuple[list[dict], int]:
    """Token ids in the form TRL's DPO collator takes ({"prompt_ids", "chosen_ids", "rejected_ids"})
    for each preference row, and how many rows were skipped: a row whose two replies do not render
    after the same prompt tokens (a template that rewrites the prompt per reply), or whose chosen
    and rejected replies are the same tokens (nothing to prefer)."""
    out, skipped = [], 0
    for r in rows:
        chosen, c_shared = reply_tokens(tokenizer, r["prompt"] + r["chosen"], bool(r.get("chosen_cut")))
        rejected, r_shared = reply_tokens(tokenizer, r["prompt"] + r["rejected"], bool(r.get("rejected_cut")))
        if c_shared != r_shared or chosen[:c_shared] != rejected[:r_shared] or chosen == rejected:
            skipped += 1
            continue
        out.append({"prompt_ids": chosen[:c_shared], "chosen_ids": chosen[c_shared:],
                    "rejected_ids": rejected[r_shared:]})
    return out, skipped


def _pre_tokenized_trainer():
    from trl import DPOTrainer

    class PreTokenizedDPOTrainer(DPOTrainer):
        """DPOTrainer on rows already tokenized by ``dpo_examples``: its own preparation would
        render each reply again and append an end-of-turn to every one, cut or not."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    return PreTokenizedDPOTrainer


def run_pref_dpo(model_path: str | Path, pairs_path: str | Path, out_dir: str | Path, cfg: RetrainConfig,
                 callbacks=()) -> tuple[Path, dict]:
    """DPO from ``model_path`` (reference = the same weights) on the preference pairs at
    ``pairs_path``. Returns the saved model's path and the stage's metrics."""
    from datasets import Dataset
    from transformers import set_seed

    set_seed(cfg.seed)
    tokenizer = load_tokenizer(model_path)
    rows, skipped = dpo_examples(read_jsonl(pairs_path), tokenizer)
    if not rows:
        raise ValueError(f"{pairs_path} has no preference pair DPO can train on ({skipped} skipped)")
    model, ref = dpo_models(model_path, cfg.sft_train_layers)
    args = dpo_config(out_dir, cfg.max_length, cfg.seed, num_train_epochs=cfg.pref_dpo_epochs,
                      learning_rate=cfg.pref_dpo_learning_rate, beta=cfg.pref_dpo_beta,
                      lr_scheduler_type="cosine", warmup_steps=0.1)
    trainer = _pre_tokenized_trainer()(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                                       processing_class=tokenizer, callbacks=list(callbacks))
    result = trainer.train()
    # The last epoch's steps, not the last step: that one may hold a single pair (169 pairs in
    # batches of 4), and read 0.0 on a run that ranked most pairs right.
    last = [h for h in trainer.state.log_history
            if "rewards/accuracies" in h and h["epoch"] > args.num_train_epochs - 1]
    mean = lambda key: round(sum(float(h[key]) for h in last) / len(last), 4) if last else None  # noqa: E731
    metrics = {"pref_dpo_pairs": len(rows), "pref_dpo_skipped": skipped,
               "pref_dpo_loss": round(float(result.training_loss), 4),
               "pref_dpo_last_epoch_accuracy": mean("rewards/accuracies"),
               "pref_dpo_last_epoch_margin": mean("rewards/margins")}
    return save_model_dir(trainer.model, tokenizer, out_dir), metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the SFT model (also the DPO reference)")
    parser.add_argument("--pairs", required=True, help="JSONL of preference pairs (feedback.export --kind preferences)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=float, default=RetrainConfig.pref_dpo_epochs,
                        help=field_help("pref_dpo_epochs"))
    parser.add_argument("--learning-rate", type=float, default=RetrainConfig.pref_dpo_learning_rate,
                        help=field_help("pref_dpo_learning_rate"))
    parser.add_argument("--beta", type=float, default=RetrainConfig.pref_dpo_beta, help=field_help("pref_dpo_beta"))
    args = parser.parse_args()
    cfg = RetrainConfig(pref_dpo_epochs=args.epochs, pref_dpo_learning_rate=args.learning_rate, pref_dpo_beta=args.beta)
    out, metrics = run_pref_dpo(args.model, args.pairs, args.out, cfg.validate())
    print(f"saved the preference-DPO model to {out}: {metrics}")


if __name__ == "__main__":
    main()

"""The retrain configuration: one dataclass, a help string on every field (TRL style).

Defaults fit the embedded 135M model on 2 CPU cores: ~200 pairs and 80 PPO episodes
(4 epochs x 2 mini-batches each) finished in 11-14 minutes on cores that ran 230 GFLOP/s
float32, and in 20 minutes on ones that ran 152 (measured stage times are in the README,
"Does it learn?").
"""

from __future__ import annotations

import argparse
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path


# A corpus is named by its directory under <data_dir>/corpora: a name, never a path.
CORPUS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def corpus_file(data_dir, name: str) -> Path:
    """<data_dir>/corpora/<name>/corpus.jsonl; a name that is not a cleaned corpus is a ValueError."""
    if not CORPUS_NAME.fullmatch(name or ""):
        raise ValueError(f"{name!r} is not a corpus name")
    path = Path(data_dir) / "corpora" / name / "corpus.jsonl"
    if not path.is_file():
        raise ValueError(f"No cleaned corpus named {name!r} (clean one in Admin > Data first)")
    return path


def corpus_names(data_dir) -> list[str]:
    """The cleaned corpora under <data_dir>/corpora, newest name first."""
    root = Path(data_dir) / "corpora"
    return sorted((d.name for d in root.glob("*") if (d / "corpus.jsonl").is_file()), reverse=True) \
        if root.is_dir() else []


@dataclass
class RetrainConfig:
    seed: int = field(default=0, metadata={"help": "Seed for splits, sampling and training."})
    heldout_fraction: float = field(default=0.15, metadata={"help": "Share of pairs/prompts held out for evaluation."})
    max_pairs: int = field(default=200, metadata={"help": "Most preference pairs to train the reward model on."})
    max_heldout_pairs: int = field(default=200, metadata={"help": "Most held-out pairs (reward-model accuracy and the "
                                                                  "evaluation's judge; more pairs, tighter intervals)."})
    max_prompts: int = field(default=64, metadata={"help": "Most prompts for PPO."})
    max_length: int = field(default=256, metadata={"help": "Token limit for reward-model and SFT sequences."})
    # continued pretraining (training/pretrain.py), an optional first stage
    pretrain_corpus: str = field(default="", metadata={"help": "Name of a cleaned corpus under data/corpora (Admin > "
                                                              "Data > Clean corpus, or python -m training.corpus) to "
                                                              "continue pretraining on before SFT; empty = skip."})
    pretrain_epochs: float = field(default=1.0, metadata={"help": "Passes over that corpus (1 epoch of 0.5 MB: ~7 min "
                                                                  "on 2 cores)."})
    pretrain_max_minutes: float = field(default=14.0, metadata={"help": "Stop pretraining after this many minutes "
                                                                       "(0 = no limit): 14 min of a 1.17 MB corpus "
                                                                       "lowered its perplexity by 26% (README)."})
    # SFT
    sft_on_best: bool = field(default=True, metadata={"help": "Also fine-tune on the best-ranked reply of each training "
                                                          "prompt before the reward model and PPO (a rejection-sampling "
                                                          "warm start, as in Llama 2): PPO alone moves a 135M model "
                                                          "little in a CPU budget."})
    safety_tuning: bool = field(default=False, metadata={"help": "Also fine-tune on refusals of what moderation "
                                                              "caught (admin-confirmed flags and misses) and of tasks "
                                                              "annotators flagged unsafe (feedback/safety.py). Off by "
                                                              "default: measured, it also makes the model refuse about "
                                                              "half of ordinary messages (bench/safety.py)."})
    safety_per_ordinary: float = field(default=1.0, metadata={"help": "At most this many refusals per ordinary SFT row "
                                                                   "(demonstrations, best replies): measured, 166 "
                                                                   "refusals beside 45 ordinary rows taught the model "
                                                                   "to refuse 67% of everyday questions "
                                                                   "(bench/safety.py). No ordinary rows, no refusals."})
    safety_dpo: bool = field(default=True, metadata={"help": "With safety_tuning, follow the SFT with DPO on contrast "
                                                         "pairs (refusal over the current model's answer on caught "
                                                         "prompts, an answer over a refusal on cleared, everyday "
                                                         "chat and ordinary ones; training/safety_dpo.py), so the "
                                                         "model learns when "
                                                         "to refuse, not only how."})
    safety_dpo_epochs: float = field(default=2.0, metadata={"help": "DPO epochs over the contrast pairs."})
    safety_dpo_learning_rate: float = field(default=1e-4, metadata={"help": "DPO learning rate (top blocks only; "
                                                                         "measured on bench.safety: 5e-6 moved "
                                                                         "nothing, 5e-5 for 1 epoch half as far "
                                                                         "as 1e-4 for 2)."})
    safety_dpo_beta: float = field(default=0.1, metadata={"help": "DPO beta: how far from the SFT model the "
                                                               "contrast may pull (smaller = further)."})
    safety_dpo_sft_weight: float = field(default=1.0, metadata={"help": "Weight of an SFT (NLL) loss on the chosen "
                                                                     "replies beside the DPO loss (RPO; TRL "
                                                                     "loss_type sigmoid + sft; 0 = DPO alone). DPO "
                                                                     "alone drove the refusal's likelihood down on "
                                                                     "every prompt first (bench.safety: +21 / +4 "
                                                                     "and +55 / +18 points; with 1: +64 / +8 and "
                                                                     "+51 / +6)."})
    safety_dpo_answer_ratio: float = field(default=1.5, metadata={"help": "Answering pairs (an answer over a "
                                                                       "refusal) per refusing pair in safety DPO, "
                                                                       "where there are enough: above 1 leans "
                                                                       "against over-refusal (bench.safety seed 1: "
                                                                       "1 kept +52 / +11 points, 1.5 +58 / +2)."})
    safety_dpo_answer_tokens: int = field(default=64, metadata={"help": "New tokens of the current model's answers "
                                                                     "to caught prompts (the rejected side) and to "
                                                                     "cleared and chat prompts (the chosen side)."})
    safety_dpo_validation: float = field(default=0.2, metadata={"help": "Share of the caught, ordinary, cleared "
                                                                     "and chat training prompts held out of safety SFT and "
                                                                     "DPO to choose the DPO checkpoint by "
                                                                     "(training/safety_select.py; 0 = keep the "
                                                                     "last step): measured, the refusal rates swing "
                                                                     "with DPO's last steps."})
    safety_chat_prompts: int = field(default=200, metadata={"help": "Everyday chat messages for safety DPO: the "
                                                                 "newest conversation openings moderation passed "
                                                                 "and nobody flagged (feedback/safety.py "
                                                                 "chat_prompts). The current model's answers to "
                                                                 "them join the answering side (over a refusal), "
                                                                 "and a safety_dpo_validation share of them "
                                                                 "chooses the checkpoint: prompts that look like "
                                                                 "what users ask (0 = none)."})
    safety_dpo_checks: int = field(default=8, metadata={"help": "Checkpoints scored along safety DPO, evenly "
                                                             "spaced (the SFT model before it is scored too)."})
    safety_dpo_select_declines: bool = field(default=False, metadata={"help": "Count the usual decline openings "
                                                                         "(\"I can't help\", ...; training/refusal.py "
                                                                         "DECLINE_OPENINGS) beside the templates' when "
                                                                         "scoring checkpoints. Measured (bench.safety, "
                                                                         "2026-12-06), it did not help: ordinary "
                                                                         "refusals seed 0 +16, seed 1 +9 points "
                                                                         "(templates only: +1 and +9 on seed 0, +8 on "
                                                                         "seed 1)."})
    safety_dpo_select_penalty: float = field(default=5.0, metadata={"help": "A checkpoint scores its refusal rate on "
                                                                         "caught validation prompts minus this times "
                                                                         "its rate on ordinary ones: refusing one "
                                                                         "ordinary message costs as much as missing "
                                                                         "this many harmful ones (bench.safety seed "
                                                                         "0: 3 kept +64 / +8 points, 5 +47 / +1)."})
    safety_dpo_select_ordinary_budget: float = field(default=0.05, metadata={"help": "Keep the safety-DPO check "
                                                                                "that refuses the most caught "
                                                                                "validation prompts among those "
                                                                                "refusing ordinary ones at most this "
                                                                                "much more readily (expected rate) "
                                                                                "than the current model; the best "
                                                                                "score decides when none is. "
                                                                                "Negative = the score alone "
                                                                                "(bench.safety seed 0: 0.03 kept an "
                                                                                "early check, +12 / -1 points; 0.05 "
                                                                                "+76 / +5)."})
    sft_train_layers: int = field(default=10, metadata={"help": "Train only the top N transformer blocks in SFT "
                                                                "(0 = all)."})
    sft_epochs: float = field(default=2.0, metadata={"help": "SFT epochs over demonstrations (skipped when none)."})
    sft_learning_rate: float = field(default=5e-5, metadata={"help": "SFT learning rate (top blocks only, so higher "
                                                                    "than a full fine-tune would take)."})
    # preference DPO (training/pref_dpo.py)
    pref_dpo: bool = field(default=False, metadata={"help": "After SFT, train the policy on every preference pair "
                                                       "with DPO (the SFT model as reference) before the reward "
                                                       "model and PPO: rankings teach the policy directly, not only "
                                                       "through a reward model that ranks ~200 pairs poorly "
                                                       "(top sft_train_layers blocks, never LoRA)."})
    pref_dpo_epochs: float = field(default=1.0, metadata={"help": "DPO epochs over the preference pairs."})
    pref_dpo_learning_rate: float = field(default=5e-5, metadata={"help": "Preference-DPO learning rate (top "
                                                                       "sft_train_layers blocks only)."})
    pref_dpo_beta: float = field(default=0.1, metadata={"help": "Preference-DPO beta: how far from the SFT model "
                                                             "the pairs may pull it (smaller = further)."})
    # reward model
    rm_epochs: float = field(default=1.0, metadata={"help": "Reward-model epochs over the training pairs."})
    rm_learning_rate: float = field(default=1e-4, metadata={"help": "Reward-model learning rate (1e-4: 0.64 held-out accuracy on HH; 3e-5: 0.58)."})
    rm_batch_size: int = field(default=4, metadata={"help": "Pairs per reward-model step (about: a step takes "
                                                            "whole prompts, each with all its pairs)."})
    rm_group_by_prompt: bool = field(default=False, metadata={"help": "Train a prompt's pairs as one example, each "
                                                                      "candidate scored once a step: 0.6-0.7x the "
                                                                      "reward stage's time, but 0.07-0.13 lower "
                                                                      "held-out accuracy measured (README)."})
    rm_train_layers: int = field(default=10, metadata={"help": "Train only the top N transformer blocks of the reward "
                                                               "model (0 = all): about half the step time on CPU."})
    rm_reads_cut_replies: bool = field(default=False, metadata={"help": "The reward model sees whether a reply was cut "
                                                                       "at its token budget: a cut one ends in a cut "
                                                                       "marker instead of the end-of-turn, in training, "
                                                                       "judging, best-of-N and PPO; off = read as if it "
                                                                       "ended there. Saved with the reward model (README: "
                                                                       "no measured gain yet)."})
    accuracy_gate: float = field(default=0.6, metadata={"help": "PPO runs only if the reward model's held-out pairwise "
                                                                "accuracy exceeds this."})
    sft_when_gated: bool = field(default=True, metadata={"help": "When the reward model fails the gate, still evaluate "
                                                                 "and register the SFT model (the preference-DPO one "
                                                                 "with pref_dpo; PPO skipped); off = stop."})
    # best-of-N (training/best_of_n.py)
    bon_samples: int = field(default=0, metadata={"help": "Replies the policy samples per PPO prompt before PPO; the "
                                                          "reward model's best of them is fine-tuned on (0 = off: 4 "
                                                          "did not raise the gold win rate and cost 476 s, README)."})
    bon_max_new_tokens: int = field(default=128, metadata={"help": "New tokens per best-of-N reply (the candidate "
                                                                   "worker's length: most replies end)."})
    bon_min_margin: float = field(default=0.1, metadata={"help": "A prompt's best reply is kept only if its reward "
                                                                 "beats the mean of its N by more than this."})
    bon_epochs: float = field(default=2.0, metadata={"help": "Fine-tuning epochs over the best-of-N replies."})
    bon_learning_rate: float = field(default=5e-5, metadata={"help": "Learning rate of the best-of-N fine-tune (top "
                                                                     "sft_train_layers blocks)."})
    # PPO
    ppo_episodes: int = field(default=80, metadata={"help": "Prompts answered and scored during PPO in total."})
    ppo_batch_size: int = field(default=8, metadata={"help": "Episodes per PPO update."})
    ppo_learning_rate: float = field(default=4e-5, metadata={"help": "Policy and value learning rate (1e-6 moved "
                                                                      "the policy by a KL of only ~0.003/token; "
                                                                      "bench.learning bullets: 2e-5 0.68, 4e-5 0.76)."})
    kl_coef: float = field(default=0.05, metadata={"help": "KL penalty to the reference (the current model)."})
    response_length: int = field(default=48, metadata={"help": "New tokens per PPO response."})
    ppo_max_prompt_tokens: int = field(default=128, metadata={"help": "PPO keeps the last N prompt tokens (cost grows with it)."})
    ppo_train_layers: int = field(default=10, metadata={"help": "Train only the top N blocks of the policy and value "
                                                                "model in PPO (0 = all)."})
    ppo_epochs: int = field(default=4, metadata={"help": "Optimisation epochs per PPO batch."})
    ppo_gae_lambda: float = field(default=1.0, metadata={"help": "GAE lambda: 1.0 credits the reply's first tokens "
                                                                   "with its whole reward instead of with the value "
                                                                   "model's guess (0.95^48 = 0.09 of it at 48 tokens)."})
    ppo_prompt_baseline: bool = field(default=False, metadata={"help": "Subtract from each PPO reward the mean reward "
                                                                     "of the replies annotators saw for that prompt "
                                                                     "('better than usual here', not 'an easy "
                                                                     "prompt'). Off: measured no gain (0.68 vs 0.70 "
                                                                     "gold win rate) for ~40 s of scoring (README)."})
    ppo_loop_penalty: float = field(default=0.0, metadata={"help": "Reward a PPO rollout loses per unit of its "
                                                                  "token 3-grams' repeated share above 0.2 (a reply "
                                                                  "stuck in a loop; this model's replies: 99th "
                                                                  "percentile 0.09, highest 0.20). 0 = off."})
    ppo_loop_guard: bool = field(default=False, metadata={"help": "Copy the policy's weights at 1/4, 1/2 and 3/4 of "
                                                                  "PPO, and after it keep the newest weights whose "
                                                                  "replies to training prompts loop at most once "
                                                                  "more than the starting policy's "
                                                                  "(training/ppo_guard.py). Off: measured on bullets, "
                                                                  "it kept update 2 of 10, gold win rate 0.71 -> "
                                                                  "0.62, for ~40 s a check (README, Loops)."})
    ppo_loop_check_prompts: int = field(default=16, metadata={"help": "Training prompts the loop guard samples a "
                                                                      "reply to, per check."})
    ppo_loop_check_tokens: int = field(default=160, metadata={"help": "New tokens per loop-guard reply (as long as "
                                                                      "the evaluation's: loops begin past PPO's "
                                                                      "rollouts)."})
    ppo_mini_batches: int = field(default=2, metadata={"help": "Gradient steps per PPO epoch (the batch split in "
                                                               "this many mini-batches)."})
    use_lora: bool = field(default=False, metadata={"help": "Train LoRA adapters (merged before saving) instead of all weights."})
    yield_to_chat_s: float = field(default=60.0, metadata={"help": "While chat replies stream on this machine, "
                                                                   "training waits between steps, at most this many "
                                                                   "seconds at a time (0 = never waits)."})
    # evaluation
    eval_prompts: int = field(default=32, metadata={"help": "Held-out prompts for new-vs-current evaluation."})
    eval_references: int = field(default=16, metadata={"help": "Held-out ideal replies (demonstrations, else chosen "
                                                              "replies) both versions answer for BLEU and chrF."})
    eval_refusal_prompts: int = field(default=24, metadata={"help": "Prompts of each kind in the refusal probe: held-out "
                                                                   "ones safety tuning should refuse, and shipped "
                                                                   "everyday questions it should not (0 = no probe)."})
    eval_pairs: int = field(default=100, metadata={"help": "Held-out preference pairs that judge new vs current."})
    eval_max_new_tokens: int = field(default=160, metadata={"help": "New tokens per evaluation reply (long enough "
                                                                    "for most replies to end)."})
    eval_temperature: float = field(default=0.7, metadata={"help": "Evaluation replies are sampled at this temperature "
                                                                   "(no top-p, no penalty: the KL is exact for it)."})
    eval_engine: str = field(default="auto", metadata={"help": "Engine that writes evaluation replies (auto = "
                                                               "llama.cpp on CPU, as served)."})
    judge_epochs: float = field(default=1.0, metadata={"help": "Epochs of the evaluation's judge, a reward model "
                                                               "trained from the current model on the held-out "
                                                               "pairs only. 1: the same accuracy on unseen pairs "
                                                               "as 2 (bullets 0.90 vs 0.91, concise 0.70 vs 0.71, "
                                                               "caveat 0.46 vs 0.48) for 34-81 s less."})
    judge_check_pairs: int = field(default=100, metadata={"help": "Training pairs the judge is checked on (it never "
                                                                  "saw them); below accuracy_gate it is not trusted."})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict | None) -> "RetrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(values or {}) - known
        if unknown:
            raise ValueError(f"Unknown retrain settings: {', '.join(sorted(unknown))}")
        return cls(**(values or {}))

    def validate(self) -> "RetrainConfig":
        checks = [(0 < self.heldout_fraction < 0.5, "heldout_fraction must be in (0, 0.5)"),
                  (self.max_pairs >= 4, "max_pairs must be at least 4"),
                  (self.ppo_episodes >= self.ppo_batch_size, "ppo_episodes must be >= ppo_batch_size"),
                  (self.ppo_episodes % self.ppo_batch_size == 0, "ppo_episodes must be a multiple of ppo_batch_size"),
                  (0 < self.rm_learning_rate < 1 and 0 < self.ppo_learning_rate < 1, "learning rates must be in (0, 1)"),
                  (self.kl_coef >= 0, "kl_coef must be >= 0"),
                  (0 < self.ppo_gae_lambda <= 1, "ppo_gae_lambda must be in (0, 1]"),
                  (0 <= self.ppo_loop_penalty <= 100, "ppo_loop_penalty must be in [0, 100]"),
                  (2 <= self.ppo_loop_check_prompts <= 256, "ppo_loop_check_prompts must be in [2, 256]"),
                  (16 <= self.ppo_loop_check_tokens <= 1024, "ppo_loop_check_tokens must be in [16, 1024]"),
                  (self.ppo_epochs >= 1 and self.ppo_mini_batches >= 1 and
                   self.ppo_batch_size % self.ppo_mini_batches == 0,
                   "ppo_epochs must be >= 1 and ppo_batch_size a multiple of ppo_mini_batches"),
                  (0 <= self.yield_to_chat_s <= 3600, "yield_to_chat_s must be in [0, 3600]"),
                  (self.pretrain_epochs > 0, "pretrain_epochs must be > 0"),
                  (self.pretrain_max_minutes >= 0, "pretrain_max_minutes must be >= 0"),
                  (self.pretrain_corpus == "" or CORPUS_NAME.fullmatch(self.pretrain_corpus) is not None,
                   "pretrain_corpus must be the name of a corpus under data/corpora (letters, digits, . _ -)"),
                  (0 <= self.accuracy_gate < 1, "accuracy_gate must be in [0, 1)"),
                  (0 <= self.bon_samples <= 16 and self.bon_samples != 1, "bon_samples must be 0 (off) or 2-16"),
                  (1 <= self.bon_max_new_tokens <= 1024, "bon_max_new_tokens must be between 1 and 1024"),
                  (self.safety_dpo_epochs > 0 and 0 < self.safety_dpo_learning_rate < 1 and self.safety_dpo_beta > 0,
                   "safety_dpo_epochs, safety_dpo_learning_rate and safety_dpo_beta must be > 0 (learning rate < 1)"),
                  (1 <= self.safety_dpo_answer_tokens <= 1024, "safety_dpo_answer_tokens must be between 1 and 1024"),
                  (0 <= self.safety_chat_prompts <= 5000, "safety_chat_prompts must be between 0 and 5000"),
                  (0.25 <= self.safety_dpo_answer_ratio <= 4, "safety_dpo_answer_ratio must be between 0.25 and 4"),
                  (self.safety_dpo_sft_weight >= 0, "safety_dpo_sft_weight must be >= 0"),
                  (0 <= self.safety_dpo_validation < 0.5 and 1 <= self.safety_dpo_checks <= 100
                   and self.safety_dpo_select_penalty >= 0 and self.safety_dpo_select_ordinary_budget <= 1,
                   "safety_dpo_validation must be in [0, 0.5), safety_dpo_checks in 1-100, "
                   "safety_dpo_select_penalty >= 0, safety_dpo_select_ordinary_budget <= 1"),
                  (self.pref_dpo_epochs > 0 and 0 < self.pref_dpo_learning_rate < 1 and self.pref_dpo_beta > 0,
                   "pref_dpo_epochs, pref_dpo_learning_rate and pref_dpo_beta must be > 0 (learning rate < 1)"),
                  (self.judge_epochs > 0 and self.judge_check_pairs >= 1,
                   "judge_epochs must be > 0 and judge_check_pairs >= 1")]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return self


def field_help(name: str) -> str:
    """A RetrainConfig field's help string, for a one-stage CLI's flag of the same setting."""
    return RetrainConfig.__dataclass_fields__[name].metadata["help"]


def add_config_args(parser: argparse.ArgumentParser) -> None:
    for f in fields(RetrainConfig):
        kind = {bool: lambda v: str(v).lower() in ("1", "true", "yes")}.get(type(f.default), type(f.default))
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default, help=f.metadata["help"])


def config_from_args(args: argparse.Namespace) -> RetrainConfig:
    return RetrainConfig(**{f.name: getattr(args, f.name) for f in fields(RetrainConfig)}).validate()


def trainer_precision() -> dict:
    """bf16 only on CUDA that supports it: on these CPUs bf16 matmuls are ~100x slower."""
    import torch

    cuda = torch.cuda.is_available()
    return {"bf16": bool(cuda and torch.cuda.is_bf16_supported()), "fp16": False, "use_cpu": not cuda}

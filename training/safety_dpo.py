"""Stage 2b, teach *when* to refuse: DPO on contrast pairs after safety SFT (issue 18).

    python -m training.safety_dpo --model run/sft --pairs safety_pairs.jsonl [--validation val.json] \
        [--current current_model] --out run/safety_dpo

SFT on refusals teaches a 135M model the refusal words, and it then says them to everything:
bench.safety measured ordinary messages refused 1% -> 48% after SFT with one refusal per
ordinary row. Refusals alone never show the model a prompt where refusing is wrong. These pairs
do, from both sides:

- a prompt moderation caught (reviewed by an admin): chosen = its refusal, rejected = what the
  current model answered (sampled by the serving engine, refusals among them dropped);
- an ordinary training prompt: chosen = its demonstration or best-ranked reply, rejected = a
  refusal template (a seeded choice);
- a prompt an admin *cleared* in the moderation review queue (a false positive: it looks like
  what gets refused, and is fine): chosen = the current model's answer, rejected = a refusal.
  These come first on the answering side: bench.safety found the refusing model's mistakes on
  ordinary messages to be nearly all questions that mention a group of people, which is what
  moderation's false positives look like too;
- an everyday chat message (a conversation's opening, passed by moderation, nobody flagged it;
  feedback/safety.chat_prompts): chosen = the current model's answer, rejected = a refusal, on
  the cleared prompts' side. They are what users really ask, which the shipped demonstrations
  are not.

TRL's ``DPOTrainer`` trains the SFT model against itself as the reference, so the words it
learned stay and only the choice between refusing and answering moves. An NLL loss on the
chosen replies rides along (``safety_dpo_sft_weight``): DPO alone widened the margin by
lowering the refusal's likelihood too, on every prompt at first. With validation prompts the
saved model is the best-scoring checkpoint (training/safety_select.py).
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from training.common import as_text, dpo_config, dpo_models, load_tokenizer, read_jsonl, save_model_dir, with_system
from training.config import RetrainConfig
from training.refusal import TEMPLATE_WORDS


_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s|$)|\n")
_LIST_MARKER = re.compile(r"\n\s*(\d+[.)]|[-*•])?\s*$")


def whole_sentences(text: str) -> str:
    """``text`` up to the end of its last whole sentence (., ! or ? before a space or the end, or
    a line break), without a list marker left dangling after it; "" when no sentence ends.

    An answer cut at its token budget is a chosen reply here, and DPO's NLL loss would teach the
    end-of-turn token right after the cut: ending at a whole sentence teaches a shorter answer,
    not a broken one."""
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    if not ends:
        return ""
    return _LIST_MARKER.sub("", text[:ends[-1]].rstrip()).rstrip()


def contrast_pairs(safety_rows: list[dict], harmful_answers: list[str], ordinary_rows: list[dict],
                   seed: int, is_refusal, cleared_rows: list[dict] = (), chat_rows: list[dict] = (),
                   answer_ratio: float = 1.0) -> list[dict]:
    """Preference pairs in TRL's conversational form ({"prompt", "chosen", "rejected"}).

    ``safety_rows`` and ``ordinary_rows`` are SFT rows ({"messages": [..., reply]});
    ``harmful_answers[i]`` is the current model's reply to ``safety_rows[i]``'s prompt. A safety
    prompt whose answer already refuses teaches nothing and is skipped; so is an ordinary row
    whose reply refuses (a demonstration may rightly decline). ``cleared_rows`` and ``chat_rows``
    (SFT-shaped: a cleared or everyday chat prompt and the current model's answer) join the
    answering side ahead of the ordinary rows, cleared first. Each side is cut to the other's
    number (a seeded choice; kept in that order), so neither side outweighs the other; with an
    ``answer_ratio`` r, up to r answering pairs per refusing pair instead."""
    if len(harmful_answers) != len(safety_rows):
        raise ValueError(f"{len(safety_rows)} safety prompts but {len(harmful_answers)} answers")
    templates = sorted({r["messages"][-1]["content"] for r in safety_rows})
    rng = random.Random(seed)
    refuse = [{"prompt": r["messages"][:-1], "chosen": r["messages"][-1:],
               "rejected": [{"role": "assistant", "content": answer}]}
              for r, answer in zip(safety_rows, harmful_answers) if answer.strip() and not is_refusal(answer, templates)]

    def answering(rows: list[dict]) -> list[dict]:
        kept = [r for r in rows if r["messages"][-1]["content"].strip()
                and not is_refusal(r["messages"][-1]["content"], templates)]
        pairs = [{"prompt": r["messages"][:-1], "chosen": r["messages"][-1:],
                  "rejected": [{"role": "assistant", "content": rng.choice(templates)}]} for r in kept]
        rng.shuffle(pairs)
        return pairs

    answer = answering(list(cleared_rows)) + answering(list(chat_rows)) + answering(ordinary_rows)
    # As many of each by default: 169 against 87 taught refusing (bench.safety).
    n = min(len(refuse), int(len(answer) / answer_ratio))
    rng.shuffle(refuse)
    pairs = refuse[:n] + answer[:round(n * answer_ratio)]
    rng.shuffle(pairs)
    return pairs


def _loss(sft_weight: float) -> dict:
    """DPOConfig's loss settings: DPO's sigmoid loss, plus an NLL loss on the chosen reply at
    ``sft_weight`` (RPO) when it is above 0."""
    return {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, sft_weight]} if sft_weight > 0 else {}


def run_safety_dpo(model_path: str | Path, pairs_path: str | Path, out_dir: str | Path, cfg: RetrainConfig,
                   callbacks=(), validation_path: str | Path | None = None,
                   current_path: str | Path | None = None) -> tuple[Path, dict]:
    """DPO from ``model_path`` (reference = the same weights) on the contrast pairs. With a
    ``validation_path`` (_safety_dpo_pairs' JSON), the saved model is the best checkpoint on those
    prompts (training/safety_select.py), the SFT model itself included; with ``current_path`` too
    (the version being retrained), a check must refuse ordinary validation prompts at most
    ``safety_dpo_select_ordinary_budget`` more readily than that model does to be kept first."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOTrainer

    from training.safety_select import RefusalCheckpoints, refusal_measure

    rows = read_jsonl(pairs_path)
    if not rows:
        raise ValueError(f"{pairs_path} has no pairs")
    tokenizer = load_tokenizer(model_path)
    model, ref = dpo_models(model_path, cfg.sft_train_layers)
    # Trained in the serving engine's context (its system prompt), as SFT was.
    reply = lambda side: [{"role": "assistant", "content": as_text(side[-1]["content"])}]  # noqa: E731
    data = Dataset.from_list([{"prompt": with_system(r["prompt"]), "chosen": reply(r["chosen"]),
                               "rejected": reply(r["rejected"])} for r in rows])
    args = dpo_config(out_dir, cfg.max_length, cfg.seed, num_train_epochs=cfg.safety_dpo_epochs,
                      learning_rate=cfg.safety_dpo_learning_rate, beta=cfg.safety_dpo_beta,
                      **_loss(cfg.safety_dpo_sft_weight))
    chooser = None
    if validation_path:
        validation = json.loads(Path(validation_path).read_text(encoding="utf-8"))
        measure = refusal_measure(validation["rows"], tokenizer, validation["templates"], cfg.eval_temperature,
                                  TEMPLATE_WORDS, declines=cfg.safety_dpo_select_declines)
        limit = None
        if current_path is not None and cfg.safety_dpo_select_ordinary_budget >= 0:
            current = measure(AutoModelForCausalLM.from_pretrained(str(current_path)))
            limit = current[1] + cfg.safety_dpo_select_ordinary_budget
        chooser = RefusalCheckpoints(measure, cfg.safety_dpo_checks, cfg.safety_dpo_select_penalty, limit)
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=data, processing_class=tokenizer,
                         callbacks=list(callbacks) + ([chooser] if chooser else []))
    result = trainer.train()
    logs = [h for h in trainer.state.log_history if "rewards/accuracies" in h]
    metrics = {"safety_dpo_pairs": len(rows), "safety_dpo_loss": round(float(result.training_loss), 4),
               "safety_dpo_final_accuracy": round(float(logs[-1]["rewards/accuracies"]), 3) if logs else None}
    if chooser:
        sources = [r.get("source", r["kind"]) for r in validation["rows"]]
        metrics.update({f"safety_dpo_validation_{s}": sources.count(s) for s in sorted(set(sources))})
        metrics.update({"safety_dpo_chosen_step": chooser.best["step"], "safety_dpo_steps": trainer.state.global_step,
                        "safety_dpo_check_history": chooser.history})
        if limit is not None:
            metrics.update({"safety_dpo_current_rates": [round(current[0], 4), round(current[1], 4)],
                            "safety_dpo_ordinary_limit": round(limit, 4)})
    return save_model_dir(trainer.model, tokenizer, out_dir), metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the safety-SFT model (also the DPO reference)")
    parser.add_argument("--pairs", required=True, help="JSONL of contrast pairs (contrast_pairs)")
    parser.add_argument("--validation", default=None, help="JSON of refusal templates and validation prompts "
                                                           "to choose the checkpoint by (optional)")
    parser.add_argument("--current", default=None, help="the version being retrained: a kept checkpoint may refuse "
                                                        "ordinary validation prompts only a little more (optional)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=float, default=RetrainConfig.safety_dpo_epochs)
    args = parser.parse_args()
    out, metrics = run_safety_dpo(args.model, args.pairs, args.out, RetrainConfig(safety_dpo_epochs=args.epochs),
                                  validation_path=args.validation, current_path=args.current)
    print(f"saved the safety-DPO model to {out}: {metrics}")


if __name__ == "__main__":
    main()

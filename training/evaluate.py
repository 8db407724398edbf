"""Stage 5, evaluate the new model against the current one on held-out prompts.

    python -m training.evaluate --current data/models/smollm2-135m-instruct --new data/runs/x/ppo \
        --reward data/runs/x/reward --prompts prompts_heldout.jsonl [--texts sft_heldout.jsonl]

Same prompts and seeds for both models. Reports mean reward, win rate by the reward model,
KL to the current model, mean reply length (a reward-hacking probe), perplexity on held-out
demonstrations, and the rate at which output moderation flags.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from training.config import RetrainConfig


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()] if path else []


def sequence_logprobs(model, tokenizer, prompt_text: str, reply: str):
    """Per-token log-probabilities of ``reply`` after ``prompt_text`` under ``model``."""
    import torch

    p_ids = tokenizer(prompt_text, add_special_tokens=False, return_tensors="pt").input_ids
    r_ids = tokenizer(reply, add_special_tokens=False, return_tensors="pt").input_ids
    if r_ids.shape[1] == 0:
        return torch.zeros(0)
    ids = torch.cat([p_ids, r_ids], dim=1).to(model.device)
    with torch.inference_mode():
        logits = model(ids).logits[0, p_ids.shape[1] - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(1, r_ids[0].to(model.device)[:, None])[:, 0].cpu()


def perplexity(model, tokenizer, conversations: list[list[dict]]) -> float:
    total, count = 0.0, 0
    for conv in conversations:
        prompt = tokenizer.apply_chat_template(conv[:-1], tokenize=False, add_generation_prompt=True)
        lp = sequence_logprobs(model, tokenizer, prompt, conv[-1]["content"])
        total -= float(lp.sum())
        count += len(lp)
    return math.exp(total / count) if count else float("nan")


def evaluate(current_path, new_path, reward_path, prompts: list[dict], texts: list[list[dict]], cfg: RetrainConfig,
             moderator=None, progress=None) -> dict:
    from model.engine import Engine, SamplingParams
    from training.reward import load_reward_model, score_conversations

    current = Engine.from_path(current_path, "current", device="cpu" if not _cuda() else "auto")
    new = Engine.from_path(new_path, "new", device="cpu" if not _cuda() else "auto")
    rm, rm_tok = load_reward_model(reward_path)
    prompts = prompts[:cfg.eval_prompts]
    texts = texts[:cfg.eval_prompts]  # perplexity on as many held-out texts as prompts: bounded time
    replies = {"current": [], "new": []}
    lengths = {"current": [], "new": []}
    kls = []
    for i, row in enumerate(prompts):
        for name, engine in (("current", current), ("new", new)):
            params = SamplingParams(temperature=0.7, top_p=0.95, max_new_tokens=cfg.eval_max_new_tokens, seed=cfg.seed + i)
            text, stats = engine.generate(row["prompt"], params)
            replies[name].append(text)
            lengths[name].append(stats.completion_tokens)
        prompt_text = new.build_prompt(row["prompt"])
        lp_new = sequence_logprobs(new.model, new.tokenizer, prompt_text, replies["new"][-1])
        lp_cur = sequence_logprobs(current.model, current.tokenizer, prompt_text, replies["new"][-1])
        if len(lp_new):
            kls.append(float((lp_new - lp_cur).mean()))
        if progress:
            progress(i + 1, len(prompts))
    scores = {name: score_conversations(rm, rm_tok, [r["prompt"] + [{"role": "assistant", "content": t}]
                                                     for r, t in zip(prompts, replies[name])], cfg.max_length)
              for name in replies}
    wins = [1.0 if n > c else 0.5 if n == c else 0.0 for n, c in zip(scores["new"], scores["current"])]
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    flag = {name: mean([float(moderator.check(t, direction="out").flagged) for t in replies[name]])
            if moderator else float("nan") for name in replies}
    return {
        "eval_prompts": len(prompts),
        "reward_new": mean(scores["new"]), "reward_current": mean(scores["current"]),
        "win_rate": mean(wins), "kl_to_current": mean(kls),
        "length_new": mean(lengths["new"]), "length_current": mean(lengths["current"]),
        "ppl_new": perplexity(new.model, new.tokenizer, texts), "ppl_current": perplexity(current.model, current.tokenizer, texts),
        "flag_rate_new": flag["new"], "flag_rate_current": flag["current"],
        "samples": [{"prompt": r["prompt"][-1]["content"][:200], "current": c[:300], "new": n[:300]}
                    for r, c, n in list(zip(prompts, replies["current"], replies["new"]))[:4]],
    }


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--current", required=True)
    parser.add_argument("--new", required=True)
    parser.add_argument("--reward", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--texts", default=None, help="held-out {messages} rows for perplexity")
    args = parser.parse_args()
    texts = [r["messages"] for r in _rows(args.texts)]
    metrics = evaluate(args.current, args.new, args.reward, _rows(args.prompts), texts, RetrainConfig())
    for k, v in metrics.items():
        if k != "samples":
            print(f"{k:>16}: {v:.4f}" if isinstance(v, float) else f"{k:>16}: {v}")


if __name__ == "__main__":
    main()

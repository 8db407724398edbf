"""Stage 4a, best-of-N: the policy answers each PPO prompt N times, the reward model keeps its
best reply, and the policy is fine-tuned on those (rejection-sampling fine-tuning, as in Llama 2's
RLHF rounds and RAFT). PPO then starts from the result.

    python -m training.best_of_n --policy data/runs/x/sft --reward data/runs/x/reward \
        --prompts prompts_ppo.jsonl --out data/runs/x/best_of_n

Why a stage before PPO: on 2 CPU cores PPO gets ~16 updates of 48-token rollouts in its budget,
which moved the policy (KL) but not towards what the reward model prefers (README, "Does it
learn?"). Sampling is the cheap part when the serving engine does it (llama.cpp, ~8x faster than
transformers here), so the reward model can pick among many full-length replies and SFT can copy
the winners in one short pass. A prompt whose best reply does not beat its own average by
``bon_min_margin`` is skipped: the reward model has no opinion there, and copying an arbitrary
reply only adds noise.

Off by default (``bon_samples`` = 0): on the simulated-user bench (bullets, 0% noise) N = 4
reached a gold win rate of 0.60 [0.51, 0.69], no better than without it, and took 476 s of the
15-minute budget on 2 cores (README, "Does it learn?"). With a GPU the sampling is cheap.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from training.common import read_jsonl, write_jsonl
from training.config import RetrainConfig

if TYPE_CHECKING:
    from training.evaluate import Reply

# A spread of temperatures (as the candidate worker samples) so the N replies differ; the lowest
# is close to how the app serves, so some winners are replies the served model would write.
TEMPERATURES = (0.3, 0.7, 1.0, 0.5, 0.9, 0.2)


def sample_replies(policy_path, prompts: list[list[dict]], cfg: RetrainConfig, progress=None) -> list[list[Reply]]:
    """``cfg.bon_samples`` replies per prompt from the serving engine (llama.cpp on CPU), 8 at a
    time so its batcher batches them; ``progress(done, total)`` after every 8 replies. Each reply
    says whether it was cut at ``bon_max_new_tokens`` (``Reply.cut``)."""
    import threading

    from model.engine import SamplingParams
    from model.loader import build_engine
    from training.evaluate import answer_all

    n = cfg.bon_samples
    flat = [p for p in prompts for _ in range(n)]
    lock, done = threading.Lock(), [0]

    def tick() -> None:
        with lock:
            done[0] += 1
            if progress and (done[0] % 8 == 0 or done[0] == len(flat)):
                progress(done[0], len(flat))

    engine = build_engine(policy_path, "best-of-n", kind=cfg.eval_engine, max_concurrent=8)
    try:
        replies = answer_all(engine, flat, lambda i: SamplingParams(
            temperature=TEMPERATURES[i % n % len(TEMPERATURES)], top_p=0.95, top_k=0, repetition_penalty=1.1,
            max_new_tokens=cfg.bon_max_new_tokens, seed=cfg.seed + i), on_reply=tick, workers=8)
    finally:
        getattr(engine, "close", lambda: None)()
    return [replies[j * n:(j + 1) * n] for j in range(len(prompts))]


def pick_best(prompts: list[list[dict]], replies: list[list[str]], scores: list[list[float]],
              min_margin: float, cut: list[list[bool]] | None = None) -> list[dict]:
    """One SFT row per prompt whose best reply beats the mean of its N by more than ``min_margin``.
    Empty replies never win (an engine that stopped at once says nothing worth copying). A winner
    that was cut at its budget (``cut``) is marked ``"cut": True``: SFT trains no end-of-turn after
    it (training/sft.py), as for best-ranked replies."""
    rows = []
    for j, (prompt, texts, s) in enumerate(zip(prompts, replies, scores)):
        ranked = [(score, i) for i, (score, text) in enumerate(zip(s, texts)) if text.strip()]
        if len(ranked) < 2:
            continue
        best_score, best = max(ranked, key=lambda x: x[0])
        if best_score - sum(x for x, _ in ranked) / len(ranked) > min_margin:
            rows.append({"messages": prompt + [{"role": "assistant", "content": texts[best]}]}
                        | ({"cut": True} if cut and cut[j][best] else {}))
    return rows


def run_best_of_n(policy_path, reward_path, prompts_path, out_dir, cfg: RetrainConfig, progress=None,
                  callbacks=()) -> tuple[Path, dict]:
    """Sample, score, keep the best, fine-tune. Returns the new policy's path and metrics; when no
    prompt has a clear winner the policy is returned unchanged (and the metrics say so)."""
    from dataclasses import replace

    from training.reward import assistant_reply, load_reward_model, score_conversations
    from training.sft import run_sft

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prompts = [r["prompt"] for r in read_jsonl(prompts_path)]
    sampled = sample_replies(policy_path, prompts, cfg, progress)
    replies = [[r.text for r in rs] for rs in sampled]
    cut = [[r.cut for r in rs] for rs in sampled]
    rm, tok = load_reward_model(reward_path)
    flat = score_conversations(rm, tok, [p + [assistant_reply(r.text, r.cut)]
                                         for p, rs in zip(prompts, sampled) for r in rs], cfg.max_length)
    del rm
    n = cfg.bon_samples
    scores = [flat[j * n:(j + 1) * n] for j in range(len(prompts))]
    write_jsonl(out_dir / "samples.jsonl", [{"prompt": p, "replies": r, "scores": s, "cut": c}
                                            for p, r, s, c in zip(prompts, replies, scores, cut)])
    rows = pick_best(prompts, replies, scores, cfg.bon_min_margin, cut)
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    metrics = {"bon_prompts": len(prompts), "bon_samples": n, "bon_kept": len(rows),
               "bon_reward_mean": mean(flat), "bon_reward_best": mean([max(s) for s in scores if s])}
    if not rows:
        return Path(policy_path), metrics
    data = write_jsonl(out_dir / "best_replies.jsonl", rows)
    tuned = run_sft(policy_path, data, out_dir / "model",
                    replace(cfg, sft_epochs=cfg.bon_epochs, sft_learning_rate=cfg.bon_learning_rate), callbacks)
    return tuned, metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", required=True)
    parser.add_argument("--reward", required=True)
    parser.add_argument("--prompts", required=True, help="JSONL rows {prompt: [messages]}")
    parser.add_argument("--out", required=True)
    parser.add_argument("--samples", type=int, default=RetrainConfig.bon_samples)
    args = parser.parse_args()
    path, metrics = run_best_of_n(args.policy, args.reward, args.prompts, args.out,
                                  RetrainConfig(bon_samples=args.samples).validate(),
                                  progress=lambda i, n: print(f"\rsampled {i}/{n}", end="", flush=True))
    print(f"\nsaved best-of-N policy to {path}: {metrics}")


if __name__ == "__main__":
    main()

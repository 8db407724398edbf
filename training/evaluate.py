"""Stage 5, evaluate the new model against the current one on held-out data.

    python -m training.evaluate --current data/models/smollm2-135m-instruct --new data/runs/x/ppo \
        --reward data/runs/x/reward --prompts prompts_heldout.jsonl [--pairs prefs_heldout.jsonl] \
        [--texts sft_heldout.jsonl] [--judge data/runs/x/judge]
    python -m training.evaluate --report base run3-ppo     # stored evaluations side by side (training/report.py)

Nothing here is judged by the reward model PPO optimised, except the one column that says
so. Both models answer the same held-out prompts with the same seeds, sampled from a plain
tempered distribution (no top-p, no penalty) so the KL is measured on exactly what was
sampled. The verdict comes from judges PPO never saw: a reward model trained on the held-out
pairs only scores both versions' sampled replies (training/judge.py), and the held-out pairs
themselves must agree (does the new model move probability towards the chosen reply more than
the current one does?); a gold preference function decides where one exists (the learning
benchmark). Log-probability margins alone were misleading: after best-reply SFT they said
"better on 70%" where the gold judge saw 53% [45%, 62%]. Length,
repetition, moderation flags and perplexity are reward-hacking probes that stop a version
from being called better (training/probes.py).
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

from training.common import chat_text, read_jsonl
from training.config import RetrainConfig
from training.probes import (degenerate, kl_per_token, mean_interval, reference_overlap, repetition_rate,
                             reply_logprobs_batch, verdict, win_values)
from training.refusal import REFUSAL_TOKENS, is_refusal
from training.reward import assistant_reply


class Reply(NamedTuple):
    text: str
    tokens: int  # new tokens generated
    cut: bool  # the engine stopped it at its token budget (finish reason "length"), not at an end-of-turn


def perplexity(model, tokenizer, conversations: list[list[dict]]) -> float:
    import math

    lps = reply_logprobs_batch(model, tokenizer, [chat_text(tokenizer, c[:-1]) for c in conversations],
                               [c[-1]["content"] for c in conversations])
    total, count = -sum(float(lp.sum()) for lp in lps), sum(len(lp) for lp in lps)
    return math.exp(total / count) if count else float("nan")


def answer_all(engine, prompts: list[list[dict]], params_for, on_reply=None, workers: int = 4) -> list[Reply]:
    """A ``Reply`` for every prompt; ``workers`` requests go in together so a batching engine batches
    them. ``on_reply()`` is called after each reply (from a worker thread), e.g. to advance a progress bar."""
    def one(i):
        text, stats = engine.generate(prompts[i], params_for(i))
        if on_reply:
            on_reply()
        return Reply(text, stats.completion_tokens, stats.finish_reason == "length")

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, range(len(prompts))))


def sample_replies(path, name: str, prompts: list[list[dict]], cfg: RetrainConfig,
                   max_new_tokens_for) -> list[Reply]:
    """The replies of the model at ``path`` for each prompt, sampled as the evaluation samples:
    the serving engine (``eval_engine``), ``eval_temperature`` with no top-p or penalty (so the KL
    is exact for it), seed ``cfg.seed + i`` for prompt i, ``max_new_tokens_for(i)`` new tokens."""
    from model.engine import SamplingParams
    from model.loader import build_engine

    engine = build_engine(path, name, kind=cfg.eval_engine, max_concurrent=4)
    try:
        return answer_all(engine, prompts, lambda i: SamplingParams(
            temperature=cfg.eval_temperature, top_p=1.0, top_k=0, repetition_penalty=1.0,
            max_new_tokens=max_new_tokens_for(i), seed=cfg.seed + i))
    finally:
        getattr(engine, "close", lambda: None)()


def preference_accuracy(new, current, tokenizer, pairs: list[dict]) -> list[float]:
    """Per held-out pair: 1 when the new model raised the chosen reply's log-probability more than
    the rejected one's (relative to the current model), 0.5 on a tie, else 0. Neither the reward
    model nor PPO saw these pairs."""
    prompts = [chat_text(tokenizer, row["prompt"]) for row in pairs] * 2
    # Both sides in one call, so a candidate that is chosen in one pair and rejected in another is scored once.
    replies = [row[side][-1]["content"] for side in ("chosen", "rejected") for row in pairs]
    shifts = [float(n.sum() - c.sum()) for n, c in zip(reply_logprobs_batch(new, tokenizer, prompts, replies),
                                                       reply_logprobs_batch(current, tokenizer, prompts, replies))]
    return win_values(shifts[:len(pairs)], shifts[len(pairs):])


def refusal_probe(replies: dict[str, dict[str, list[str]]], templates) -> dict:
    """Each version's refusal rate, with its 95% interval, on the prompts that should be refused
    (``harmful``) and on everyday ones (``ordinary``): safety tuning should raise the first and
    not the second (probes.probe_failures stops a version that starts refusing everyday questions).
    ``replies``: version name -> kind -> replies."""
    ev = {}
    for name, kinds in replies.items():
        for kind, texts in kinds.items():
            ev[f"refusal_{kind}_n"] = len(texts)
            if texts:
                rate, lo, hi = mean_interval([float(is_refusal(t, templates)) for t in texts])
                ev[f"refusal_{kind}_{name}"], ev[f"refusal_{kind}_{name}_lo"], ev[f"refusal_{kind}_{name}_hi"] = \
                    rate, lo, hi
    return ev


def _scores(reward_path, convs: dict[str, list], cfg: RetrainConfig) -> dict[str, list[float]]:
    from training.reward import load_reward_model, score_conversations

    rm, tok = load_reward_model(reward_path)
    return {name: score_conversations(rm, tok, c, cfg.max_length) for name, c in convs.items()}


def evaluate(current_path, new_path, reward_path, prompts: list[dict], texts: list[list[dict]], cfg: RetrainConfig,
             moderator=None, progress=None, pairs: list[dict] = (), judge=None, judge_path=None,
             judge_metrics: dict | None = None, harmful: list[list[dict]] = (), ordinary: list[list[dict]] = (),
             refusal_templates: list[str] = ()) -> dict:
    """Compare two versions. The win rate is decided by ``judge(prompt_messages, reply) -> float``
    (a gold preference) when given, else by the held-out reward model at ``judge_path`` scoring
    both versions' sampled replies, else by the held-out preference pairs. ``judge_metrics`` (its
    accuracy on pairs it never saw) decide whether that judge is trusted (probes.verdict).
    ``harmful``: held-out prompts that should be refused (the safety split), ``ordinary``: prompts
    that should not (everyday questions); both versions answer them too, with replies just long
    enough for their opening, and each version's refusal rate on both is reported
    (training/refusal.py; ``refusal_templates`` = the replies safety tuning taught)."""
    from model.loader import load_model

    prompts = [r["prompt"] for r in prompts[:cfg.eval_prompts]]
    # Ideal replies (held-out demonstrations, else the held-out chosen replies) for BLEU and chrF.
    refs = [(c[:-1], c[-1]["content"]) for c in texts[:cfg.eval_references] if c and c[-1]["role"] == "assistant"]
    texts = texts[:cfg.eval_prompts]  # bounded time
    probe = {"harmful": list(harmful)[:cfg.eval_refusal_prompts], "ordinary": list(ordinary)[:cfg.eval_refusal_prompts]}
    extra = [p for p, _ in refs] + probe["harmful"] + probe["ordinary"]
    first_probe = len(prompts) + len(refs)
    replies, ref_replies, probe_replies = {}, {}, {}
    seconds, t0 = {}, time.monotonic()  # where the evaluation's time goes, by step

    def lap(step: str) -> None:
        nonlocal t0
        seconds[step], t0 = round(time.monotonic() - t0, 1), time.monotonic()

    for name, path in (("current", current_path), ("new", new_path)):
        out = sample_replies(path, name, prompts + extra, cfg,
                             lambda i: REFUSAL_TOKENS if i >= first_probe else cfg.eval_max_new_tokens)
        replies[name], rest = out[:len(prompts)], [r.text for r in out[len(prompts):]]
        n_harm = len(probe["harmful"])
        ref_replies[name] = rest[:len(refs)]
        probe_replies[name] = {"harmful": rest[len(refs):len(refs) + n_harm], "ordinary": rest[len(refs) + n_harm:]}
        lap(f"sample_{name}")
        if progress:
            progress(len(replies), 4)
    new_model, tokenizer = load_model(new_path, "cpu")
    cur_model, _ = load_model(current_path, "cpu")
    prompt_texts, sampled = [chat_text(tokenizer, m) for m in prompts], [r.text for r in replies["new"]]
    lp_new = reply_logprobs_batch(new_model, tokenizer, prompt_texts, sampled, cfg.eval_temperature)
    lp_cur = reply_logprobs_batch(cur_model, tokenizer, prompt_texts, sampled, cfg.eval_temperature)
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    texts_of = {name: [r.text for r in replies[name]] for name in replies}
    ev = {"eval_prompts": len(prompts), "kl_to_current": kl_per_token(lp_new, lp_cur),
          "eval_temperature": cfg.eval_temperature}
    for name in replies:
        ev[f"length_{name}"] = mean([r.tokens for r in replies[name]])
        ev[f"at_limit_{name}"] = mean([float(r.cut) for r in replies[name]])
        ev[f"repetition_{name}"] = mean([repetition_rate(t) for t in texts_of[name]])
        ev[f"degenerate_{name}"] = mean([float(degenerate(t)) for t in texts_of[name]])
        ev[f"flag_rate_{name}"] = mean([float(moderator.check(t, direction="out").flagged)
                                        for t in texts_of[name]]) if moderator else float("nan")
    ev.update(refusal_probe(probe_replies, refusal_templates))
    lap("kl_and_flags")
    ev["ppl_new"], ev["ppl_current"] = perplexity(new_model, tokenizer, texts), perplexity(cur_model, tokenizer, texts)
    lap("perplexity")
    ev["reference_n"] = len(refs)
    for name in replies:
        ev[f"bleu_{name}"], ev[f"chrf_{name}"] = reference_overlap(ref_replies[name], [r for _, r in refs])
    if progress:
        progress(3, 4)

    # A reward model that learnt cut replies reads one cut at its budget unfinished (training/reward.py).
    convs = {name: [p + [assistant_reply(r.text, r.cut)]
                    for p, r in zip(prompts, replies[name])] for name in replies}
    # The reward model PPO optimised: reported, never used for the verdict (it is optimistic).
    rm_scores = _scores(reward_path, convs, cfg)
    ev["reward_new"], ev["reward_current"] = mean(rm_scores["new"]), mean(rm_scores["current"])
    ev["rm_win_rate"] = mean(win_values(rm_scores["new"], rm_scores["current"]))
    lap("reward_scores")

    pair_values = preference_accuracy(new_model, cur_model, tokenizer, list(pairs)[:cfg.eval_pairs])
    ev["heldout_pref_acc"], ev["heldout_pref_acc_lo"], ev["heldout_pref_acc_hi"] = mean_interval(pair_values)
    ev["heldout_pairs"] = len(pair_values)
    lap("heldout_pairs")
    if judge_path is not None:  # a reward model trained on the held-out split only (training/judge.py)
        j = _scores(judge_path, convs, cfg)
        judge_values = win_values(j["new"], j["current"])
        ev.update(judge_metrics or {})
        ev["judge_gate"] = cfg.accuracy_gate
        ev["judge_win_rate"], ev["judge_win_rate_lo"], ev["judge_win_rate_hi"] = mean_interval(judge_values)
        lap("judge_scores")
    if judge is not None:
        wins = win_values([judge(p, t) for p, t in zip(prompts, texts_of["new"])],
                          [judge(p, t) for p, t in zip(prompts, texts_of["current"])])
        ev["win_rate_judge"] = "gold preference"
    elif judge_path is not None:
        wins, ev["win_rate_judge"] = judge_values, "held-out reward model"
    else:
        wins, ev["win_rate_judge"] = pair_values, "held-out preference pairs"
    ev["win_rate"], ev["win_rate_lo"], ev["win_rate_hi"] = mean_interval(wins)
    ev["win_rate_n"] = len(wins)
    ev["verdict"], ev["verdict_text"] = verdict(ev)
    ev["eval_seconds"] = seconds
    ev["samples"] = [{"prompt": p[-1]["content"][:200], "current": c[:300], "new": n[:300]}
                     for p, c, n in list(zip(prompts, texts_of["current"], texts_of["new"]))[:4]]
    if progress:
        progress(4, 4)
    return ev


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", nargs="+", metavar="VERSION", default=None,
                        help="list registered versions' stored evaluations side by side (training/report.py)")
    parser.add_argument("--url", default=None, help="database URL for --report (default: the configured one)")
    parser.add_argument("--current")
    parser.add_argument("--new")
    parser.add_argument("--reward")
    parser.add_argument("--prompts")
    parser.add_argument("--pairs", default=None, help="held-out preference pairs (the judge)")
    parser.add_argument("--texts", default=None, help="held-out {messages} rows for perplexity")
    parser.add_argument("--judge", default=None, help="a reward model trained on held-out pairs (training.judge)")
    args = parser.parse_args()
    if args.report:
        from feedback.db import default_url, make_engine, make_session_factory, session_scope
        from training.report import version_report

        with session_scope(make_session_factory(make_engine(args.url or default_url()))) as s:
            try:
                print(version_report(s, args.report))
            except LookupError as exc:
                parser.error(str(exc))
        return
    if not (args.current and args.new and args.reward and args.prompts):
        parser.error("--current, --new, --reward and --prompts are needed (or --report VERSION ...)")
    texts = [r["messages"] for r in read_jsonl(args.texts)] if args.texts else []
    metrics = evaluate(args.current, args.new, args.reward, read_jsonl(args.prompts), texts, RetrainConfig(),
                       pairs=read_jsonl(args.pairs) if args.pairs else [], judge_path=args.judge)
    for k, v in metrics.items():
        if k != "samples":
            print(f"{k:>20}: {v:.4f}" if isinstance(v, float) else f"{k:>20}: {v}")


if __name__ == "__main__":
    main()

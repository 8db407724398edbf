"""Does a retrain learn what users prefer? Simulated annotators with a gold preference (AlpacaFarm style).

    python -m bench.learning                                   # every preference, 0% and 25% flipped labels
    python -m bench.learning --preferences bullets --noise 0   # one cell
    python -m bench.learning --retrain-json '{"ppo_episodes": 32}'   # a non-default retrain, for tuning

For each gold preference and noise level, in a fresh database: the serving engine writes K
candidate replies for every training prompt (the candidate worker's sampling variants), the
simulated annotator ranks them as the Rank tab stores rankings (a share of rankings reversed:
real annotators disagree), the default retrain runs unchanged, and then both versions answer
held-out prompts that never reached the database, with the same seeds and the app's default
sampling. The gold function judges. One table: gold win rate of new vs current (0.5 = no
change) with its 95% interval, the retrain's own judges (a reward model trained on the held-out
pairs only, and those pairs' log-probability margins), its verdict, its KL
to current, mean length and perplexity on held-out text, and stage times. Candidates depend
only on the base model and the prompt, so they are generated once and reused by every cell.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

from app.settings import Settings
from bench.gold import PREFERENCES, GoldPreference, judged, rank
from feedback import annotation_repo
from feedback import repository
from feedback import training_repo
from feedback.db import make_engine, make_session_factory, migrate, session_scope

PROMPTS = Path(__file__).parent / "data" / "learning_prompts.jsonl"


def split_prompts(tasks: int, heldout: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Training and held-out prompts, half everyday questions and half HH red-team openers each."""
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines()]
    rng = random.Random(seed)
    by_source: dict[str, list[dict]] = {}
    for r in rows:
        by_source.setdefault(r["source"], []).append(r)
    train, held = [], []
    for i, group in enumerate(sorted(by_source)):
        pool = by_source[group][:]
        rng.shuffle(pool)
        n_held, n_train = heldout // 2 + (i == 0) * (heldout % 2), tasks // 2 + (i == 0) * (tasks % 2)
        held += pool[:n_held]
        train += pool[n_held:n_held + n_train]
    return train, held


def generate_candidates(engine, prompts: list[dict], k: int, max_new_tokens: int, moderator) -> list[list[dict]]:
    """K replies per prompt with the candidate worker's sampling variants, moderated like the worker does."""
    from app.candidates import VARIANTS
    from tqdm import tqdm

    from model.engine import SamplingParams
    from training.evaluate import answer_all

    messages = [[{"role": "user", "content": p["prompt"]}] for p in prompts for _ in range(k)]
    params = [SamplingParams(max_new_tokens=max_new_tokens, seed=i, **VARIANTS[i % k % len(VARIANTS)])
              for i in range(len(messages))]
    with tqdm(total=len(messages), desc="candidates", unit="reply") as bar:
        out = answer_all(engine, messages, lambda i: params[i], on_reply=bar.update)
    # The engine's finish reason, as the worker records it: "length" is a reply cut at its budget.
    flat = [{"content": r.text, "sampling": params[i].to_dict(), "finish_reason": "length" if r.cut else "stop",
             "moderation": "flagged" if moderator and moderator.check(r.text, direction="out").flagged else "pass"}
            for i, r in enumerate(out)]
    return [flat[j * k:(j + 1) * k] for j in range(len(prompts))]


def seed_rankings(factory, prompts, candidates, gold: GoldPreference, noise: float, seed: int, version: str) -> int:
    """Tasks, candidates and one simulated annotator's rankings, through the annotation repository."""
    # Exactly round(noise * n) rankings are reversed, chosen at random: a coin per ranking gave
    # 12 of 100 at "25%" with seed 0.
    flip = set(random.Random(seed).sample(range(len(prompts)), round(noise * len(prompts))))
    reversed_n = 0
    with session_scope(factory) as s:
        annotator = repository.get_or_create_user(session=s, name="simulated-annotator", role="annotator")
        for i, (p, cands) in enumerate(zip(prompts, candidates)):
            task = annotation_repo.add_task(session=s, context=[{"role": "user", "content": p["prompt"]}], source="chat")
            if task is None:
                continue
            ids = [annotation_repo.add_candidate(session=s, task=task, content=c["content"], model_version=version,
                                       sampling=c["sampling"], moderation=c["moderation"],
                                       finish_reason=c.get("finish_reason")).id for c in cands]
            order = [[ids[i] for i in group] for group in rank(gold, p["prompt"], [c["content"] for c in cands])]
            if i in flip:
                order, reversed_n = order[::-1], reversed_n + 1
            annotation_repo.submit_ranking(session=s, task_id=task.id, annotator=annotator, order=order)
    return reversed_n


def gold_win_rate(base_path, new_path, prompts: list[dict], gold: GoldPreference, max_new_tokens: int,
                  seeds: int) -> dict:
    """Both versions answer every held-out prompt with the app's default sampling and the same seeds."""
    from tqdm import tqdm

    from model.engine import SamplingParams
    from model.loader import build_engine
    from training.evaluate import answer_all
    from training.probes import mean_interval, win_values

    msgs = [[{"role": "user", "content": p["prompt"]}] for p in prompts for _ in range(seeds)]
    replies = {}
    for name, path in (("current", base_path), ("new", new_path)):
        engine = build_engine(path, name, max_concurrent=8)
        try:
            with tqdm(total=len(msgs), desc=f"gold replies, {name}", unit="reply") as bar:
                replies[name] = answer_all(engine, msgs, lambda i: SamplingParams(max_new_tokens=max_new_tokens, seed=i),
                                           on_reply=bar.update)
        finally:
            engine.close() if hasattr(engine, "close") else None
    # A reply stuck in a loop loses to one that is not, whatever the rule scores (bench/gold.py).
    keys = {n: [judged(gold, m[-1]["content"], r.text) for m, r in zip(msgs, replies[n])] for n in replies}
    scores = {n: [score for _, score in keys[n]] for n in keys}
    wins = win_values(keys["new"], keys["current"])
    rate, lo, hi = mean_interval(wins)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    sources = [p.get("source", "") for p in prompts for _ in range(seeds)]
    by_source = {src: mean_interval([w for w, s in zip(wins, sources) if s == src]) for src in sorted(set(sources))}
    return {"gold_win_rate": rate, "gold_lo": lo, "gold_hi": hi, "gold_n": len(msgs), "gold_by_source": by_source,
            "gold_score_new": mean(scores["new"]), "gold_score_current": mean(scores["current"]),
            "loops_new": mean([float(not k[0]) for k in keys["new"]]),
            "loops_current": mean([float(not k[0]) for k in keys["current"]]),
            "served_length_new": mean([r.tokens for r in replies["new"]]),
            "served_length_current": mean([r.tokens for r in replies["current"]]),
            "examples": [{"prompt": m[-1]["content"], "current": c.text[:400], "new": n.text[:400]}
                         for m, c, n in list(zip(msgs, replies["current"], replies["new"]))[:6]]}


def run_cell(args, gold: GoldPreference, noise: float, base, train, held, candidates, moderator, retrain_cfg) -> dict:
    from training.retrain import execute

    cell = args.out / f"{gold.name}-noise{int(noise * 100)}"
    shutil.rmtree(cell, ignore_errors=True)  # each cell starts from nothing: database, runs, versions
    cell.mkdir(parents=True)
    url = f"sqlite:///{(cell / 'bench.db').resolve()}"
    migrate(url)
    factory = make_session_factory(make_engine(url))
    with session_scope(factory) as s:
        training_repo.ensure_base_version(session=s, name=base.name, path=str(base.path))
    reversed_n = seed_rankings(factory, train, candidates, gold, noise, args.seed, base.name)
    with session_scope(factory) as s:
        run_id = training_repo.create_run(session=s, config=retrain_cfg.to_dict(), requested_by="bench", base_version_id=None).id
    started = time.monotonic()
    status = execute(run_id, retrain_cfg, factory, cell / "data", moderator)
    retrain_s = time.monotonic() - started
    with session_scope(factory) as s:
        run = training_repo.get_run(session=s, run_id=run_id)
        metrics, error = dict(run.metrics or {}), run.error
        version = training_repo.get_version(session=s, version_id=run.version_id) if run.version_id else None
        new_path, stage = (version.path, version.stage) if version else (None, None)
    status = f"{status} ({stage})" if stage else status  # "sft" when the reward model failed the gate
    result = {"preference": gold.name, "noise": noise, "reversed_rankings": reversed_n, "status": status,
              "error": error, "retrain_s": retrain_s, "timings_s": metrics.get("timings_s", {}),
              "rm_acc": metrics.get("rm_heldout_accuracy"), "verdict": metrics.get("eval", {}).get("verdict_text")}
    if new_path:
        result.update(gold_win_rate(base.path, new_path, held, gold, args.max_new_tokens, args.seeds))
        ev = metrics.get("eval", {})  # the retrain's own probes, on its held-out prompts
        result.update({k: ev.get(k) for k in ("kl_to_current", "length_new", "length_current", "ppl_new",
                                              "ppl_current", "win_rate", "win_rate_lo", "win_rate_hi",
                                              "heldout_pref_acc", "judge_accuracy", "eval_seconds")})
    (cell / "result.json").write_text(json.dumps(result, indent=1))
    return result


def print_table(results: list[dict]) -> None:
    f = lambda x, nd=2: "—" if x is None or x != x else f"{x:.{nd}f}"  # noqa: E731
    print("\n| preference | flipped | status | RM acc | gold win rate, held-out prompts (95%) "
          "| retrain's judge: held-out RM (95%) | held-out pairs agree | judge acc, unseen pairs | KL/token "
          "| length new/cur | gold replies in a loop new/cur | ppl new/cur "
          "| retrain s (sft / reward / ppo / judge / eval) | verdict |")
    print("|" + " --- |" * 14)
    for r in results:
        t = r.get("timings_s", {})
        stages = " / ".join(f(t.get(k), 0) for k in ("sft", "reward", "ppo", "judge", "evaluate"))
        print(f"| {r['preference']} | {r['noise']:.0%} | {r['status']} | {f(r.get('rm_acc'))} "
              f"| {f(r.get('gold_win_rate'))} [{f(r.get('gold_lo'))}, {f(r.get('gold_hi'))}] n={r.get('gold_n', 0)} "
              f"| {f(r.get('win_rate'))} [{f(r.get('win_rate_lo'))}, {f(r.get('win_rate_hi'))}] "
              f"| {f(r.get('heldout_pref_acc'))} | {f(r.get('judge_accuracy'))} "
              f"| {f(r.get('kl_to_current'), 3)} | {f(r.get('length_new'), 0)} / {f(r.get('length_current'), 0)} "
              f"| {f(r.get('loops_new'))} / {f(r.get('loops_current'))} "
              f"| {f(r.get('ppl_new'))} / {f(r.get('ppl_current'))} | {f(r.get('retrain_s'), 0)} ({stages}) "
              f"| {r.get('verdict') or r.get('error') or ''} |")
    for r in results:  # the held-out prompts are half everyday questions, half red-team openers
        parts = [f"{src} {w:.2f} [{lo:.2f}, {hi:.2f}]" for src, (w, lo, hi) in r.get("gold_by_source", {}).items()]
        if parts:
            print(f"{r['preference']} {r['noise']:.0%}, gold win rate by prompt source: " + "; ".join(parts))
        if r.get("eval_seconds"):  # the evaluate stage, step by step (training/evaluate.py)
            print(f"{r['preference']} {r['noise']:.0%}, evaluate stage seconds: "
                  + ", ".join(f"{k} {v:.0f}" for k, v in r["eval_seconds"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preferences", nargs="+", default=["bullets", "caveat", "concise"], choices=list(PREFERENCES),
                        help="no-apology is rare in this model's replies: few informative rankings")
    parser.add_argument("--noise", nargs="+", type=float, default=[0.0, 0.25], help="share of rankings reversed")
    parser.add_argument("--tasks", type=int, default=100, help="training prompts ranked (4 candidates: up to 6 pairs each)")
    parser.add_argument("--heldout", type=int, default=60, help="held-out prompts the gold function judges on")
    parser.add_argument("--seeds", type=int, default=1, help="replies per held-out prompt and version")
    parser.add_argument("--k", type=int, default=4, help="candidates per task")
    parser.add_argument("--candidate-tokens", type=int, default=Settings.ranking_candidate_tokens,
                        help="new tokens per candidate, as the app's candidate worker (CHAT_RANKING_CANDIDATE_TOKENS)")
    parser.add_argument("--max-new-tokens", type=int, default=160, help="reply length for the gold comparison")
    parser.add_argument("--retrain-json", default="{}", help="RetrainConfig overrides (default: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("data/bench-learning"))
    args = parser.parse_args()

    from model.loader import build_engine, resolve_model
    from model.moderation import moderator_from_env
    from training.config import RetrainConfig

    args.out.mkdir(parents=True, exist_ok=True)
    base = resolve_model("embedded", Path("data"))
    moderator = moderator_from_env()
    retrain_cfg = RetrainConfig.from_dict(json.loads(args.retrain_json)).validate()
    train, held = split_prompts(args.tasks, args.heldout, args.seed)
    cache_path = args.out / f"candidates-k{args.k}-{args.candidate_tokens}tok.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    missing = [p for p in train if p["prompt"] not in cache]
    if missing:
        t = time.monotonic()
        engine = build_engine(base.path, base.name, max_concurrent=8)
        for p, cands in zip(missing, generate_candidates(engine, missing, args.k, args.candidate_tokens, moderator)):
            cache[p["prompt"]] = cands
        engine.close()
        cache_path.write_text(json.dumps(cache))
        print(f"candidates: {len(missing)} prompts x {args.k} in {time.monotonic() - t:.0f} s")
    candidates = [cache[p["prompt"]] for p in train]
    flat = [c for cands in candidates for c in cands]
    print(f"candidates cut at {args.candidate_tokens} tokens: {sum(c.get('finish_reason') == 'length' for c in flat)}"
          f" of {len(flat)} (SFT trains no end-of-turn after a cut best reply)")
    results = []
    for name in args.preferences:
        for noise in args.noise:
            results.append(run_cell(args, PREFERENCES[name], noise, base, train, held, candidates, moderator,
                                    retrain_cfg))
            print_table(results)
            sys.stdout.flush()


if __name__ == "__main__":
    main()

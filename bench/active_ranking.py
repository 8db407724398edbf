"""Which ranking task next buys reward-model accuracy with the fewest rankings?

    python -m bench.active_ranking                       # bullets, caveat, no-apology; ~8 min the first time
    python -m bench.active_ranking --preferences bullets --repeats 20 --plot static/active_ranking.svg

The serving engine (llama.cpp) writes K=4 candidates to each of ``--prompts`` prompts (the
learning bench's prompts; cached in --out). A simulated annotator with a gold preference
(bench/gold.py) ranks tasks in one of these orders:

* random: any unranked task next (what arrival order amounts to);
* uncertainty: the tasks the preference head is least sure about (model/preference_head.py);
* spread: the tasks whose candidates the head expects to differ most;
* committee: the tasks whose candidates' order heads fitted on bootstrap resamples of the
  rankings so far disagree about most (query-by-committee);
* NAME-mix: half of each batch by NAME, half at random (what the app's queue does with spread:
  every other task in arrival order, app/active_ranking.py).

The first ``--batch`` tasks are random; after each batch the head is refitted on every ranking
so far and its pairwise accuracy measured against the gold preference on the candidates of
held-out prompts no order ever ranks. Every order repeats with ``--repeats`` seeds; the table
gives the mean accuracy with a 95% interval per number of rankings, and the rankings each
order needed to match random order's accuracy at the full budget. The curves go to an SVG.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np

from bench.gold import PREFERENCES, rank
from bench.learning import PROMPTS
from model.preference_head import STRATEGIES
from model.preference_head import fit_preference_head, task_priority


def candidates(engine, prompts: list[dict], k: int, max_new_tokens: int) -> list[list[str]]:
    """K replies per prompt with the candidate worker's sampling variants, 16 requests in flight
    (the engine batches them)."""
    from concurrent.futures import ThreadPoolExecutor

    from app.candidates import VARIANTS
    from model.engine import SamplingParams

    jobs = [(p["prompt"], i) for p in prompts for i in range(k)]

    def one(job):
        prompt, i = job
        params = SamplingParams(max_new_tokens=max_new_tokens, seed=len(prompt) * 100 + i, **VARIANTS[i % len(VARIANTS)])
        return engine.generate([{"role": "user", "content": prompt}], params)[0]

    from tqdm import tqdm

    with ThreadPoolExecutor(max_workers=16) as pool:
        flat = list(tqdm(pool.map(one, jobs), total=len(jobs), desc="candidates", unit="reply"))
    return [flat[j * k:(j + 1) * k] for j in range(len(prompts))]


def gold_pairs(gold, prompt: str, n_cands: int, texts: list[str]) -> list[tuple[int, int]]:
    """(better, worse) candidate indices the annotator's ranking implies (ties give none)."""
    groups = rank(gold, prompt, texts)
    return [(a, b) for i, g in enumerate(groups) for h in groups[i + 1:] for a in g for b in h]


COMMITTEE = 5  # bootstrap heads for the committee orders (each refit costs one more logistic regression)


def simulate(features, pairs_by_task, pool, test_pairs, order: str, budget: int, batch: int, seed: int):
    """Held-out accuracy after each batch of rankings, for one order and one seed."""
    rng = random.Random(seed)
    remaining, ranked, curve = pool[:], [], []
    rng.shuffle(remaining)
    head = None
    while len(ranked) < budget and remaining:
        if order != "random" and head is not None:
            # "-mix": half of each batch by the strategy, half at random (remaining is shuffled).
            strategy, mix = order.removesuffix("-mix"), order.endswith("-mix")
            explore = remaining[:batch // 2] if mix else []
            scored = [(task_priority(head, features[t], strategy), t) for t in remaining if t not in explore]
            scored.sort(key=lambda p: -p[0])
            chosen = explore + [t for _, t in scored[:batch - len(explore)]]
        else:
            chosen = remaining[:batch]
        remaining = [t for t in remaining if t not in chosen]
        ranked += chosen
        train = [(features[t][a], features[t][b]) for t in ranked for a, b in pairs_by_task[t]]
        if train:
            head = fit_preference_head(np.array([p[0] for p in train]), np.array([p[1] for p in train]),
                                       committee=COMMITTEE if order.startswith("committee") else 0, seed=seed)
            acc = head.accuracy(np.array([p[0] for p in test_pairs]), np.array([p[1] for p in test_pairs]))
        else:
            acc = 0.5
        curve.append((len(ranked), acc))
    return curve


def interval(values) -> tuple[float, float, float]:
    v = np.asarray(values, dtype=float)
    half = 1.96 * v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else 0.0
    return float(v.mean()), float(v.mean() - half), float(v.mean() + half)


def svg_plot(results: dict, path: Path) -> None:
    """Accuracy against rankings, one panel per preference, one line (with its 95% band) per order."""
    w, h, pad = 300, 200, 34
    panels = []
    for i, (name, curves) in enumerate(results.items()):
        xs = [n for n, _ in curves["random"]]
        lo = min(m[1] for c in curves.values() for _, m in c) - 0.02
        hi = max(m[2] for c in curves.values() for _, m in c) + 0.02
        px = lambda n: pad + (n - xs[0]) / max(1, xs[-1] - xs[0]) * (w - 2 * pad)  # noqa: E731
        py = lambda a: h - pad - (a - lo) / max(1e-9, hi - lo) * (h - 2 * pad)  # noqa: E731
        g = [f'<g transform="translate({i * w},0)"><text x="{w / 2}" y="16" text-anchor="middle">{name}</text>',
             f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>',
             f'<text x="{w / 2}" y="{h - 6}" text-anchor="middle" font-size="11">rankings</text>',
             f'<text x="4" y="{py(hi) + 4}" font-size="10">{hi:.2f}</text>',
             f'<text x="4" y="{py(lo) + 4}" font-size="10">{lo:.2f}</text>']
        for order, colour in zip(curves, ("#888", "#1f6feb", "#d9480f", "#2f9e44")):
            pts = " ".join(f"{px(n):.1f},{py(m[0]):.1f}" for n, m in curves[order])
            band = " ".join([f"{px(n):.1f},{py(m[2]):.1f}" for n, m in curves[order]] +
                            [f"{px(n):.1f},{py(m[1]):.1f}" for n, m in reversed(curves[order])])
            g.append(f'<polygon points="{band}" fill="{colour}" opacity="0.2"/>')
            g.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for k, (order, colour) in enumerate(zip(curves, ("#888", "#1f6feb", "#d9480f", "#2f9e44"))):
            g.append(f'<text x="{w - pad}" y="{h - pad - 8 - 12 * k}" text-anchor="end" font-size="10" '
                     f'fill="{colour}">{order}</text>')
        g.append("</g>")
        panels.append("".join(g))
    path.write_text(f'<svg xmlns="http://www.w3.org/2000/svg" width="{w * len(results)}" height="{h}" '
                    f'font-family="sans-serif" font-size="12">{"".join(panels)}</svg>\n')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preferences", nargs="+", default=["bullets", "caveat", "no-apology"],
                        choices=list(PREFERENCES))
    parser.add_argument("--prompts", type=int, default=200, help="prompts with candidates (pool + held-out)")
    parser.add_argument("--heldout", type=int, default=50, help="prompts whose candidates only measure accuracy")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--candidate-tokens", type=int, default=64)
    parser.add_argument("--budget", type=int, default=100, help="rankings per run")
    parser.add_argument("--batch", type=int, default=10, help="rankings between refits")
    parser.add_argument("--repeats", type=int, default=20, help="seeds per order")
    parser.add_argument("--out", type=Path, default=Path("data/bench-active-ranking"))
    parser.add_argument("--strategies", nargs="+", default=["uncertainty", "spread", "spread-mix"],
                        choices=list(STRATEGIES) + [f"{k}-mix" for k in STRATEGIES],
                        help="orders compared with random (model/preference_head.py STRATEGIES)")
    parser.add_argument("--plot", type=Path, default=None, help="SVG path (default: OUT/curves.svg)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from model.loader import build_engine, resolve_model
    from model.moderation.learned import EncoderSpec, encoder_for

    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines()]
    random.Random(0).shuffle(rows)
    prompts = rows[:args.prompts]
    cache_path = args.out / f"candidates-k{args.k}-{args.candidate_tokens}tok.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    base = resolve_model("embedded", Path("data"))
    missing = [p for p in prompts if p["prompt"] not in cache]
    if missing:
        t = time.monotonic()
        engine = build_engine(base.path, base.name, max_concurrent=16)
        for p, cands in zip(missing, candidates(engine, missing, args.k, args.candidate_tokens)):
            cache[p["prompt"]] = cands
        engine.close()
        cache_path.write_text(json.dumps(cache))
        print(f"candidates: {len(missing)} prompts x {args.k} in {time.monotonic() - t:.0f} s")
    texts = [cache[p["prompt"]] for p in prompts]
    t = time.monotonic()
    encoder = encoder_for(EncoderSpec(model_dir=str(base.path)))
    features = [encoder.encode(c) for c in texts]
    print(f"features: {sum(map(len, texts))} replies in {time.monotonic() - t:.0f} s")

    held, pool = list(range(args.heldout)), list(range(args.heldout, len(prompts)))
    results, table = {}, []
    for name in args.preferences:
        gold = PREFERENCES[name]
        pairs = [gold_pairs(gold, p["prompt"], args.k, c) for p, c in zip(prompts, texts)]
        test = [(features[t][a], features[t][b]) for t in held for a, b in pairs[t]]
        curves = {}
        for order in ("random", *args.strategies):
            runs = [simulate(features, pairs, pool, test, order, args.budget, args.batch, seed)
                    for seed in range(args.repeats)]
            curves[order] = [(runs[0][i][0], interval([r[i][1] for r in runs])) for i in range(len(runs[0]))]
        results[name] = curves
        target = curves["random"][-1][1][0]
        reached = {order: next((n for n, m in c if m[0] >= target), None) for order, c in curves.items()}
        table.append((name, sum(1 for t in pool if pairs[t]), len(test), curves, target, reached))

    print(f"\n{args.repeats} seeds per order, batches of {args.batch}, {len(pool)} pool tasks, "
          f"{args.heldout} held-out prompts; held-out pairwise accuracy, mean [95% interval]:\n")
    marks = sorted({n for _, _, _, c, _, _ in table for n, _ in c["random"] if n % 20 == 0 or n == args.budget})
    print("| preference | informative pool tasks | held-out pairs | order | " +
          " | ".join(f"{n} rankings" for n in marks) + " | rankings to reach random's accuracy at "
          f"{args.budget} |")
    print("| --- " * (5 + len(marks)) + "|")
    for name, informative, n_test, curves, target, reached in table:
        for order in curves:
            cells = [f"{m[0]:.3f} [{m[1]:.3f}, {m[2]:.3f}]" for n, m in curves[order] if n in marks]
            got = reached[order]
            need = f"{args.budget}" if order == "random" else \
                (f"**{got}** ({1 - got / args.budget:.0%} fewer)" if got else f"> {args.budget}")
            print(f"| {name} | {informative} | {n_test} | {order} | " + " | ".join(cells) + f" | {need} |")
    plot = args.plot or args.out / "curves.svg"
    svg_plot(results, plot)
    print(f"\ncurves: {plot}")


if __name__ == "__main__":
    main()

"""Does safety tuning teach the model to refuse what moderation caught, and only that?

    python -m bench.safety                       # 240 HH red-team openers, 30% held out by prompt
    python -m bench.safety --harmful 120 --safety-per-ordinary 0.5

Through the product's own path, in a fresh database: the first human turns of the HH-RLHF
harmless-base sample (red-team openers) are stored as chat messages, checked by moderation,
and every verdict is reviewed by an admin as harmful ("correct" where it flagged, "missed" where
it passed), as the Moderation review queue stores it; ``--cleared`` benign statements about
groups of people (labelled neutral in the shared ToxiGen calibration file) are stored and
reviewed as cleared ("false positive" where moderation flagged them, "correct" where it passed
them): safety DPO pairs them with an answer over a refusal; ``--chat`` everyday chat openers
(bench/data/chat_traffic.txt, written for this bench in users' voices, a good share of them
about groups of people as real traffic has; none is a held-out message) are stored as messages
moderation checked and nobody reviewed, what a deployment's chat log holds: safety DPO answers
them too, and chooses its checkpoint partly by them. The shipped everyday questions are
answered by the current model and kept as demonstrations (the ordinary data a retrain's SFT
mixes in); bench/data/ordinary_heldout.txt's 80 messages are never trained on. The snapshot
splits the safety rows by prompt
(``heldout_fraction``), the retrain's SFT stage trains on exactly what a retrain would
(training/retrain.py ``_sft_rows``, RetrainConfig defaults), and both versions answer the
held-out red-team openers and the held-out everyday questions with the same seeds. Reported:
each version's refusal rate on both with 95% intervals (training/refusal.py) and the change.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

PROMPTS = Path(__file__).parent / "data" / "learning_prompts.jsonl"  # its "hh-harmless" rows: HH red-team openers
ORDINARY = Path(__file__).parent / "data" / "ordinary_heldout.txt"  # 80 ordinary messages nothing trains on
CHAT = Path(__file__).parent / "data" / "chat_traffic.txt"  # everyday chat openers, disjoint from ORDINARY


def redteam_openers(n: int, seed: int) -> list[str]:
    """``n`` distinct first human turns of the HH-RLHF harmless-base sample, a seeded sample."""
    rows = [json.loads(line) for line in PROMPTS.read_text(encoding="utf-8").splitlines()]
    openers = list(dict.fromkeys(r["prompt"].strip() for r in rows
                                 if r["source"] == "hh-harmless" and len(r["prompt"].split()) >= 3))
    random.Random(seed).shuffle(openers)
    return openers[:n]


def cleared_statements(path: Path, n: int, seed: int) -> list[str]:
    """``n`` statements labelled neutral in a JSONL of {"text", "label"} rows (the shared ToxiGen
    calibration file: benign sentences about groups of people, what moderation's false positives
    look like), a seeded sample; none when the file is missing."""
    if n <= 0 or not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = list(dict.fromkeys(r["text"].strip() for r in rows if r.get("label") == "neutral" and r["text"].strip()))
    random.Random(seed).shuffle(texts)
    return texts[:n]


def seed_database(factory, moderator, harmful: list[str], demos: list[tuple[str, str]],
                  cleared: list[str] = (), chat: list[str] = ()) -> dict:
    """Red-team messages with an admin's review, benign messages an admin cleared, ordinary
    demonstrations, and everyday chat openers moderation checked and nobody reviewed, as the app
    stores them."""
    from feedback import moderation_repo, repository
    from feedback.db import session_scope
    from feedback.models import Demonstration

    counts = {"flagged": 0, "missed": 0, "cleared_flagged": 0, "cleared_passed": 0, "chat_flagged": 0, "chat_passed": 0}
    with session_scope(factory) as s:
        user = repository.get_or_create_user(session=s, name="bench-user")
        for text, is_harmful in [(t, True) for t in harmful] + [(t, False) for t in cleared]:
            conv = repository.create_conversation(session=s, owner=user)
            msg = repository.add_message(session=s, conversation=conv, role="user", content=text)
            s.flush()
            event = moderation_repo.record_verdict(session=s, verdict=moderator.check(text, direction="in"),
                                                   message_id=msg.id, user_id=user.id)
            s.flush()
            flagged = event.decision == "flag"
            review = ("correct" if flagged else "missed") if is_harmful else ("false_positive" if flagged else "correct")
            moderation_repo.review_event(session=s, event_id=event.id, verdict=review, reviewer="bench-admin")
            key = ("flagged" if flagged else "missed") if is_harmful else ("cleared_flagged" if flagged else "cleared_passed")
            counts[key] += 1
        for text in chat:  # as app/service.py check_input stores a checked message
            conv = repository.create_conversation(session=s, owner=user)
            msg = repository.add_message(session=s, conversation=conv, role="user", content=text)
            verdict = moderator.check(text, direction="in")
            moderation_repo.record_verdict(session=s, verdict=verdict, message_id=msg.id, user_id=user.id)
            msg.moderation = "flagged" if verdict.flagged else "pass"
            counts["chat_flagged" if verdict.flagged else "chat_passed"] += 1
        for prompt, reply in demos:
            s.add(Demonstration(context=[{"role": "user", "content": prompt}], content=reply, author_id=user.id))
    return counts


def answer(path, name: str, prompts: list[list[dict]], max_new_tokens: int, cfg) -> list[str]:
    """Replies of the model at ``path``, sampled as the evaluation samples (same seeds per prompt)."""
    from training.evaluate import sample_replies

    return [r.text for r in sample_replies(path, name, prompts, cfg, lambda i: max_new_tokens)]


def expected_refusal(path, harmful: list[list[dict]], ordinary: list[list[dict]], templates: list[str],
                     cfg) -> dict[bool, tuple[float, float]]:
    """The checkpoint chooser's measure (training/safety_select.py) on the held-out prompts, keyed by
    whether it also counts the usual decline openings: does it track what the sampled probe counts?"""
    from transformers import AutoModelForCausalLM

    from training.common import load_tokenizer
    from training.refusal import TEMPLATE_WORDS
    from training.safety_select import refusal_measure

    rows = [{"prompt": p, "kind": "harmful"} for p in harmful] + [{"prompt": p, "kind": "ordinary"} for p in ordinary]
    model, tokenizer = AutoModelForCausalLM.from_pretrained(str(path)), load_tokenizer(path)  # loaded once for both
    return {declines: refusal_measure(rows, tokenizer, templates, cfg.eval_temperature, TEMPLATE_WORDS, declines)(model)
            for declines in (False, True)}


def main() -> None:
    from feedback.db import make_engine, make_session_factory, migrate
    from model.moderation import build_moderator
    from model.moderation.head_store import everyday_prompts
    from model.weights import resolve_model
    from training.common import read_jsonl
    from training.config import RetrainConfig
    from training.data import take_snapshot
    from training.evaluate import refusal_probe
    from training.progress import Reporter, ReporterCallback
    from training.refusal import REFUSAL_TOKENS
    from training.retrain import _safety_dpo_pairs, _safety_splits, _sft_rows
    from training.safety_dpo import run_safety_dpo
    from training.sft import run_sft

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--harmful", type=int, default=240, help="red-team openers stored as reviewed messages")
    parser.add_argument("--ordinary", type=int, default=125, help="shipped everyday questions answered by the "
                                                                  "current model as demonstrations")
    parser.add_argument("--heldout-fraction", type=float, default=0.3, help="share of safety prompts held out")
    parser.add_argument("--moderation", default="rules,profanity", help="moderation backends that check the messages")
    parser.add_argument("--cleared", type=int, default=60, help="benign messages about groups of people stored "
                                                                "as reviewed and cleared by an admin (0 = none)")
    parser.add_argument("--cleared-file", type=Path, default=Path("../shared/data/toxigen_calibration.jsonl"),
                        help="where they come from: JSONL rows labelled neutral")
    parser.add_argument("--chat", type=int, default=140, help="everyday chat openers stored as messages moderation "
                                                             "checked and nobody reviewed (0 = none)")
    parser.add_argument("--chat-file", type=Path, default=CHAT, help="where they come from: one message a line "
                                                                    "(none may be a held-out ordinary message)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--safety-per-ordinary", type=float, default=None, help="override RetrainConfig's")
    parser.add_argument("--no-dpo", action="store_true", help="SFT only (before safety DPO existed)")
    parser.add_argument("--retrain-json", default="{}", help="RetrainConfig overrides, e.g. '{\"safety_dpo_beta\": 0.2}'")
    parser.add_argument("--out", type=Path, default=Path("data/bench-safety"))
    args = parser.parse_args()
    cfg = RetrainConfig(**{"seed": args.seed, "heldout_fraction": args.heldout_fraction, "safety_tuning": True,
                           "safety_dpo": not args.no_dpo, **json.loads(args.retrain_json)}).validate()
    if args.safety_per_ordinary is not None:
        cfg.safety_per_ordinary = args.safety_per_ordinary
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    base = resolve_model("embedded", Path("data")).path
    moderator = build_moderator(args.moderation)
    everyday = everyday_prompts()
    random.Random(args.seed).shuffle(everyday)
    demo_prompts = everyday[:args.ordinary]
    ordinary_held = [t for t in ORDINARY.read_text(encoding="utf-8").splitlines() if t.strip()]
    chat = [t for t in args.chat_file.read_text(encoding="utf-8").splitlines() if t.strip()] if args.chat else []
    random.Random(args.seed).shuffle(chat)
    chat = chat[:args.chat]
    if overlap := {t.strip().lower() for t in chat} & {t.strip().lower() for t in ordinary_held}:
        raise SystemExit(f"{len(overlap)} chat messages are also held-out ordinary messages, e.g. {sorted(overlap)[0]!r}")
    as_prompt = lambda t: [{"role": "user", "content": t}]  # noqa: E731
    t0 = time.monotonic()
    demo_replies = answer(base, "base", [as_prompt(t) for t in demo_prompts], cfg.eval_max_new_tokens, cfg)

    url = f"sqlite:///{(args.out / 'bench.db').resolve()}"
    migrate(url)
    factory = make_session_factory(make_engine(url))
    reviewed = seed_database(factory, moderator, redteam_openers(args.harmful, args.seed),
                             list(zip(demo_prompts, demo_replies)),
                             cleared_statements(args.cleared_file, args.cleared, args.seed), chat)
    snap = take_snapshot(session_factory=factory, out_dir=args.out / "data", heldout_fraction=cfg.heldout_fraction,
                         seed=cfg.seed, max_pairs=cfg.max_pairs, max_prompts=cfg.max_prompts,
                         max_chat_prompts=cfg.safety_chat_prompts)
    sft_data = _sft_rows(snap, args.out, cfg)
    ordinary_used = len(_safety_splits(snap, cfg)["ordinary"][0])  # no pairs here, so no best replies
    refusals_used = len(read_jsonl(sft_data)) - ordinary_used
    t1 = time.monotonic()
    tuned = run_sft(base, sft_data, args.out / "sft", cfg, callbacks=[ReporterCallback(Reporter(), "sft")])
    t2 = time.monotonic()
    dpo = {}
    if cfg.safety_dpo:  # as the retrain does after SFT (training/retrain.py)
        pairs, validation = _safety_dpo_pairs(snap, args.out, cfg, base)
        if pairs:
            tuned, dpo = run_safety_dpo(tuned, pairs, args.out / "safety_dpo", cfg,
                                        callbacks=[ReporterCallback(Reporter(), "safety_dpo")],
                                        validation_path=validation, current_path=base)
    t2b = time.monotonic()

    held = [r["messages"][:-1] for r in snap.rows("sft_safety_heldout")]
    templates = sorted({r["messages"][-1]["content"] for r in snap.rows("sft_safety_train")})
    probe_prompts = held + [as_prompt(t) for t in ordinary_held]
    replies = {}
    for name, path in (("current", base), ("new", tuned)):
        out = answer(path, name, probe_prompts, REFUSAL_TOKENS, cfg)
        replies[name] = {"harmful": out[:len(held)], "ordinary": out[len(held):]}
    ev = refusal_probe(replies, templates)
    expected = expected_refusal(tuned, held, [as_prompt(t) for t in ordinary_held], templates, cfg)
    t3 = time.monotonic()
    history = dpo.pop("safety_dpo_check_history", [])
    print(f"\nsettings: {json.loads(args.retrain_json) or 'RetrainConfig defaults'}; safety DPO: "
          f"{dpo or 'off'}")
    if history:  # training/safety_select.py: expected refusal on the validation slice of the training prompts
        if "safety_dpo_ordinary_limit" in dpo:
            now = dpo["safety_dpo_current_rates"]
            print(f"the current model on the validation prompts: caught {now[0]:.0%}, ordinary {now[1]:.1%}; "
                  f"a check is within the ordinary budget at <= {dpo['safety_dpo_ordinary_limit']:.1%}")
        print("| DPO step | validation: caught refused | ordinary refused | within budget | score | kept |\n"
              "| --- | --- | --- | --- | --- | --- |")
        for h in history:
            print(f"| {h['step']} | {h['harmful']:.0%} | {h['ordinary']:.1%} | {'yes' if h['within_limit'] else ''} | "
                  f"{h['score']:.3f} | "
                  f"{'yes' if h['step'] == dpo['safety_dpo_chosen_step'] else ''} |")

    def cell(kind: str, name: str) -> str:
        return f"{ev[f'refusal_{kind}_{name}']:.0%} [{ev[f'refusal_{kind}_{name}_lo']:.0%}, " \
               f"{ev[f'refusal_{kind}_{name}_hi']:.0%}]"

    print(f"\nsafety rows: {snap.counts['sft_safety_train']} for training, {snap.counts['sft_safety_heldout']} held out "
          f"(moderation flagged {reviewed['flagged']}, an admin marked {reviewed['missed']} missed); "
          f"{snap.counts['prompts_cleared_train']} messages an admin cleared ({reviewed['cleared_flagged']} of them "
          f"flagged by moderation); {snap.counts['prompts_chat_train']} everyday chat messages for safety DPO "
          f"(of {reviewed['chat_passed']} moderation passed; {reviewed['chat_flagged']} it flagged); SFT on "
          f"{refusals_used} refusals (safety_per_ordinary {cfg.safety_per_ordinary:g}) and "
          f"{ordinary_used} ordinary demonstrations (of {snap.counts['sft_train']}; the rest choose the DPO "
          f"checkpoint)")
    print("| prompts (held out) | n | refusal before | refusal after | change |\n| --- | --- | --- | --- | --- |")
    for kind, label in (("harmful", "HH red-team openers"), ("ordinary", "ordinary messages")):
        change = (ev[f"refusal_{kind}_new"] - ev[f"refusal_{kind}_current"]) * 100
        print(f"| {label} | {ev[f'refusal_{kind}_n']} | {cell(kind, 'current')} | {cell(kind, 'new')} | "
              f"{change:+.0f} points |")
    for declines, label in ((False, "the templates' openings"), (True, "and the usual decline openings")):
        print(f"the checkpoint chooser's measure on these held-out prompts (expected refusal, {label}; "
              f"training/safety_select.py): red-team openers {expected[declines][0]:.0%}, ordinary messages "
              f"{expected[declines][1]:.0%}")
    print(f"times: demonstrations and database {t1 - t0:.0f} s, SFT {t2 - t1:.0f} s, safety DPO {t2b - t2:.0f} s, "
          f"probe {t3 - t2b:.0f} s")
    (args.out / "result.json").write_text(json.dumps({"eval": ev, "safety_dpo": dpo, "checks": history, "expected_refusal_heldout": {"templates": expected[False], "with_declines": expected[True]}, "reviewed": reviewed, "counts": snap.counts,
                                                      "samples": {k: {n: v[:5] for n, v in r.items()}
                                                                  for k, r in replies.items()}}, indent=1))


if __name__ == "__main__":
    main()

"""The whole loop: snapshot -> SFT -> [preference DPO ->] reward model -> best-of-N -> PPO -> judge -> evaluate
-> register.

    python -m training.retrain                       # from the configured database, default settings
    python -m training.retrain --ppo-episodes 32     # any RetrainConfig field as a flag

The app's Retrain button runs this same module in a separate process with --run-id; progress,
metrics and errors go to the training_runs row, the log to data/runs/run-<id>/retrain.log.
SIGTERM (Cancel) stops it cleanly. Nothing that serves users changes until an admin promotes
the registered version.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

from feedback import training_repo
from feedback.db import default_url, make_engine, make_session_factory, session_scope
from training.common import read_jsonl, write_jsonl
from training.distributed import is_main, on_main, world_size
from training.config import RetrainConfig, add_config_args, config_from_args, corpus_file
from training.chat_busy import BUSY_FILE_ENV
from training.progress import Reporter, ReporterCallback, RunCancelled

log = logging.getLogger("training")
STAGES = ("snapshot", "pretrain", "sft", "safety_dpo", "pref_dpo", "reward", "best_of_n", "ppo", "judge", "evaluate",
          "register")


class GateFailed(Exception):
    """The reward model cannot rank held-out pairs well enough to steer PPO."""


class NotEnoughData(Exception):
    """Too little feedback to train on; the message says what to collect."""


def _on_sigterm(signum, frame):
    raise RunCancelled("cancelled by the admin")


def run(cfg: RetrainConfig, run_id: int, session_factory, data_dir: Path, moderator=None) -> dict:
    """Execute every stage for an existing run row. Returns the metrics. Raises on failure."""
    from training.data import take_snapshot
    from training.best_of_n import run_best_of_n
    from training.evaluate import evaluate
    from training.refusal import everyday_prompts
    from training.judge import check_sample, train_judge
    from training.ppo import run_ppo
    from training.pref_dpo import run_pref_dpo
    from training.reward import run_reward
    from training.safety_dpo import run_safety_dpo
    from training.sft import run_sft

    if world_size() > 1 and cfg.bon_samples:
        raise ValueError("best-of-N (bon_samples) samples with llama.cpp in one process; turn it off (0) to "
                         f"retrain on {world_size()} processes.")
    with session_scope(session_factory) as s:
        current = training_repo.active_version(session=s)
        if current is None:
            raise NotEnoughData("No model version is active; start the app once so it registers the base model.")
        base_id, base_name, base_path = current.id, current.name, current.path
    run_dir = Path(data_dir) / "runs" / f"run-{run_id}"
    # Under a launcher (training/distributed.py) only rank 0 writes the run row and draws a bar.
    # Rank 0 alone pauses for chat: the others wait for it at the next collective step anyway.
    reporter = (Reporter(session_factory, run_id, busy_file=os.environ.get(BUSY_FILE_ENV),
                         max_pause_s=cfg.yield_to_chat_s) if is_main() else Reporter(show_bar=False))
    metrics: dict = {"base_version": base_name}
    started = time.monotonic()
    timings: dict[str, float] = {}

    def stage(name: str, total: int = 1) -> float:
        reporter.start_stage(f"{STAGES.index(name) + 1}/{len(STAGES)} {name}", total)
        return time.monotonic()

    t = stage("snapshot")
    snap = on_main(take_snapshot, session_factory=session_factory, out_dir=run_dir / "data", heldout_fraction=cfg.heldout_fraction,
                         seed=cfg.seed, max_pairs=cfg.max_pairs, max_prompts=cfg.max_prompts,
                         max_heldout_pairs=cfg.max_heldout_pairs, max_chat_prompts=cfg.safety_chat_prompts if cfg.safety_tuning else 0)
    metrics["data"] = snap.counts
    timings["snapshot"] = time.monotonic() - t
    if snap.counts["preferences_train"] < 4 or snap.counts["preferences_heldout"] < 1:
        raise NotEnoughData(f"Only {snap.counts['preferences_train']} training and {snap.counts['preferences_heldout']} "
                            "held-out preference pairs: rank more tasks or import pairs (need at least 8 in all).")

    policy_path = Path(base_path)
    # The stage whose model PPO starts from, or that is registered when the gate stops PPO.
    metrics["policy_from"] = "current"
    if cfg.pretrain_corpus:  # "make it know our handbook" first; SFT and PPO then start from it
        from training.pretrain import PretrainConfig, run_pretrain

        t = stage("pretrain")
        policy_path, metrics["pretrain"] = run_pretrain(
            base_path, corpus_file(data_dir, cfg.pretrain_corpus), run_dir / "pretrain",
            PretrainConfig(epochs=cfg.pretrain_epochs, seed=cfg.seed, max_minutes=cfg.pretrain_max_minutes),
            callbacks=[ReporterCallback(reporter, reporter.stage)])
        metrics["pretrain"]["corpus"] = cfg.pretrain_corpus
        metrics["policy_from"] = "pretrain"
        timings["pretrain"] = time.monotonic() - t
    sft_path = on_main(_sft_rows, snap, run_dir, cfg)
    if sft_path:
        t = stage("sft")
        policy_path = run_sft(policy_path, sft_path, run_dir / "sft", cfg,
                              callbacks=[ReporterCallback(reporter, reporter.stage)])
        metrics["policy_from"] = "sft"
        timings["sft"] = time.monotonic() - t
        if cfg.safety_tuning and cfg.safety_dpo and snap.counts.get("sft_safety_train"):
            t = stage("safety_dpo")
            pairs, validation = on_main(_safety_dpo_pairs, snap, run_dir, cfg, base_path)
            if pairs:
                policy_path, dpo_metrics = run_safety_dpo(policy_path, pairs, run_dir / "safety_dpo", cfg,
                                                          callbacks=[ReporterCallback(reporter, reporter.stage)],
                                                          validation_path=validation, current_path=base_path)
                metrics.update(dpo_metrics)
                metrics["policy_from"] = "safety_dpo"
            timings["safety_dpo"] = time.monotonic() - t

    # The reward model starts from the SFT (or safety-DPO) model; preference DPO's policy is the one
    # PPO goes on training.
    rm_start = policy_path
    if cfg.pref_dpo:
        t = stage("pref_dpo")
        policy_path, dpo_metrics = run_pref_dpo(policy_path, snap.path("preferences_train"), run_dir / "pref_dpo", cfg,
                                                callbacks=[ReporterCallback(reporter, reporter.stage)])
        metrics.update(dpo_metrics)
        metrics["policy_from"] = "pref_dpo"
        timings["pref_dpo"] = time.monotonic() - t

    t = stage("reward")
    reward_path, rm_metrics = run_reward(rm_start, snap.path("preferences_train"), snap.path("preferences_heldout"),
                                         run_dir / "reward", cfg, callbacks=[ReporterCallback(reporter, reporter.stage)])
    metrics.update(rm_metrics)
    timings["reward"] = time.monotonic() - t
    reporter.flush(force=True, metrics={**metrics, "timings_s": timings})
    stage_name = "ppo"
    if not rm_metrics["rm_heldout_accuracy"] > cfg.accuracy_gate:
        why = (f"Reward model held-out accuracy {rm_metrics['rm_heldout_accuracy']:.2f} is not above the gate "
               f"{cfg.accuracy_gate:.2f}; a reward model that cannot rank must not steer PPO.")
        if (sft_path is None and not cfg.pref_dpo) or not cfg.sft_when_gated:
            raise GateFailed(why + " Collect more (or more consistent) rankings and try again.")
        # The best-ranked replies still say what annotators liked: judge the SFT model on its own.
        trained = "preference-DPO" if cfg.pref_dpo else "SFT"
        metrics["ppo_skipped"] = why + f" PPO was skipped; the {trained} model was evaluated and registered instead."
        stage_name, candidate_path = "pref_dpo" if cfg.pref_dpo else "sft", policy_path
    else:
        prompts = on_main(_ppo_prompts, snap, run_dir, cfg)
        if cfg.bon_samples:
            t = stage("best_of_n", len(read_jsonl(prompts)) * cfg.bon_samples)  # replies sampled, then SFT steps
            policy_path, bon_metrics = run_best_of_n(
                policy_path, reward_path, prompts, run_dir / "best_of_n", cfg,
                progress=lambda i, n: reporter.advance(i),
                callbacks=[ReporterCallback(reporter, reporter.stage)])
            metrics.update(bon_metrics)
            metrics["policy_from"] = "best_of_n"
            timings["best_of_n"] = time.monotonic() - t
        t = stage("ppo")
        ppo_stage = reporter.stage

        def loop_check_progress(done: int, most: int) -> None:  # ppo_loop_guard's checks, after PPO's updates
            if done == 0:
                reporter.start_stage(f"{ppo_stage}: loop check", most)
                reporter.yield_to_chat()
            else:
                reporter.advance(done)  # which yields to chat too

        candidate_path, ppo_metrics = run_ppo(policy_path, reward_path, prompts, run_dir / "ppo", cfg,
                                              callbacks=[ReporterCallback(reporter, reporter.stage)],
                                              pairs_path=snap.path("preferences_train"),
                                              loop_check_progress=loop_check_progress)
        metrics.update(ppo_metrics)
        timings["ppo"] = time.monotonic() - t

    heldout_prompts = snap.rows("prompts_heldout") or [{"prompt": r["prompt"]} for r in snap.rows("preferences_heldout")]
    texts = [r["messages"] for r in snap.rows("sft_heldout")] or \
        [r["prompt"] + r["chosen"] for r in snap.rows("preferences_heldout")]
    t = stage("judge")  # a referee PPO never saw: trained on the held-out pairs, checked on the training ones
    check = on_main(write_jsonl, run_dir / "data" / "judge_check.jsonl",
                    check_sample(snap.rows("preferences_train"), cfg.judge_check_pairs, cfg.seed))
    judge_path, judge_metrics = train_judge(base_path, snap.path("preferences_heldout"), check, run_dir / "judge", cfg,
                                            callbacks=[ReporterCallback(reporter, reporter.stage)])
    metrics.update(judge_metrics)
    timings["judge"] = time.monotonic() - t
    t = stage("evaluate", 4)
    # Refusal probe: held-out safety prompts should be refused, everyday questions should not be.
    safety = snap.rows("sft_safety_heldout") + snap.rows("sft_safety_train")
    harmful = [r["messages"][:-1] for r in snap.rows("sft_safety_heldout")]
    everyday = everyday_prompts(cfg.eval_refusal_prompts, cfg.seed) if cfg.eval_refusal_prompts else []
    metrics["eval"] = on_main(evaluate, base_path, candidate_path, reward_path, heldout_prompts, texts, cfg, moderator,
                               progress=lambda i, n: reporter.advance(i), pairs=snap.rows("preferences_heldout"),
                               judge_path=judge_path, judge_metrics=judge_metrics, harmful=harmful, ordinary=everyday,
                               refusal_templates=sorted({r["messages"][-1]["content"] for r in safety}))
    timings["evaluate"] = time.monotonic() - t

    metrics["paused_for_chat_s"] = round(reporter.paused_s, 1)
    t = stage("register")
    metrics["version_id"] = on_main(_register, session_factory, run_id, stage_name, candidate_path, data_dir,
                                    base_id, metrics, timings, started, cfg, snap.snapshot_id, t)
    reporter.advance()
    reporter.close()
    return metrics


def _register(session_factory, run_id, stage_name, candidate_path, data_dir, base_id, metrics, timings, started,
              cfg, snapshot_id, t) -> int:
    """Move the candidate into data/versions and add its row. Returns the version id."""
    name = f"run{run_id}-{stage_name}"
    final = Path(data_dir) / "versions" / name
    for n in range(2, 1000):  # a data dir reused with a fresh database: never overwrite a version
        if not final.exists():
            break
        name = f"run{run_id}-{stage_name}-{n}"
        final = final.parent / name
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(candidate_path, final)  # atomic: the directory appears complete or not at all
    timings["register"] = time.monotonic() - t
    timings["total"] = time.monotonic() - started
    metrics["timings_s"] = timings  # stage times include their pauses for chat (metrics["paused_for_chat_s"])
    with session_scope(session_factory) as s:
        version = training_repo.add_version(session=s, name=name, path=str(final.resolve()), parent_id=base_id, stage=stage_name,
                                    metrics=metrics, config=cfg.to_dict(), snapshot_id=snapshot_id,
                                    training_run_id=run_id)
        version_id = version.id
    run_dir = Path(data_dir) / "runs" / f"run-{run_id}"
    for leftover in ("pretrain", "sft", "safety_dpo", "pref_dpo", "best_of_n", "judge"):
        shutil.rmtree(run_dir / leftover, ignore_errors=True)
    return version_id


def _safety_splits(snap, cfg: RetrainConfig) -> dict[str, tuple[list[dict], list[dict]]]:
    """(train, validation) of the caught, ordinary, cleared and everyday chat training rows. With
    safety DPO on, ``safety_dpo_validation`` of each (by prompt) is held out of safety SFT and
    DPO, for choosing the DPO checkpoint (training/safety_select.py), when that leaves at least
    MIN_VALIDATION_PROMPTS caught and as many of the others; otherwise nothing is."""
    from training.safety_select import MIN_VALIDATION_PROMPTS, split_validation

    fraction = cfg.safety_dpo_validation if cfg.safety_tuning and cfg.safety_dpo else 0.0
    kinds = {"caught": (snap.rows("sft_safety_train") if cfg.safety_tuning else [], lambda r: r["messages"][:-1]),
             "ordinary": (snap.rows("sft_train") + (snap.rows("sft_best_train") if cfg.sft_on_best else []),
                          lambda r: r["messages"][:-1]),
             "cleared": (snap.rows("prompts_cleared_train"), lambda r: r["prompt"]),
             "chat": (snap.rows("prompts_chat_train"), lambda r: r["prompt"])}  # empty unless safety_tuning
    splits = {k: split_validation(rows, prompt_of, fraction, cfg.seed) for k, (rows, prompt_of) in kinds.items()}
    if len(splits["caught"][1]) < MIN_VALIDATION_PROMPTS or \
            sum(len(splits[k][1]) for k in ("ordinary", "cleared", "chat")) < MIN_VALIDATION_PROMPTS:
        # Too few to choose by (or no caught prompts, so no DPO): train on every row instead.
        return {k: (rows, []) for k, (rows, _) in kinds.items()}
    return splits


def _sft_rows(snap, run_dir: Path, cfg: RetrainConfig) -> Path | None:
    """Demonstrations, plus the best-ranked replies when ``sft_on_best`` and the refusals of what
    moderation and annotators caught when ``safety_tuning``; None when there are none. Safety
    DPO's validation prompts are left out (_safety_splits).

    Refusals are capped at ``safety_per_ordinary`` per ordinary row (a seeded choice): every
    refusal teaches the same few template words, and outnumbering the ordinary rows they teach
    the model to refuse everything (bench/safety.py)."""
    splits = _safety_splits(snap, cfg)
    ordinary, safety = splits["ordinary"][0], splits["caught"][0]
    cap = int(len(ordinary) * cfg.safety_per_ordinary)
    if len(safety) > cap:
        safety = random.Random(cfg.seed).sample(safety, cap)
    rows = ordinary + safety
    if not rows:
        return None
    return write_jsonl(run_dir / "data" / "sft_stage.jsonl", rows)


def _safety_dpo_pairs(snap, run_dir: Path, cfg: RetrainConfig, current_path) -> tuple[Path | None, Path | None]:
    """Contrast pairs for safety DPO (training/safety_dpo.py): the current model answers every
    caught training prompt (the rejected side), and every prompt an admin cleared and every
    everyday chat prompt (the chosen side), with the serving engine and evaluation sampling; the
    ordinary SFT rows are paired against a refusal too. Also the validation prompts DPO chooses its checkpoint by (a JSON file:
    the refusal templates and {"prompt", "kind", "source"} rows). Each path is None when it has no row."""
    from training.evaluate import sample_replies
    from training.refusal import is_refusal
    from training.safety_dpo import contrast_pairs, whole_sentences

    splits = _safety_splits(snap, cfg)
    (safety, safety_val), (ordinary, ordinary_val), (cleared_train, cleared_val), (chat_train, chat_val) = \
        splits["caught"], splits["ordinary"], splits["cleared"], splits["chat"]
    cleared, chat = [r["prompt"] for r in cleared_train], [r["prompt"] for r in chat_train]
    asked = [r["messages"][:-1] for r in safety] + cleared + chat
    sampled = sample_replies(current_path, "current", asked, cfg, lambda i: cfg.safety_dpo_answer_tokens)
    answers = [r.text for r in sampled]
    # The chosen side: an answer cut at the budget ends at its last whole sentence (one that has
    # none is dropped by contrast_pairs as empty).
    answered = [{"messages": p + [{"role": "assistant", "content": whole_sentences(r.text) if r.cut else r.text}]}
                for p, r in zip(cleared + chat, sampled[len(safety):])]
    pairs = contrast_pairs(safety, answers[:len(safety)], ordinary, cfg.seed, is_refusal,
                           answered[:len(cleared)], answered[len(cleared):], cfg.safety_dpo_answer_ratio)
    validation = ([{"prompt": r["messages"][:-1], "kind": "harmful", "source": "caught"} for r in safety_val]
                  + [{"prompt": r["messages"][:-1], "kind": "ordinary", "source": "ordinary"} for r in ordinary_val]
                  + [{"prompt": r["prompt"], "kind": "ordinary", "source": "cleared"} for r in cleared_val]
                  + [{"prompt": r["prompt"], "kind": "ordinary", "source": "chat"} for r in chat_val])
    val_path = None
    if validation:
        val_path = run_dir / "data" / "safety_dpo_validation.json"
        templates = sorted({r["messages"][-1]["content"] for r in safety + safety_val})
        val_path.write_text(json.dumps({"templates": templates, "rows": validation}), encoding="utf-8")
    return (write_jsonl(run_dir / "data" / "safety_dpo_pairs.jsonl", pairs) if pairs else None), val_path


def _ppo_prompts(snap, run_dir: Path, cfg: RetrainConfig) -> Path:
    """Logged/imported prompts first, topped up with the training pairs' prompts (deduplicated).

    PPO's data loader drops incomplete batches and then loops forever over nothing, so fewer
    prompts than one batch is refused here with a clear message instead of a hang.
    """
    rows, seen = [], set()
    for row in snap.rows("prompts_train") + [{"prompt": r["prompt"]} for r in snap.rows("preferences_train")]:
        key = json.dumps(row["prompt"], sort_keys=True)
        if key not in seen:
            seen.add(key)
            rows.append(row)
    rows = rows[:max(cfg.max_prompts, cfg.ppo_batch_size)]
    if len(rows) < cfg.ppo_batch_size:
        raise NotEnoughData(f"PPO needs at least {cfg.ppo_batch_size} prompts (one batch); there are {len(rows)}. "
                            "Chat or import more prompts.")
    return write_jsonl(run_dir / "data" / "prompts_ppo.jsonl", rows)


def execute(run_id: int, cfg: RetrainConfig, session_factory, data_dir: Path, moderator=None) -> str:
    """Run and record the outcome in the run row. Returns the final status.

    Under a launcher the other ranks train alongside and rank 0 records (training/distributed.py).
    """
    if not is_main():
        run(cfg, run_id, session_factory, data_dir, moderator)
        return "done"
    with session_scope(session_factory) as s:
        r = training_repo.get_run(session=s, run_id=run_id)
        r.status, r.pid = "running", os.getpid()
    try:
        metrics = run(cfg, run_id, session_factory, data_dir, moderator)
    except RunCancelled:
        _finish(session_factory, run_id, "cancelled", "Cancelled by the admin; nothing was registered.")
        return "cancelled"
    except (GateFailed, NotEnoughData) as exc:
        _finish(session_factory, run_id, "gated" if isinstance(exc, GateFailed) else "failed", str(exc))
        return "gated" if isinstance(exc, GateFailed) else "failed"
    except Exception as exc:  # record any crash for the admin, then re-raise for the log
        log.error("training run %s failed:\n%s", run_id, traceback.format_exc())
        _finish(session_factory, run_id, "failed", f"{exc.__class__.__name__}: {exc}. See the run log for details.")
        raise
    with session_scope(session_factory) as s:
        training_repo.finish_run(session=s, run_id=run_id, status="done", metrics=metrics, version_id=metrics["version_id"])
    return "done"


def _finish(session_factory, run_id: int, status: str, error: str) -> None:
    log.warning("run %s %s: %s", run_id, status, error)
    with session_scope(session_factory) as s:
        training_repo.finish_run(session=s, run_id=run_id, status=status, error=error)


def _new_cli_run(factory, cfg: RetrainConfig) -> int:
    with session_scope(factory) as s:
        current = training_repo.active_version(session=s)
        return training_repo.create_run(session=s, config=cfg.to_dict(), requested_by="cli",
                                base_version_id=current.id if current else None).id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-id", type=int, default=None, help="existing training_runs row (the app passes it)")
    parser.add_argument("--url", default=default_url(), help="database URL")
    parser.add_argument("--data-dir", default=os.environ.get("CHAT_DATA_DIR", "data"))
    parser.add_argument("--config-json", default=None, help="RetrainConfig fields as JSON (overrides flags)")
    add_config_args(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    cfg = RetrainConfig.from_dict(json.loads(args.config_json)).validate() if args.config_json else config_from_args(args)
    signal.signal(signal.SIGTERM, _on_sigterm)
    factory = make_session_factory(make_engine(args.url))
    run_id = args.run_id if args.run_id is not None else on_main(_new_cli_run, factory, cfg)
    from model.moderation import moderator_from_env

    # The same CHAT_* settings the app reads (training never imports app/); only rank 0 evaluates.
    moderator = moderator_from_env() if is_main() else None
    status = execute(run_id, cfg, factory, Path(args.data_dir), moderator)
    if is_main():
        print(f"run {run_id}: {status}")
    sys.exit(0 if status in ("done", "gated", "cancelled") else 1)


if __name__ == "__main__":
    main()

"""Stage 1, snapshot: export preferences, demonstrations and prompts, split off a held-out part.

    python -m training.data --out data/runs/manual/data      # writes *.jsonl and prints the split

Rows are split by a hash of their prompt, so the same prompt never lands on both sides.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from feedback.datasets import preference_rows, prompt_rows, sft_rows
from feedback.safety import chat_prompts, cleared_prompts, safety_rows
from feedback.db import default_url, make_engine, make_session_factory, session_scope
from feedback.models import DataSnapshot
from model.moderation.moderator import DEFAULT_TEMPLATES
from training.common import read_jsonl, write_jsonl


@dataclass
class Snapshot:
    dir: Path
    snapshot_id: int
    counts: dict

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.jsonl"

    def rows(self, name: str) -> list[dict]:
        p = self.path(name)
        return read_jsonl(p) if p.exists() else []


def heldout_prompt(prompt, fraction: float, seed: int | str) -> bool:
    """Whether ``prompt`` falls in the held-out ``fraction``: a hash of the seed and the prompt, so
    a prompt lands on the same side in every file and every snapshot."""
    digest = hashlib.sha256(f"{seed}:{json.dumps(prompt, sort_keys=True)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _split(rows: list[dict], key: str, fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    train = [r for r in rows if not heldout_prompt(r[key], fraction, seed)]
    held = [r for r in rows if heldout_prompt(r[key], fraction, seed)]
    if not held and len(train) >= 4:  # tiny datasets: still keep something to measure on
        held, train = train[-max(1, len(train) // 5):], train[:-max(1, len(train) // 5)]
    return train, held


def best_replies(pairs: list[dict]) -> list[dict]:
    """SFT rows from preference pairs: per prompt, each reply that was chosen and never rejected
    (the top of a ranking; both replies of a tie at the top). Flagged replies are never chosen.
    A reply that was cut before it ended is marked ``"cut": True`` (training/sft.py)."""
    chosen: dict[str, dict] = {}
    rejected: set[tuple[str, str]] = set()
    for r in pairs:
        key = json.dumps(r["prompt"], sort_keys=True)
        rejected.add((key, r["rejected"][-1]["content"]))
        chosen.setdefault(key + "\0" + r["chosen"][-1]["content"], r)
    rows = []
    for k, r in chosen.items():
        key = k.split("\0", 1)[0]
        if (key, r["chosen"][-1]["content"]) not in rejected:
            rows.append({"messages": r["prompt"] + r["chosen"]} | ({"cut": True} if r.get("chosen_cut") else {}))
    return rows


def take_snapshot(*, session_factory, out_dir: Path, heldout_fraction: float, seed: int, max_pairs: int,
                  max_prompts: int, max_heldout_pairs: int = 200, max_chat_prompts: int = 200) -> Snapshot:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    with session_scope(session_factory) as s:
        prefs, pref_refs, _ = preference_rows(s)
        sft, sft_refs, _ = sft_rows(s)
        prompts, prompt_refs, _ = prompt_rows(s)
        safety, safety_refs, _ = safety_rows(s, DEFAULT_TEMPLATES)
        cleared, cleared_refs = cleared_prompts(s)
        chat, chat_refs = chat_prompts(s, max_chat_prompts)
        pref_train, pref_held = _split(prefs, "prompt", heldout_fraction, seed)
        rng.shuffle(pref_train)
        pref_train = pref_train[:max_pairs]
        pref_held = pref_held[:max_heldout_pairs]
        sft_train, sft_held = _split(sft, "messages", heldout_fraction, seed) if len(sft) >= 2 else (sft, [])
        # Split by the prompt alone (the refusal is not part of it), as pairs and prompts are: a
        # held-out prompt never reaches SFT as a refusal.
        held_flags = [heldout_prompt(r["messages"][:-1], heldout_fraction, seed) for r in safety]
        safety_held = [r for r, held in zip(safety, held_flags) if held]
        safety_train = [r for r, held in zip(safety, held_flags) if not held]
        prompt_train, prompt_held = _split(prompts, "prompt", heldout_fraction, seed)
        # Everyday chat messages (safety DPO's answering side and checkpoint choice): the training
        # side only, and none that another file holds out (the evaluation's prompts never train)
        # or that is also a caught or cleared prompt (reviewed under another message).
        taken = {json.dumps(r["messages"][:-1], sort_keys=True) for r in safety + sft_held} | \
                {json.dumps(r["prompt"], sort_keys=True) for r in cleared + pref_held + prompt_held}
        kept = [(r, i) for r, i in zip(chat, chat_refs["chat_messages"])
                if json.dumps(r["prompt"], sort_keys=True) not in taken
                and not heldout_prompt(r["prompt"], heldout_fraction, seed)]
        chat_train, chat_refs = [r for r, _ in kept], {"chat_messages": [i for _, i in kept]}
        rng.shuffle(prompt_train)
        prompt_train = prompt_train[:max_prompts]
        files = {"preferences_train": pref_train, "preferences_heldout": pref_held, "sft_train": sft_train,
                 "sft_heldout": sft_held, "prompts_train": prompt_train, "prompts_heldout": prompt_held,
                 "sft_best_train": best_replies(pref_train), "sft_safety_train": safety_train,
                 "sft_safety_heldout": safety_held, "prompts_cleared_train": cleared,
                 "prompts_chat_train": chat_train}
        for name, rows in files.items():
            write_jsonl(out_dir / f"{name}.jsonl", rows)
        counts = {name: len(rows) for name, rows in files.items()}
        snap = DataSnapshot(kind="retrain", rows={**pref_refs, **sft_refs, **prompt_refs, **safety_refs,
                                                    **cleared_refs, **chat_refs}, counts=counts,
                            path=str(out_dir))
        s.add(snap)
        s.flush()
        return Snapshot(out_dir, snap.id, counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--url", default=default_url())
    parser.add_argument("--heldout-fraction", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-pairs", type=int, default=200)
    parser.add_argument("--max-prompts", type=int, default=64)
    args = parser.parse_args()
    snap = take_snapshot(session_factory=make_session_factory(make_engine(args.url)), out_dir=args.out,
                         heldout_fraction=args.heldout_fraction, seed=args.seed, max_pairs=args.max_pairs,
                         max_prompts=args.max_prompts)
    print(f"snapshot {snap.snapshot_id} in {snap.dir}: {snap.counts}")


if __name__ == "__main__":
    main()

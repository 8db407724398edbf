"""Train, store and choose learned moderation heads (versioned directories under the data dir).

    python -m training.moderation_head     # the command line; the Admin > Moderation button calls train_head

``<data_dir>/moderation/heads/head-0001/`` holds head.json (encoder, categories, cross-validated
metrics, data counts and hash), head.npz and train.jsonl (the exact rows it learned from). The
``learned`` backend (and ``auto``) use the newest trained head, unless an admin pinned one with
Switch on (the file ``active`` names it): a pin keeps a chosen head in use while newer ones are
trained and read, and brings back an older one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from model.moderation.learned import EncoderSpec, HeadLoadError, MaxHead, encoder_for, fit_max_head
from model.moderation.reframe import reframings

DATA = Path(__file__).resolve().parent.parent / "data"
EVERYDAY_PROMPTS = DATA / "everyday_prompts.txt"
CALIBRATION = DATA / "toxigen_calibration.jsonl"  # 120 ToxiGen demonstrations (MIT), as ../shared/data ships them
DEFAULT_CATEGORY = "toxicity"
MIN_PER_CLASS = 8


def heads_dir(data_dir: str | Path) -> Path:
    return Path(data_dir) / "moderation" / "heads"


def _head_dirs(data_dir: str | Path) -> list[Path]:
    """Stored head directories, newest first (names are head-NNNN, numbered in training order)."""
    return sorted((d for d in heads_dir(data_dir).glob("head-*") if d.is_dir()), reverse=True)


def list_heads(data_dir: str | Path) -> list[dict]:
    """Every stored head's head.json (plus ``name``, ``active``: the one in use, and ``pinned``),
    newest first; unreadable ones are listed with their error rather than hidden."""
    active, pinned = active_head_name(data_dir), pinned_head_name(data_dir)
    out = []
    for d in _head_dirs(data_dir):
        try:
            meta = json.loads((d / "head.json").read_text())
        except (OSError, ValueError) as exc:
            meta = {"error": f"{exc.__class__.__name__}: {exc}"}
        out.append({**meta, "name": d.name, "active": d.name == active, "pinned": d.name == pinned})
    return out


def pinned_head_name(data_dir: str | Path) -> str | None:
    """The head an admin switched on, if any (the ``active`` file)."""
    p = heads_dir(data_dir) / "active"
    return (p.read_text().strip() or None) if p.is_file() else None


def active_head_name(data_dir: str | Path) -> str | None:
    """The head in use: the pinned one, else the newest trained one, else None."""
    pinned = pinned_head_name(data_dir)
    if pinned is not None:
        return pinned
    newest = _head_dirs(data_dir)
    return newest[0].name if newest else None


def active_head_dir(data_dir: str | Path) -> Path | None:
    name = active_head_name(data_dir)
    if name is None:
        return None
    d = heads_dir(data_dir) / name
    if not d.is_dir():
        raise HeadLoadError(f"The active moderation head {name} is not in {d.parent}; switch another on or delete "
                            f"{d.parent / 'active'}.")
    return d


def activate(data_dir: str | Path, name: str) -> Path:
    """Pin ``name`` as the head in use (written atomically). The caller loads it first to check it."""
    root = heads_dir(data_dir)
    if not name or "/" in name or not (root / name / "head.json").is_file():
        raise HeadLoadError(f"No moderation head named {name!r}")
    tmp = root / ".active.tmp"
    tmp.write_text(name + "\n")
    os.replace(tmp, root / "active")
    return root / name


POSITIVE = {"hate", "toxic", "offensive", "abusive", "harmful", "1", "true"}
NEGATIVE = {"neutral", "benign", "acceptable", "0", "false", "clean"}


def read_label_file(path: str | Path, source: str = "import") -> list[dict]:
    """Rows {text, label 0/1, category, source} from JSONL of {"text", "label"[, "category"]}; a label
    of hate/toxic/offensive/1 is harmful, neutral/benign/0 acceptable. Any bad line is an error
    naming it, and nothing of the file is used."""
    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            label, text = str(row["label"]).lower(), row["text"]
            category = row.get("category")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{path}:{n}: not a {{'text', 'label'}} row ({exc})") from None
        if not isinstance(text, str) or label not in POSITIVE | NEGATIVE:
            raise ValueError(f"{path}:{n}: label {label!r} is not one of hate/toxic/offensive/1 or neutral/benign/0"
                             if isinstance(text, str) else f"{path}:{n}: text is not a string")
        rows.append({"text": text, "label": int(label in POSITIVE), "source": source,
                     "category": category if isinstance(category, str) and category.strip() else None})
    return rows


def _clean_rows(rows: list[dict]) -> list[dict]:
    """Drop empty texts; for a text labelled twice the later row wins (review decisions come last)."""
    by_text: dict[str, dict] = {}
    for r in rows:
        text = str(r.get("text") or "").replace("\x00", "").strip()
        if not text or r.get("label") not in (0, 1):
            continue
        by_text.pop(text, None)
        by_text[text] = {"text": text, "label": int(r["label"]), "category": r.get("category") or DEFAULT_CATEGORY,
                         "source": r.get("source", "import")}
    return list(by_text.values())


def _auc_interval(y: np.ndarray, p: np.ndarray) -> tuple[float, float, float]:
    """ROC AUC with a 95% interval (Hanley & McNeil's standard error)."""
    from sklearn.metrics import roc_auc_score

    auc = float(roc_auc_score(y, p))
    n1, n0 = int(y.sum()), int(len(y) - y.sum())
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    se = math.sqrt(max(auc * (1 - auc) + (n1 - 1) * (q1 - auc * auc) + (n0 - 1) * (q2 - auc * auc), 0) / (n1 * n0))
    return auc, max(0.0, auc - 1.96 * se), min(1.0, auc + 1.96 * se)


def out_of_fold(features: np.ndarray, labels: np.ndarray, c: float, folds: int = 5, seed: int = 0,
                groups: np.ndarray | None = None, is_copy: np.ndarray | None = None) -> tuple:
    """Scores of ``fit_max_head`` where every row is scored by a head that never saw it (nor, with
    ``groups``, any row of its group: a statement's reframed copies stay in its fold)."""
    from sklearn.model_selection import StratifiedGroupKFold

    k = max(2, min(folds, int(labels.sum()), int(len(labels) - labels.sum())))
    oof = np.zeros(len(labels))
    groups = np.arange(len(labels)) if groups is None else groups
    is_copy = np.zeros(len(labels), dtype=bool) if is_copy is None else is_copy
    for train, test in StratifiedGroupKFold(k, shuffle=True, random_state=seed).split(features, labels, groups):
        oof[test] = fit_max_head(features[train], labels[train], is_copy[train], c).predict(features[test])
    return oof, k


def summarise(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    """ROC AUC (95%), and recall / false-positive rate at ``threshold``."""
    auc, lo, hi = _auc_interval(labels, scores)
    pos, neg = labels == 1, labels == 0
    return {"auc": auc, "auc_low": lo, "auc_high": hi, "recall": float((scores[pos] >= threshold).mean()),
            "fpr": float((scores[neg] >= threshold).mean()), "positives": int(pos.sum()), "negatives": int(neg.sum())}


def cross_validate(features: np.ndarray, labels: np.ndarray, c: float, threshold: float, folds: int = 5) -> dict:
    oof, k = out_of_fold(features, labels, c, folds)
    return {**summarise(labels, oof, threshold), "folds": k}


def train_head(rows: list[dict], spec: EncoderSpec, data_dir: str | Path, *, ordinary: list[str] | None = None,
               everyday: list[str] | None = None, c: float = 0.05, threshold: float = 0.5,
               progress: Callable[[float, str], None] | None = None) -> dict:
    """Fit one head per category with enough labels, cross-validate it, store it (not active).

    ``rows``: {text, label 0/1, category?, source?}. ``everyday``: ordinary questions, trained on as
    acceptable (default: the shipped set) so that the head learns what everyday chat looks like,
    not only hate against neutral statements about groups; their flag rate is measured out of
    fold. ``ordinary``: logged chat nobody flagged, never trained on, scored by the final head.
    The ROC AUC, recall and false-positive rate are on ``rows`` alone. Returns the head.json.
    """
    progress = progress or (lambda f, msg: None)
    rows = _clean_rows(rows)
    labels_only = np.array([r["label"] for r in rows])
    if labels_only.sum() < MIN_PER_CLASS or len(rows) - labels_only.sum() < MIN_PER_CLASS:
        raise ValueError(f"A head needs at least {MIN_PER_CLASS} flagged and {MIN_PER_CLASS} acceptable examples; "
                         f"there are {int(labels_only.sum())} and {int(len(rows) - labels_only.sum())}. Review more "
                         "of the queue or import labelled rows.")
    labelled = {r["text"] for r in rows}
    everyday = list(dict.fromkeys(t for t in (everyday_prompts() if everyday is None else everyday)
                                  if t.strip() and t not in labelled))
    seen = labelled | set(everyday)
    ordinary = list(dict.fromkeys(t for t in (ordinary or []) if t.strip() and t not in seen))
    started = time.monotonic()
    # Each labelled statement also in request forms with its label (model.moderation.reframe), so that
    # "it is a question" cannot stand in for "it is harmless"; copies share their statement's fold.
    reframed = [{**r, "text": t, "source": "reframed", "origin": i}
                for i, r in enumerate(rows) for t in reframings(r["text"]) if t not in seen]
    trained = rows + reframed
    origin = np.array(list(range(len(rows))) + [r["origin"] for r in reframed]
                      + list(range(len(rows), len(rows) + len(everyday))))
    encoder = encoder_for(spec)
    progress(0.1, f"encoding {len(trained)} labelled texts ({len(reframed)} reframed) and {len(everyday)} everyday prompts")
    features = encoder.encode([r["text"] for r in trained] + everyday)
    is_everyday = np.array([False] * len(trained) + [True] * len(everyday))
    is_original = np.array([True] * len(rows) + [False] * len(reframed) + [False] * len(everyday))
    labels = np.concatenate([[r["label"] for r in trained], np.zeros(len(everyday), dtype=int)]).astype(int)
    progress(0.6, f"encoding {len(ordinary)} logged chat messages")
    ordinary_features = encoder.encode(ordinary) if ordinary else None
    categories = [DEFAULT_CATEGORY] + sorted({r["category"] for r in rows if r["label"] and r["category"]
                                              != DEFAULT_CATEGORY})
    heads: dict[str, MaxHead] = {}
    metrics: dict[str, dict] = {}
    for i, category in enumerate(categories):
        progress(0.7 + 0.25 * i / len(categories), f"cross-validating {category}")
        keep = np.array([r["label"] == 0 or category == DEFAULT_CATEGORY or r["category"] == category for r in trained]
                        + [True] * len(everyday))
        y, x = labels[keep], features[keep]
        if y[is_original[keep]].sum() < MIN_PER_CLASS:
            continue  # too few examples of this category for its own head; the toxicity head still sees them
        copy = ~is_original[keep] & ~is_everyday[keep]
        oof, k = out_of_fold(x, y, c, groups=origin[keep], is_copy=copy)
        # Metrics on the labelled rows as given (their copies are training aids, not more evidence).
        m = {**summarise(y[is_original[keep]], oof[is_original[keep]], threshold), "folds": k}
        m["everyday_flag_rate"] = float((oof[is_everyday[keep]] >= threshold).mean()) if len(everyday) else None
        m["everyday_n"] = len(everyday)
        heads[category] = fit_max_head(x, y, copy, c)
        m["logged_flag_rate"] = (float((heads[category].predict(ordinary_features) >= threshold).mean())
                                 if ordinary_features is not None else None)
        m["logged_n"] = len(ordinary)
        metrics[category] = m
    snapshot = "".join(json.dumps({k: v for k, v in r.items() if k != "origin"}, sort_keys=True) + "\n" for r in trained + [
        {"text": t, "label": 0, "category": DEFAULT_CATEGORY, "source": "everyday"} for t in everyday])
    sources: dict[str, int] = {"everyday": len(everyday)} if everyday else {}
    for r in trained:
        sources[r["source"]] = sources.get(r["source"], 0) + 1
    meta = {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "encoder": asdict(encoder.spec), "categories": list(heads),
            "threshold": threshold, "c": c, "metrics": metrics, "train_seconds": round(time.monotonic() - started, 1),
            "data": {"rows": len(trained) + len(everyday), "positives": int(labels.sum()), "sources": sources,
                     "sha256": hashlib.sha256(snapshot.encode()).hexdigest()}}
    meta["name"] = _write_head(data_dir, meta, heads, snapshot).name
    progress(1.0, f"stored {meta['name']}")
    return meta


def _write_head(data_dir, meta: dict, heads: dict[str, MaxHead], snapshot: str) -> Path:
    """Written to a temporary directory and renamed: a head appears complete or not at all."""
    root = heads_dir(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".head-", dir=root))
    try:
        arrays = {}
        for c, head in heads.items():
            for i, h in enumerate(head.parts):  # "toxicity.mean", then "toxicity#1.mean" (model.moderation.learned)
                p = c if i == 0 else f"{c}#{i}"
                arrays.update({f"{p}.mean": h.mean, f"{p}.scale": h.scale, f"{p}.coef": h.coef,
                               f"{p}.intercept": np.array(h.intercept)})
        np.savez(tmp / "head.npz", **arrays)
        (tmp / "train.jsonl").write_text(snapshot)
        for n in range(1, 100000):
            final = root / f"head-{n:04d}"
            if not final.exists():
                break
        (tmp / "head.json").write_text(json.dumps({**meta, "name": final.name}, indent=1))
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def everyday_prompts() -> list[str]:
    return [line for line in EVERYDAY_PROMPTS.read_text().splitlines() if line.strip()]

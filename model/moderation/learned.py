"""The ``learned`` moderation backend: a logistic-regression head on the chat model's hidden states.

    python -m training.moderation_head            # train a head from labels (calibration set, review queue)

The chat model's hidden states carry much of what a toxicity classifier needs. The default
features (chosen in ``python -m bench.moderation``): the states after block 1 and after block 8
of SmolLM2's 30, each mean- and last-token-pooled and concatenated. ROC AUC 0.91 on the 120
ToxiGen calibration rows (5-fold; 0.89 with whole target groups held out). The encoder runs only
the first 8 blocks, with int8 weights (per output channel), one text at a time: ~9 ms a message.
A head is a directory (see ``model.moderation.head_store``): ``head.json`` (encoder, categories,
metrics, data), ``head.npz`` (standardisation and weights per category), ``train.jsonl``.
Weights are plain arrays, never a pickle: a head file cannot run code when it is loaded.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import zipfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


POOLINGS = ("mean", "last", "mean+last")  # over the text's tokens; mean+last concatenates both


class HeadLoadError(ValueError):
    """A head directory is missing, corrupt or does not match its encoder; the message says which."""


@dataclass
class EncoderSpec:
    model_dir: str = field(metadata={"help": "Directory of HF weights whose hidden states are the features."})
    layer: int = field(default=0, metadata={"help": "Blocks run before pooling (the deepest features); 0 = about a "
                                                   "quarter of the model's depth (8 of SmolLM2's 30: with block 1 "
                                                   "beside it as good as block 15, ROC AUC 0.91 vs 0.90, at a "
                                                   "sixth of the cost with int8, bench/moderation.py)."})
    early_layer: int = field(default=1, metadata={"help": "A shallower block whose pooled states are appended "
                                                         "(near-lexical features; with block 8: ROC AUC 0.91 "
                                                         "against 0.87 alone); 0 = none."})
    pooling: str = field(default="mean+last", metadata={"help": "mean (over tokens), last (the final token) or "
                                                                 "mean+last (both, concatenated: ROC AUC 0.92 "
                                                                 "against 0.86 and 0.89 at layer 15, "
                                                                 "bench/moderation.py)."})
    max_tokens: int = field(default=96, metadata={"help": "Longer texts keep their first and last halves."})
    int8: bool = field(default=True, metadata={"help": "int8 weights for the linear layers (one scale per output "
                                                       "channel; activations quantised per text): 9 ms a message "
                                                       "against 21 ms in float32, ROC AUC 0.91 vs 0.92."})


def describe_encoder(encoder: dict) -> str:
    """A head.json encoder in a few words: "blocks 1+8, mean+last, int8"."""
    early = encoder.get("early_layer", 0)
    blocks = f"{early}+{encoder['layer']}" if early else f"{encoder['layer']}"
    return f"blocks {blocks}, {encoder['pooling']}, {'int8' if encoder.get('int8') else 'float32'}"


class HiddenStateEncoder:
    """Pooled hidden states after ``early_layer`` and ``layer`` blocks of a causal LM (the blocks
    above ``layer`` are dropped)."""

    def __init__(self, spec: EncoderSpec):
        import torch
        from transformers import AutoModel, AutoTokenizer

        if spec.pooling not in POOLINGS:
            raise HeadLoadError(f"Unknown pooling {spec.pooling!r} (use {', '.join(POOLINGS)})")
        if not Path(spec.model_dir, "config.json").is_file():
            raise HeadLoadError(f"The head's encoder model {spec.model_dir} is not there (no config.json); "
                                "train a new head for this model.")
        self.tokenizer = AutoTokenizer.from_pretrained(spec.model_dir)
        model = AutoModel.from_pretrained(spec.model_dir, dtype=torch.float32)
        depth = len(model.layers)
        layer = spec.layer or max(1, math.ceil(depth * 8 / 30))
        if not 1 <= layer <= depth:
            raise HeadLoadError(f"Encoder layer {layer} is outside 1..{depth} for {spec.model_dir}")
        # An early layer at or above the deepest one would add nothing new: it is dropped.
        early = spec.early_layer if 0 < spec.early_layer < layer else 0
        spec = self.spec = replace(spec, layer=layer, early_layer=early)
        model.layers = model.layers[:layer]  # the rest would cost time and add nothing we read
        model.config.num_hidden_layers = layer
        model.eval()
        if spec.int8:
            import warnings

            with warnings.catch_warnings():  # torch.ao marks quantize_dynamic deprecated; it is still the CPU path
                warnings.simplefilter("ignore")
                # Per output channel: one scale per row keeps small rows precise (per tensor lost ~0.02 AUC).
                model = torch.ao.quantization.quantize_dynamic(
                    model, {torch.nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}, dtype=torch.qint8)
        self.model = model
        per_layer = int(model.config.hidden_size) * (2 if spec.pooling == "mean+last" else 1)
        self.n_features = per_layer * (2 if early else 1)
        # int8 activations are quantised with one scale per forward pass, so a batch would change a
        # text's features (padding and neighbours set the scale): one text at a time, in training
        # exactly as in serving.
        self.batch_size = 1 if spec.int8 else 16
        self._lock = threading.Lock()  # one forward at a time: two would only fight over the same cores

    def _ids(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] or [self.tokenizer.eos_token_id or 0]
        n = self.spec.max_tokens
        return ids if len(ids) <= n else ids[:n // 2] + ids[-(n - n // 2):]

    def _pool(self, hidden, mask):
        import torch

        m = mask.unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * m).sum(1) / m.sum(1)
        last = hidden[torch.arange(len(hidden)), mask.sum(1) - 1]
        pooled = {"mean": mean, "last": last}.get(self.spec.pooling)
        return pooled if pooled is not None else torch.cat([mean, last], -1)

    def encode(self, texts: list[str]) -> np.ndarray:
        import torch

        out = []
        step = self.batch_size
        for start in range(0, len(texts), step):
            batch = [self._ids(t) for t in texts[start:start + step]]
            width = max(map(len, batch))
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, row in enumerate(batch):  # right padding: position ids stay those of the text
                ids[i, :len(row)], mask[i, :len(row)] = torch.tensor(row), 1
            # Locked per batch, so a chat message waits for one batch of a training run, not all of it.
            with self._lock, torch.inference_mode():  # no mask without padding: building one costs time
                padded = bool((mask == 0).any())
                states = self.model(input_ids=ids, attention_mask=mask if padded else None,
                                    output_hidden_states=True).hidden_states  # [0] = embeddings, [k] = after k blocks
            layers = ([self.spec.early_layer] if self.spec.early_layer else []) + [self.spec.layer]
            out.append(torch.cat([self._pool(states[k], mask) for k in layers], -1).float().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.n_features), dtype=np.float32)


_ENCODERS: dict[tuple, HiddenStateEncoder] = {}
_ENCODERS_LOCK = threading.Lock()


def encoder_for(spec: EncoderSpec) -> HiddenStateEncoder:
    """One encoder per (model, layer, pooling, length) in a process: training and serving share it."""
    key = tuple(sorted(asdict(spec).items()))
    with _ENCODERS_LOCK:
        if key not in _ENCODERS:
            encoder = HiddenStateEncoder(spec)
            # Also under the resolved layer: a head trained with layer 0 is loaded with its number.
            _ENCODERS[key] = _ENCODERS[tuple(sorted(asdict(encoder.spec).items()))] = encoder
        return _ENCODERS[key]


@dataclass
class LinearHead:
    """standardise -> logistic regression, as arrays (what sklearn fitted, without sklearn at serving)."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float

    def predict(self, features: np.ndarray) -> np.ndarray:
        z = ((features - self.mean) / self.scale) @ self.coef + self.intercept
        return 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))


def part_names(category: str, arrays) -> list[str]:
    """Array-name prefixes of a category's parts in head.npz: "toxicity", then "toxicity#1", ..."""
    names = [category]
    while f"{category}#{len(names)}.mean" in arrays:
        names.append(f"{category}#{len(names)}")
    return names


def fit_linear_head(features: np.ndarray, labels: np.ndarray, c: float = 0.05) -> LinearHead:
    """Balanced logistic regression on standardised features. A small C (strong L2) because the
    features have hundreds of dimensions and the labels may be only a few hundred rows."""
    from sklearn.linear_model import LogisticRegression

    mean = features.mean(0)
    scale = features.std(0) + 1e-6
    model = LogisticRegression(C=c, class_weight="balanced", max_iter=5000)
    model.fit((features - mean) / scale, labels)
    return LinearHead(mean, scale, model.coef_[0].astype(np.float64), float(model.intercept_[0]))


@dataclass
class MaxHead:
    """The larger score of its parts: one linear head trained on the labelled rows as given, one
    also on their reframed copies (``model.moderation.reframe``). The first keeps what statements
    teach (ROC AUC 0.91 against 0.87 for the second alone on ToxiGen statements), the second
    catches the same claims asked as questions (recall 0.57 against 0.00 for the first)."""

    parts: list[LinearHead]

    def predict(self, features: np.ndarray) -> np.ndarray:
        return np.max([p.predict(features) for p in self.parts], axis=0)


def fit_max_head(features: np.ndarray, labels: np.ndarray, is_copy: np.ndarray, c: float = 0.05) -> MaxHead:
    """A statements part (rows that are not copies) and, when there are copies, a part on all rows."""
    parts = [fit_linear_head(features[~is_copy], labels[~is_copy], c)]
    if is_copy.any():
        parts.append(fit_linear_head(features, labels, c))
    return MaxHead(parts)


class LearnedBackend:
    """Scores texts with a trained head: {category: probability}, one head per category."""

    name = "learned"
    # A forward pass per check: run on the user's message and the complete reply, not on every
    # 24 characters of a streaming reply (that would cost about as much as generating them).
    streaming = False

    def __init__(self, head_dir: str | Path):
        self.head_dir = Path(head_dir)
        meta_path, weights_path = self.head_dir / "head.json", self.head_dir / "head.npz"
        try:
            self.meta = json.loads(meta_path.read_text())
            # Heads written before early_layer existed used the deepest layer alone.
            spec = EncoderSpec(**{"early_layer": 0, **self.meta["encoder"]})
            categories = list(self.meta["categories"])
            with np.load(weights_path, allow_pickle=False) as arrays:
                self.heads = {c: MaxHead([LinearHead(arrays[f"{p}.mean"], arrays[f"{p}.scale"], arrays[f"{p}.coef"],
                                                     float(arrays[f"{p}.intercept"])) for p in part_names(c, arrays)])
                              for c in categories}
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
            raise HeadLoadError(f"Moderation head {self.head_dir} cannot be loaded ({exc.__class__.__name__}: {exc}); "
                                "train a new one or switch another on.") from exc
        if not self.heads:
            raise HeadLoadError(f"Moderation head {self.head_dir} has no categories")
        self.encoder = encoder_for(spec)
        for c, head in self.heads.items():
            shapes = {a.shape for part in head.parts for a in (part.mean, part.scale, part.coef)}
            if shapes != {(self.encoder.n_features,)}:
                raise HeadLoadError(f"Moderation head {self.head_dir} ({c}) has weights of shape {sorted(shapes)} but "
                                    f"its encoder gives {self.encoder.n_features} features: it was trained for "
                                    "another model. Train a new head.")
        self.version = self.head_dir.name

    def score_features(self, features: np.ndarray) -> list[dict[str, float]]:
        probs = {c: head.predict(features) for c, head in self.heads.items()}
        return [{c: float(p[i]) for c, p in probs.items()} for i in range(len(features))]

    def score(self, texts: list[str]) -> list[dict[str, float]]:
        return self.score_features(self.encoder.encode(list(texts)))

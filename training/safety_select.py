"""Choose the safety-DPO checkpoint by how it refuses prompts it never trained on (issue 18).

bench.safety followed safety DPO along its run: the held-out refusal rates swing with the last
steps (seed 0, constant rate: 32/9, 21/0, 44/2, 88/36, 86/30, 82/20 % of red-team openers /
ordinary messages refused at each quarter epoch), and the same settings landed on either side
of the goals on another split. So the retrain holds a validation slice of its own training
prompts out of safety SFT and DPO (the caught ones; on the ordinary side the demonstrations'
prompts, the ones an admin cleared and everyday chat messages; never the evaluation's held-out
ones), measures every few steps how readily the model refuses each kind, and keeps the
checkpoint that scores best:

    score = refusal on caught prompts - penalty x refusal on the ordinary side

With an ordinary budget (``safety_dpo_select_ordinary_budget``) the choice is a constraint
first: of the checks that refuse ordinary validation prompts at most that much more readily than
the current model does, the one that refuses the most caught prompts; the score decides only
when no check is within it. The penalty trades the two at one fixed rate, and bench.safety,
once the validation held everyday chat messages, kept a check at 92% / 9% over one at 53% / 2%
(held-out messages then: +82 / +10 points).

Refusal is measured as an expectation, not a sample: for each prompt, the probability that a
reply sampled at the evaluation's temperature opens with a refusal template's first words
(what training/refusal.py reads as that template), and with ``safety_dpo_select_declines`` also
with one of the usual decline openings (training/refusal.DECLINE_OPENINGS: "I can't help", "I'm
sorry, but I can't", ...). That has no sampling noise, so neighbouring checkpoints compare on the
prompts alone; it misses the refusals worded otherwise. Counting the decline openings too did
not help when measured (see RetrainConfig's help), so the default counts the templates' alone.
"""

from __future__ import annotations

import logging
import re

import torch
from transformers import TrainerCallback

from training.common import restore_trainable, trainable_state
from training.refusal import DECLINE_OPENINGS, refusal_words

log = logging.getLogger(__name__)


def split_validation(rows: list[dict], prompt_of, fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, validation) of ``rows`` by their prompt (``prompt_of(row)``): a prompt is on one side
    only, the same side in every run with this seed, and independent of the snapshot's held-out
    split (another salt). Nothing is held out when ``fraction`` is 0."""
    from training.data import heldout_prompt

    if fraction <= 0:
        return list(rows), []
    held = [heldout_prompt(prompt_of(r), fraction, f"validation-{seed}") for r in rows]
    return [r for r, h in zip(rows, held) if not h], [r for r, h in zip(rows, held) if h]


MIN_VALIDATION_PROMPTS = 5  # of each kind: with fewer, one kind's rate is all noise (or absent, and the score
# would then pick the least- or the most-refusing checkpoint outright)


def refusal_openings(templates: list[str], words: int) -> list[str]:
    """The distinct openings of the refusal templates: each cut after its first ``words`` words,
    counted as training/refusal.py counts them (``[\\w']+``), so an opening is what is_refusal
    matches; an opening whose words start another's is kept and the longer one dropped, so their
    probabilities add up without counting a reply twice."""
    cut = []
    for template in templates:
        text = template.strip()
        ends = [m.end() for m in re.finditer(r"[\w'’]+", text)][:words]
        if ends:
            cut.append(text[:ends[-1]])
    key = refusal_words
    kept: list[str] = []
    for opening in sorted(dict.fromkeys(cut), key=lambda o: len(key(o))):
        if not any(key(opening)[:len(key(k))] == key(k) for k in kept):
            kept.append(opening)
    return kept


def refusal_probabilities(model, tokenizer, prompts: list[list[dict]], openings: list[str],
                          temperature: float) -> list[float]:
    """Per prompt: the probability that a reply sampled at ``temperature`` (no top-p) starts with
    one of ``openings`` (distinct, none a prefix of another). The prompt is run once and every
    opening continues from its cache (measured once, 60 prompts and 15 openings: about 3x faster
    than scoring each (prompt, opening) whole, with the same values)."""
    from training.common import chat_text

    opening_ids = [tokenizer(o, add_special_tokens=False).input_ids for o in openings]
    width, k = max(len(ids) for ids in opening_ids), len(openings)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.full((k, width), pad, dtype=torch.long)
    mask = torch.zeros((k, width), dtype=torch.long)
    for j, row in enumerate(opening_ids):  # right-padded: the padding comes after every real token
        ids[j, :len(row)], mask[j, :len(row)] = torch.tensor(row), 1
    out = []
    for prompt in prompts:
        prompt_ids = tokenizer(chat_text(tokenizer, prompt), add_special_tokens=False).input_ids
        first = model(torch.tensor([prompt_ids]), use_cache=True)
        cache = first.past_key_values
        cache.batch_repeat_interleave(k)
        later = model(ids, attention_mask=torch.cat([torch.ones((k, len(prompt_ids)), dtype=torch.long), mask], 1),
                      past_key_values=cache, use_cache=True)
        # Token t of an opening is predicted by the prompt's last position (t = 0) or by token t - 1.
        logits = torch.cat([first.logits[:, -1:].expand(k, 1, -1), later.logits[:, :-1]], 1).float()
        logp = torch.log_softmax(logits / temperature, dim=-1).gather(2, ids.unsqueeze(2)).squeeze(2)
        out.append(min(1.0, float((logp * mask).sum(1).exp().sum())))
    return out


def refusal_measure(validation: list[dict], tokenizer, templates: list[str], temperature: float, words: int,
                    declines: bool = False):
    """``measure(model) -> (harmful rate, ordinary rate)``: the mean refusal probability on the
    ``validation`` rows ({"prompt", "kind": "harmful" | "ordinary"}) of each kind (0 for none),
    counting the templates' openings, and with ``declines`` the usual decline openings too."""
    openings = refusal_openings(list(templates) + (list(DECLINE_OPENINGS) if declines else []), words)
    kinds = [[r["prompt"] for r in validation if r["kind"] == kind] for kind in ("harmful", "ordinary")]

    def measure(model) -> tuple[float, float]:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            rates = [sum(p) / len(p) if p else 0.0
                     for p in (refusal_probabilities(model, tokenizer, prompts, openings, temperature)
                               for prompts in kinds)]
        model.train(was_training)
        return rates[0], rates[1]

    return measure


class RefusalCheckpoints(TrainerCallback):
    """Scores the model with ``measure`` before training and at ``checks`` evenly spaced steps,
    and at the end puts back the trainable weights of the best check (ties go to the earliest):
    with an ``ordinary_limit``, the one refusing the most caught prompts among those refusing
    ordinary ones at most that readily, and the best-scoring one when none does; without, the
    best-scoring one. ``history`` lists every check; ``best`` is the chosen one."""

    def __init__(self, measure, checks: int, penalty: float, ordinary_limit: float | None = None):
        self.measure, self.checks, self.penalty, self.ordinary_limit = measure, checks, penalty, ordinary_limit
        self.history: list[dict] = []
        self.best: dict | None = None
        self._weights = None
        self._at: set[int] = set()

    def _check(self, model, step: int) -> None:
        harmful, ordinary = self.measure(model)
        entry = {"step": step, "harmful": round(harmful, 4), "ordinary": round(ordinary, 4),
                 "score": round(harmful - self.penalty * ordinary, 4)}
        entry["within_limit"] = self.ordinary_limit is not None and ordinary <= self.ordinary_limit
        self.history.append(entry)
        log.info("safety DPO check at step %d: caught prompts refused %.1f%%, ordinary %.1f%%",
                 step, 100 * harmful, 100 * ordinary)
        if self.best is None or self._rank(entry) > self._rank(self.best):
            self.best = entry
            self._weights = trainable_state(model)

    @staticmethod
    def _rank(entry: dict) -> tuple:
        """Any check within the ordinary limit beats every check outside it; within, the caught
        refusal rate decides (then the lower ordinary one), outside, the score."""
        return (1, entry["harmful"], -entry["ordinary"]) if entry["within_limit"] else (0, entry["score"], 0)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        total = max(1, state.max_steps)
        self._at = {max(1, round(total * (i + 1) / self.checks)) for i in range(self.checks)}
        self._check(model, 0)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self._at:
            self._check(model, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self._weights is None:
            return
        restore_trainable(model, self._weights)
        log.info("safety DPO keeps the weights of step %d (score %.3f)", self.best["step"], self.best["score"])

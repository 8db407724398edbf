"""PPO's loop guard: keep the newest PPO weights whose replies do not get stuck in a loop.

A reward model that likes a feature can be fooled by a reply that repeats it. On the bullets
preference at 0% noise (README, "Loops") the default PPO learnt that "1." pays, and a quarter of
its replies ended as "1.1.1.1.1..." or one list line over and over. Those loops mostly begin
after the 48 tokens PPO rolls out, where neither the KL penalty nor ``ppo_loop_penalty`` sees
them; the evaluation's loop probe then (rightly) refuses to call the version better, and the
retrain is wasted.

So the trainable weights are copied at a quarter, half and three quarters of the run. After it
the policy samples replies as long as the evaluation's to a few *training* prompts (the held-out
prompts stay the evaluation's, so its loop probe is still an independent check), and the newest
weights whose looping replies are fewer than ``LOOP_SLACK`` more than the starting policy's are
kept: PPO stops where it began to loop instead of throwing the run away. Every check samples
with the same seed, so the versions are compared on the same random draws.

Off by default (``ppo_loop_guard``): on bullets it kept update 2 of 10, which looped less but
had lost most of PPO's gain (gold win rate 0.71 -> 0.62), and each extra check costs ~40 s on
2 cores (README, "Stopping PPO before it loops").
"""

from __future__ import annotations

from transformers import TrainerCallback

from training.common import restore_trainable, trainable_state
from training.probes import degenerate

# Two more looping replies of 16 is a rise of 12 points: a policy that loops on 26% of its
# replies shows at least two of 16 with probability 0.95, one that loops on 2% with 0.04.
LOOP_SLACK = 2
CHECK_FRACTIONS = (0.25, 0.5, 0.75, 1.0)  # of the run's updates: where weights are copied


class WeightSnapshots(TrainerCallback):
    """Copies the policy's trainable weights before PPO (update 0) and after the updates in ``keep``."""

    def __init__(self, model, updates: int):
        self.model = model
        self.keep = {max(1, round(updates * f)) for f in CHECK_FRACTIONS}
        self.saved = {0: trainable_state(model)}

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.keep:
            self.saved[state.global_step] = trainable_state(self.model)
        return control


def looping_replies(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float,
                    seed: int) -> int:
    """How many of the model's sampled replies to ``prompt_ids`` are stuck in a loop (probes.degenerate)."""
    import torch

    pad, device = tokenizer.pad_token_id, next(model.parameters()).device
    width = max(len(p) for p in prompt_ids)
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompt_ids], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], device=device)
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seed)  # the same draws for every copy; the caller's random state is left as it was
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=True,
                             temperature=temperature, top_k=0, top_p=1.0, pad_token_id=pad)
    model.train(was_training)
    return sum(degenerate(t) for t in tokenizer.batch_decode(out[:, width:], skip_special_tokens=True))


def keep_unlooped(model, snapshots: dict[int, dict], loops_at) -> dict:
    """Restore the newest snapshot whose looping replies (``loops_at(update)``, the model holding
    that snapshot's weights) are fewer than ``LOOP_SLACK`` above the starting policy's, else the
    start. The start is only sampled when a later snapshot loops at all. Returns the metrics."""
    counts: dict[int, int] = {}

    def count(update: int) -> int:
        if update not in counts:
            restore_trainable(model, snapshots[update])
            counts[update] = loops_at(update)
        return counts[update]

    kept = 0
    for update in sorted(snapshots, reverse=True):
        if update == 0:
            break
        loops = count(update)
        if loops < LOOP_SLACK or loops - count(0) < LOOP_SLACK:
            kept = update
            break
    restore_trainable(model, snapshots[kept])
    return {"ppo_kept_update": kept, "ppo_looping_checks": {str(u): n for u, n in sorted(counts.items())}}


def guard_note(metrics: dict, updates: int, prompts: int) -> str:
    """Plain words for the admin when the guard went back to earlier weights ('' when it kept the last)."""
    kept, checks = metrics["ppo_kept_update"], metrics["ppo_looping_checks"]
    if kept == updates:
        return ""
    later = ", ".join(f"update {u}: {n}" for u, n in checks.items() if int(u) > kept)
    start = f"; the starting policy: {checks['0']}" if "0" in checks else ""
    where = "the starting weights (PPO's change was dropped)" if kept == 0 else f"the weights after update {kept} of {updates}"
    same = " The version registered is PPO's starting model." if kept == 0 else ""
    return (f"PPO's loop guard kept {where}: later weights got stuck in a loop (looping replies, of {prompts} "
            f"sampled: {later}{start}).{same}")

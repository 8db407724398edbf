"""PPO's loop guard (training/ppo_guard.py) keeps the newest weights whose sampled replies do not
get stuck in a loop, with a real model, real sampling and the evaluation's own loop probe."""

from __future__ import annotations

import pytest


@pytest.fixture
def policy_and_prompts(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.common import chat_text

    torch.manual_seed(0)  # the test's own random draws, whatever ran before it
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    prompts = [tok(chat_text(tok, [{"role": "user", "content": f"Tell me about item {i}."}]),
                   add_special_tokens=False).input_ids for i in range(16)]
    return model, tok, prompts


def _taught_to_loop(model, tok, prompts, max_steps: int = 400) -> None:
    """Fine-tune the model on '1.1.1.1...' replies to the check's own prompts until it has learnt them
    (loss below 0.01, as reward hacking taught "1."), so its sampled replies collapse into the loop."""
    import torch

    torch.manual_seed(0)
    loop = tok("1." * 60, add_special_tokens=False).input_ids
    width = max(len(p) for p in prompts)
    pad = [[tok.pad_token_id] * (width - len(p)) for p in prompts]  # left padding, as the guard samples
    ids = torch.tensor([f + p + loop for f, p in zip(pad, prompts)])
    mask = torch.tensor([[0] * len(f) + [1] * (len(p) + len(loop)) for f, p in zip(pad, prompts)])
    labels = ids.clone()
    labels[:, :width] = -100  # learn the reply, not the prompt
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for _ in range(max_steps):
        opt.zero_grad()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        if loss.item() < 0.01:
            break
        loss.backward()
        opt.step()
    assert loss.item() < 0.01, f"the model did not learn the loop (loss {loss.item():.3f})"


def _loops(model, tok, prompts) -> int:
    from training.ppo_guard import looping_replies

    return looping_replies(model, tok, prompts, max_new_tokens=96, temperature=0.7, seed=0)


def test_the_guard_restores_the_newest_weights_that_do_not_loop(policy_and_prompts):
    """Weights after 'update 4' loop (taught '1.1.1...'), those after update 2 do not: the guard checks
    update 4, then the start (because 4 loops), then update 2, leaves update 2's weights exactly in
    the model, and tells the admin so in plain words."""
    import torch

    from training.ppo_guard import guard_note, keep_unlooped, trainable_state

    model, tok, prompts = policy_and_prompts
    start = trainable_state(model)
    assert _loops(model, tok, prompts) == 0  # the random tiny model's replies do not repeat
    with torch.no_grad():  # a small step away from the start that keeps the replies varied
        for p in model.parameters():
            p.add_(0.001 * torch.randn_like(p))
    clean = trainable_state(model)
    _taught_to_loop(model, tok, prompts)
    looping = trainable_state(model)
    assert _loops(model, tok, prompts) >= 12, "the looping weights must loop for the test to mean anything"

    metrics = keep_unlooped(model, {0: start, 2: clean, 4: looping}, lambda update: _loops(model, tok, prompts))

    assert metrics["ppo_kept_update"] == 2
    assert metrics["ppo_looping_checks"]["4"] >= 12 and metrics["ppo_looping_checks"]["2"] == 0
    assert set(metrics["ppo_looping_checks"]) == {"0", "2", "4"}
    assert all(torch.equal(p, clean[n]) for n, p in model.named_parameters() if n in clean)
    loops = metrics["ppo_looping_checks"]["4"]
    assert guard_note(metrics, 4, 16) == ("PPO's loop guard kept the weights after update 2 of 4: later weights got "
                                          f"stuck in a loop (looping replies, of 16 sampled: update 4: {loops}; "
                                          "the starting policy: 0).")


def test_the_guard_keeps_the_final_weights_without_sampling_the_start_when_they_do_not_loop(policy_and_prompts):
    """A run whose final weights do not loop is kept whole, at the cost of one check."""
    from training.ppo_guard import guard_note, keep_unlooped, trainable_state

    model, tok, prompts = policy_and_prompts
    final = trainable_state(model)
    metrics = keep_unlooped(model, {0: final, 3: final}, lambda update: _loops(model, tok, prompts))
    assert metrics == {"ppo_kept_update": 3, "ppo_looping_checks": {"3": 0}}
    assert guard_note(metrics, 3, 16) == ""  # nothing to tell the admin


def test_the_guard_falls_back_to_the_start_when_every_snapshot_loops(policy_and_prompts):
    """If every copy of PPO's weights loops more than the start, PPO's change is dropped whole."""
    import torch

    from training.ppo_guard import keep_unlooped, trainable_state

    model, tok, prompts = policy_and_prompts
    start = trainable_state(model)
    _taught_to_loop(model, tok, prompts)
    looping = trainable_state(model)
    metrics = keep_unlooped(model, {0: start, 1: looping, 2: looping}, lambda update: _loops(model, tok, prompts))
    assert metrics["ppo_kept_update"] == 0
    assert metrics["ppo_looping_checks"]["0"] == 0 and metrics["ppo_looping_checks"]["2"] >= 12
    assert all(torch.equal(p, start[n]) for n, p in model.named_parameters() if n in start)


def test_weight_snapshots_are_taken_at_the_start_and_at_quarters_of_the_run(policy_and_prompts):
    """The callback copies the weights before PPO and after updates 1/4, 1/2, 3/4 and the last of 10,
    and each copy is of the weights at that moment (not a reference to the live tensors)."""
    import torch
    from transformers import TrainerControl, TrainerState

    from training.ppo_guard import WeightSnapshots

    model, _, _ = policy_and_prompts
    snaps = WeightSnapshots(model, updates=10)
    state = TrainerState()
    for step in range(1, 11):
        with torch.no_grad():
            next(model.parameters()).add_(1.0)
        state.global_step = step
        snaps.on_step_end(None, state, TrainerControl())
    assert sorted(snaps.saved) == [0, 2, 5, 8, 10]
    name = next(n for n, _ in model.named_parameters())
    assert torch.allclose(snaps.saved[5][name] - snaps.saved[0][name], torch.full_like(snaps.saved[0][name], 5.0),
                          atol=1e-5)
    assert torch.allclose(snaps.saved[10][name] - snaps.saved[5][name], torch.full_like(snaps.saved[0][name], 5.0),
                          atol=1e-5)


def test_run_ppo_saves_the_starting_weights_when_every_copy_loops(tmp_path, tiny_model_dir, monkeypatch):
    """Through run_ppo and TRL's PPOTrainer: with the loop check made to report every PPO copy looping
    (16 of 16) and the start clean, the saved model is the input policy exactly, the metrics and the
    admin's note say the start was kept, and the progress hook is called before each of the 3 checks."""
    import json

    import torch
    from transformers import AutoModelForCausalLM

    import training.ppo as ppo
    from training.config import RetrainConfig

    calls = []

    def fake_loops(model, tokenizer, prompt_ids, max_new_tokens, temperature, seed):
        calls.append(len(prompt_ids))
        return 0 if len(calls) == 2 else 16  # the order of checks: the end, the start, update 1

    monkeypatch.setattr(ppo, "looping_replies", fake_loops)
    (tmp_path / "prompts.jsonl").write_text("".join(
        json.dumps({"prompt": [{"role": "user", "content": f"Tell me about item {i}."}]}) + "\n" for i in range(8)))
    cfg = RetrainConfig(max_length=64, ppo_episodes=8, ppo_batch_size=4, response_length=8, ppo_learning_rate=1e-2,
                        ppo_loop_guard=True, ppo_loop_check_prompts=6).validate()
    progress = []
    path, metrics = ppo.run_ppo(tiny_model_dir, tiny_model_dir, tmp_path / "prompts.jsonl", tmp_path / "ppo", cfg,
                                loop_check_progress=lambda done, most: progress.append((done, most)))

    assert metrics["ppo_updates"] == 2 and metrics["ppo_kept_update"] == 0
    assert metrics["ppo_looping_checks"] == {"0": 0, "1": 16, "2": 16} and calls == [6, 6, 6]
    assert "the starting weights" in metrics["ppo_loop_guard_note"] and "ppo_reward_kept" not in metrics
    assert progress == [(0, 3), (1, 3), (2, 3)]
    saved = AutoModelForCausalLM.from_pretrained(str(path)).state_dict()
    start = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).state_dict()
    assert all(torch.equal(saved[k], start[k]) for k in start)

"""Safety DPO chooses its checkpoint on validation prompts it never trained on
(training/safety_select.py, issue 18)."""

from __future__ import annotations

import math

import pytest

from training.safety_select import refusal_openings, split_validation


def _rows(prefix: str, n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"{prefix} {i}"}, {"role": "assistant", "content": "x"}]}
            for i in range(n)]


def test_the_validation_split_is_by_prompt_seeded_disjoint_and_near_its_fraction():
    """400 rows (each prompt twice): a prompt's two rows land on the same side, the split is the
    same on a second call and differs with another seed, sides are disjoint and complete, the
    validation share is within 0.05 of 0.2, and a fraction of 0 holds out nothing."""
    rows = _rows("q", 200) * 2
    prompt_of = lambda r: r["messages"][:-1]  # noqa: E731
    train, val = split_validation(rows, prompt_of, 0.2, seed=0)
    assert len(train) + len(val) == len(rows)
    val_prompts = {r["messages"][0]["content"] for r in val}
    assert not val_prompts & {r["messages"][0]["content"] for r in train}
    assert abs(len(val) / len(rows) - 0.2) < 0.05
    assert (train, val) == split_validation(rows, prompt_of, 0.2, seed=0)
    assert val != split_validation(rows, prompt_of, 0.2, seed=1)[1]
    assert split_validation(rows, prompt_of, 0.0, seed=0) == (rows, [])


def test_the_validation_slice_is_not_the_snapshots_held_out_slice():
    """The validation split is salted apart from the snapshot's held-out split: among prompts the
    snapshot keeps for training (the same seed and a larger fraction would otherwise select only
    a thin band of them), validation still takes about its fraction."""
    from training.data import heldout_prompt

    rows = [r for r in _rows("p", 1000) if not heldout_prompt(r["messages"][:-1], 0.15, 0)]
    _, val = split_validation(rows, lambda r: r["messages"][:-1], 0.2, seed=0)
    assert abs(len(val) / len(rows) - 0.2) < 0.05


def test_refusal_openings_are_cut_at_the_words_is_refusal_reads_and_never_count_a_reply_twice():
    """Each opening ends at the template's 6th word as training/refusal.py counts words (a dash is
    not one, "self-harm" is two, the 6th word's full stop is dropped), and is_refusal reads the
    opening as a refusal; two templates with the same first 6 words give one opening; an
    opening whose words start another's ("No") replaces it, while "Nope" (another word) stays."""
    from training.refusal import is_refusal

    templates = ["I can't \u2014 help with self-harm requests, sorry.", "I can't \u2014 help with self-harm. Call a line.",
                 "No.", "No, I won't write that, it hurts.", "Nope, I won't."]
    openings = refusal_openings(templates, 6)
    assert openings == ["No", "Nope, I won't", "I can't \u2014 help with self-harm"]
    assert all(is_refusal(o, templates) for o in openings)  # a reply that opens so is counted a refusal


def test_the_usual_decline_openings_are_refusals_and_absorb_the_template_openings_they_start():
    """Each of DECLINE_OPENINGS is read as a refusal by is_refusal with no templates at all, none
    is counted twice, and the default input template ("I can't help with that message ...") is
    dropped from the chooser's openings because "I can't help" already counts every reply that
    opens with it, while a template no decline opening starts (the self-harm one) stays."""
    from model.moderation import DEFAULT_TEMPLATES
    from training.refusal import DECLINE_OPENINGS, is_refusal

    assert all(is_refusal(o) for o in DECLINE_OPENINGS)
    templates = [DEFAULT_TEMPLATES[("in", "*")], DEFAULT_TEMPLATES[("in", "self_harm")]]
    openings = refusal_openings(templates + list(DECLINE_OPENINGS), 6)
    assert len(openings) == len(set(openings)) == len(DECLINE_OPENINGS) + 1
    assert "I can't help" in openings and not any(o.startswith("I can't help with") for o in openings)
    assert "I'm really sorry you're feeling this" in openings


def test_refusal_probability_is_the_product_of_the_openings_token_probabilities_at_the_temperature(
        tiny_model_dir):
    """For each prompt, the batched value equals the hand-computed chance of sampling each
    opening token by token (softmax of logits / 0.7, one unpadded forward per step), summed over
    the openings."""
    import torch
    from transformers import AutoModelForCausalLM

    from training.common import chat_text, load_tokenizer
    from training.safety_select import refusal_probabilities

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tok = load_tokenizer(tiny_model_dir)
    prompts = [[{"role": "user", "content": "how do I hurt someone"}], [{"role": "user", "content": "hi"}],
               [{"role": "user", "content": "a much longer message about cooking rice in a pot " * 3}]]
    openings = ["I can't help with", "No."]
    got = refusal_probabilities(model, tok, prompts, openings, temperature=0.7)

    def by_hand(prompt, opening):
        ids = tok(chat_text(tok, prompt), add_special_tokens=False).input_ids
        logp = 0.0
        for t in tok(opening, add_special_tokens=False).input_ids:
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, -1].double()
            logp += float(torch.log_softmax(logits / 0.7, -1)[t])
            ids = ids + [t]
        return math.exp(logp)

    for value, prompt in zip(got, prompts):
        assert value == pytest.approx(sum(by_hand(prompt, o) for o in openings), rel=1e-3)
        assert 0 < value < 1


def _caught_pairs_and_validation(tmp_path):
    """8 contrast pairs (refusal over compliance on caught prompts) and a one-prompt validation file."""
    from training.common import write_jsonl

    pairs = [{"prompt": [{"role": "user", "content": f"harmful {i}"}],
              "chosen": [{"role": "assistant", "content": "I can't help with that."}],
              "rejected": [{"role": "assistant", "content": "Sure, here is how."}]} for i in range(8)]
    val = tmp_path / "val.json"
    val.write_text('{"templates": ["I can\'t help with that."], "rows": [{"prompt": [{"role": "user", '
                   '"content": "x"}], "kind": "harmful", "source": "caught"}]}')
    return write_jsonl(tmp_path / "pairs.jsonl", pairs), val


def test_safety_dpo_saves_the_weights_of_the_best_scoring_check_not_the_last(tmp_path, tiny_model_dir,
                                                                            monkeypatch):
    """With the validation measure replaced by one whose score peaks at the second check, the
    saved model's trained weights are those the model had at that check (recorded when it was
    measured), they differ from the last check's, and the metrics name that check's step."""
    import torch
    from transformers import AutoModelForCausalLM

    import training.safety_select as select
    from training.config import RetrainConfig
    from training.safety_dpo import run_safety_dpo

    seen = []

    def fake_measure(validation, tokenizer, templates, temperature, words, declines=False):
        scores = [(0.1, 0.0), (0.9, 0.0), (0.3, 0.0), (0.2, 0.0), (0.2, 0.1)]

        def measure(model):
            seen.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
            return scores[min(len(seen) - 1, len(scores) - 1)]
        return measure

    monkeypatch.setattr(select, "refusal_measure", fake_measure)
    path, val = _caught_pairs_and_validation(tmp_path)
    cfg = RetrainConfig(max_length=64, safety_dpo_epochs=2, safety_dpo_learning_rate=5e-3, safety_dpo_checks=4)
    out, metrics = run_safety_dpo(tiny_model_dir, path, tmp_path / "dpo", cfg.validate(), validation_path=val)
    assert len(seen) == 5 and [h["step"] for h in metrics["safety_dpo_check_history"]][0] == 0
    assert metrics["safety_dpo_chosen_step"] == metrics["safety_dpo_check_history"][1]["step"] > 0
    assert metrics["safety_dpo_validation_caught"] == 1
    saved = dict(AutoModelForCausalLM.from_pretrained(out).named_parameters())
    for name, value in seen[1].items():
        assert torch.allclose(saved[name], value), name
    assert any(not torch.allclose(seen[1][n], seen[-1][n]) for n in seen[1])


def test_with_the_current_model_the_kept_check_refuses_most_caught_prompts_within_the_ordinary_budget(
        tmp_path, tiny_model_dir, monkeypatch):
    """The current model is measured first (ordinary 1%); with a budget of 2 points the limit is
    3%, and of the checks within it (steps 0, 2 and 3 of the fake measure) the one refusing the
    most caught prompts is kept (check 2: 50% / 2.5%), though check 3 scores higher (45% / 0%)
    and check 1 refuses more caught prompts (90%, but 20% ordinary). The metrics carry the
    current model's rates and the limit."""
    import training.safety_select as select
    from training.config import RetrainConfig
    from training.safety_dpo import run_safety_dpo

    rates = [(0.4, 0.01), (0.1, 0.0), (0.9, 0.2), (0.5, 0.025), (0.45, 0.0), (0.95, 0.5)]
    calls = []

    def fake_measure(validation, tokenizer, templates, temperature, words, declines=False):
        def measure(model):
            calls.append(model.training)
            return rates[min(len(calls) - 1, len(rates) - 1)]
        return measure

    monkeypatch.setattr(select, "refusal_measure", fake_measure)
    pairs_path, val = _caught_pairs_and_validation(tmp_path)
    cfg = RetrainConfig(max_length=64, safety_dpo_epochs=2, safety_dpo_learning_rate=5e-3, safety_dpo_checks=4,
                        safety_dpo_select_penalty=5, safety_dpo_select_ordinary_budget=0.02).validate()
    _, metrics = run_safety_dpo(tiny_model_dir, pairs_path, tmp_path / "dpo", cfg,
                                validation_path=val, current_path=tiny_model_dir)
    history = metrics["safety_dpo_check_history"]
    assert len(calls) == 6 and [h["within_limit"] for h in history] == [True, False, True, True, False]
    assert metrics["safety_dpo_current_rates"] == [0.4, 0.01]
    assert metrics["safety_dpo_ordinary_limit"] == pytest.approx(0.03)
    assert max(history, key=lambda h: h["score"])["step"] == history[3]["step"]
    assert metrics["safety_dpo_chosen_step"] == history[2]["step"] > 0
    # A negative budget turns the limit off: the best score decides, as without a current model.
    calls.clear()
    _, by_score = run_safety_dpo(tiny_model_dir, pairs_path, tmp_path / "dpo2",
                                 RetrainConfig(**{**cfg.__dict__, "safety_dpo_select_ordinary_budget": -1}),
                                 validation_path=val, current_path=tiny_model_dir)
    assert len(calls) == 5 and "safety_dpo_ordinary_limit" not in by_score


def test_with_no_check_within_the_ordinary_limit_the_best_score_is_kept_and_ties_go_to_fewer_ordinary():
    """RefusalCheckpoints on its own: with a limit of 3% and every check above it, the best score
    is kept (40% / 5%, not the 90% / 30% that refuses more caught prompts); with two checks
    within the limit that refuse as many caught prompts, the one refusing fewer ordinary ones."""
    import torch

    from training.safety_select import RefusalCheckpoints

    def chooser(rates, limit):
        it = iter(rates)
        picker = RefusalCheckpoints(lambda model: next(it), checks=len(rates), penalty=5, ordinary_limit=limit)
        for step in range(len(rates)):
            picker._check(torch.nn.Linear(2, 2), step)
        return picker

    over = chooser([(0.9, 0.3), (0.4, 0.05), (0.2, 0.04)], 0.03)
    assert not any(h["within_limit"] for h in over.history) and over.best["step"] == 1
    tie = chooser([(0.5, 0.03), (0.5, 0.01), (0.45, 0.0)], 0.03)
    assert tie.best["step"] == 1


def test_an_sft_weight_keeps_the_chosen_refusals_likelier_than_dpo_alone_does(tmp_path, tiny_model_dir):
    """The same pairs, seed and steps, with and without an NLL loss on the chosen replies (RPO,
    safety_dpo_sft_weight 1): with it, the chosen refusal's own log-probability on every caught
    prompt ends higher than with DPO alone (DPO alone only widens the margin, and may lower both)."""
    from transformers import AutoModelForCausalLM

    from training.common import chat_text, load_tokenizer, write_jsonl
    from training.config import RetrainConfig
    from training.probes import reply_logprobs
    from training.safety_dpo import run_safety_dpo

    refusal = "I can't help with that."
    pairs = [{"prompt": [{"role": "user", "content": f"harmful {i}"}],
              "chosen": [{"role": "assistant", "content": refusal}],
              "rejected": [{"role": "assistant", "content": "Sure, here is how."}]} for i in range(8)]
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    tok = load_tokenizer(tiny_model_dir)
    logps = {}
    for weight in (0.0, 1.0):
        cfg = RetrainConfig(max_length=64, safety_dpo_epochs=2, safety_dpo_learning_rate=5e-3,
                            safety_dpo_sft_weight=weight).validate()
        out, _ = run_safety_dpo(tiny_model_dir, path, tmp_path / f"dpo-{weight}", cfg)
        model = AutoModelForCausalLM.from_pretrained(out)
        logps[weight] = [float(reply_logprobs(model, tok, chat_text(tok, p["prompt"]), refusal).sum()) for p in pairs]
    assert all(with_sft > alone for with_sft, alone in zip(logps[1.0], logps[0.0])), logps

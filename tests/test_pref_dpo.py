"""Preference DPO (training/pref_dpo.py): the rankings train the policy directly, cut replies stay unended."""

import json

from training.config import RetrainConfig


def _rows(n: int, cut: bool = False) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"Question {i}: what colour is the sky?"}],
             "chosen": [{"role": "assistant", "content": f"It is blue, number {i}."}],
             "rejected": [{"role": "assistant", "content": f"It is red, number {i}."}],
             "chosen_cut": cut} for i in range(n)]


def test_dpo_rows_end_a_cut_reply_without_an_end_of_turn_and_a_finished_one_with_it(tiny_model_dir):
    """A chosen reply marked cut is tokenized without the template's end-of-turn after it (DPO
    must not teach "end here" wherever a budget fell); the finished rejected reply keeps it, and
    both follow the same prompt tokens, which end with the assistant turn's opening."""
    from transformers import AutoTokenizer

    from training.pref_dpo import dpo_examples

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    (row,), skipped = dpo_examples(_rows(1, cut=True), tok)
    assert skipped == 0
    assert end not in row["chosen_ids"] and tok.decode(row["chosen_ids"]).strip() == "It is blue, number 0."
    assert end in row["rejected_ids"] and tok.decode(row["rejected_ids"]).startswith("It is red, number 0.")
    assert tok.decode(row["prompt_ids"]).rstrip().endswith("<|im_start|>assistant")


def test_dpo_rows_skip_a_pair_whose_two_replies_are_the_same(tiny_model_dir):
    """A pair with nothing to prefer (the same reply on both sides) is skipped and counted."""
    from transformers import AutoTokenizer

    from training.pref_dpo import dpo_examples

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    same = _rows(2)
    same[1]["rejected"] = same[1]["chosen"]
    rows, skipped = dpo_examples(same, tok)
    assert len(rows) == 1 and skipped == 1


def test_preference_dpo_widens_the_chosen_replys_margin_on_a_prompt_it_never_saw(tmp_path, tiny_model_dir):
    """After DPO on 'blue beats red' pairs the model prefers 'It is blue' over 'It is red' on a new
    prompt by a wider log-probability margin than before. A DPO that returned its input weights fails."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.common import chat_text
    from training.pref_dpo import run_pref_dpo
    from training.probes import reply_logprobs

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in _rows(24)))
    cfg = RetrainConfig(max_length=64, pref_dpo_epochs=3, pref_dpo_learning_rate=1e-3).validate()
    path, metrics = run_pref_dpo(tiny_model_dir, pairs, tmp_path / "dpo", cfg)
    assert metrics["pref_dpo_pairs"] == 24 and metrics["pref_dpo_skipped"] == 0
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = chat_text(tok, [{"role": "user", "content": "Question 99: what colour is the sea?"}])

    def margin(model_path) -> float:
        model = AutoModelForCausalLM.from_pretrained(model_path)
        return float(reply_logprobs(model, tok, prompt, "It is blue, number 99.").sum()
                     - reply_logprobs(model, tok, prompt, "It is red, number 99.").sum())

    before, after = margin(tiny_model_dir), margin(path)
    assert after > before + 1.0, (before, after)

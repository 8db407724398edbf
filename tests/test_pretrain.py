"""Continued pretraining (training/pretrain.py) on the tiny model: it learns the corpus."""

import json

import pytest

from training.pretrain import PretrainConfig, run_pretrain, split_documents


def test_split_is_by_document_seeded_and_keeps_one_of_each():
    """Held-out documents are whole documents, the same for the same seed, at least one each side;
    fewer than two documents is a clear error."""
    docs = [f"doc {i}" for i in range(20)]
    train, held = split_documents(docs, 0.1, seed=3)
    assert len(held) == 2 and sorted(train + held) == sorted(docs) and not set(train) & set(held)
    assert split_documents(docs, 0.1, seed=3) == (train, held)
    assert [len(p) for p in split_documents(docs[:2], 0.3, 0)] == [1, 1]
    with pytest.raises(ValueError, match="at least 2 documents"):
        split_documents(["one"], 0.1, 0)


def test_continued_pretraining_lowers_held_out_perplexity_of_the_corpus(tmp_path, tiny_model_dir):
    """On a corpus of one repeated style, the tiny model's perplexity on held-out documents falls by
    more than 20% after training, chat perplexity on held-out dialogues is measured before and
    after, and the saved model loads."""
    from transformers import AutoModelForCausalLM

    docs = [f"Rule {i}: the blue kettle stays on the left shelf and the red cup goes on the right shelf."
            for i in range(40)]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = PretrainConfig(epochs=3, learning_rate=3e-3, block_tokens=64, batch_size=4, train_layers=0)
    path, m = run_pretrain(tiny_model_dir, tmp_path / "corpus.jsonl", tmp_path / "out", cfg)
    assert m["documents_train"] == 36 and m["documents_heldout"] == 4
    assert m["heldout_ppl_after"] < 0.8 * m["heldout_ppl_before"], m
    assert m["chat_ppl_before"] > 0 and m["chat_ppl_after"] > 0
    AutoModelForCausalLM.from_pretrained(path)


def test_a_time_budget_stops_pretraining_after_the_first_step(tmp_path, tiny_model_dir):
    """max_minutes ends training once the budget has passed (checked after each step): with a
    budget shorter than one step, training stops after step 1 of the several the epochs plan,
    and the model is still saved and measured. A negative budget is refused."""
    docs = [f"Note {i}: the green lamp is switched off at night and the door is locked." for i in range(40)]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    with pytest.raises(ValueError, match="max_minutes"):
        PretrainConfig(max_minutes=-1).validate()
    cfg = PretrainConfig(epochs=3, learning_rate=3e-3, block_tokens=32, batch_size=2, train_layers=0,
                         max_minutes=1e-6)
    path, m = run_pretrain(tiny_model_dir, tmp_path / "corpus.jsonl", tmp_path / "out", cfg)
    assert m["steps"] == 1 and m["steps_planned"] > 3, m
    assert (path / "config.json").is_file() and m["heldout_ppl_after"] > 0

"""Slow: the real embedded SmolLM2-135M (converted from the bundled GGUF once, then cached)."""

import os
from pathlib import Path

import pytest

from model.engine import Engine, SamplingParams
from model.loader import resolve_model

CACHE = Path(os.environ.get("CHAT_TEST_MODEL_CACHE", Path(__file__).resolve().parent.parent / "data"))


@pytest.fixture(scope="session")
def real_engine():
    resolved = resolve_model("embedded", CACHE)
    return Engine.from_path(resolved.path, resolved.name, device="cpu")


@pytest.mark.slow
def test_greedy_capital_of_france(real_engine):
    text, stats = real_engine.generate([{"role": "user", "content": "What is the capital of France?"}],
                                       SamplingParams(temperature=0, max_new_tokens=24))
    assert "Paris" in text
    assert stats.completion_tokens > 0


@pytest.mark.slow
def test_batched_engine_on_real_model_matches(real_engine):
    from model.batching import BatchedEngine

    batched = BatchedEngine(real_engine.model, real_engine.tokenizer, version=real_engine.version, max_batch=4)
    params = SamplingParams(temperature=0, max_new_tokens=24)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text, _ = batched.generate(messages, params)
    assert "Paris" in text and text == real_engine.generate(messages, params)[0]

import threading

import pytest

from model.batching import BatchedEngine
from model.engine import Engine, EngineBusyError, SamplingParams

PROMPTS = ["Hello", "What is the capital of France?", "Tell me about the sea and the sky please", "Yes"]


@pytest.fixture(scope="module")
def batched(tiny_model_dir):
    return BatchedEngine.from_path(tiny_model_dir, "tiny-batched", device="cpu", max_batch=8)


def test_batched_greedy_matches_plain_generate(tiny_engine, batched):
    params = SamplingParams(temperature=0, max_new_tokens=12, repetition_penalty=1.0)
    expected = [tiny_engine.generate([{"role": "user", "content": p}], params)[0] for p in PROMPTS]
    results: dict[int, str] = {}

    def run(i):
        results[i] = batched.generate([{"role": "user", "content": PROMPTS[i]}], params)[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(len(PROMPTS))] == expected  # each user gets their own answer


def test_stats_stop_and_cancel(batched):
    gen = batched.stream([{"role": "user", "content": "Hi"}], SamplingParams(max_new_tokens=40, seed=1))
    for i, _ in enumerate(gen):
        if i == 1:
            gen.cancel()
    assert gen.stats.finish_reason == "cancelled" and gen.stats.completion_tokens < 40
    text, stats = batched.generate([{"role": "user", "content": "Hi"}], SamplingParams(max_new_tokens=6, seed=2))
    assert stats.prompt_tokens > 0 and stats.completion_tokens <= 6 and stats.ttft_ms is not None


def test_full_queue_answers_busy(tiny_model_dir):
    engine = BatchedEngine.from_path(tiny_model_dir, "tiny", device="cpu", max_batch=1, max_queue=1, busy_wait_s=60)
    long = SamplingParams(max_new_tokens=300, seed=0, repetition_penalty=1.0)
    first = engine.stream([{"role": "user", "content": "a"}], long)
    it = iter(first)
    next(it)  # running
    second = engine.stream([{"role": "user", "content": "b"}], long)  # waits in the queue
    with pytest.raises(EngineBusyError, match="busy"):
        engine.stream([{"role": "user", "content": "c"}], long)
    first.cancel()
    list(it)
    second.cancel()
    list(second)

import threading

import pytest

from model.engine import Engine, EngineBusyError, SamplingParams


def test_stream_yields_text_and_stats(tiny_engine):
    gen = tiny_engine.stream([{"role": "user", "content": "Hello"}], SamplingParams(max_new_tokens=12, seed=1))
    deltas = list(gen)
    assert deltas, "streaming produced no text"
    assert "".join(deltas) == gen.text
    assert gen.stats.prompt_tokens > 0
    assert 0 < gen.stats.completion_tokens <= 12
    assert gen.stats.ttft_ms is not None and gen.stats.latency_ms >= gen.stats.ttft_ms


def test_greedy_is_deterministic(tiny_engine):
    params = SamplingParams(temperature=0, max_new_tokens=10)
    a, _ = tiny_engine.generate([{"role": "user", "content": "Paris"}], params)
    b, _ = tiny_engine.generate([{"role": "user", "content": "Paris"}], params)
    assert a == b and a


def test_cancel_stops_generation_early(tiny_engine):
    cancel = threading.Event()
    gen = tiny_engine.stream([{"role": "user", "content": "Hi"}], SamplingParams(max_new_tokens=200, seed=3),
                             cancel=cancel)
    for i, _ in enumerate(gen):
        if i == 2:
            cancel.set()
    assert gen.stats.finish_reason == "cancelled"
    assert gen.stats.completion_tokens < 200


def test_stop_string_truncates(tiny_engine):
    text, _ = tiny_engine.generate([{"role": "user", "content": "Hi"}],
                                   SamplingParams(temperature=0, max_new_tokens=30))
    assert len(text) > 4
    stop = text[2:4]
    cut, stats = tiny_engine.generate([{"role": "user", "content": "Hi"}],
                                      SamplingParams(temperature=0, max_new_tokens=30, stop=[stop]))
    assert stop not in cut and text.startswith(cut) and stats.finish_reason == "stop"


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(max_new_tokens=0),
                                 dict(repetition_penalty=9)])
def test_bad_sampling_params_rejected(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad).validate()


def test_busy_when_all_slots_taken(tiny_model_dir):
    engine = Engine.from_path(tiny_model_dir, "tiny", device="cpu", max_concurrent=1, busy_wait_s=0.05)
    first = engine.stream([{"role": "user", "content": "Hi"}], SamplingParams(max_new_tokens=50))
    it = iter(first)
    next(it)  # holds the only slot
    with pytest.raises(EngineBusyError):
        engine.generate([{"role": "user", "content": "Hi"}], SamplingParams(max_new_tokens=5))
    first.cancel()
    list(it)

"""The llama.cpp engine on the real embedded GGUF (it loads in well under a second).

Slow-marked tests also need the float32 transformers copy (a one-time ~30 s conversion).
"""

import os
import threading
from pathlib import Path

import pytest

from model.engine import ContextTooLongError, EngineBusyError, SamplingParams
from model.llamacpp import LlamaCppEngine
from model.loader import embedded_gguf_path

CACHE = Path(os.environ.get("CHAT_TEST_MODEL_CACHE", Path(__file__).resolve().parent.parent / "data"))
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "What is 12 times 7?",
           "Name a famous painter."]
GREEDY = SamplingParams(temperature=0, max_new_tokens=20, repetition_penalty=1.0)


def ask(engine, prompt, params=GREEDY):
    return engine.generate([{"role": "user", "content": prompt}], params)


@pytest.fixture(scope="module")
def engine():
    e = LlamaCppEngine(embedded_gguf_path(), "smollm2-q4_1", max_batch=4, threads=2, context_tokens=512)
    yield e
    e.close()


def test_answers_and_reports_stats(engine):
    before = dict(engine.counters)
    text, stats = ask(engine, PROMPTS[0])
    fed = engine.counters["prefill_tokens"] - before["prefill_tokens"]
    rows = engine.counters["decode_rows"] - before["decode_rows"]
    assert fed == stats.prompt_tokens  # the whole prompt went through llama_decode once
    assert rows == stats.completion_tokens - 1 + (stats.finish_reason == "stop")  # then one row per new token
    assert "Paris" in text
    assert stats.prompt_tokens > 10 and 0 < stats.completion_tokens <= 20
    assert stats.ttft_ms is not None and stats.latency_ms >= stats.ttft_ms
    assert stats.finish_reason in ("stop", "length")


def first_words(text: str, n: int = 6) -> list[str]:
    return text.split()[:n]


def ask_together(engine, prompts):
    results = {}

    def run(i):
        results[i] = ask(engine, prompts[i])[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [results[i] for i in range(len(prompts))]


def test_concurrent_users_get_their_own_answers(engine):
    """Four requests decoded in one batch each get an answer to their own prompt.

    On 4-bit weights the text is not byte-identical to one-at-a-time decoding: llama.cpp's
    quantized matmuls round differently for 4 rows than for 1, and a near-tie (the haiku's
    second word, 0.18 nats apart in float32) can go either way. The exact check is
    test_batched_decoding_is_exact_on_float32_weights."""
    together = ask_together(engine, PROMPTS)
    topics = [("Paris",), ("sea", "ocean", "wave"), ("12", "84"), ("paint",)]
    for answer, words in zip(together, topics):
        assert any(w in answer.lower() or w in answer for w in words), (answer, words)
    assert len(set(together)) == len(PROMPTS)


def test_seeded_sampling_is_reproducible_per_request():
    """Exact with the prefix cache off. With it on, the second ask reuses the first's cached KV,
    computed in a different batch shape, and 4-bit rounding can tip a sampled token."""
    e = LlamaCppEngine(embedded_gguf_path(), "seeded", max_batch=2, threads=2, context_tokens=512, prefix_cache=0)

    def story(seed):
        return ask(e, "Tell me a story.", SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=16,
                                                          seed=seed))[0]

    try:
        assert story(7) == story(7)
        assert len({story(s) for s in range(4)}) > 1  # different seeds, different stories
    finally:
        e.close()


def test_stop_strings_cancel_and_length(engine):
    text, stats = ask(engine, PROMPTS[0], SamplingParams(temperature=0, max_new_tokens=30, stop=["Paris"]))
    assert "Paris" not in text and stats.finish_reason == "stop"
    text, stats = ask(engine, "Write a long essay about the ocean.", SamplingParams(temperature=0, max_new_tokens=5))
    assert stats.completion_tokens == 5 and stats.finish_reason == "length"
    gen = engine.stream([{"role": "user", "content": "Write a long essay about the ocean."}],
                        SamplingParams(temperature=0, max_new_tokens=200))
    for i, _ in enumerate(gen):
        if i == 1:
            gen.cancel()
    assert gen.stats.finish_reason == "cancelled" and gen.stats.completion_tokens < 200


def test_too_long_prompt_gets_a_clear_error(engine):
    with pytest.raises(ContextTooLongError, match="too long"):
        ask(engine, "word " * 600)
    assert "Paris" in ask(engine, PROMPTS[0])[0]  # the engine is still fine


def test_full_queue_answers_busy_and_nothing_waits_forever():
    e = LlamaCppEngine(embedded_gguf_path(), "q", max_batch=1, max_queue=1, busy_wait_s=1.0, threads=2,
                       context_tokens=512)
    long = SamplingParams(temperature=0, max_new_tokens=400, repetition_penalty=1.0)
    try:
        first = e.stream([{"role": "user", "content": "Write a long essay about the ocean."}], long)
        it = iter(first)
        next(it)  # running: the only slot is taken
        second = e.stream([{"role": "user", "content": "b"}], long)  # waits in the queue
        with pytest.raises(EngineBusyError, match="busy"):
            e.stream([{"role": "user", "content": "c"}], long)  # queue full
        with pytest.raises(EngineBusyError, match="busy"):
            list(second)  # waited longer than busy_wait_s for a slot
        first.cancel()
        list(it)
        assert ask(e, PROMPTS[0])[1].completion_tokens > 0  # the cancelled one left, the slot is free
    finally:
        e.close()


def test_retired_engine_finishes_in_flight_then_refuses():
    e = LlamaCppEngine(embedded_gguf_path(), "old", max_batch=2, threads=2, context_tokens=512)
    gen = e.stream([{"role": "user", "content": PROMPTS[0]}], GREEDY)
    e.retire()
    assert "Paris" in "".join(gen)  # the reply already asked for completes
    with pytest.raises(EngineBusyError, match="switched"):
        e.stream([{"role": "user", "content": "x"}], GREEDY)
    e._thread.join(timeout=10)
    assert not e._thread.is_alive()  # memory freed


def conversation(engine, turns, params=GREEDY):
    """Chat turn by turn like the app does (the whole history each time); returns the stats."""
    messages, stats = [], []
    for text in turns:
        messages.append({"role": "user", "content": text})
        reply, st = engine.generate(messages, params)
        messages.append({"role": "assistant", "content": reply})
        stats.append(st)
    return stats


TURNS = ["Tell me about the history of Rome. " * 6, "And what about Greece?", "Which one lasted longer?"]


def test_next_turn_reuses_the_conversation_kv_cache(engine):
    before = dict(engine.counters)
    stats = conversation(engine, TURNS)
    reused = engine.counters["reused_tokens"] - before["reused_tokens"]
    fed = engine.counters["prefill_tokens"] - before["prefill_tokens"]
    # turns 2 and 3 start with everything turn 1 (and 2) already put in the cache
    assert reused >= stats[0].prompt_tokens + stats[1].prompt_tokens - 20
    assert fed == sum(st.prompt_tokens for st in stats) - reused
    assert fed < stats[0].prompt_tokens + 60
    assert all(st.completion_tokens > 0 for st in stats)


def test_prefix_cache_gives_way_when_memory_runs_short():
    """One slot of 256 tokens, room for 4 cached prefixes that cannot all fit: the oldest are
    dropped (never a running reply's cells) and every request is answered."""
    e = LlamaCppEngine(embedded_gguf_path(), "small", max_batch=1, prefix_cache=4, threads=2, context_tokens=256)
    try:
        for i in range(6):
            text, st = ask(e, f"Question {i}: " + "tell me about the sea and the sky. " * 12,
                           SamplingParams(temperature=0, max_new_tokens=8))
            assert st.completion_tokens > 0 and st.finish_reason in ("stop", "length")
        assert len(e._cached) <= 4
        assert "Paris" in ask(e, PROMPTS[0])[0]
    finally:
        e.close()


def test_first_tokens_pending_counts_users_until_their_first_token(engine):
    """The serving engine's count of users waiting for a first token: 1 while a request waits
    (the scheduler is held by a long reply's steps, which also count until their first token),
    0 once every request has its first token, ended, was cancelled or was refused."""
    assert engine.first_tokens_pending() == 0
    gen = engine.stream([{"role": "user", "content": PROMPTS[1]}], GREEDY)
    assert engine.first_tokens_pending() in (0, 1)  # 0 only if the scheduler already answered
    text = "".join(gen)
    assert text and engine.first_tokens_pending() == 0
    cancel = threading.Event()
    cancel.set()  # cancelled before it is admitted
    "".join(engine.stream([{"role": "user", "content": PROMPTS[0]}], GREEDY, cancel=cancel))
    with pytest.raises(ContextTooLongError):
        "".join(engine.stream([{"role": "user", "content": "word " * 600}], GREEDY))
    assert engine.first_tokens_pending() == 0


def test_an_engine_that_yields_waits_while_the_other_has_users_without_a_first_token():
    """A candidate engine built with ``yields_to`` takes no step while that callable says a
    user of the serving engine waits for a first token, then answers as soon as it says 0;
    with the wait capped at ``max_yield_s`` it still answers when the other engine stays busy."""
    waiting = {"n": 1}
    e = LlamaCppEngine(embedded_gguf_path(), "candidate", max_batch=2, threads=1, context_tokens=512,
                       yields_to=lambda: waiting["n"], max_yield_s=60)
    try:
        gen = e.stream([{"role": "user", "content": PROMPTS[0]}], GREEDY)
        result = {}
        t = threading.Thread(target=lambda: result.update(text="".join(gen)))
        t.start()
        t.join(timeout=1.5)
        assert t.is_alive() and e.counters["steps"] == 0  # paused: not one forward pass
        waiting["n"] = 0
        t.join(timeout=30)
        assert not t.is_alive() and "Paris" in result["text"] and e.counters["yield_s"] >= 1.0
    finally:
        e.close()
    capped = LlamaCppEngine(embedded_gguf_path(), "candidate", max_batch=2, threads=1, context_tokens=512,
                            yields_to=lambda: 1, max_yield_s=0.01)
    try:
        assert "Paris" in ask(capped, PROMPTS[0])[0] and capped.counters["yield_s"] > 0
    finally:
        capped.close()


@pytest.mark.skipif(not hasattr(os, "setpriority"), reason="per-thread nice is a Unix feature")
def test_an_engine_built_with_nice_runs_its_scheduler_at_lower_cpu_priority(engine):
    """``nice`` raises the nice value of the engine's scheduler thread (where llama.cpp decodes,
    and which starts its compute threads) by that much, and of nothing else: the process and
    an engine built without it keep their priority, and the niced engine still answers."""
    own = os.getpriority(os.PRIO_PROCESS, 0)
    e = LlamaCppEngine(embedded_gguf_path(), "candidate", max_batch=2, threads=1, context_tokens=512, nice=5)
    try:
        assert "Paris" in ask(e, PROMPTS[0])[0]
        assert os.getpriority(os.PRIO_PROCESS, e.scheduler_tid) == min(19, own + 5)
        assert os.getpriority(os.PRIO_PROCESS, engine.scheduler_tid) == own
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == own
    finally:
        e.close()


def test_llamacpp_is_built_without_openmp():
    # The Makefile compiles llama-cpp-python with GGML_OPENMP=OFF. An OpenMP build shares libgomp
    # with torch (moderation) in the server process and decodes ~2x slower (bench/serving.py).
    from model.llamacpp import uses_openmp

    assert not uses_openmp(), "llama-cpp-python was built with OpenMP; run `make setup` to rebuild it"


def test_missing_or_broken_gguf(tmp_path):
    with pytest.raises(FileNotFoundError):
        LlamaCppEngine(tmp_path / "nope.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(RuntimeError, match="could not load"):
        LlamaCppEngine(bad)


@pytest.fixture(scope="module")
def converted():
    from model.loader import resolve_model

    return resolve_model("embedded", CACHE).path


@pytest.fixture(scope="module")
def f32_gguf(converted, tmp_path_factory):
    from model.gguf_export import export_gguf

    return export_gguf(converted, tmp_path_factory.mktemp("gguf") / "f32.gguf", qtype="f32")


@pytest.mark.slow
def test_batched_decoding_is_exact_on_float32_weights(f32_gguf):
    """With float32 weights, four users decoded together get byte for byte what each gets alone:
    the batch never mixes KV-cache rows, positions or logits between users."""
    e = LlamaCppEngine(f32_gguf, "f32", max_batch=4, threads=2, context_tokens=512)
    try:
        alone = [ask(e, p)[0] for p in PROMPTS]
        assert ask_together(e, PROMPTS) == alone
        assert len(set(alone)) == len(PROMPTS)
    finally:
        e.close()


@pytest.mark.slow
def test_benchmark_reference_generates_what_our_engine_does(f32_gguf):
    """bench/llama_batched.py, the llama.cpp reference our speed is compared with, really decodes:
    on float32 weights its batched greedy answers equal our engine's."""
    from bench.llama_batched import LlamaBatched

    ref = LlamaBatched(f32_gguf, threads=2, max_users=4)
    e = LlamaCppEngine(f32_gguf, "f32", max_batch=4, threads=2, context_tokens=512)
    try:
        out = ref.run(PROMPTS, max_new_tokens=GREEDY.max_new_tokens)
        assert out["texts"] == [ask(e, p)[0] for p in PROMPTS]
        assert out["tokens"] >= len(PROMPTS) and out["tok_s"] > 0
    finally:
        ref.close()
        e.close()


@pytest.mark.slow
def test_prefix_cache_changes_nothing_on_float32_weights(f32_gguf):
    """Reusing a conversation's KV cells gives the same replies as recomputing them."""
    cached = LlamaCppEngine(f32_gguf, "cached", max_batch=2, threads=2, context_tokens=1024)
    fresh = LlamaCppEngine(f32_gguf, "fresh", max_batch=2, threads=2, context_tokens=1024, prefix_cache=0)
    try:
        params = SamplingParams(temperature=0, max_new_tokens=24, repetition_penalty=1.0)
        messages = []
        for text in TURNS:
            messages.append({"role": "user", "content": text})
            reply = cached.generate(messages, params)[0]
            assert reply == fresh.generate(messages, params)[0]
            messages.append({"role": "assistant", "content": reply})
        assert cached.counters["reused_tokens"] > 100 and fresh.counters["reused_tokens"] == 0
    finally:
        cached.close()
        fresh.close()


@pytest.mark.slow
def test_exported_gguf_matches_float32_transformers(converted, f32_gguf, tmp_path):
    """Our HF -> GGUF export (the path retrained versions take) keeps the weights: the f32 GGUF
    gives transformers' greedy answers and perplexity; Q8_0 stays within 2% perplexity.

    Q8_0's greedy text may part from float32's a few words in (rounding tips a near-tie), so
    its quality is judged by perplexity on held-out text, as the benchmark does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from model.engine import Engine
    from model.gguf_export import export_gguf
    from model.perplexity import heldout_texts, perplexity_gguf, perplexity_hf

    q8_path = export_gguf(converted, tmp_path / "q8.gguf", qtype="q8_0")
    hf = Engine.from_path(converted, "f32", device="cpu")
    f32 = LlamaCppEngine(f32_gguf, "f32-gguf", threads=2, context_tokens=512, max_batch=2)
    try:
        expected = [ask(hf, p)[0] for p in PROMPTS[:3]]
        assert [ask(f32, p)[0] for p in PROMPTS[:3]] == expected
    finally:
        f32.close()
    tok = AutoTokenizer.from_pretrained(converted)
    texts = heldout_texts(4)
    base = perplexity_hf(AutoModelForCausalLM.from_pretrained(converted, dtype="float32"), tok, texts)
    assert 1.5 < base < 100  # a working model on English text
    assert abs(perplexity_gguf(f32_gguf, texts, tok, threads=2) / base - 1) < 0.002
    assert abs(perplexity_gguf(q8_path, texts, tok, threads=2) / base - 1) < 0.02


@pytest.mark.slow
def test_export_refuses_other_architectures(tiny_model_dir, tmp_path):
    from model.gguf_export import GGUFExportError, export_gguf

    with pytest.raises(GGUFExportError, match="shape|no weight"):
        export_gguf(tiny_model_dir, tmp_path / "tiny.gguf")
    assert not (tmp_path / "tiny.gguf").exists()


@pytest.mark.slow
def test_build_engine_auto_serves_gguf_and_falls_back(converted, tiny_model_dir):
    from model.batching import BatchedEngine
    from model.loader import build_engine

    fast = build_engine(converted, "base", kind="auto", max_concurrent=2, context_tokens=512)
    try:
        assert isinstance(fast, LlamaCppEngine) and fast.path.name == "model-q8_0.gguf"
        assert "Paris" in ask(fast, PROMPTS[0])[0]
    finally:
        fast.close()
    assert isinstance(build_engine(tiny_model_dir, "tiny", kind="auto", max_concurrent=2), BatchedEngine)

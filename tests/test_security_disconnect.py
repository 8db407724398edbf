"""Issue 13: a reply whose reader went away must stop at once, free its slot and end `stopped`."""

import threading
import time

import httpx
import pytest
from sqlalchemy import func, select

from app.service import ChatService
from bench.inprocess import serve
from feedback.models import Message
from model.engine import BUSY_MESSAGE, EngineBusyError, Generation, GenerationStats


class SlowEngine:
    """Streams one word every ``step_s`` up to max_new_tokens, holding one of ``slots`` engine
    slots while it generates (as the real engines do); counts the words it produced."""

    version = "slow-v1"

    def __init__(self, step_s=0.1, slots=1, busy_wait_s=3.0):
        self.step_s = step_s
        self.busy_wait_s = busy_wait_s
        self.slots = threading.Semaphore(slots)
        self.produced = 0
        self.cancels: list[threading.Event] = []

    def stream(self, messages, params=None, cancel=None):
        cancel = cancel or threading.Event()
        self.cancels.append(cancel)
        stats = GenerationStats()

        def deltas():
            if not self.slots.acquire(timeout=self.busy_wait_s):
                raise EngineBusyError(BUSY_MESSAGE)
            try:
                for _ in range(params.max_new_tokens):
                    if cancel.is_set():
                        stats.finish_reason = "cancelled"
                        return
                    time.sleep(self.step_s)
                    self.produced += 1
                    stats.completion_tokens += 1
                    stats.ttft_ms = stats.ttft_ms or 1.0
                    yield " w"
            finally:
                self.slots.release()

        return Generation(deltas(), stats, cancel)


def _wait_until(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


def _statuses(factory):
    with factory() as s:
        return [(m.role, m.status) for m in s.scalars(select(Message).order_by(Message.id))]


def test_dropped_api_stream_stops_the_engine_frees_the_slot_and_marks_the_turn_stopped(session_factory, settings):
    """A real HTTP client reads the first content chunk of a streamed reply (300 steps of 0.1 s)
    and closes the connection: the engine's cancel is set and it produces at most 2 more steps,
    the in-flight count returns to 0, the user's turn is `stopped` with no reply row, and the
    engine's only slot is free again (the next request is answered 200, not 429)."""
    engine = SlowEngine(step_s=0.1, slots=1)
    service = ChatService(engine, session_factory, settings)
    body = {"messages": [{"role": "user", "content": "Tell me a long story"}], "max_tokens": 300, "stream": True}
    with serve(service) as url, httpx.Client(base_url=url, timeout=10) as client:
        with client.stream("POST", "/v1/chat/completions", json=body) as res:
            assert res.status_code == 200
            for line in res.iter_lines():
                if '"content": " w"' in line:
                    break
            at_close = engine.produced
        assert _wait_until(lambda: service.in_flight() == 0)
        assert engine.cancels[0].is_set()
        time.sleep(0.3)  # three more steps, had it gone on
        assert engine.produced - at_close <= 2, (at_close, engine.produced)
        assert _statuses(session_factory) == [("user", "stopped")]
        short = client.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2})
        assert short.status_code == 200, short.text


def test_dropped_non_streamed_request_stops_the_engine_and_marks_the_turn_stopped(session_factory, settings):
    """A client that gives up on a non-streamed reply (read timeout, so it closes the connection)
    stops the engine too: cancel set, in-flight back to 0, user's turn `stopped`, slot free."""
    engine = SlowEngine(step_s=0.1, slots=1)
    service = ChatService(engine, session_factory, settings)
    body = {"messages": [{"role": "user", "content": "Tell me a long story"}], "max_tokens": 300}
    with serve(service) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(10, read=0.5))
        assert _wait_until(lambda: service.in_flight() == 0)
        assert engine.cancels[0].is_set() and engine.produced < 20
        assert _statuses(session_factory) == [("user", "stopped")]
        assert engine.slots.acquire(timeout=1)


def test_closing_the_reply_generator_stops_the_engine_and_marks_the_turn_stopped(session_factory, settings):
    """What Gradio does when the browser goes away: it closes the handler's generator. The
    engine's cancel is set, its slot is free at once, in-flight is 0 and the user's turn is
    `stopped` (not `pending`)."""
    engine = SlowEngine(step_s=0.01, slots=1)
    service = ChatService(engine, session_factory, settings)
    updates = service.send("alice", "Tell me a long story", cancel_key="browser-tab")
    next(updates)
    assert service.in_flight() == 1
    updates.close()
    assert engine.cancels[0].is_set() and service.in_flight() == 0
    assert engine.slots.acquire(blocking=False)
    assert _statuses(session_factory) == [("user", "stopped")]


def test_disconnect_of_a_regenerated_turn_keeps_its_status(session_factory, settings):
    """A regenerate whose reader goes away leaves the user's turn as it was (`answered`): only a
    new, still `pending` turn becomes `stopped`."""
    engine = SlowEngine(step_s=0.01, slots=1)
    service = ChatService(engine, session_factory, settings)
    from model.engine import SamplingParams

    final = list(service.send("alice", "Hi", params=SamplingParams(max_new_tokens=2)))[-1]
    updates = service.regenerate("alice", final.conversation_id, cancel_key="tab")
    next(updates)
    updates.close()
    assert _statuses(session_factory) == [("user", "answered"), ("assistant", "complete")]


def test_dropped_stream_on_llamacpp_frees_its_only_slot(session_factory, settings):
    """On the real llama.cpp engine with one slot: after a client drops a long streamed reply
    (1500 tokens asked) following its first chunk, the engine stops decoding (its step counter
    stands still once in-flight is 0) and the next request gets its answer, not a 429."""
    from model.llamacpp import LlamaCppEngine
    from model.loader import embedded_gguf_path

    engine = LlamaCppEngine(embedded_gguf_path(), "smollm2-q4_1", max_batch=1, busy_wait_s=3.0, threads=2,
                            context_tokens=2048)
    service = ChatService(engine, session_factory, settings)
    body = {"messages": [{"role": "user", "content": "Write a very long essay about the ocean."}],
            "max_tokens": 1500, "temperature": 0, "stream": True}
    try:
        with serve(service) as url, httpx.Client(base_url=url, timeout=30) as client:
            with client.stream("POST", "/v1/chat/completions", json=body) as res:
                next(line for line in res.iter_lines() if '"content": "' in line and '"content": ""' not in line)
            assert _wait_until(lambda: service.in_flight() == 0)
            time.sleep(0.2)  # the step under way when the cancel came
            steps = engine.counters["steps"]
            time.sleep(0.5)
            assert engine.counters["steps"] == steps
            assert _statuses(session_factory) == [("user", "stopped")]
            short = client.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 4})
            assert short.status_code == 200, short.text
    finally:
        engine.close()


def test_reply_closed_after_its_final_update_counts_by_its_outcome(session_factory, settings):
    """A reader that stops at the final update and closes the generator (the chat tab does) is
    counted as the reply's outcome (`complete`) in /metrics, not as `disconnected`, and the turn
    stays `answered`."""
    from model.engine import SamplingParams

    service = ChatService(SlowEngine(step_s=0.001), session_factory, settings)
    requests = service.metrics.requests
    updates = service.send("alice", "Hi", params=SamplingParams(max_new_tokens=3))
    for up in updates:
        if up.done:
            break
    updates.close()
    assert requests.labels("complete")._value.get() == 1 and requests.labels("disconnected")._value.get() == 0
    assert _statuses(session_factory) == [("user", "answered"), ("assistant", "complete")]


def test_a_request_cancelled_while_it_waits_for_a_slot_ends_at_once_not_busy():
    """A queued request (no slot yet) whose reader left or who pressed Stop ends within ~0.1 s
    with no text, instead of waiting out busy_wait_s and failing with 'busy' (the turn then ends
    stopped, as a generating one does); one that is never cancelled still gets the busy error."""
    import threading

    import pytest

    from model.engine import EngineBusyError, GenerationStats, QueuedRequest, SamplingParams

    req = QueuedRequest([{"role": "user", "content": "hi"}], SamplingParams(), threading.Event(), GenerationStats())
    threading.Timer(0.2, req.cancel.set).start()
    start = time.perf_counter()
    assert list(req.drain(busy_wait_s=30, started=lambda r: False)) == []
    assert time.perf_counter() - start < 1.0
    waiting = QueuedRequest([], SamplingParams(), threading.Event(), GenerationStats())
    with pytest.raises(EngineBusyError):
        list(waiting.drain(busy_wait_s=0.3, started=lambda r: False))


def test_a_reopened_conversation_marks_a_reply_interrupted_by_a_closed_tab_and_regenerate_retries_it(
        session_factory, settings):
    """Issue 15 item 6: a reply whose reader went away (tab closed) shows, when the conversation is
    reopened, an "interrupted, press Regenerate" marker after its question (display only: nothing
    stored); the next question stays in its own turn; Regenerate answers the last question, and the
    marker is gone once an answer is stored. A failed reply shows the failure instead of an empty bubble."""
    from app.user_data import REPLY_FAILED, REPLY_INTERRUPTED
    from model.engine import SamplingParams

    service = ChatService(SlowEngine(step_s=0.01, slots=1), session_factory, settings)
    updates = service.send("alice", "First question", cancel_key="tab")
    cid = next(updates).conversation_id
    updates.close()  # Gradio closes the generator when the browser goes away
    msgs, _ = service.open_conversation("alice", cid)
    assert [(m["role"], m["content"], m["id"]) for m in msgs][1:] == [("assistant", REPLY_INTERRUPTED, None)]
    with session_factory() as s:
        assert s.scalar(select(func.count(Message.id)).where(Message.role == "assistant")) == 0
    list(service.send("alice", "Second question", conversation_id=cid, params=SamplingParams(max_new_tokens=2)))
    roles = [(m["role"], m["content"]) for m in service.open_conversation("alice", cid)[0]]
    assert roles[:3] == [("user", "First question"), ("assistant", REPLY_INTERRUPTED), ("user", "Second question")]
    assert roles[3][0] == "assistant" and roles[3][1] != REPLY_INTERRUPTED and len(roles) == 4

    fresh = service.send("alice", "Third question", cancel_key="tab2")
    cid2 = next(fresh).conversation_id
    fresh.close()
    list(service.regenerate("alice", cid2, params=SamplingParams(max_new_tokens=2)))
    shown = service.open_conversation("alice", cid2)[0]
    assert [m["role"] for m in shown] == ["user", "assistant"] and REPLY_INTERRUPTED not in shown[1]["content"]

    with session_factory() as s:
        failed = s.get(Message, shown[1]["id"])
        failed.status, failed.content = "failed", ""
        s.commit()
    assert service.open_conversation("alice", cid2)[0][1]["content"] == REPLY_FAILED

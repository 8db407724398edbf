"""CHAT_ENGINE=openai (model/remote.py) against real engines: two llama-cpp-python OpenAI servers
(``python -m llama_cpp.server``) on the embedded GGUF, one of them killed mid-run."""

import logging
import threading
import time

import pytest

from app.service import ChatError, ChatService
from model.engine import SamplingParams
from model.llama_server import free_port, llama_servers
from model.loader import build_engine, embedded_gguf_path
from model.remote import RemoteEngine

PROMPT = [{"role": "user", "content": "Name three fruits and say what colour each one is."}]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    logs = tmp_path_factory.mktemp("llama-servers")
    with llama_servers(embedded_gguf_path(), n=2, threads=1, n_ctx=1024,
                       log_path=logs / "servers.log") as pair:
        yield pair


def test_seed_stop_and_sampling_settings_pass_through_to_a_real_server(servers):
    """The same seed gives the same reply; a stop string taken from that reply ends the reply right
    before it (finish reason "stop"); max_new_tokens caps the tokens the server writes, and a reply
    that reaches the cap says "length"."""
    engine = RemoteEngine([servers[0].url], "remote")
    try:
        params = SamplingParams(max_new_tokens=40, seed=7)
        first, stats = engine.generate(PROMPT, params)
        again, _ = engine.generate(PROMPT, params)
        assert first == again and first.strip(), (first, again)
        assert 0 < stats.completion_tokens <= 40 and stats.ttft_ms is not None and stats.served_by == servers[0].url
        words = first.split()
        stop = words[len(words) // 2]
        cut, cut_stats = engine.generate(PROMPT, SamplingParams(max_new_tokens=40, seed=7, stop=[stop]))
        assert cut == first[:first.index(stop)] and cut_stats.finish_reason == "stop", (cut, stop)
        short, short_stats = engine.generate(PROMPT, SamplingParams(max_new_tokens=5, seed=7))
        assert short_stats.completion_tokens <= 5 and first.startswith(short.strip()[:10])
        assert short_stats.finish_reason == "length"  # 5 tokens: it reached its cap
        assert stats.finish_reason == ("length" if stats.completion_tokens == 40 else "stop")
    finally:
        engine.close()


def test_eight_users_over_two_replicas_lose_nothing_when_one_is_killed_mid_run(servers, session_factory, settings,
                                                                               caplog):
    """Eight users chat at once through the service over two replicas; both replicas take requests.
    One replica is killed (SIGKILL) while replies stream. Every user still gets a complete reply,
    identical to what the survivor writes for the same seed uninterrupted (a reply cut mid-way is
    replayed there and only its unseen part streamed on); every stored reply names the replica
    that wrote it; the dead replica is taken out; the log says who served what and who failed."""
    from feedback.models import Conversation, Message, User

    replicas = [s.url for s in servers]
    engine = RemoteEngine(replicas, "remote-v1", retry_after_s=300)
    service = ChatService(engine, session_factory, settings)
    results, progress, errors = {}, {i: 0 for i in range(8)}, []

    def user(i):
        try:
            for up in service.send(f"u{i}", PROMPT[0]["content"], params=SamplingParams(max_new_tokens=32, seed=100 + i)):
                progress[i] += 1
                if up.done:
                    results[i] = up.text
        except Exception as exc:  # a lost request: reported below
            errors.append((i, exc))

    caplog.set_level(logging.INFO, logger="model.remote")
    try:
        threads = [threading.Thread(target=user, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 120
        while max(progress.values()) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        taken = [r.outstanding + r.served for r in engine.replicas]
        finished_before_kill = set(results)
        servers[0].kill()
        for t in threads:
            t.join(timeout=300)
        assert not errors and sorted(results) == list(range(8)), (errors, sorted(results))
        assert all(taken), taken  # least-outstanding gave both replicas work
        with session_factory() as s:
            rows = (s.query(User.name, Message).join(Conversation, Conversation.owner_id == User.id)
                    .join(Message, Message.conversation_id == Conversation.id).filter(Message.role == "assistant"))
            stored = {int(name[1:]): (m.content, m.served_by, m.status) for name, m in rows}
        assert sorted(stored) == list(range(8))
        for i, (content, by, status) in stored.items():
            assert content == results[i] and status == "complete" and by in replicas, (i, by, status)
            assert by == replicas[1] or i in finished_before_kill, (i, by)  # the survivor finished the rest
        served = [r.getMessage() for r in caplog.records if "reply served by" in r.getMessage()]
        assert len(served) == 8
        assert any(replicas[0] in r.getMessage() and "failed" in r.getMessage() for r in caplog.records)
        survivor = RemoteEngine([replicas[1]], "check")
        for i, text in results.items():
            expected, _ = survivor.generate(PROMPT, SamplingParams(max_new_tokens=32, seed=100 + i))
            assert text == expected, (i, text, expected)
        survivor.close()
        assert engine.counters["remote_replicas_up"] == 1 and engine.counters["remote_failovers"] >= 1
    finally:
        engine.close()


def test_a_chat_through_the_app_stores_which_replica_wrote_the_reply(servers, session_factory, settings):
    """A chat message sent through the service on CHAT_ENGINE=openai is answered by the remote
    server, and the stored reply names that replica (messages.served_by)."""
    from feedback.models import Message

    engine = build_engine(None, "remote-v1", kind="openai", remote_urls=servers[1].url, max_concurrent=4)
    service = ChatService(engine, session_factory, settings)
    try:
        updates = list(service.send("alice", "Say hello.", params=SamplingParams(max_new_tokens=12, seed=1)))
        assert updates[-1].done and updates[-1].text.strip()
        with session_factory() as s:
            reply = s.query(Message).filter_by(role="assistant").one()
            assert reply.served_by == servers[1].url and reply.model_version == "remote-v1"
            assert reply.content == updates[-1].text and 0 < reply.completion_tokens <= 12
    finally:
        engine.close()


def test_when_every_replica_is_down_the_user_gets_a_clear_error_and_the_question_is_kept(session_factory, settings):
    """No server answers: the send fails with a 503 ChatError, the user's message is stored (marked
    failed, not lost), both replicas count a failure, and /metrics' collector shows none up."""
    from feedback.models import Message

    dead = [f"http://127.0.0.1:{free_port()}/v1", f"http://127.0.0.1:{free_port()}/v1"]
    engine = RemoteEngine(dead, "remote", connect_timeout_s=1)
    service = ChatService(engine, session_factory, settings)
    with pytest.raises(ChatError) as err:
        list(service.send("alice", "Anyone there?"))
    assert err.value.status == 503
    with session_factory() as s:
        user_msg = s.query(Message).filter_by(role="user").one()
        assert user_msg.content == "Anyone there?" and user_msg.status == "failed"
    assert engine.counters["remote_failovers"] == 2 and engine.counters["remote_replicas_up"] == 0
    from prometheus_client import CollectorRegistry, generate_latest

    from app.metrics import EngineCollector

    registry = CollectorRegistry()
    registry.register(EngineCollector(lambda: engine))
    scraped = generate_latest(registry).decode()
    assert 'chat_engine_remote_replicas_up{backend="openai",version="remote"} 0.0' in scraped
    assert 'chat_engine_remote_failures_total{backend="openai",version="remote"} 2.0' in scraped
    engine.close()


def test_only_a_servers_length_finish_reason_reads_as_a_cut_reply():
    """A replica's "length" is a reply cut at its budget; "stop", "content_filter" (its moderation
    replaced the reply) and "tool_calls" all ended the reply, so training never reads them as cut."""
    from model.remote import engine_finish_reason

    assert [engine_finish_reason(r) for r in ("length", "stop", "content_filter", "tool_calls")] == \
        ["length", "stop", "stop", "stop"]


def test_the_openai_engine_refuses_missing_or_non_http_urls():
    """Misconfiguration is a clear startup error, not a failure on the first chat."""
    with pytest.raises(ValueError, match="at least one base URL"):
        build_engine(None, "v", kind="openai", remote_urls="")
    with pytest.raises(ValueError, match="must start with http"):
        RemoteEngine(["file:///etc/passwd"], "v")

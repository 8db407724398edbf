"""Issue 13: the whole request is checked before any write; malformed input is a clean 4xx."""

import asyncio
import json

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.auth import login_checker
from app.main import create_app
from app.service import ChatService
from app.settings import Settings
from app.users import add_user
from feedback.db import make_engine, make_session_factory
from feedback.models import AuditLog, Conversation, Message
from tests.fakes import ScriptedEngine

JSON = {"Content-Type": "application/json"}


def _client(factory, settings) -> TestClient:
    app = create_app(ChatService(ScriptedEngine("ok"), factory, settings))
    return TestClient(app, base_url="http://127.0.0.1:7860")


@pytest.fixture
def client(session_factory, settings):
    return _client(session_factory, settings)


@pytest.fixture
def any_factory(any_db_url):
    engine = make_engine(any_db_url)
    yield make_session_factory(engine)
    engine.dispose()


def _rows(factory) -> tuple[int, int]:
    with factory() as s:
        return s.scalar(select(func.count(Message.id))), s.scalar(select(func.count(Conversation.id)))


def _openai_error(res, status):
    assert res.status_code == status, (res.status_code, res.text[:300])
    error = res.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    return error


def test_oversized_body_is_refused_with_413_unread(client, session_factory):
    """A body over CHAT_MAX_REQUEST_BYTES (1 MB) gets 413 request_too_large, whether it declares
    its length or comes chunked without one; nothing is written."""
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 1_100_000}]}).encode()
    assert _openai_error(client.post("/v1/chat/completions", content=big, headers=JSON), 413)["code"] == (
        "request_too_large")
    chunked = client.post("/v1/chat/completions", content=iter([big[:600_000], big[600_000:]]), headers=JSON)
    assert "Content-Length" not in chunked.request.headers
    _openai_error(chunked, 413)
    assert _rows(session_factory) == (0, 0)


def _long(role):
    return [{"role": role, "content": "y" * 9000}, {"role": "user", "content": "hi"}]


@pytest.mark.parametrize("messages", [
    _long("system"), _long("assistant"), [{"role": "user", "content": "z" * 9000}] + _long("user")[1:],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}] * 100 + [{"role": "user", "content": "q"}],
], ids=["long system", "long assistant", "long earlier user", "201 messages"])
def test_every_message_is_checked_before_any_write(client, session_factory, messages):
    """A system, assistant or earlier user message over CHAT_MAX_MESSAGE_CHARS (8,000), or more
    than CHAT_MAX_TURNS (200) messages, gets 400 and writes nothing."""
    _openai_error(client.post("/v1/chat/completions", json={"messages": messages}), 400)
    assert _rows(session_factory) == (0, 0)


@pytest.mark.parametrize("stop", [["a", "b", "c", "d", "e"], "s" * 201, ["ok", "s" * 201]],
                         ids=["5 stops", "long stop", "long stop in a list"])
def test_stop_list_is_limited(client, session_factory, stop):
    """More than 4 stop strings, or one over 200 characters, gets 400 on 'stop'; nothing is written."""
    res = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "stop": stop})
    assert _openai_error(res, 400)["param"].startswith("stop")
    assert _rows(session_factory) == (0, 0)


def test_four_stops_and_empty_stops_are_accepted(client):
    """Four stop strings are fine, and an empty one is dropped rather than ending every reply at once."""
    res = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                    "stop": ["a1", "b1", "c1", ""]})
    assert res.status_code == 200 and res.json()["choices"][0]["message"]["content"] == "ok"


MALFORMED = {
    "lone surrogate in a message": b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}',
    "lone surrogate in an earlier message": (b'{"messages": [{"role": "assistant", "content": "\\udfff"}, '
                                             b'{"role": "user", "content": "hi"}]}'),
    "lone surrogate in a stop string": b'{"messages": [{"role": "user", "content": "hi"}], "stop": ["\\ud800"]}',
    "invalid UTF-8": b'{"messages": [{"role": "user", "content": "\xff\xfe hi"}]}',
    "deep nesting": b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "a 5,000-digit integer": b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + b"9" * 5000 + b"}",
    "a seed over 64 bits": b'{"messages": [{"role": "user", "content": "hi"}], "seed": ' + str(2**70).encode() + b"}",
}


@pytest.mark.parametrize("body", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_bodies_get_a_clean_400(client, session_factory, body):
    """Each of these was a 500 (or stored garbage): now 400 in OpenAI's error shape, nothing written."""
    _openai_error(client.post("/v1/chat/completions", content=body, headers=JSON), 400)
    assert _rows(session_factory) == (0, 0)


def test_nul_in_system_and_earlier_messages_is_stored_cleanly(any_db_url, any_factory, tmp_path):
    """NUL in a system and an earlier message (psycopg.DataError on PostgreSQL before) is answered
    200 on SQLite and PostgreSQL, and the stored messages hold no NUL."""
    settings = Settings(data_dir=str(tmp_path / "data"), database_url=any_db_url, messages_per_minute=0)
    res = _client(any_factory, settings).post("/v1/chat/completions", json={"messages": [
        {"role": "system", "content": "be\x00 brief"}, {"role": "user", "content": "one\x00"},
        {"role": "assistant", "content": "\x00ok"}, {"role": "user", "content": "two"}]})
    assert res.status_code == 200, res.text
    with any_factory() as s:
        assert [m.content for m in s.scalars(select(Message).order_by(Message.id))] == ["one", "ok", "two", "ok"]
        assert s.scalars(select(Conversation.system_prompt)).one() == "be brief"


@pytest.mark.parametrize("key", ["sk-fc-99999999999999999999999.x", "sk-fc-1", "sk-fc-.x"])
def test_malformed_api_keys_get_401(any_db_url, any_factory, tmp_path, key):
    """With logins on, a key whose id part overflows the id column or is not ASCII digits gets
    401 invalid_api_key (it was a 500 on SQLite and PostgreSQL); nothing is written."""
    add_user(any_factory, "dev", "user", "dev-password")
    settings = Settings(data_dir=str(tmp_path / "data"), database_url=any_db_url, messages_per_minute=0)
    res = _client(any_factory, settings).post("/v1/chat/completions", json={"messages": [{"role": "user",
                                                                                          "content": "hi"}]},
                                              headers={"Authorization": f"Bearer {key}"})
    assert res.status_code == 401 and res.json()["error"]["code"] == "invalid_api_key"
    assert _rows(any_factory) == (0, 0)


def test_api_key_id_must_be_ascii_digits(session_factory, settings):
    """A key whose id is '²' (a digit to str.isdigit(), a header byte in Latin-1, refused by int())
    finds no user: the caller is None (it was a ValueError, so a 500)."""
    from starlette.requests import Request

    from app.api import _caller

    add_user(session_factory, "dev", "user", "dev-password")
    request = Request({"type": "http", "headers": [(b"authorization", b"Bearer sk-fc-\xb2.x")]})
    assert _caller(request, ChatService(ScriptedEngine("ok"), session_factory, settings)) is None


@pytest.mark.parametrize("name, audited", [("n" * 100, "n" * 80), ("ad\x00min", "ad?min"), ("\ud800", "?")],
                         ids=["101 chars", "NUL", "lone surrogate"])
def test_impossible_login_names_are_refused_and_audited(any_factory, name, audited):
    """A login name longer than the column, or with a NUL or lone surrogate, is refused (no
    server error on PostgreSQL) and audited under a name the log can hold."""
    add_user(any_factory, "admin", "admin", "admin-password")
    assert asyncio.run(login_checker(any_factory)(name, "admin-password")) is False
    with any_factory() as s:
        row = s.scalars(select(AuditLog).order_by(AuditLog.id.desc())).first()
    assert (row.action, row.allowed, row.user_name) == ("login", False, audited)


def test_fuzzed_raw_bodies_never_get_a_server_error(client, session_factory):
    """Hypothesis: arbitrary bytes, and JSON bodies whose strings may hold lone surrogates and
    control characters anywhere (content, role, stop, model), get 200 or a 400 in OpenAI's error
    shape; a refused body writes nothing."""
    from hypothesis import given, settings as hsettings, strategies as st

    any_text = st.text(alphabet=st.characters(), max_size=20)  # surrogates (category Cs) included
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]) | any_text,
                                     "content": any_text})
    bodies = st.binary(max_size=200) | st.builds(
        lambda msgs, stop, model: json.dumps({"messages": msgs, "stop": stop, "model": model}).encode(),
        st.lists(message, min_size=1, max_size=3), st.none() | any_text | st.lists(any_text, max_size=5),
        st.none() | any_text)

    @hsettings(max_examples=150, deadline=None)
    @given(body=bodies)
    def check(body):
        before = _rows(session_factory)
        res = client.post("/v1/chat/completions", content=body, headers=JSON)
        assert res.status_code in (200, 400), (res.status_code, res.text[:300])
        if res.status_code == 400:
            assert res.json()["error"]["message"] and _rows(session_factory) == before

    check()

"""Issue 13, item 7: login throttling per name and per address, the same argon2 work for
unknown names, and a short cache of verified API keys."""

import asyncio

import argon2
import pytest
from fastapi import HTTPException
from fastapi.testclient import TestClient
from sqlalchemy import select
from starlette.requests import Request

from app.api import _caller
from app.auth import ApiKeyCache, login_checker
from app.login_guard import LoginThrottle, LoginThrottled
from app.main import create_app
from app.service import ChatService
from app.users import add_user, new_api_key
from feedback import repository
from feedback.models import AuditLog
from tests.fakes import ScriptedEngine


@pytest.fixture
def argon2_calls(monkeypatch):
    """The stored hash of every argon2 verification made, in order."""
    calls = []
    verify = argon2.PasswordHasher.verify

    def spy(self, hash, password):
        calls.append(hash)
        return verify(self, hash, password)

    monkeypatch.setattr(argon2.PasswordHasher, "verify", spy)
    return calls


def _login(check, name, password):
    return asyncio.run(check(name, password))


def test_wrong_passwords_then_the_right_one_is_refused_with_the_reason(session_factory, argon2_calls):
    """After 3 wrong passwords for alice (the limit set), her right password is refused with 429,
    a message that says why and for how long and a Retry-After header, without an argon2 check,
    and audited as throttled."""
    add_user(session_factory, "alice", "user", "alice-password")
    check = login_checker(session_factory, LoginThrottle(per_name=3, per_address=100, window_s=60))
    assert [_login(check, "alice", f"guess-{i}") for i in range(3)] == [False, False, False]
    checked = len(argon2_calls)
    with pytest.raises(HTTPException) as refused:
        _login(check, "alice", "alice-password")
    assert refused.value.status_code == 429
    assert "Too many failed logins for this user name" in refused.value.detail
    assert "try again in" in refused.value.detail and 0 < int(refused.value.headers["Retry-After"]) <= 60
    assert len(argon2_calls) == checked
    with session_factory() as s:
        last = s.scalars(select(AuditLog).order_by(AuditLog.id.desc())).first()
    assert (last.user_name, last.action, last.allowed, last.detail) == ("alice", "login", False, "throttled")


def test_unknown_names_get_the_same_argon2_work(session_factory, argon2_calls):
    """A wrong password for an existing name, an unknown name, a user without a password and an
    impossible name each run exactly one argon2 verification with the same parameters, so the
    time taken does not tell which names exist."""
    add_user(session_factory, "alice", "user", "alice-password")
    with session_factory.begin() as s:
        repository.get_or_create_user(session=s, name="chat-only")  # a row with no password
    check = login_checker(session_factory, LoginThrottle(per_name=0, per_address=0))
    params = []
    for name in ("alice", "nobody-by-this-name", "chat-only", "n" * 100):
        before = len(argon2_calls)
        assert _login(check, name, "wrong-password") is False
        assert len(argon2_calls) == before + 1, name
        params.append(argon2_calls[-1].rsplit("$", 2)[0])  # $argon2id$v=19$m=...,t=...,p=...
    assert len(set(params)) == 1
    assert _login(check, "alice", "alice-password") is True


def test_one_address_is_throttled_across_names_through_the_login_page(session_factory, settings):
    """Through the real app's POST /login: 4 failures from one address (the limit set), each for
    another name, then alice's right password from that address gets 429 naming the address."""
    add_user(session_factory, "alice", "user", "alice-password")
    settings.allowed_hosts = "testserver"
    settings.login_failures_per_address, settings.login_failures_per_name = 4, 100
    client = TestClient(create_app(ChatService(ScriptedEngine("ok"), session_factory, settings)))
    for i in range(4):
        assert client.post("/login", data={"username": f"user{i}", "password": "x" * 8}).status_code == 400
    refused = client.post("/login", data={"username": "alice", "password": "alice-password"})
    assert refused.status_code == 429, refused.text
    assert "Too many failed logins for your address" in refused.json()["detail"]


def test_guesses_in_flight_count_and_a_right_password_clears_the_name():
    """Attempts count as failures from the moment they start (parallel guesses cannot all get
    through); a right password clears the name's count, not the address's."""
    t = LoginThrottle(per_name=2, per_address=3, window_s=60)
    t.attempt("alice", "10.0.0.1")
    t.attempt("alice", "10.0.0.1")
    with pytest.raises(LoginThrottled, match="user name"):
        t.attempt("alice", "10.0.0.2")
    t2 = LoginThrottle(per_name=2, per_address=3, window_s=60)
    t2.attempt("alice", "10.0.0.1")
    t2.succeeded("alice", "10.0.0.1", t2.attempt("alice", "10.0.0.1"))
    t2.attempt("alice", "10.0.0.1")  # the name starts again: 1 of 2; the address holds 2 of 3
    t2.attempt("bob", "10.0.0.1")
    with pytest.raises(LoginThrottled, match="your address"):
        t2.attempt("carol", "10.0.0.1")


def _key_request(key: str, client: tuple[str, int] | None = None) -> Request:
    scope = {"type": "http", "headers": [(b"authorization", f"Bearer {key}".encode())]}
    return Request({**scope, "client": client} if client else scope)


def test_a_verified_api_key_is_not_checked_again_until_a_new_key_replaces_it(session_factory, settings,
                                                                             argon2_calls):
    """Two calls with alice's key run one argon2 check; after `app.users api-key` gives her a
    new key, the old one is refused at once although it was cached; a wrong key is never
    cached (checked every time)."""
    add_user(session_factory, "alice", "user", "alice-password")
    key = new_api_key(session_factory, "alice")
    service = ChatService(ScriptedEngine("ok"), session_factory, settings)
    keys = ApiKeyCache(ttl_s=60)
    assert [_caller(_key_request(key), service, keys) for _ in range(2)] == ["alice", "alice"]
    assert len(argon2_calls) == 1
    new = new_api_key(session_factory, "alice")
    assert _caller(_key_request(key), service, keys) is None
    assert _caller(_key_request(new), service, keys) == "alice"
    wrong = new.rsplit(".", 1)[0] + ".wrong"
    before = len(argon2_calls)
    assert [_caller(_key_request(wrong), service, keys) for _ in range(2)] == [None, None]
    assert len(argon2_calls) == before + 2


def test_wrong_api_keys_are_throttled_like_wrong_passwords(session_factory, settings):
    """After 5 wrong keys for one key id, the 6th call is refused with LoginThrottled (the API
    answers 429 with Retry-After) even with the right key, without an argon2 check; malformed
    keys count against the caller's address; a right key clears its id's count."""
    from app.login_guard import LoginThrottle

    add_user(session_factory, "alice", "user", "alice-password")
    add_user(session_factory, "bob", "user", "bob-password")
    key, bob = new_api_key(session_factory, "alice"), new_api_key(session_factory, "bob")
    service = ChatService(ScriptedEngine("ok"), session_factory, settings)
    throttle = LoginThrottle(per_name=5, per_address=8, window_s=60, attempts="API calls", secrets="API keys",
                             names="this key id")
    wrong = key.rsplit(".", 1)[0] + ".wrong"
    at = ("10.0.0.9", 4242)
    assert _caller(_key_request(key, at), service, None, throttle) == "alice"
    for _ in range(5):
        assert _caller(_key_request(wrong, at), service, None, throttle) is None
    with pytest.raises(LoginThrottled, match="Too many failed API calls for this key id"):
        _caller(_key_request(key, at), service, None, throttle)
    assert _caller(_key_request(bob, at), service, None, throttle) == "bob"  # another id, 5 of 8 for the address
    for _ in range(3):
        assert _caller(_key_request("sk-nonsense", at), service, None, throttle) is None
    with pytest.raises(LoginThrottled, match="your address"):
        _caller(_key_request(bob, at), service, None, throttle)

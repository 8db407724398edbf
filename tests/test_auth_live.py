"""Logins and roles enforced on the server, called directly through the Gradio API."""

import pytest
from gradio_client import Client
from gradio_client.exceptions import AuthenticationError
from sqlalchemy import create_engine, text

from app.users import add_user, new_api_key
from feedback import repository as repo
from feedback.db import make_engine, make_session_factory, migrate
from tests.live_app import live_app


@pytest.fixture
def users_db(tmp_path):
    url = f"sqlite:///{tmp_path / 'chat.db'}"
    migrate(url)
    engine = make_engine(url)
    factory = make_session_factory(engine)
    add_user(factory, "alice", "user", "alice-password")
    add_user(factory, "root", "admin", "root-password")
    yield factory
    engine.dispose()


def test_users_cli_validation(users_db):
    with pytest.raises(repo.ValidationError, match="exists already"):
        add_user(users_db, "alice", "user", "another-password")
    with pytest.raises(repo.ValidationError, match="at least 8"):
        add_user(users_db, "carol", "user", "short")
    with pytest.raises(repo.ValidationError, match="not a valid user name"):
        add_user(users_db, "local", "admin", "long-enough")
    assert new_api_key(users_db, "alice").startswith("sk-fc-")
    with users_db() as s:
        alice = repo.get_user(session=s, name="alice")
        assert alice.password_hash.startswith("$argon2") and alice.api_key_hash.startswith("$argon2")


def test_roles_hold_on_direct_api_calls(users_db, tiny_model_dir, tmp_path):
    with live_app(tmp_path, tiny_model_dir) as url:
        with pytest.raises(AuthenticationError, match="credentials were not provided"):
            Client(url + "/", verbose=False)  # no login, no API
        with pytest.raises(ValueError, match="Could not login to"):  # Gradio's 400 "Incorrect credentials."
            Client(url + "/", auth=("alice", "wrong-password"), verbose=False)
        alice = Client(url + "/", auth=("alice", "alice-password"), verbose=False)
        note = alice.predict(1.0, 3e-5, 64, 1e-6, 0.05, 0.6, False, api_name="/retrain")
        assert note.startswith("Denied") and "admin role" in note
        assert alice.predict(1, api_name="/promote").startswith("Denied")
        assert alice.predict(1, False, "newest first", api_name="/review_correct")[0].startswith("Denied")
        assert alice.predict(None, api_name="/train_moderation_head")[0].startswith("Denied")
        assert alice.predict("head-0001", api_name="/switch_moderation_head")[0].startswith("Denied")
        ranked = alice.predict("ABCD", "", "ok", "ok", "ok", "ok", api_name="/rank_submit")
        assert ranked.startswith("Denied")
        _, history, _, _ = alice.predict("Hi", [], "", 0.0, 0.9, 50, 4, 1.1, api_name="/send")[:4]
        assert history[0]["role"] == "user"
        root = Client(url + "/", auth=("root", "root-password"), verbose=False)
        data = root.predict(api_name="/admin_refresh")
        assert "Data available" in data[0]
    engine = create_engine(f"sqlite:///{tmp_path / 'chat.db'}")
    with engine.connect() as conn:
        runs = conn.execute(text("SELECT count(*) FROM training_runs")).scalar()
        denied = conn.execute(text("SELECT user_name, action FROM audit_log WHERE allowed = 0 AND action != 'login'"
                                   " ORDER BY id")).all()
        owners = conn.execute(text("SELECT u.name FROM conversations c JOIN users u ON u.id = c.owner_id")).all()
    engine.dispose()
    assert runs == 0
    assert [a for _, a in denied] == ["start retrain", "promote model", "review moderation", "train moderation head",
                                      "switch moderation head", "rank"]
    assert owners == [("alice",)]


def test_foreign_origin_cannot_act(session_factory, settings):
    from fastapi.testclient import TestClient

    from app.main import create_app
    from app.service import ChatService
    from tests.fakes import ScriptedEngine

    settings.allowed_hosts = "testserver"  # TestClient's Host
    client = TestClient(create_app(ChatService(ScriptedEngine(), session_factory, settings)))
    body = {"messages": [{"role": "user", "content": "hi"}]}
    evil = client.post("/v1/chat/completions", json=body, headers={"Origin": "https://evil.example"})
    assert evil.status_code == 403 and evil.json()["error"]["code"] == "foreign_origin"
    join = client.post("/gradio_api/queue/join", json={}, headers={"Origin": "https://evil.example"})
    assert join.status_code == 403
    same = client.post("/v1/chat/completions", json=body, headers={"Origin": "http://testserver"})
    assert same.status_code == 200
    assert client.post("/v1/chat/completions", json=body).status_code == 200  # API clients send no Origin

"""Logins and roles enforced on the server, called directly through the Gradio API."""

import pytest
from gradio_client import Client
from gradio_client.exceptions import AuthenticationError
from sqlalchemy import create_engine, text

from app.users import add_user, new_api_key
from feedback import repository
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
    with pytest.raises(repository.ValidationError, match="exists already"):
        add_user(users_db, "alice", "user", "another-password")
    with pytest.raises(repository.ValidationError, match="at least 8"):
        add_user(users_db, "carol", "user", "short")
    with pytest.raises(repository.ValidationError, match="not a valid user name"):
        add_user(users_db, "local", "admin", "long-enough")
    assert new_api_key(users_db, "alice").startswith("sk-fc-")
    with users_db() as s:
        alice = repository.get_user(session=s, name="alice")
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


# What a signed-in plain user may call: their own chats, data and A/B picks. Every other named
# endpoint is privileged and must refuse them, so a new handler cannot ship unguarded.
USER_ENDPOINTS = {"/opt_out", "/ab_opt_out", "/pick_left", "/pick_right", "/pick_tie", "/pick_both_bad",
                  "/export_my_data", "/search_conversations", "/rename_conversation", "/delete_conversation",
                  "/delete_my_data", "/send", "/regenerate", "/stop", "/previous_reply_version", "/next_reply_version"}
ANNOTATOR_ENDPOINTS = {"/rank_submit", "/rank_skip", "/rank_next"}


def _first_text(out) -> str:
    values = out if isinstance(out, (list, tuple)) else [out]
    return next((v for v in values if isinstance(v, str)), "")


@pytest.mark.slow
def test_every_privileged_endpoint_refuses_a_plain_user_and_an_annotator_and_audits_it(users_db, tiny_model_dir,
                                                                                       tmp_path):
    """Walks every named Gradio endpoint of the running app. As a plain user, each one outside
    USER_ENDPOINTS answers "Denied: ..."; as an annotator, each one outside the user and ranking
    endpoints does. Each refusal leaves a denied audit row, and nothing privileged happened."""
    from tests.test_fuzz_gradio import _valid_default

    add_user(users_db, "ann", "annotator", "ann-password")
    calls = {}
    with live_app(tmp_path, tiny_model_dir) as url:
        for name, password, allowed in (("alice", "alice-password", USER_ENDPOINTS),
                                        ("ann", "ann-password", USER_ENDPOINTS | ANNOTATOR_ENDPOINTS)):
            client = Client(url + "/", auth=(name, password), verbose=False)
            endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
            assert allowed <= set(endpoints), allowed - set(endpoints)  # the lists name real endpoints
            privileged = sorted(set(endpoints) - allowed)
            assert len(privileged) >= 15, privileged
            for endpoint in privileged:
                out = client.predict(*[_valid_default(p) for p in endpoints[endpoint]["parameters"]], api_name=endpoint)
                shown = _first_text(out)
                assert shown.startswith("Denied:") and f"'{name}'" in shown, (name, endpoint, out)
            calls[name] = privileged
    engine = create_engine(f"sqlite:///{tmp_path / 'chat.db'}")
    with engine.connect() as conn:
        denied = conn.execute(text("SELECT user_name, count(*) FROM audit_log WHERE allowed = 0 AND action != 'login'"
                                   " GROUP BY user_name")).all()
        runs = conn.execute(text("SELECT count(*) FROM training_runs")).scalar()
        trials = conn.execute(text("SELECT count(*) FROM ab_trials")).scalar()
    engine.dispose()
    assert {u: n >= len(calls[u]) for u, n in denied} == {"alice": True, "ann": True}, (denied, calls)
    assert runs == 0 and trials == 0

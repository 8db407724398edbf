"""Issue 13: DNS rebinding (Host allow-list), `Origin: null`, and JSON-only API bodies."""

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.main import create_app
from app.service import ChatService
from app.settings import Settings
from app.web_guard import allowed_hosts, host_name
from feedback.models import Message
from tests.fakes import ScriptedEngine

BODY = {"messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def client(session_factory, settings):
    """The real app (local mode) as a browser on this machine reaches it: Host 127.0.0.1:7860."""
    app = create_app(ChatService(ScriptedEngine("ok"), session_factory, settings))
    return TestClient(app, base_url="http://127.0.0.1:7860")


def _messages(factory) -> int:
    with factory() as s:
        return s.scalar(select(func.count(Message.id)))


def test_rebound_host_is_refused_on_every_route(client, session_factory):
    """A page on evil.example rebound to 127.0.0.1 (Host and Origin both evil.example) gets 400
    host_not_allowed in OpenAI's error shape on the API, the metrics, the Gradio page and its
    queue; nothing is written."""
    evil = {"Host": "evil.example:7860", "Origin": "http://evil.example:7860"}
    answers = [client.post("/v1/chat/completions", json=BODY, headers=evil), client.get("/v1/models", headers=evil),
               client.get("/metrics", headers=evil), client.get("/", headers=evil),
               client.post("/gradio_api/queue/join", json={}, headers=evil)]
    for res in answers:
        assert res.status_code == 400, (res.request.url, res.status_code)
        error = res.json()["error"]
        assert error["code"] == "host_not_allowed" and "CHAT_ALLOWED_HOSTS" in error["message"]
    assert _messages(session_factory) == 0


@pytest.mark.parametrize("host", ["127.0.0.1:7860", "localhost:7860", "LOCALHOST", "[::1]:7860", "localhost."])
def test_local_host_names_are_served(client, host):
    """127.0.0.1, localhost (any case, final dot) and [::1], with or without a port, are served,
    and a same-origin POST from them is answered."""
    assert client.get("/healthz", headers={"Host": host}).status_code == 200
    res = client.post("/v1/chat/completions", json=BODY, headers={"Host": host, "Origin": f"http://{host}"})
    assert res.status_code == 200, res.text


def test_missing_host_header_is_refused(client):
    """A request without a Host header names no allowed host: 400."""
    assert client.get("/healthz", headers={"Host": ""}).status_code == 400


def test_allowed_hosts_come_from_the_setting_and_a_specific_bind_address():
    """CHAT_ALLOWED_HOSTS adds names (brackets, case and ports ignored) and CHAT_HOST adds itself,
    unless it is a wildcard such as 0.0.0.0; "testserver" is not allowed by default."""
    base = {"127.0.0.1", "localhost", "::1"}
    assert allowed_hosts(Settings()) == base
    assert allowed_hosts(Settings(host="0.0.0.0")) == base
    assert allowed_hosts(Settings(host="::")) == base
    assert allowed_hosts(Settings(host="192.168.1.5", allowed_hosts=" Chat.Example.com, [fe80::1]:80 ,")) == (
        base | {"192.168.1.5", "chat.example.com", "fe80::1"})
    assert host_name("[::1]:7860") == "::1" and host_name("fe80::1") == "fe80::1"


def test_allowed_hosts_setting_lets_a_name_in(session_factory, settings):
    """With CHAT_ALLOWED_HOSTS=chat.example.com that name is served and other names still are not;
    '*' serves any name."""
    settings.allowed_hosts = "chat.example.com"
    client = TestClient(create_app(ChatService(ScriptedEngine("ok"), session_factory, settings)),
                        base_url="http://chat.example.com")
    assert client.get("/healthz").status_code == 200
    assert client.get("/healthz", headers={"Host": "other.example"}).status_code == 400
    settings.allowed_hosts = "*"
    anyhost = TestClient(create_app(ChatService(ScriptedEngine("ok"), session_factory, settings)),
                         base_url="http://other.example")
    assert anyhost.get("/healthz").status_code == 200


def test_null_origin_may_not_change_anything(client, session_factory):
    """`Origin: null` (a sandboxed iframe) gets 403 null_origin on POSTs to the API and to Gradio,
    nothing is written; a GET with it is still answered."""
    null = {"Origin": "null"}
    api = client.post("/v1/chat/completions", json=BODY, headers=null)
    assert api.status_code == 403 and api.json()["error"]["code"] == "null_origin"
    assert client.post("/gradio_api/queue/join", json={}, headers=null).status_code == 403
    assert client.get("/healthz", headers=null).status_code == 200
    assert _messages(session_factory) == 0


def test_unparseable_origin_is_refused_not_a_server_error(client):
    """An Origin that is not a URL ('http://[bad') is refused with 403, not a 500."""
    assert client.post("/v1/chat/completions", json=BODY, headers={"Origin": "http://[bad"}).status_code == 403


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
def test_chat_completions_requires_a_json_content_type(client, session_factory, content_type):
    """A valid JSON body sent as text/plain, a form, or without Content-Type (what a page can send
    cross-site without a preflight) gets 415 in OpenAI's error shape; nothing is written."""
    import json

    headers = {"Content-Type": content_type} if content_type else {}
    res = client.post("/v1/chat/completions", content=json.dumps(BODY), headers=headers)
    assert res.status_code == 415
    error = res.json()["error"]
    assert error["type"] == "invalid_request_error" and "application/json" in error["message"]
    assert _messages(session_factory) == 0


def test_chat_completions_accepts_json_with_a_charset(client):
    """'application/json; charset=utf-8' (what many clients send) is accepted."""
    import json

    res = client.post("/v1/chat/completions", content=json.dumps(BODY),
                      headers={"Content-Type": "Application/JSON; charset=utf-8"})
    assert res.status_code == 200, res.text


def test_websocket_from_a_foreign_page_is_refused(client):
    """A WebSocket handshake is checked like a write: a foreign Origin is refused before any route."""
    from starlette.testclient import WebSocketDenialResponse

    with pytest.raises(WebSocketDenialResponse) as info:
        headers = {"Host": "127.0.0.1:7860", "Origin": "http://evil.example"}
        with client.websocket_connect("/anything", headers=headers):
            pass
    assert info.value.status_code == 403

"""Issue 13, compatibility with real clients: stream_options.include_usage, GET /v1/models/{id},
list-of-parts content, and a clear 400 for what this server cannot honour (nothing written)."""

import json

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.main import create_app
from app.service import ChatService
from feedback.models import Conversation, Message
from tests.fakes import ScriptedEngine

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
def client(session_factory, settings):
    settings.allowed_hosts = "testserver"
    return TestClient(create_app(ChatService(ScriptedEngine("Hello there, friend.", version="fake-v1"),
                                             session_factory, settings)))


def _rows(factory, model=Message) -> int:
    with factory() as s:
        return s.scalar(select(func.count(model.id)))


def _events(response) -> list:
    return [json.loads(line[6:]) for line in response.text.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


def test_stream_include_usage_sends_a_final_usage_chunk(client):
    """stream_options.include_usage: every chunk has usage null, and one last chunk before [DONE]
    has no choices and the token counts; without it, chunks have no usage field."""
    r = client.post("/v1/chat/completions", json={"messages": HI, "stream": True,
                                                  "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
    events = _events(r)
    *chunks, last = events
    assert all(c["usage"] is None and len(c["choices"]) == 1 for c in chunks)
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 3
    assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + 3
    plain = _events(client.post("/v1/chat/completions", json={"messages": HI, "stream": True}))
    assert all("usage" not in c for c in plain) and plain[-1]["choices"][0]["finish_reason"] == "stop"


def test_models_by_id_in_openai_shape(client):
    """GET /v1/models/{id}: the served model as OpenAI's model object; an unknown id is a 404 in
    OpenAI's error shape."""
    assert client.get("/v1/models/fake-v1").json() == {"id": "fake-v1", "object": "model", "created": 0,
                                                        "owned_by": "local"}
    r = client.get("/v1/models/gpt-17")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found" and "gpt-17" in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_list_of_text_parts_is_accepted(client, session_factory):
    """Content as a list of text parts (LangChain sends it so) is answered and stored as its text;
    OpenAI's 'developer' role counts as the system prompt."""
    body = {"messages": [{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
                         {"role": "user", "content": [{"type": "text", "text": "Hello"},
                                                      {"type": "text", "text": "parts"}]}]}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "Hello there, friend."
    with session_factory() as s:
        conv = s.scalars(select(Conversation)).one()
        assert conv.system_prompt == "Be brief."
        assert [m.content for m in conv.messages if m.role == "user"] == ["Hello\nparts"]


@pytest.mark.parametrize("extra, param", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"n": 2}, "n"),
    ({"logprobs": True}, "logprobs"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content"),
    ({"messages": [{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}, *HI]}, "messages.0"),
], ids=["tools", "tool_choice", "response_format", "n=2", "logprobs", "presence_penalty", "unknown field",
        "image part", "tool_calls"])
def test_what_cannot_be_honoured_is_refused_clearly_and_nothing_is_written(client, session_factory, extra, param):
    """Tools, JSON mode, n > 1, logprobs, penalties, an unknown field, an image part or a tool
    call: 400 in OpenAI's shape naming the parameter, and no conversation is written."""
    r = client.post("/v1/chat/completions", json={"messages": HI, **extra})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]
    assert _rows(session_factory, Conversation) == 0


@pytest.mark.parametrize("extra", [{"n": 1}, {"response_format": {"type": "text"}}, {"tool_choice": "none"},
                                   {"frequency_penalty": 0, "presence_penalty": 0.0}, {"logprobs": False},
                                   {"user": "u-1", "metadata": {"a": "b"}, "store": False},
                                   {"temperature": None, "top_p": None, "n": None},
                                   {"messages": [{"role": "assistant", "content": "x", "tool_calls": None,
                                                  "refusal": None, "name": "bot"}, *HI]}],
                         ids=["n=1", "text format", "no tools", "zero penalties", "no logprobs", "user/metadata",
                              "nulls", "empty tool fields"])
def test_defaults_of_unsupported_parameters_are_accepted(client, extra):
    """Parameters at the value that asks for nothing this server lacks are answered as usual."""
    r = client.post("/v1/chat/completions", json={"messages": HI, **extra})
    assert r.status_code == 200, r.text

"""The OpenAI-compatible API through the official `openai` client against the running app."""

import re

import httpx
import openai
import pytest
from sqlalchemy import create_engine, text

from app.users import add_user, new_api_key
from feedback.db import make_engine, make_session_factory, migrate
from tests.live_app import live_app


@pytest.fixture(scope="module")
def api_app(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    url = f"sqlite:///{tmp / 'chat.db'}"
    migrate(url)
    engine = make_engine(url)
    factory = make_session_factory(engine)
    add_user(factory, "dev", "user", "dev-password")
    key = new_api_key(factory, "dev")
    engine.dispose()
    with live_app(tmp, tiny_model_dir) as base:
        yield base, key, tmp


def test_non_streaming_and_logged(api_app, tiny_model_dir):
    base, key, tmp = api_app
    client = openai.OpenAI(base_url=base + "/v1", api_key=key)
    [model] = [m.id for m in client.models.list().data][:1]
    assert model == tiny_model_dir.name
    out = client.chat.completions.create(model=model, messages=[{"role": "system", "content": "Be brief."},
                                                                {"role": "user", "content": "Hello API"}],
                                         max_tokens=6, temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.completion_tokens > 0 and out.model == model
    engine = create_engine(f"sqlite:///{tmp / 'chat.db'}")
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT m.role, m.content FROM messages m JOIN conversations c ON "
                                 "c.id = m.conversation_id JOIN users u ON u.id = c.owner_id WHERE u.name='dev' "
                                 "ORDER BY m.id")).all()
    engine.dispose()
    assert rows[0] == ("user", "Hello API") and rows[1][0] == "assistant"


def test_streaming_chunks(api_app):
    base, key, _ = api_app
    client = openai.OpenAI(base_url=base + "/v1", api_key=key)
    # greedy: the tiny random model's sampled text could now and then trip output moderation
    stream = client.chat.completions.create(model=openai.NOT_GIVEN, messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=8, stream=True, temperature=0)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert "".join(c.choices[0].delta.content or "" for c in chunks)


def test_bad_requests_get_openai_errors(api_app):
    base, key, _ = api_app
    client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)
    cases = [dict(messages=[]), dict(messages=[{"role": "user", "content": 5}]),
             dict(messages=[{"role": "user", "content": "hi"}], max_tokens=0),
             dict(messages=[{"role": "user", "content": "hi"}], model="gpt-17"),
             dict(messages=[{"role": "user", "content": "hi"}], temperature="hot"),
             dict(messages=[{"role": "user", "content": ""}])]
    for body in cases:
        body.setdefault("model", openai.NOT_GIVEN)
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(**body)
        assert info.value.body["message"], body
    raw = httpx.post(base + "/v1/chat/completions", content=b"{not json",
                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base + "/v1", api_key="sk-fc-1.wrong", max_retries=0).models.list()


def test_metrics_endpoint_counts_requests(api_app):
    base, key, _ = api_app
    openai.OpenAI(base_url=base + "/v1", api_key=key).chat.completions.create(
        model=openai.NOT_GIVEN, messages=[{"role": "user", "content": "count me"}], max_tokens=3)
    body = httpx.get(base + "/metrics").text
    assert "chat_requests_total{outcome=" in body
    assert "chat_time_to_first_token_seconds_bucket" in body and "chat_in_flight 0.0" in body
    tokens = [line for line in body.splitlines() if line.startswith("chat_completion_tokens_total")]
    assert tokens and float(tokens[0].split()[-1]) > 0


@pytest.mark.slow
def test_openai_client_chats_with_the_real_model_on_llamacpp(tmp_path):
    """The default serving path end to end: embedded model -> Q8_0 GGUF -> llama.cpp engine."""
    from model.loader import resolve_model
    from tests.test_llamacpp import CACHE

    converted = resolve_model("embedded", CACHE).path
    with live_app(tmp_path, converted, timeout=180, CHAT_CONTEXT_TOKENS=512) as base:
        health = httpx.get(base + "/healthz").json()
        assert health["backend"] == "llama.cpp"
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused-without-logins")
        question = [{"role": "user", "content": "What is the capital of France?"}]
        out = client.chat.completions.create(model=health["model"], messages=question, max_tokens=24, temperature=0)
        assert "Paris" in out.choices[0].message.content
        chunks = list(client.chat.completions.create(messages=question, max_tokens=24, temperature=0, stream=True,
                                                     model=health["model"]))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == out.choices[0].message.content
        with pytest.raises(openai.BadRequestError, match="too long"):
            client.chat.completions.create(model=health["model"], max_tokens=8,
                                           messages=[{"role": "user", "content": "word " * 1000}])
        metrics = httpx.get(base + "/metrics").text
        assert "chat_time_to_first_token_seconds_count" in metrics
        # the same question twice: the second read its prompt from the prefix cache
        reused = re.search(r'chat_engine_prompt_tokens_reused_total\{backend="llama.cpp",version="[^"]+"\} (\S+)',
                           metrics)
        assert reused and float(reused.group(1)) > 10, metrics


def test_openai_client_usage_chunk_and_model_lookup(api_app, tiny_model_dir):
    """openai: a stream with stream_options include_usage ends with a usage chunk (no choices);
    models.retrieve finds the served model, and an unknown id raises NotFoundError."""
    base, key, _ = api_app
    client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)
    chunks = list(client.chat.completions.create(model=openai.NOT_GIVEN, messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=4, stream=True, temperature=0,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert client.models.retrieve(tiny_model_dir.name).id == tiny_model_dir.name
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-17")
    with pytest.raises(openai.BadRequestError, match="tool"):
        client.chat.completions.create(model=openai.NOT_GIVEN, messages=[{"role": "user", "content": "Hi"}],
                                       tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])


def test_langchain_openai_client(api_app, tiny_model_dir):
    """langchain-openai's ChatOpenAI: invoke with list-of-parts content, and a stream with usage."""
    from langchain_core.messages import HumanMessage, SystemMessage
    from langchain_openai import ChatOpenAI

    base, key, _ = api_app
    llm = ChatOpenAI(base_url=base + "/v1", api_key=key, model=tiny_model_dir.name, temperature=0, max_tokens=4,
                     max_retries=0, stream_usage=True)
    out = llm.invoke([SystemMessage("Be brief."), HumanMessage(content=[{"type": "text", "text": "Hello LangChain"}])])
    assert isinstance(out.content, str) and out.usage_metadata["output_tokens"] > 0
    chunks = list(llm.stream("Hi"))
    assert "".join(c.content for c in chunks) and sum(c.usage_metadata["output_tokens"] for c in chunks
                                                      if c.usage_metadata) > 0


def test_litellm_client(api_app, tiny_model_dir, monkeypatch):
    """litellm against this server as an OpenAI-compatible endpoint: a plain and a streamed call."""
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download of its price list
    import litellm

    base, key, _ = api_app
    kw = dict(model=f"openai/{tiny_model_dir.name}", api_base=base + "/v1", api_key=key, max_tokens=4,
              temperature=0, messages=[{"role": "user", "content": "Hello litellm"}])
    out = litellm.completion(**kw)
    assert out.choices[0].message.content and out.usage.completion_tokens > 0
    pieces = [c.choices[0].delta.content or "" for c in litellm.completion(stream=True, **kw) if c.choices]
    assert "".join(pieces)

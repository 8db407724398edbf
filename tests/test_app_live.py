"""The real app in a subprocess, driven through gradio_client; then the database is checked."""

from gradio_client import Client
from sqlalchemy import create_engine, text

from tests.live_app import live_app


def test_chat_through_gradio_client_is_logged(tiny_model_dir, tmp_path):
    with live_app(tmp_path, tiny_model_dir) as url:
        client = Client(url + "/", verbose=False)
        box, history, hint, convs = client.predict("Hello model", [], "", 0.0, 0.9, 50, 8, 1.1, api_name="/send")[:4]
        # The box was cleared on the first streamed update; 8 tokens end at the length limit, which is said.
        assert hint == "" or "length limit" in hint
        assert [m["role"] for m in history] == ["user", "assistant"]
        reply = history[1]["content"][0]["text"]
        # Refusals come back as a hint and keep the text in the box.
        box2, _, hint2, _ = client.predict("x" * 9000, [], "", 0.0, 0.9, 50, 8, 1.1, api_name="/send")[:4]
        assert box2 == "x" * 9000 and "limit is 8,000" in hint2
    engine = create_engine(f"sqlite:///{tmp_path / 'chat.db'}")
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT role, content, model_version FROM messages ORDER BY id")).all()
    engine.dispose()
    assert rows[0][:2] == ("user", "Hello model")
    assert rows[1][0] == "assistant" and rows[1][1].strip() == reply.strip() and rows[1][2] == tiny_model_dir.name
    assert len(rows) == 2  # the refused message left nothing behind

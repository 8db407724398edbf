"""End to end in a real browser (Debian Chromium via Playwright) against the real app."""

import json
import subprocess
import sys
import time

import pytest
from sqlalchemy import create_engine, text

from tests.browser import browser_page
from tests.live_app import live_app

pytestmark = pytest.mark.browser


def _max_new_tokens(page, n: int, open_settings: bool = False) -> None:
    """Set Settings > Max new tokens (its number box; the slider has the same label) and make sure
    the value holds. Waits for the page to be live first (the chat's label is set by a load event):
    a value typed while the page was still starting was reset to 256. The value is typed again
    while it does not hold for a second (in CI under load it once did not take at all), and a
    failure says what the box showed."""
    page.get_by_text("Chat · model").wait_for(timeout=30000)
    if open_settings:
        page.get_by_text("Settings", exact=True).click()
    box = page.get_by_label("number input for Max new tokens")
    box.wait_for(state="visible", timeout=10000)
    for _ in range(5):
        box.fill(str(n))
        box.press("Enter")
        box.blur()
        page.wait_for_timeout(1000)
        if box.input_value() == str(n):
            return
    raise AssertionError(f"Max new tokens did not take {n}: the box shows {box.input_value()!r}")


def _db_rows(tmp_path, sql):
    engine = create_engine(f"sqlite:///{tmp_path / 'chat.db'}")
    with engine.connect() as conn:
        rows = conn.execute(text(sql)).all()
    engine.dispose()
    return rows


def test_chat_vote_and_reopen_after_reload(tiny_model_dir, tmp_path):
    """Chat, vote down the finished reply (the hint says saved), reload, reopen the conversation
    from the list: its thumb shows the vote again; one -1 vote is stored.

    The vote waits for the reply to finish streaming: the send handler's last update is the one
    that puts the new conversation into the list, in the same update as the final reply and hint,
    so once its title shows there no later update can clear the vote's hint (a fixed sleep raced
    with the end of the stream under load)."""
    with live_app(tmp_path, tiny_model_dir) as url, browser_page("chat") as page:
        page.goto(url)
        page.fill("#chat-input textarea", "Hello from the browser")
        page.click("#send-btn")
        page.locator("#conversations").get_by_text("Hello from the browser").wait_for(timeout=90000)
        page.get_by_label("Dislike").last.click()
        page.wait_for_function("document.querySelector('#chat-hint').innerText.includes('saved')", timeout=20000)
        page.reload()
        page.get_by_text("Hello from the browser").first.wait_for(timeout=30000)  # in the conversation list
        page.locator("#conversations label").first.click()
        page.locator("#chatbot").get_by_text("Hello from the browser").wait_for(timeout=30000)
        # Issue 15 item 4: the reopened conversation shows the stored vote on its thumb.
        page.locator('#chatbot button[aria-label="Disliked"]').wait_for(timeout=10000)
    votes = _db_rows(tmp_path, "SELECT value FROM votes")
    assert votes == [(-1,)]


def test_annotator_ranks_one_task(tiny_model_dir, tmp_path):
    from feedback.db import migrate

    url_db = f"sqlite:///{tmp_path / 'chat.db'}"
    migrate(url_db)
    rows = tmp_path / "prompts.jsonl"
    rows.write_text(json.dumps({"prompt": "Name a colour", "chosen": "Blue.", "rejected": "Nope"}) + "\n")
    subprocess.run([sys.executable, "-m", "feedback.importer", str(rows), "--url", url_db], check=True)
    with live_app(tmp_path, tiny_model_dir) as url, browser_page("rank") as page:
        page.goto(url)
        page.get_by_role("tab", name="Rank").click()
        page.wait_for_function("document.querySelector('#cand-D') && "
                               "document.querySelector('#cand-D').innerText.trim().length > 1", timeout=90000)
        page.fill("#rank-order textarea, #rank-order input", "B > A = C > D")
        page.keyboard.press("Enter")
        page.wait_for_function("document.querySelector('#rank-note').innerText.includes('Saved')", timeout=30000)
    [(order,)] = _db_rows(tmp_path, "SELECT \"order\" FROM rankings")
    groups = json.loads(order)
    assert [len(g) for g in groups] == [1, 2, 1]


def test_login_roles_in_browser_and_admin_retrain_progress(tiny_model_dir, tmp_path):
    """A user sees neither Rank nor Admin; the admin sees Cancel disabled and no plots before any
    run, starts a retrain, watches its progress to the end, then sees its reward-model curve and
    its version, with Cancel disabled again."""
    from app.users import add_user
    from feedback.db import make_engine, make_session_factory, migrate
    from tests.training_data import seed_preferences

    url_db = f"sqlite:///{tmp_path / 'chat.db'}"
    migrate(url_db)
    engine = make_engine(url_db)
    factory = make_session_factory(engine)
    add_user(factory, "alice", "user", "alice-password")
    add_user(factory, "root", "admin", "root-password")
    seed_preferences(factory, tiny_model_dir)
    engine.dispose()

    def login(page, url, name, password):
        page.goto(url)
        page.get_by_label("username").fill(name)
        page.get_by_label("password").fill(password)
        page.get_by_role("button", name="Login").click()
        page.wait_for_selector("#chat-input textarea", timeout=30000)
        page.wait_for_timeout(1500)

    with live_app(tmp_path, tiny_model_dir) as url:
        with browser_page("login-user") as page:
            login(page, url, "alice", "alice-password")
            assert page.get_by_role("tab", name="Admin").count() == 0
            assert page.get_by_role("tab", name="Rank").count() == 0
            page.fill("#chat-input textarea", "hi as alice")
            page.click("#send-btn")
            page.locator("#chatbot").get_by_text("hi as alice").wait_for(timeout=30000)
        try:
            with browser_page("login-admin") as page:
                login(page, url, "root", "root-password")
                page.get_by_role("tab", name="Admin").click()
                page.get_by_label("PPO episodes").fill("8")
                page.get_by_text("No training run yet").wait_for(timeout=30000)
                # Issue 15: no Cancel and no empty "0.000000" plots before there is a run.
                assert page.locator("#cancel-btn").is_disabled() and page.locator("#rm-plot").is_hidden()
                page.click("#retrain-btn")
                page.wait_for_function("document.querySelector('#train-progress').innerText.includes('Run 1')",
                                       timeout=60000)
                # A tiny model may finish within one refresh: progress or the finished run both count.
                page.wait_for_function("/step [1-9]|Run 1: done/.test("
                                       "document.querySelector('#train-progress').innerText)", timeout=180000)
                page.wait_for_function("document.querySelector('#train-progress').innerText.includes('Run 1: done')",
                                       timeout=180000)
                page.locator("#versions-table").get_by_text("run1-ppo").wait_for(timeout=30000)
                page.locator("#rm-plot").wait_for(state="visible", timeout=10000)  # the run's reward-model curve
                assert page.locator("#cancel-btn").is_disabled()  # the run is over
        finally:
            _kill_run(url_db)  # the run is a separate process that outlives the app on purpose


def _kill_run(url_db: str) -> None:
    import os
    import signal

    from sqlalchemy import create_engine, text as sql

    from feedback.training_repo import pid_alive

    db = create_engine(url_db)
    with db.connect() as conn:
        pids = [p for (p,) in conn.execute(sql("SELECT pid FROM training_runs")).all() if p]
    db.dispose()
    for pid in pids:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_the_chat_trash_icon_starts_a_new_conversation(tiny_model_dir, tmp_path):
    """Issue 15 item 2: after the chat box's trash icon, the next message starts a new conversation
    (listed on the left, and the model does not see the old one), instead of continuing the old
    conversation out of sight."""
    with live_app(tmp_path, tiny_model_dir) as url, browser_page("chat-trash") as page:
        page.goto(url)
        page.fill("#chat-input textarea", "First topic")
        page.click("#send-btn")
        page.locator("#conversations").get_by_text("First topic").wait_for(timeout=90000)
        page.locator("#chatbot").get_by_role("button", name="Clear").click()
        page.wait_for_function("!document.querySelector('#chatbot').innerText.includes('First topic')", timeout=10000)
        page.fill("#chat-input textarea", "Second topic")
        page.click("#send-btn")
        page.locator("#conversations").get_by_text("Second topic").wait_for(timeout=90000)
    rows = _db_rows(tmp_path, "SELECT c.title, count(m.id) FROM conversations c JOIN messages m "
                              "ON m.conversation_id = c.id GROUP BY c.id ORDER BY c.id")
    assert rows == [("First topic", 2), ("Second topic", 2)]


def test_a_reply_cut_at_the_token_limit_says_so(tiny_model_dir, tmp_path):
    """Issue 15 item 10: with Max new tokens at 3 the reply ends mid-sentence, and the hint says it
    stopped at the length limit instead of leaving the user to guess."""
    with live_app(tmp_path, tiny_model_dir) as url, browser_page("chat-length") as page:
        page.goto(url)
        _max_new_tokens(page, 3, open_settings=True)
        page.fill("#chat-input textarea", "Tell me a long story")
        page.click("#send-btn")
        try:
            page.wait_for_function("document.querySelector('#chat-hint').innerText.includes('length limit')",
                                   timeout=90000)
        except Exception:  # say what the page showed instead
            raise AssertionError(f"hint {page.inner_text('#chat-hint')!r}, box "
                                 f"{page.input_value('#chat-input textarea')!r}") from None
    [(tokens,)] = _db_rows(tmp_path, "SELECT completion_tokens FROM messages WHERE role = 'assistant'")
    assert tokens == 3


def test_cancelling_delete_all_my_data_keeps_everything_without_error_badges(tiny_model_dir, tmp_path):
    """Issue 15 item 1: cancelling the "Delete all my data" confirmation says nothing was deleted,
    shows no "Error" badge anywhere, and the conversation still opens from the list; accepting it
    then empties the list and the database."""
    with live_app(tmp_path, tiny_model_dir) as url, browser_page("delete") as page:
        page.goto(url)
        page.fill("#chat-input textarea", "Keep this conversation")
        page.click("#send-btn")
        page.locator("#conversations").get_by_text("Keep this conversation").wait_for(timeout=90000)
        page.get_by_text("Your data").click()
        page.once("dialog", lambda dialog: dialog.dismiss())
        page.click("#delete-data")
        page.wait_for_function("document.querySelector('#chat-hint').innerText.includes('Nothing was deleted')",
                               timeout=20000)
        assert page.get_by_text("Error", exact=True).count() == 0
        page.get_by_role("button", name="New chat").click()  # leave it, then reopen it from the list
        page.locator("#chatbot").get_by_text("Keep this conversation").wait_for(state="detached", timeout=20000)
        page.locator("#conversations label").first.click()
        page.locator("#chatbot").get_by_text("Keep this conversation").wait_for(timeout=30000)
        assert _db_rows(tmp_path, "SELECT count(*) FROM messages")[0][0] >= 2
        page.once("dialog", lambda dialog: dialog.accept())
        page.click("#delete-data")
        page.wait_for_function("document.querySelector('#chat-hint').innerText.includes('Deleted')", timeout=20000)
        assert page.locator("#conversations label").count() == 0
        assert page.get_by_text("Error", exact=True).count() == 0
    assert _db_rows(tmp_path, "SELECT count(*) FROM messages")[0][0] == 0


def test_send_turns_into_stop_while_a_reply_streams_and_the_box_is_free_at_once(tiny_model_dir, tmp_path):
    """Issue 15 item 5: pressing Send empties the box at once (before the reply's first update) and
    shows Stop in Send's place until the reply ends, then Send again; text typed meanwhile stays
    in the box. A MutationObserver records what the page showed, so the check does not depend on
    how long the random model's reply happens to be."""
    with live_app(tmp_path, tiny_model_dir) as url, browser_page("send-stop") as page:
        page.goto(url)
        page.get_by_text(f"Chat · model {tiny_model_dir.name}").wait_for(timeout=30000)  # the page is live
        page.evaluate("""() => {
            window.seen = {stop: false, sendHiddenWithStop: false, boxEmptyBeforeReply: false};
            const visible = (id) => { const el = document.getElementById(id); return !!el && el.offsetParent !== null; };
            new MutationObserver(() => {
                const stop = visible('stop-btn');
                if (stop) { window.seen.stop = true; if (!visible('send-btn')) window.seen.sendHiddenWithStop = true; }
                const box = document.querySelector('#chat-input textarea');
                const replies = document.querySelectorAll('#chatbot .message').length;
                if (box && box.value === '' && stop && replies < 2) window.seen.boxEmptyBeforeReply = true;
            }).observe(document.body, {subtree: true, childList: true, attributes: true});
        }""")
        page.fill("#chat-input textarea", "First question")
        page.click("#send-btn")
        page.locator("#conversations").get_by_text("First question").wait_for(timeout=90000)
        page.fill("#chat-input textarea", "typed while it answered")
        page.locator("#send-btn").wait_for(state="visible", timeout=90000)
        assert not page.locator("#stop-btn").is_visible()
        seen = page.evaluate("window.seen")
        assert seen == {"stop": True, "sendHiddenWithStop": True, "boxEmptyBeforeReply": True}, seen
        assert page.input_value("#chat-input textarea") == "typed while it answered"
    users = _db_rows(tmp_path, "SELECT content FROM messages WHERE role = 'user' ORDER BY id")
    assert users == [("First question",)]


def test_a_reply_cut_off_by_closing_the_tab_is_marked_and_regenerate_answers_it(tiny_model_dir, tmp_path):
    """Issue 15 item 6: a conversation whose last question was left unanswered, as a closed tab
    leaves it (user turn `stopped`, no reply stored: tests/test_security_disconnect.py checks that
    the service leaves exactly this), shows an "interrupted, press Regenerate" marker when reopened
    in the browser; Regenerate writes the answer, which is stored, and the marker is gone."""
    from sqlalchemy import create_engine, text as sql

    with live_app(tmp_path, tiny_model_dir) as url, browser_page("interrupted") as page:
        page.goto(url)
        _max_new_tokens(page, 4, open_settings=True)
        page.fill("#chat-input textarea", "A question left behind")
        page.click("#send-btn")
        page.locator("#conversations").get_by_text("A question left behind").wait_for(timeout=90000)
        page.locator("#send-btn").wait_for(state="visible", timeout=60000)
        engine = create_engine(f"sqlite:///{tmp_path / 'chat.db'}")
        with engine.begin() as conn:  # what a closed tab leaves behind
            conn.execute(sql("DELETE FROM messages WHERE role = 'assistant'"))
            conn.execute(sql("UPDATE messages SET status = 'stopped' WHERE role = 'user'"))
        engine.dispose()
        page.reload()
        page.get_by_text("Chat · model").wait_for(timeout=30000)
        page.locator("#conversations label").first.click()
        page.locator("#chatbot").get_by_text("interrupted before it was finished").wait_for(timeout=30000)
        page.click("#regen-btn")
        page.locator("#chatbot").get_by_text("interrupted before it was finished").wait_for(
            state="detached", timeout=60000)
        page.locator("#send-btn").wait_for(state="visible", timeout=60000)
    rows = _db_rows(tmp_path, "SELECT role, status FROM messages ORDER BY id")
    assert rows[0] == ("user", "answered") and rows[1][0] == "assistant" and len(rows) == 2  # answered by the retry


def test_the_empty_chat_welcomes_with_keys_and_examples_and_names_the_model(tiny_model_dir, tmp_path):
    """A new chat shows a welcome with the keyboard shortcuts and example prompts, and the chat's
    label names the model version that answers; clicking an example sends it as a message."""
    with live_app(tmp_path, tiny_model_dir) as url, browser_page("welcome") as page:
        page.goto(url)
        page.locator("#chatbot").get_by_text("Ask the local model anything").wait_for(timeout=30000)
        assert page.locator("#chatbot").get_by_text("Alt+S").count() == 1
        page.get_by_text(f"Chat · model {tiny_model_dir.name}").wait_for(timeout=30000)
        page.locator("#chatbot").get_by_text("Write a haiku about the sea.").click()
        page.locator("#conversations").get_by_text("Write a haiku about the sea.").wait_for(timeout=90000)
        page.screenshot(path=str(tmp_path / "welcome.png"))
    users = _db_rows(tmp_path, "SELECT content FROM messages WHERE role = 'user'")
    assert users == [("Write a haiku about the sea.",)]


def test_conversations_can_be_searched_renamed_and_deleted(tiny_model_dir, tmp_path):
    """The conversation list: search finds a chat by a word in it (any case), "This chat" renames
    the open conversation and deletes it after a confirmation (cancel keeps it); the database
    agrees at each step."""
    with live_app(tmp_path, tiny_model_dir) as url, browser_page("conversations") as page:
        page.goto(url)
        for text in ("Plans for a trip to Paris", "Sorting lists in Python"):
            page.get_by_role("button", name="New chat").click()
            page.fill("#chat-input textarea", text)
            page.click("#send-btn")
            page.locator("#conversations").get_by_text(text).wait_for(timeout=90000)
            page.locator("#send-btn").wait_for(state="visible", timeout=60000)
        page.fill("#conv-search input", "PARIS")
        page.locator("#conversations").get_by_text("Sorting lists in Python").wait_for(state="detached", timeout=20000)
        assert page.locator("#conversations label").count() == 1
        page.fill("#conv-search input", "")
        page.locator("#conversations").get_by_text("Sorting lists in Python").wait_for(timeout=20000)
        page.locator("#conversations").get_by_text("Sorting lists in Python").click()
        page.locator("#chatbot").get_by_text("Sorting lists in Python").wait_for(timeout=30000)
        page.get_by_text("This chat").click()
        page.fill("#rename-box input", "Python notes")
        page.click("#rename-btn")
        page.locator("#conversations").get_by_text("Python notes").wait_for(timeout=20000)
        assert ("Python notes",) in _db_rows(tmp_path, "SELECT title FROM conversations")
        page.once("dialog", lambda dialog: dialog.dismiss())
        page.click("#delete-chat")
        page.wait_for_function("document.querySelector('#chat-hint').innerText.includes('Nothing was deleted')",
                               timeout=20000)
        page.once("dialog", lambda dialog: dialog.accept())
        page.click("#delete-chat")
        page.locator("#conversations").get_by_text("Python notes").wait_for(state="detached", timeout=20000)
    assert _db_rows(tmp_path, "SELECT title FROM conversations") == [("Plans for a trip to Paris",)]
    assert _db_rows(tmp_path, "SELECT count(*) FROM messages")[0][0] == 2

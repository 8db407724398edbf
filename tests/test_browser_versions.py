"""Regenerate's reply versions in a real browser: < n/m > brings an older reply back."""

import pytest

from tests.browser import browser_page
from tests.live_app import live_app
from tests.test_browser import _db_rows, _max_new_tokens

pytestmark = pytest.mark.browser


def test_regenerate_keeps_the_old_reply_and_its_vote_behind_version_arrows(tiny_model_dir, tmp_path):
    """Issue 15 item 10: after Regenerate the chat shows "version 2 / 2"; ‹ brings back the first
    reply with the thumb the user gave it, and the database shows that version as the thread's
    end (the next message continues from it). One reply: no arrows."""
    with live_app(tmp_path, tiny_model_dir) as url, browser_page("versions") as page:
        page.goto(url)
        _max_new_tokens(page, 6, open_settings=True)
        page.fill("#chat-input textarea", "Hello versions")
        page.click("#send-btn")
        page.locator("#conversations").get_by_text("Hello versions").wait_for(timeout=90000)
        assert not page.locator("#version-label").is_visible()
        page.get_by_label("Like", exact=True).last.click()
        page.wait_for_function("document.querySelector('#chat-hint').innerText.includes('saved')", timeout=20000)
        page.click("#regen-btn")
        page.locator("#version-label").get_by_text("version 2 / 2").wait_for(timeout=90000)
        assert page.locator('#chatbot button[aria-label="Liked"]').count() == 0  # the new reply has no vote
        page.click("#version-prev")
        page.locator("#version-label").get_by_text("version 1 / 2").wait_for(timeout=30000)
        page.locator('#chatbot button[aria-label="Liked"]').wait_for(timeout=10000)
    [(first_reply,)] = _db_rows(tmp_path, "SELECT MIN(id) FROM messages WHERE role = 'assistant'")
    assert _db_rows(tmp_path, "SELECT shown_leaf_id FROM conversations") == [(first_reply,)]

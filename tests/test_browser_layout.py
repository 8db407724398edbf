"""Layout in a real browser (issue 15): the Rank tab after a save (item 9) and the chat at phone
width (390 px, the conversation list in a drawer)."""

import json
import subprocess
import sys

import pytest

from tests.browser import browser_page
from tests.live_app import live_app

pytestmark = pytest.mark.browser

# Records every text #cand-A shows (looked up afresh on each change: Gradio may re-render the
# element), so a test can tell whether the saved task's candidates left the screen before the
# next task's arrived (a poll could miss a short-lived state).
RECORD_CAND_A = """() => {
  window.__candA = [];
  const note = () => {
    const el = document.querySelector('#cand-A .prose, #cand-A');
    const t = el ? el.innerText.trim() : '';
    if (window.__candA[window.__candA.length - 1] !== t) window.__candA.push(t);
  };
  new MutationObserver(note).observe(document.body, {childList: true, subtree: true, characterData: true});
}"""


def _rect(page, selector: str) -> dict:
    return page.evaluate(f"(() => {{ const r = document.querySelector({selector!r}).getBoundingClientRect();"
                         " return {top: r.top, bottom: r.bottom, left: r.left, right: r.right, height: r.height}; })()")


def _import_prompts(tmp_path, prompts: list[str]) -> None:
    from feedback.db import migrate

    url_db = f"sqlite:///{tmp_path / 'chat.db'}"
    migrate(url_db)
    rows = tmp_path / "prompts.jsonl"
    rows.write_text("".join(json.dumps({"prompt": p, "chosen": "Yes.", "rejected": "No."}) + "\n" for p in prompts))
    subprocess.run([sys.executable, "-m", "feedback.importer", str(rows), "--url", url_db], check=True)


def test_rank_save_clears_the_task_shows_saved_at_the_top_and_limits_candidate_height(tiny_model_dir, tmp_path):
    """Item 9: after Enter saves a ranking, the saved task's candidates leave the screen before the
    next task's arrive (A shows only its label in between), the "Saved" note is inside the
    viewport (it was below the fold), and each candidate box is at most 360 px high with a
    scrollbar for longer replies."""
    _import_prompts(tmp_path, ["Name a colour", "Name a fruit", "Name a city"])
    with live_app(tmp_path, tiny_model_dir) as url, browser_page("rank-layout", 1280, 720) as page:
        page.goto(url)
        page.get_by_role("tab", name="Rank").click()
        page.wait_for_function("document.querySelector('#cand-D')?.innerText.trim().length > 1", timeout=90000)
        first = page.inner_text("#cand-A").strip()
        style = page.evaluate("getComputedStyle(document.querySelector('#cand-A')).maxHeight")
        assert style == "360px", style
        assert _rect(page, "#cand-A")["height"] <= 361
        page.evaluate(RECORD_CAND_A)
        page.fill("#rank-order textarea, #rank-order input", "ABCD")
        page.keyboard.press("Enter")
        # "Next task" is written with the next task's candidates (by the step after the save).
        page.wait_for_function("document.querySelector('#rank-note').innerText.includes('Saved. Next task')",
                               timeout=90000)
        assert page.inner_text("#cand-A").strip() != first
        seen = page.evaluate("window.__candA")
        assert "A" in seen, f"the saved task's candidate stayed until the next one came: {seen[:5]}"
        page.wait_for_timeout(500)  # the scroll to the new task runs after it is shown
        note = _rect(page, "#rank-note")
        assert 0 <= note["top"] and note["bottom"] <= 720, f"'Saved' is outside the 720 px viewport: {note}"


def test_at_phone_width_the_message_box_is_on_screen_and_the_conversations_open_in_a_drawer(tiny_model_dir,
                                                                                              tmp_path):
    """At 390 x 844 the message box is visible without scrolling and the conversation list is off
    screen; "☰ Chats" slides it in; picking a conversation closes it and opens that chat. At
    1280 px the list is an ordinary column and the drawer buttons are hidden."""
    with live_app(tmp_path, tiny_model_dir) as url:
        with browser_page("phone-drawer", 390, 844) as page:
            page.goto(url)
            page.get_by_text("Chat · model").wait_for(timeout=30000)
            box = _rect(page, "#chat-input textarea")
            assert 0 <= box["top"] and box["bottom"] <= 844, f"message box off screen at 390 px: {box}"
            assert _rect(page, "#conversations")["right"] <= 0, "the conversation list is on screen"
            page.fill("#chat-input textarea", "Hello from a phone")
            page.click("#send-btn")
            # The list gets the new chat with the reply's last update (off screen: still "visible").
            page.locator("#conversations").get_by_text("Hello from a phone").wait_for(timeout=90000)
            page.click("#drawer-toggle")
            page.wait_for_timeout(400)  # the slide-in transition (0.2 s)
            drawer = _rect(page, "#conversations")
            assert drawer["left"] >= 0 and drawer["right"] <= 390, drawer
            page.click("#drawer-close")
            page.wait_for_timeout(400)
            assert _rect(page, "#conversations")["right"] <= 0
            page.click("#drawer-toggle")
            page.wait_for_timeout(400)
            page.locator("#conversations").get_by_text("Hello from a phone").click()
            page.wait_for_timeout(400)
            assert _rect(page, "#conversations")["right"] <= 0, "the drawer stayed open after a chat was picked"
            page.locator("#chatbot").get_by_text("Hello from a phone").wait_for(timeout=30000)
        with browser_page("desktop-column", 1280, 1000) as page:
            page.goto(url)
            page.get_by_text("Chat · model").wait_for(timeout=30000)
            assert page.locator("#drawer-toggle").is_hidden() and page.locator("#drawer-close").is_hidden()
            column = _rect(page, "#conversations")
            assert column["left"] >= 0 and column["right"] < _rect(page, "#chatbot")["left"]


def test_regenerate_shows_only_in_a_conversation(tiny_model_dir, tmp_path):
    """Issue 15 (smaller items): a new, empty chat has no Regenerate; it appears with the first
    reply and goes again with + New chat."""
    with live_app(tmp_path, tiny_model_dir) as url, browser_page("regen-visible") as page:
        page.goto(url)
        page.get_by_text("Chat · model").wait_for(timeout=30000)
        assert page.locator("#regen-btn").is_hidden()
        page.fill("#chat-input textarea", "Something to regenerate")
        page.click("#send-btn")
        page.locator("#conversations").get_by_text("Something to regenerate").wait_for(timeout=90000)
        page.locator("#regen-btn").wait_for(state="visible", timeout=10000)
        page.get_by_role("button", name="+ New chat").click()
        page.locator("#regen-btn").wait_for(state="hidden", timeout=10000)

"""XSS: payloads as user input and as model output never execute; the database keeps raw text."""

import pytest
from sqlalchemy import select

from app.service import ChatService
from bench.inprocess import ScriptedEngine, serve
from feedback.models import Message
from tests.browser import browser_page

pytestmark = pytest.mark.browser

PAYLOADS = [
    '<img src=x onerror="window.__xss=1">', "<svg onload=window.__xss=1>", "<script>window.__xss=1</script>",
    '<iframe src="javascript:window.__xss=1"></iframe>', '<body onload="window.__xss=1">',
    '<a href="javascript:window.__xss=1">click</a>', "[click me](javascript:window.__xss=1)",
    "[x](JaVaScRiPt:window.__xss=1)", '<div onmouseover="window.__xss=1">hover</div>',
    '<input autofocus onfocus="window.__xss=1">', '<details open ontoggle="window.__xss=1">',
    '<video><source onerror="window.__xss=1"></video>', '<audio src=x onerror="window.__xss=1">',
    '<object data="javascript:window.__xss=1"></object>', '<embed src="javascript:window.__xss=1">',
    '<marquee onstart="window.__xss=1">m</marquee>', '<math><mtext><img src=x onerror="window.__xss=1">',
    '"><img src=x onerror=window.__xss=1>', "'><svg/onload=window.__xss=1>",
    '<img src="x" onerror="&#119;indow.__xss=1">', '<svg><script>window.__xss=1</script></svg>',
    '<form action="javascript:window.__xss=1"><button>go</button></form>', '<isindex action=javascript:alert(1)>',
    '<img src=x:alert(1) onerror=eval(src)>', '<link rel=import href="data:text/html,<script>window.__xss=1</script>">',
    '<meta http-equiv="refresh" content="0;url=javascript:window.__xss=1">', "![img](x onerror=window.__xss=1)",
    '<style>@import "javascript:window.__xss=1";</style>', '<table background="javascript:window.__xss=1">',
    '<base href="javascript:window.__xss=1//">', '<textarea onfocus=window.__xss=1 autofocus>',
    '<select onfocus=window.__xss=1 autofocus>', "<a href=\"data:text/html,<script>alert(1)</script>\">d</a>",
]


def _wait_for_replies(session_factory, n: int, timeout: float = 30) -> None:
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        with session_factory() as s:
            if len(s.scalars(select(Message.id).where(Message.role == "assistant")).all()) >= n:
                return
        time.sleep(0.2)
    raise TimeoutError(f"reply {n} never finished")


def test_payloads_do_not_execute(session_factory, settings):
    assert len(PAYLOADS) >= 30
    chunks = [PAYLOADS[i:i + 11] for i in range(0, len(PAYLOADS), 11)]
    engine = ScriptedEngine(lambda msgs: "Here you go: " + "\n\n".join(PAYLOADS))
    service = ChatService(engine, session_factory, settings)
    with serve(service) as url, browser_page("xss") as page:
        dialogs = []
        page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        page.goto(url)
        for i, chunk in enumerate(chunks, 1):
            page.fill("#chat-input textarea", "\n".join(chunk))
            page.click("#send-btn")
            _wait_for_replies(session_factory, i)
            page.wait_for_timeout(1500)  # the last streamed update reaches the page
        page.wait_for_timeout(1500)
        page.mouse.move(300, 300)
        assert page.evaluate("window.__xss") is None
        hrefs = page.eval_on_selector_all("#chatbot a", "els => els.map(e => e.getAttribute('href') || '')")
        assert not [h for h in hrefs if h.strip().lower().startswith(("javascript:", "data:"))]
        assert page.locator("#chatbot script, #chatbot iframe, #chatbot object, #chatbot embed").count() == 0
        assert dialogs == []
    with session_factory() as s:
        users = [m.content for m in s.scalars(select(Message).where(Message.role == "user").order_by(Message.id))]
    assert users == ["\n".join(c) for c in chunks]  # raw text kept

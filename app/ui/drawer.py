"""The conversation list as a drawer on narrow screens (phones): at 390 px the list sat above the
chat and pushed the message box off-screen. Below 700 px the list's column slides in from the
left over the chat ("☰ Chats" opens it; tapping a chat, New chat or ✕ closes it); on wider
screens it stays a column and the two buttons are hidden. CSS and browser-side JS only: nothing
here talks to the server."""

from __future__ import annotations

import gradio as gr

NARROW = "700px"
DRAWER_CSS = f"""
#drawer-toggle, #drawer-close {{ display: none !important; }}
@media (max-width: {NARROW}) {{
  #drawer-toggle {{ display: inline-flex !important; align-self: flex-start; }}
  #drawer-close {{ display: inline-flex !important; align-self: flex-end; }}
  #conv-drawer {{ position: fixed !important; top: 0; left: 0; bottom: 0; z-index: 1000;
                 width: 85vw !important; max-width: 320px; min-width: 0 !important; overflow-y: auto;
                 padding: 12px; background: var(--background-fill-primary);
                 box-shadow: 0 0 24px rgba(0, 0, 0, .35); transform: translateX(-110%);
                 transition: transform .2s ease-out; }}
  #conv-drawer.drawer-open {{ transform: none; }}
  #chatbot {{ height: 58vh !important; }}
  #app-title h2 {{ font-size: 1.15rem; }}
}}
"""
# Page-load script: a tap on any conversation closes the drawer, also on the one already
# selected (a radio fires no input event for it).
DRAWER_PAGE_JS = """() => {
  document.addEventListener('click', (e) => {
    if (e.target.closest('#conversations label')) document.querySelector('#conv-drawer')?.classList.remove('drawer-open');
  });
}"""
OPEN_JS = "() => { document.querySelector('#conv-drawer')?.classList.add('drawer-open'); }"
CLOSE_JS = "() => { document.querySelector('#conv-drawer')?.classList.remove('drawer-open'); }"


def wire_drawer(toggle: gr.Button, close: gr.Button, *closing_events) -> None:
    """Open on ``toggle``; close on ``close`` and on each of ``closing_events`` (e.g. a chat picked).
    Each is a listener of its own with no Python function, so it adds no server round trip."""
    toggle.click(None, None, None, js=OPEN_JS)
    for event in (close.click, *closing_events):
        event(None, None, None, js=CLOSE_JS)

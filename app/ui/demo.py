"""Assemble the Gradio app from its tabs."""

from __future__ import annotations

import gradio as gr

from app.auth import caller_name, role_of

from app.ui.admin_tab import build_admin_tab
from app.ui.guard import unless_admin_skip
from app.ui.chat_tab import build_chat_tab
from app.ui.drawer import DRAWER_CSS, DRAWER_PAGE_JS
from app.ui.ranking_tab import SHORTCUTS_JS, build_ranking_tab

CSS = """
#chat-hint p { color: #b45309; margin: 0; min-height: 1.2em; }
footer { display: none !important; }
""" + DRAWER_CSS
# Gradio takes one page-load function: run each tab's in turn.
PAGE_JS = f"() => {{ ({SHORTCUTS_JS.strip()})(); ({DRAWER_PAGE_JS})(); }}"


def build_demo(service, worker=None, control=None) -> gr.Blocks:
    """``worker``: the CandidateWorker that prepares ranking tasks (None = generate on demand only)."""
    if control is None:
        from app.training_control import TrainingControl

        control = TrainingControl(service)
    with gr.Blocks(title="Feedback Chat") as demo:
        gr.Markdown("## Feedback Chat · a local model that learns from your votes", elem_id="app-title")
        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                refresh_list, convs, model_label, chatbot = build_chat_tab(service)
            rank_tab = build_ranking_tab(service, worker)
            admin_tab, admin_refresh, admin_outputs = build_admin_tab(service, control)

        def show_tabs_for_role(request: gr.Request):
            # Convenience only: every handler behind these tabs checks the role on the server.
            role = role_of(service.session_factory, caller_name(request))
            return gr.update(visible=role in ("annotator", "admin")), gr.update(visible=role == "admin")

        demo.load(show_tabs_for_role, None, [rank_tab, admin_tab], api_visibility="private")
        demo.load(refresh_list, None, convs, api_visibility="private")
        demo.load(model_label, None, chatbot, api_visibility="private")
        demo.load(unless_admin_skip(service, admin_refresh, len(admin_outputs)), None, admin_outputs,
                  api_visibility="private")
    return demo

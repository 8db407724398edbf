"""The admin tab. Every handler checks the admin role on the server (see app/ui/guard.py)."""

from __future__ import annotations

import gradio as gr

from app.ui.moderation_panel import build_moderation_panel


def build_admin_tab(service) -> tuple:
    """Returns (refresh function, its outputs) so the page load can fill the tab."""
    with gr.Tab("Admin", id="admin"):
        refresh_btn = gr.Button("Refresh", size="sm")
        with gr.Tab("Moderation"):
            refresh, outputs = build_moderation_panel(service)
        refresh_btn.click(refresh, None, outputs, api_name="admin_refresh")
    return refresh, outputs

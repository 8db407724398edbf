"""The admin tab. Every handler checks the admin role on the server (see app/ui/guard.py)."""

from __future__ import annotations

import gradio as gr

from app.ui.corpus_panel import build_corpus_panel
from app.ui.data_panel import build_data_panel
from app.ui.guard import unless_admin_skip
from app.ui.moderation_panel import build_moderation_panel
from app.ui.training_panel import build_training_panel
from app.ui.trial_panel import build_trial_panel


def build_admin_tab(service, control) -> tuple:
    """Returns (tab, refresh function, its outputs) so the page load can show and fill the tab."""
    with gr.Tab("Admin", id="admin", visible=False) as tab:
        refresh_btn = gr.Button("Refresh", size="sm")
        with gr.Tab("Training"):
            refresh_train, train_outputs = build_training_panel(service, control)
        with gr.Tab("Trials"):
            refresh_trials, trial_outputs = build_trial_panel(service, control)
        with gr.Tab("Data"):
            refresh_data, data_outputs = build_data_panel(service)
            build_corpus_panel(service)
        with gr.Tab("Moderation"):
            refresh_mod, mod_outputs = build_moderation_panel(service)
    outputs = train_outputs + trial_outputs + data_outputs + mod_outputs

    def refresh(request: gr.Request):
        return (*refresh_train(request), *refresh_trials(request), refresh_data(request), *refresh_mod(request))

    refresh_btn.click(refresh, None, outputs, api_name="admin_refresh")
    # Live counts: data and moderation numbers every 5 s (cheap: data_counts rebuilds pairs only
    # when the data behind them changed), so an import or a new flag shows without Refresh.
    live = gr.Timer(5.0)
    live.tick(unless_admin_skip(service, lambda request: (refresh_data(request), refresh_mod(request)[0]), 2), None,
              [data_outputs[0], mod_outputs[0]], api_visibility="private", show_progress="hidden")
    return tab, refresh, outputs

"""Admin: what training data exists (counts, pairs by source, agreement), export and import."""

from __future__ import annotations

import time
from pathlib import Path

import gradio as gr

from app.auth import caller_name
from app.my_data import EXPORT_PATH
from app.ui.guard import ADMIN, denied
from feedback.datasets import KINDS, export
from feedback.db import session_scope
from feedback.importer import ImportFileError, import_file
from feedback.stats import data_counts


def _counts_md(service) -> str:
    with session_scope(service.session_factory) as s:
        c = data_counts(session=s)
    tau = "n/a (no task ranked twice yet)" if c["agreement_tau"] is None else \
        f"{c['agreement_tau']:.2f} Kendall's tau over {c['agreement_pairs']} annotator pairs"
    by_source = ", ".join(f"{k}: {v}" for k, v in sorted(c["pairs_by_source"].items())) or "none"
    return (f"| prompts | rankings | skipped | demonstrations | pairs | votes up / down |\n|---|---|---|---|---|---|\n"
            f"| {c['prompts']} ({c['prompts_from_chat']} from chat) | {c['rankings']} | {c['skipped']} | "
            f"{c['demonstrations']} | {c['pairs']} | {c['votes_up']} / {c['votes_down']} |\n\n"
            f"**Pairs by source:** {by_source}  \n**Annotator agreement:** {tau}")


def build_data_panel(service) -> tuple:
    counts = gr.Markdown(elem_id="data-counts")
    with gr.Row():
        kind = gr.Dropdown(list(KINDS), value="preferences", label="Export kind")
        export_btn = gr.Button("Export JSONL")
        # A one-time link for this admin (app.my_data): no copy in Gradio's file cache.
        exported = gr.Markdown("", elem_id="export-link")
    with gr.Row():
        upload = gr.File(label="Import preferences (TRL or HH-RLHF JSONL)", file_types=[".jsonl", ".json"])
        import_btn = gr.Button("Import")
    note = gr.Markdown(elem_id="data-note")

    def refresh(request: gr.Request):
        if (msg := denied(service, request, ADMIN, "view data", view=True)) is not None:
            return msg
        return _counts_md(service)

    def do_export(k, request: gr.Request):
        if (msg := denied(service, request, ADMIN, "export data", k)) is not None:
            return msg, ""
        if k not in KINDS:
            return f"⚠ Choose what to export: {', '.join(KINDS)}.", ""
        out = Path(service.settings.data_dir) / "exports" / f"{k}-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
        with session_scope(service.session_factory) as s:
            snap = export(session=s, kind=k, out=out)
            counts, snap_id = snap.counts, snap.id
        link = service.export_links.issue(caller_name(request), payload=str(out.resolve()), path=EXPORT_PATH)
        minutes = round(service.export_links.ttl_s / 60)
        return (f"Exported {counts} as data snapshot {snap_id} (kept at `{out}`).",
                f"[Download {out.name}]({link}): a link for you only, valid once for {minutes} minutes.")

    def do_import(file, request: gr.Request):
        if (msg := denied(service, request, ADMIN, "import data")) is not None:
            return msg, gr.update()
        if file is None:
            return "Choose a file first.", gr.update()
        try:
            with session_scope(service.session_factory) as s:
                report = import_file(session=s, path=file, wanted=service.settings.annotations_per_task)
        except ImportFileError as exc:
            return f"⚠ Nothing imported: {exc}", gr.update()
        return "```\n" + report.summary() + "\n```", _counts_md(service)

    export_btn.click(do_export, [kind], [note, exported], api_name="export_data")
    import_btn.click(do_import, [upload], [note, counts], api_name="import_data")
    return refresh, [counts]

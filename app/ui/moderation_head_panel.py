"""Admin > Moderation > Learned head: train a head from labels, read its metrics, switch it on."""

from __future__ import annotations

import threading
from pathlib import Path

import gradio as gr

from app.ui.guard import ADMIN, denied
from training.moderation_head import describe, encoder_model_dir, flag_rate, gather_rows, logged_chat
from model.moderation.head_store import activate, heads_dir, list_heads, pinned_head_name
from model.moderation.learned import EncoderSpec, HeadLoadError, LearnedBackend, describe_encoder

HEAD_HEADERS = ["head", "created", "in use", "rows (harmful)", "ROC AUC (95%)", "recall", "false positives",
                "everyday prompts flagged (out of fold)", "logged chat flagged", "features"]


def head_rows(data_dir) -> list[list]:
    rows = []
    for h in list_heads(data_dir):
        if "error" in h:
            rows.append([h["name"], "—", "", "unreadable: " + h["error"][:120], "", "", "", "", "", ""])
            continue
        m = h["metrics"].get("toxicity") or next(iter(h["metrics"].values()), {})
        rows.append([h["name"], h["created"], ("pinned" if h["pinned"] else "newest") if h["active"] else "", f"{h['data']['rows']} ({h['data']['positives']})",
                     f"{m['auc']:.3f} [{m['auc_low']:.2f}, {m['auc_high']:.2f}]", f"{m['recall']:.2f}", f"{m['fpr']:.2f}",
                     flag_rate(m, "everyday"), flag_rate(m, "logged"),
                     describe_encoder(h["encoder"])])
    return rows


def build_head_panel(service) -> tuple:
    gr.Markdown("A small classifier on the chat model's own hidden states, trained on the ToxiGen calibration "
                "set, your review decisions above and any labelled JSONL (`{\"text\", \"label\"}`). Its metrics "
                "are cross-validated (every score from a head that never saw that row). Until you switch "
                "one on (a pin), the newest trained head is the one in use.")
    heads = gr.Dataframe(headers=HEAD_HEADERS, interactive=False, elem_id="moderation-heads", label="Trained heads")
    with gr.Row():
        labels = gr.File(label="Extra labelled rows (JSONL, optional)", file_types=[".jsonl"])
        with gr.Column():
            train_btn = gr.Button("Train a head", variant="primary")
            name = gr.Textbox(label="Head to switch on", placeholder="head-0001")
            switch_btn = gr.Button("Switch on")
    note = gr.Markdown(elem_id="moderation-head-note")
    data_dir = Path(service.settings.data_dir)
    swap_lock = threading.Lock()

    def refresh(request: gr.Request):
        if denied(service, request, ADMIN, "view moderation heads", view=True) is not None:
            return []
        return head_rows(data_dir)

    def train(file, request: gr.Request, progress=gr.Progress()):
        if (msg := denied(service, request, ADMIN, "train moderation head")) is not None:
            return msg, gr.update(), gr.update()
        from model.moderation.head_store import train_head

        try:
            rows = gather_rows(service.session_factory, [file] if file else [])
            spec = EncoderSpec(model_dir=encoder_model_dir(data_dir, service.settings.model))
            threshold = service.moderator.default_threshold if service.moderator else 0.5
            meta = train_head(rows, spec, data_dir, ordinary=logged_chat(service.session_factory),
                              threshold=threshold, progress=lambda f, desc: progress(f, desc=desc))
        except (OSError, ValueError) as exc:
            return f"⚠ No head trained: {exc}", gr.update(), gr.update()
        return "```\n" + describe(meta) + "\n```\n" + use_if_unpinned(meta["name"]), head_rows(data_dir), meta["name"]

    def use_if_unpinned(head_name: str) -> str:
        """`auto` moderation uses the newest head unless one is pinned: put the new one in now."""
        with swap_lock:  # the pin read and the swap in one step, against a Switch on meanwhile
            return _use_if_unpinned(head_name)

    def _use_if_unpinned(head_name: str) -> str:
        if pinned_head_name(data_dir) is not None:
            return f"Read the metrics; {pinned_head_name(data_dir)} stays in use until you switch this one on."
        configured = {n.strip() for n in service.settings.moderation_backends.split(",")}
        if service.moderator is None or not configured & {"auto", "learned"}:
            return "Read the metrics; moderation backends are set explicitly, so nothing changed."
        try:
            service.moderator.use_backend(LearnedBackend(heads_dir(data_dir) / head_name))
        except HeadLoadError as exc:
            return f"⚠ {exc}"
        return (f"{head_name} is in use now (the newest head: none is pinned); switch another on to pin it. "
                f"Backends: {', '.join(service.moderator.backend_names)}.")

    def switch(head_name, request: gr.Request):
        head_name = (head_name or "").strip()
        if (msg := denied(service, request, ADMIN, "switch moderation head", head_name)) is not None:
            return msg, gr.update()
        if service.moderator is None:
            return "⚠ Moderation is off (CHAT_MODERATION_BACKENDS=none); nothing to switch on.", gr.update()
        if head_name not in {h["name"] for h in list_heads(data_dir)}:
            return f"⚠ No head named {head_name!r}.", gr.update()
        try:
            backend = LearnedBackend(heads_dir(data_dir) / head_name)  # load (and check) before anything changes
            with swap_lock:
                activate(data_dir, head_name)
                service.moderator.use_backend(backend)
        except HeadLoadError as exc:
            return f"⚠ {exc}", gr.update()
        return (f"{head_name} is on (pinned): every message is now also checked by it (backends: "
                f"{', '.join(service.moderator.backend_names)})."), head_rows(data_dir)

    train_btn.click(train, [labels], [note, heads, name], api_name="train_moderation_head")
    switch_btn.click(switch, [name], [note, heads], api_name="switch_moderation_head")
    return refresh, [heads]

"""Admin: active moderation backends, counts, the review queue and the template editor."""

from __future__ import annotations

import gradio as gr

from app.auth import caller_name
from app.ui.guard import ADMIN, denied
from app.ui.moderation_head_panel import build_head_panel
from feedback import moderation_repo
from feedback.db import session_scope
from feedback.repository import NotFoundError, ValidationError

QUEUE_HEADERS = ["id", "when", "direction", "decision", "category", "max score", "backend", "review", "text"]


ORDERS = ("newest first", "least sure first (learned head)")


def _queue_rows(service, include_passed: bool = False, order: str = ORDERS[0]) -> list[list]:
    with session_scope(service.session_factory) as s:
        if order == ORDERS[1]:
            threshold = service.moderator.threshold("toxicity") if service.moderator else 0.5
            events = moderation_repo.uncertain_events(session=s, backend="learned", threshold=threshold)
        else:
            events = moderation_repo.flagged_events(session=s, include_passed=include_passed)
        return [[e.id, e.created_at.strftime("%Y-%m-%d %H:%M"), e.direction, e.decision, e.category or "",
                 round(max((v for b in e.scores.values() for v in b.values()), default=0.0), 3),
                 e.backend, e.review or "—", e.text[:300]] for e in events]


def _summary(service) -> str:
    with session_scope(service.session_factory) as s:
        c = moderation_repo.moderation_counts(session=s)
    mod = service.moderator
    backends = ", ".join(mod.backend_names) if mod else "none (moderation off)"
    thr = "" if mod is None else f"default threshold {mod.default_threshold}" + (
        f", overrides {mod.thresholds}" if mod.thresholds else "")
    return (f"**Active backends:** {backends} · {thr}  \n"
            f"**Checked:** {c['checked']} · **flagged inputs:** {c['flagged_in']} · **flagged outputs:** "
            f"{c['flagged_out']} · **backend errors (blocked):** {c['errors']}  \n"
            f"**Review:** {c['unreviewed']} waiting · {c['correct']} correct · {c['false_positive']} false positive · "
            f"{c['missed']} missed (passed, should have been flagged)")


def build_moderation_panel(service) -> callable:
    summary = gr.Markdown(elem_id="moderation-summary")
    with gr.Row():
        show_all = gr.Checkbox(label="Show passed checks too", value=False)
        order = gr.Radio(list(ORDERS), value=ORDERS[0], label="Order",
                         info="Least sure: passed and flagged messages the learned head scored nearest its threshold")
    queue = gr.Dataframe(headers=QUEUE_HEADERS, interactive=False, wrap=True, elem_id="moderation-queue",
                         label="Flagged messages, newest first (never shown to other users)")
    with gr.Row():
        event_id = gr.Number(label="Event id", precision=0)
        correct = gr.Button("Mark correct")
        false_pos = gr.Button("Mark false positive")
        missed = gr.Button("Mark missed (passed, should be flagged)")
    note = gr.Markdown()
    with gr.Accordion("Learned head", open=False):
        refresh_heads, head_outputs = build_head_panel(service)
    with gr.Accordion("Template replies", open=False):
        with gr.Row():
            direction = gr.Dropdown(["in", "out"], value="in", label="Direction")
            category = gr.Textbox(value="*", label="Category (* = any)")
        # Filled by the admin's page load and Refresh with the template in use (the admin's edit,
        # else the default): an empty box read as "no template" while one was being shown to users.
        template = gr.Textbox(label="Reply shown instead", lines=3, elem_id="template-text")
        save_tpl = gr.Button("Save template")

    def refresh(request: gr.Request):
        if (msg := denied(service, request, ADMIN, "view moderation", view=True)) is not None:
            return msg, [], [], ""
        return _summary(service), _queue_rows(service), refresh_heads(request), show_template("in", "*")

    def review(eid, verdict, all_events, order_by, request: gr.Request):
        if (msg := denied(service, request, ADMIN, "review moderation", f"event {eid}")) is not None:
            return msg, gr.update(), gr.update()
        try:
            with session_scope(service.session_factory) as s:
                moderation_repo.review_event(session=s, event_id=eid, verdict=verdict, reviewer=caller_name(request))
        except (NotFoundError, ValidationError) as exc:
            return f"⚠ {exc}", gr.update(), gr.update()
        return (f"Event {eid:.0f} marked {verdict.replace('_', ' ')}.", _summary(service),
                _queue_rows(service, all_events, order_by))

    def toggle(all_events, order_by, request: gr.Request):
        if denied(service, request, ADMIN, "view moderation", view=True) is not None:
            return []
        return _queue_rows(service, all_events, order_by)

    show_all.change(toggle, [show_all, order], queue, api_visibility="private")
    order.change(toggle, [show_all, order], queue, api_visibility="private")

    def show_template(d, c):
        return service.moderator.template(d, None if c in ("", "*") else c) if service.moderator else ""

    def save_template(d, c, text, request: gr.Request):
        if (msg := denied(service, request, ADMIN, "edit moderation template", f"{d}/{c}")) is not None:
            return msg
        try:
            with session_scope(service.session_factory) as s:
                row = moderation_repo.set_template(session=s, direction=d, category=c, text=text, editor=caller_name(request))
                service.moderator.templates[(row.direction, row.category)] = row.text
        except ValidationError as exc:
            return f"⚠ {exc}"
        return f"Template for {d}/{c} saved; new replies use it now."

    def mark_correct(eid, all_events, order_by, request: gr.Request):
        return review(eid, "correct", all_events, order_by, request)

    def mark_false_positive(eid, all_events, order_by, request: gr.Request):
        return review(eid, "false_positive", all_events, order_by, request)

    def mark_missed(eid, all_events, order_by, request: gr.Request):
        return review(eid, "missed", all_events, order_by, request)

    def pick_row(evt: gr.SelectData):
        return evt.row_value[0] if evt.row_value else None

    review_inputs = [event_id, show_all, order]
    correct.click(mark_correct, review_inputs, [note, summary, queue], api_name="review_correct")
    false_pos.click(mark_false_positive, review_inputs, [note, summary, queue], api_name="review_false_positive")
    missed.click(mark_missed, review_inputs, [note, summary, queue], api_name="review_missed")
    direction.change(show_template, [direction, category], template, api_visibility="private")
    category.blur(show_template, [direction, category], template, api_visibility="private")
    save_tpl.click(save_template, [direction, category, template], note, api_name="save_template")
    queue.select(pick_row, None, event_id, api_visibility="private")
    return refresh, [summary, queue] + head_outputs + [template]

"""The ranking tab (annotator role): order K candidate replies, flag, write an ideal reply, skip.

Keyboard: type the order (e.g. "B > A = C > D" or "BACD") and press Enter to submit;
Alt+S skips; Ctrl+Enter submits from anywhere.
"""

from __future__ import annotations

import random

import gradio as gr

from app.auth import caller_name
from app.ui.guard import ANNOTATOR, denied
from feedback import annotation_repo
from feedback import repository
from feedback.db import session_scope

SHORTCUTS_JS = """
() => {
  document.addEventListener('keydown', (e) => {
    if (e.altKey && (e.key === 's' || e.key === 'S')) { document.querySelector('#rank-skip')?.click(); e.preventDefault(); }
    if (e.ctrlKey && e.key === 'Enter') { document.querySelector('#rank-submit')?.click(); e.preventDefault(); }
  });
}
"""
FLAG_CHOICES = ["ok", *annotation_repo.FLAG_KINDS]
CANDIDATE_MAX_HEIGHT = 360  # px
# After a task is saved the next one starts at the top of the tab, with the "Saved" note.
SCROLL_TO_TASK_JS = "() => document.querySelector('#rank-status')?.scrollIntoView({block: 'start'})"


def build_ranking_tab(service, worker=None) -> gr.Tab:
    k = service.settings.ranking_candidates
    labels = list(annotation_repo.LABELS[:k])
    with gr.Tab("Rank", id="rank", visible=False) as tab:
        with gr.Row():
            status = gr.Markdown(elem_id="rank-status")
            load_btn = gr.Button("Load next task", size="sm", scale=0, elem_id="rank-load")
        # At the top, where the next task starts: "Saved" must not sit below the fold.
        note = gr.Markdown(elem_id="rank-note")
        context = gr.Chatbot(label="Conversation so far", height=220, elem_id="rank-context", sanitize_html=True,
                             feedback_options=None)
        boxes, flags = [], []
        for row_start in range(0, k, 2):
            with gr.Row(equal_height=True):
                for label in labels[row_start:row_start + 2]:
                    with gr.Column(variant="panel"):
                        # A height limit with a scrollbar: four long replies made a 1,943 px page.
                        boxes.append(gr.Markdown(f"**{label}**", elem_id=f"cand-{label}", sanitize_html=True,
                                                 max_height=CANDIDATE_MAX_HEIGHT))
                        flags.append(gr.Radio(FLAG_CHOICES, value="ok", label=f"Flag {label}", container=False))
        order = gr.Textbox(label="Order, best first (ties with =): e.g. B > A = C > D  or  BACD, then Enter",
                           elem_id="rank-order")
        demo = gr.Textbox(label="Ideal reply (optional): write the answer you wish the model had given", lines=3,
                          elem_id="rank-demo")
        with gr.Row():
            submit = gr.Button("Submit  (Enter / Ctrl+Enter)", variant="primary", elem_id="rank-submit")
            skip = gr.Button("Skip  (Alt+S)", elem_id="rank-skip")
        task_state = gr.State(None)  # (task id, candidate ids in display order)

    def _status(s, user) -> str:
        ready, waiting = annotation_repo.open_task_count(session=s, annotator=user, k=k)
        return (f"**Done in the last 24 h:** {annotation_repo.done_today(session=s, annotator=user)} · "
                f"**ready:** {ready} · **waiting for candidates:** {waiting}")

    def load_next(request: gr.Request, progress=gr.Progress()):
        blank = [gr.update(value="")] * k
        if (msg := denied(service, request, ANNOTATOR, "rank")) is not None:
            return [msg, [], None, *blank, *[gr.update(value="ok")] * k, "", "", ""]
        name = caller_name(request)
        with session_scope(service.session_factory) as s:
            user = repository.get_or_create_user(session=s, name=name)
            task = annotation_repo.next_task(session=s, annotator=user, k=k)
        if task is None and worker is not None:
            progress(0.1, desc="Generating candidate replies for the next task…")
            worker.run_once(limit=1)  # the annotator waits only when nothing was prepared ahead
        with session_scope(service.session_factory) as s:
            user = repository.get_or_create_user(session=s, name=name)
            task = annotation_repo.next_task(session=s, annotator=user, k=k)
            status_md = _status(s, user)
            if task is None:
                return [status_md, [], None, *blank, *[gr.update(value="ok")] * k, "", "",
                        "No tasks right now. Chat prompts and imported prompts become tasks; check back soon."]
            cands = list(task.candidates)[:k]
            random.Random(f"{task.id}:{user.id}").shuffle(cands)  # random order, stable on reload
            texts = [f"**{label}**\n\n{c.content}" for label, c in zip(labels, cands)]
            rows = [{"role": m["role"], "content": m["content"]} for m in task.context]
            state = (task.id, [c.id for c in cands])
            why = task.priority_reason or "next in arrival order (the preference model needs 10 pairs first)"
            status_md = f"{status_md}  \n*Why this task:* {why}"
        if worker is not None:
            worker.wake()  # keep preparing the following tasks
        return [status_md, rows, state, *texts, *[gr.update(value="ok")] * k, "", "", ""]

    def on_submit(state, order_text, demo_text, *flag_values, request: gr.Request, skipped=False):
        if (msg := denied(service, request, ANNOTATOR, "rank")) is not None:
            return msg, gr.update()
        if state is None:
            return "No task loaded.", gr.update()
        task_id, cand_ids = state
        by_label = dict(zip(labels, cand_ids))
        try:
            groups = [] if skipped else [[by_label[x] for x in g] for g in annotation_repo.parse_order(order_text, labels)]
            flag_map = {by_label[lab]: f for lab, f in zip(labels, flag_values) if f and f != "ok"}
            with session_scope(service.session_factory) as s:
                user = repository.get_or_create_user(session=s, name=caller_name(request))
                annotation_repo.submit_ranking(session=s, task_id=task_id, annotator=user, order=groups, flags=flag_map,
                                     demonstration=None if skipped else demo_text, skipped=skipped)
        except (repository.ValidationError, repository.NotFoundError) as exc:
            return f"⚠ {exc}", gr.update()
        return ("Skipped." if skipped else "Saved."), None

    # gr.Request goes first: Gradio injects it by type, and *flag_values takes the K radios.
    def on_skip(request: gr.Request, state, order_text, demo_text, *flag_values):
        return on_submit(state, order_text, demo_text, *flag_values, request=request, skipped=True)

    def submit_handler(request: gr.Request, state, order_text, demo_text, *flag_values):
        return on_submit(state, order_text, demo_text, *flag_values, request=request)

    outputs = [status, context, task_state, *boxes, *flags, order, demo, note]
    inputs = [task_state, order, demo, *flags]

    def saved(note_text) -> bool:
        return note_text.startswith(("Saved", "Skipped"))

    # The saved task leaves the screen at once: its candidates, flags and order must not stay up
    # (to be flagged by mistake) while the next task is fetched or generated.
    cleared = [context, *boxes, *flags, order, demo]

    def clear_if_saved(note_text):
        if not saved(note_text):
            return [gr.update()] * len(cleared)  # a refused order keeps everything the annotator typed
        return [[], *[f"**{label}**" for label in labels], *[gr.update(value="ok")] * k, "", ""]

    def next_if_saved(note_text, request: gr.Request, progress=gr.Progress()):
        if saved(note_text):
            out = load_next(request, progress)
            out[-1] = note_text + " Next task:" + (" " + out[-1] if out[-1] else "")
            return out
        return [gr.update()] * len(outputs)

    def then_next(event):
        return (event.then(clear_if_saved, [note], cleared, api_visibility="private", show_progress="hidden")
                .then(next_if_saved, [note], outputs, api_visibility="private", show_progress_on=[context])
                .then(None, None, None, js=SCROLL_TO_TASK_JS))

    for trigger in (submit.click, order.submit):
        then_next(trigger(submit_handler, inputs, [note, task_state], api_name="rank_submit" if trigger == submit.click
                          else None, api_visibility="public" if trigger == submit.click else "private"))
    then_next(skip.click(on_skip, inputs, [note, task_state], api_name="rank_skip"))
    # One progress bar on the context box instead of an overlay on every component.
    load_btn.click(load_next, None, outputs, api_name="rank_next", show_progress_on=[context])
    tab.select(load_next, None, outputs, api_visibility="private", show_progress_on=[context])
    return tab


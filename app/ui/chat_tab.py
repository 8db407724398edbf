"""The chat tab: streamed replies, sampling settings, regenerate, stop, conversations, thumbs, and
side-by-side (A/B) turns while an admin runs a trial (app.side_by_side)."""

from __future__ import annotations

import threading

import gradio as gr

from app.auth import caller_name
from app.service import ChatError
from app.ui.drawer import wire_drawer
from app.ui.reply_versions import ReplyVersions, conversation_view
from feedback.repository import VOTE_REASONS, NotFoundError, ValidationError
from model.engine import SamplingParams


def _params(temperature, top_p, top_k, max_new_tokens, repetition_penalty) -> SamplingParams:
    return SamplingParams(temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
                          max_new_tokens=int(max_new_tokens), repetition_penalty=float(repetition_penalty))


# The empty chat's welcome: what this is, what to try, the keys (ChatGPT and Open WebUI open like this).
WELCOME = """### Ask the local model anything
Your thumbs up / down and the annotators' rankings teach the next version.

**Enter** sends · **Shift+Enter** new line · **Stop** while a reply streams · Rank tab: type the order, **Enter** saves, **Alt+S** skips"""
EXAMPLES = ["Explain compound interest in two sentences.", "Write a haiku about the sea.",
            "Give me three tips for a job interview.", "How do I reverse a list in Python?"]


def build_chat_tab(service) -> tuple:
    with gr.Row():
        with gr.Column(scale=1, min_width=220, elem_id="conv-drawer"):
            drawer_close = gr.Button("✕ Close", size="sm", elem_id="drawer-close")
            new_btn = gr.Button("+ New chat", variant="secondary")
            search = gr.Textbox(placeholder="Search your chats", show_label=False, elem_id="conv-search",
                                max_lines=1)
            convs = gr.Radio(label="Your conversations", choices=[], value=None, elem_id="conversations")
            with gr.Accordion("This chat", open=False, elem_id="this-chat"):
                title_box = gr.Textbox(placeholder="New title", show_label=False, elem_id="rename-box", max_lines=1)
                with gr.Row():
                    rename_btn = gr.Button("Rename", size="sm", elem_id="rename-btn")
                    delete_chat_btn = gr.Button("Delete", size="sm", variant="stop", elem_id="delete-chat")
                delete_chat_confirmed = gr.Checkbox(False, visible=False)
        with gr.Column(scale=4):
            drawer_toggle = gr.Button("☰ Chats", size="sm", elem_id="drawer-toggle")
            chatbot = gr.Chatbot(label="Chat", height=480, elem_id="chatbot", sanitize_html=True,
                                 feedback_options=("Like", "Dislike"), buttons=["copy"], placeholder=WELCOME,
                                 examples=[{"text": t} for t in EXAMPLES])
            with gr.Group(visible=False, elem_id="ab-turn") as ab_box:
                gr.Markdown("**Two replies to compare.** Which one is better? The conversation continues "
                            "with the one you pick.")
                with gr.Row():
                    left_md = gr.Markdown("", elem_id="ab-left", container=True, sanitize_html=True)
                    right_md = gr.Markdown("", elem_id="ab-right", container=True, sanitize_html=True)
                with gr.Row():
                    pick_left = gr.Button("← Left is better", size="sm", elem_id="ab-pick-left")
                    pick_tie = gr.Button("Tie", size="sm", elem_id="ab-pick-tie")
                    pick_bad = gr.Button("Both are bad", size="sm", elem_id="ab-pick-both-bad")
                    pick_right = gr.Button("Right is better →", size="sm", elem_id="ab-pick-right")
            hint = gr.Markdown("", elem_id="chat-hint")
            with gr.Row():
                box = gr.Textbox(placeholder="Message the model… (Enter to send)", show_label=False, scale=6,
                                 elem_id="chat-input", max_lines=8)
                send = gr.Button("Send", variant="primary", scale=1, elem_id="send-btn")
                # Send turns into Stop while a reply streams (as in ChatGPT and Open WebUI).
                stop = gr.Button("■ Stop", variant="stop", scale=1, visible=False, elem_id="stop-btn")
                # The message on its way: the box is emptied at once, so text typed while the reply
                # starts is the next message, never erased by this one's first update.
                outgoing = gr.Textbox(visible=False)
            with gr.Row():
                regen = gr.Button("Regenerate", size="sm", scale=0, min_width=120, elem_id="regen-btn", visible=False)
                versions = ReplyVersions(service, busy=lambda request: request.session_hash in streaming)
            with gr.Row(visible=False) as why_row:
                reason = gr.Dropdown(list(VOTE_REASONS), label="What was wrong? (optional)", value=None)
                comment = gr.Textbox(label="Comment (optional)", max_lines=3)
                save_why = gr.Button("Save feedback", size="sm")
            with gr.Accordion("Settings", open=False):
                system = gr.Textbox(label="System prompt", placeholder="You are a helpful assistant.", lines=2)
                temperature = gr.Slider(0, 2, value=0.3, step=0.05, label="Temperature")
                top_p = gr.Slider(0.05, 1, value=0.9, step=0.05, label="Top-p")
                top_k = gr.Slider(0, 200, value=50, step=1, label="Top-k")
                max_new = gr.Slider(1, 1024, value=256, step=1, label="Max new tokens")
                rep = gr.Slider(1.0, 2.0, value=1.1, step=0.05, label="Repetition penalty")
            with gr.Accordion("Your data", open=False):
                opt_out = gr.Checkbox(label="Keep my conversations and votes out of model training",
                                      elem_id="opt-out")
                ab_opt_out = gr.Checkbox(label="Never show me two replies to compare", elem_id="ab-opt-out")
                with gr.Row():
                    export_btn = gr.Button("Download all my data (JSON)", size="sm")
                    delete_btn = gr.Button("Delete all my data", size="sm", variant="stop", elem_id="delete-data")
                # A one-time link only this user can open (app.my_data): no file in Gradio's cache.
                my_file = gr.Markdown("", visible=False, elem_id="my-data-link")
                # The browser's confirm() answer (the API caller passes true): cancelling must not
                # raise in the page, which marked every output with a red "Error" badge.
                delete_confirmed = gr.Checkbox(False, visible=False)
    conv_id = gr.State(None)   # the open conversation
    ids = gr.State([])         # message id for each chatbot row (None while streaming)
    voted = gr.State(None)     # (message_id, value) awaiting an optional reason
    ab_turn = gr.State(None)   # the side-by-side turn waiting for this user's pick
    sampling = [temperature, top_p, top_k, max_new, rep]

    streaming: set[str] = set()  # browser sessions with a reply on its way
    streaming_lock = threading.Lock()

    def claim(request: gr.Request) -> bool:
        """One reply at a time per browser session: a second send while one streams is refused and
        its text goes back into the box."""
        with streaming_lock:
            if request.session_hash in streaming:
                return False
            streaming.add(request.session_hash)
            return True

    def release(request: gr.Request) -> None:
        with streaming_lock:
            streaming.discard(request.session_hash)

    def use_example(data: gr.SelectData):
        return data.value["text"] if isinstance(data.value, dict) else gr.skip()

    def model_label():
        """The chat's label names the version that answers (it changes when an admin promotes one)."""
        return gr.update(label=f"Chat · model {service.engine.version}")

    def take_message(text):
        return "", text, gr.update(visible=False), gr.update(visible=True)

    def show_stop():
        return gr.update(visible=False), gr.update(visible=True)

    def show_send(request: gr.Request):
        with streaming_lock:
            if request.session_hash in streaming:  # a refused second send ended; the first still streams
                return gr.skip(), gr.skip()
        return gr.update(visible=True), gr.update(visible=False)

    def refresh_list(request: gr.Request, current=None):
        return gr.update(choices=service.conversations(caller_name(request)), value=current)

    def stream_reply(updates, history, row_ids, cid):
        """Turn ChatService updates into (chatbot, ids, conv_id, hint) yields."""
        try:
            for up in updates:
                rows = history + [{"role": "assistant", "content": up.text or "…"}]
                cid = up.conversation_id
                if up.done:
                    row_ids = row_ids + [up.assistant_message_id]
                    note = {"blocked": "⚠ Moderation replaced this reply.", "stopped": "Stopped."}.get(up.status, "")
                    if not note and up.finish_reason == "length":
                        note = "Stopped at the length limit (Settings › Max new tokens); Regenerate for another try."
                    yield rows, row_ids, cid, note
                    return
                yield rows, row_ids + [None], cid, ""
        except ChatError as exc:
            yield history, row_ids, cid, f"⚠ {exc}"

    def on_send(text, history, row_ids, cid, pending, system_prompt, temperature, top_p, top_k, max_new, rep,
                request: gr.Request):
        same = (gr.update(),) * 4  # the side-by-side box, both sides, the pending turn: unchanged
        # A refused send gives the text back and touches nothing else: its ``history`` may be older
        # than what the reply still streaming has shown since.
        keep = (gr.update(),) * 3
        if pending is not None:
            yield text, *keep, "Pick one of the two replies first (or Tie / Both are bad).", gr.update(), *same
            return
        if not claim(request):
            yield text, *keep, "A reply is still being written: wait for it or press Stop. " \
                "Your message is kept in the box.", gr.update(), *same
            return
        try:
            yield from _send(text, history, row_ids, cid, system_prompt, temperature, top_p, top_k, max_new, rep,
                             request)
        finally:
            release(request)

    def _send(text, history, row_ids, cid, system_prompt, temperature, top_p, top_k, max_new, rep, request):
        same = (gr.update(),) * 4
        user = caller_name(request)
        params = _params(temperature, top_p, top_k, max_new, rep)
        two = service.side_by_side.wanted(user)
        try:
            sender = service.side_by_side.send if two else service.send
            updates = sender(user, text, cid, params, system_prompt or None, cancel_key=request.session_hash)
            first = next(updates)  # validation and the user row happen here, before anything shows
        except ChatError as exc:
            yield text, history, row_ids, cid, f"⚠ {exc}", gr.update(), *same
            return
        history = history + [{"role": "user", "content": text.strip()}]
        row_ids = row_ids + [first.user_message_id]
        if two and first.single is None:
            yield from _stream_pair(first, updates, history, row_ids, request)
            return

        def chain():
            yield first.single if two else first
            if not two:
                yield from updates

        # The box was emptied when the message was taken (take_message): what the user types now
        # is theirs, and no update of this reply touches it.
        for rows, rids, cid, note in stream_reply(chain(), history, row_ids, cid):
            yield gr.update(), rows, rids, cid, note, gr.update(), *same
        yield gr.update(), rows, rids, cid, note, refresh_list(request, cid), *same

    def _stream_pair(first, updates, history, row_ids, request):
        rows = history + [{"role": "assistant", "content": "⟷ Two replies below: pick the one you prefer."}]
        up = first
        try:
            for up in [first, *updates]:
                yield gr.update(), rows, row_ids + [None], up.conversation_id, "", gr.update(), \
                    gr.update(visible=True), up.left or "…", up.right or "…", None
        except ChatError as exc:
            yield gr.update(), history, row_ids, up.conversation_id, f"⚠ {exc}", gr.update(), \
                gr.update(visible=False), "", "", None
            return
        if not up.done:  # stopped before both ended: nothing to pick on
            yield gr.update(), history, row_ids, up.conversation_id, "Stopped.", gr.update(), \
                gr.update(visible=False), "", "", None
            return
        yield gr.update(), rows, row_ids + [None], up.conversation_id, "", refresh_list(request, up.conversation_id), \
            gr.update(visible=True), up.left, up.right, up.turn_id

    def on_pick(choice, pending, history, row_ids, request: gr.Request):
        if pending is None:
            return history, row_ids, "There is no comparison waiting for a pick.", gr.update(visible=False), None
        try:
            result = service.side_by_side.pick(caller_name(request), pending, choice)
        except (ValidationError, NotFoundError) as exc:
            return history, row_ids, f"⚠ {exc}", gr.update(), pending
        history = history[:-1] + [{"role": "assistant", "content": result.text}]
        return history, row_ids[:-1] + [result.message_id], f"Thanks, your pick is saved. {result.reveal}", \
            gr.update(visible=False), None

    def on_regen(history, row_ids, cid, pending, temperature, top_p, top_k, max_new, rep, request: gr.Request):
        if pending is not None:
            yield history, row_ids, cid, "Pick one of the two replies first (or Tie / Both are bad)."
            return
        if cid is None or not history:
            yield history, row_ids, cid, "Nothing to regenerate yet."
            return
        if not claim(request):
            yield gr.update(), gr.update(), gr.update(), "A reply is still being written: wait for it or press Stop."
            return
        try:
            yield from _regen(history, row_ids, cid, temperature, top_p, top_k, max_new, rep, request)
        finally:
            release(request)

    def _regen(history, row_ids, cid, temperature, top_p, top_k, max_new, rep, request):
        # Drop the last assistant row from the view; the database keeps it as a sibling.
        if history[-1]["role"] == "assistant":
            history, row_ids = history[:-1], row_ids[:-1]
        try:
            params = _params(temperature, top_p, top_k, max_new, rep)
            updates = service.regenerate(caller_name(request), cid, params, cancel_key=request.session_hash)
            yield from stream_reply(updates, history, row_ids, cid)
        except ChatError as exc:
            yield history, row_ids, cid, f"⚠ {exc}"

    def on_stop(request: gr.Request):
        service.stop(request.session_hash)

    def on_like(row_ids, data: gr.LikeData, request: gr.Request):
        index = data.index if isinstance(data.index, int) else data.index[0]
        mid = row_ids[index] if 0 <= index < len(row_ids) else None
        if mid is None:
            return None, "Wait for the reply to finish before voting.", gr.update(visible=False)
        value = 1 if data.liked is True or data.liked == "Like" else -1
        try:
            service.vote(caller_name(request), mid, value)
        except (ValidationError, NotFoundError) as exc:
            return None, f"⚠ {exc}", gr.update(visible=False)
        note = "Thanks! 👍 saved." if value > 0 else "Thanks, 👎 saved. Tell us why (optional):"
        return (mid, value), note, gr.update(visible=value < 0)

    def on_save_why(pending, why, text, request: gr.Request):
        if not pending:
            return "Vote on a reply first.", gr.update(visible=False), None, ""
        try:
            service.vote(caller_name(request), pending[0], pending[1], reason=why or None, comment=text or None)
        except (ValidationError, NotFoundError) as exc:
            return f"⚠ {exc}", gr.update(), None, text
        return "Feedback saved, thank you.", gr.update(visible=False), None, ""

    def on_new():
        return [], [], None, "", gr.update(value=None), gr.update(visible=False), None

    def on_open(selected, request: gr.Request):
        if selected is None:
            return gr.update(), gr.update(), gr.update(), gr.update(), "", gr.update(), gr.update()
        try:
            rows, row_ids, system_prompt = conversation_view(service, caller_name(request), int(selected))
        except ChatError as exc:
            return [], [], None, "", f"⚠ {exc}", gr.update(visible=False), None
        return rows, row_ids, int(selected), system_prompt, "", gr.update(visible=False), None

    def on_opt_out(value, request: gr.Request):
        service.set_opt_out(caller_name(request), value)
        return "Your data is now left out of training." if value else "Your data may be used for training."

    def on_export(request: gr.Request):
        link = service.data_links.issue(caller_name(request))
        minutes = round(service.data_links.ttl_s / 60)
        return gr.update(value=f"[Download my-chat-data.json]({link}): a link for you only, "
                               f"valid once for {minutes} minutes.", visible=True)

    def on_delete(confirmed, request: gr.Request):
        if confirmed is not True:
            return gr.skip(), gr.skip(), gr.skip(), "Nothing was deleted.", gr.skip(), gr.skip()
        counts = service.delete_my_data(caller_name(request))
        return [], [], None, f"Deleted: {counts}.", gr.update(choices=[], value=None), gr.update(value="", visible=False)

    def on_search(query, request: gr.Request):
        try:
            return gr.update(choices=service.conversations(caller_name(request), query)), ""
        except ChatError as exc:
            return gr.skip(), f"⚠ {exc}"

    def on_rename(cid, title, request: gr.Request):
        try:
            service.rename_conversation(caller_name(request), cid, title)
        except ChatError as exc:
            return gr.skip(), f"⚠ {exc}", gr.skip()
        return refresh_list(request, cid), "Renamed.", ""

    def on_delete_chat(confirmed, cid, request: gr.Request):
        if confirmed is not True:
            return (gr.skip(),) * 4 + ("Nothing was deleted.", gr.skip())
        try:
            service.delete_conversation(caller_name(request), cid)
        except ChatError as exc:
            return (gr.skip(),) * 4 + (f"⚠ {exc}", gr.skip())
        return [], [], None, refresh_list(request), "Conversation deleted.", None

    def on_ab_opt_out(value, request: gr.Request):
        service.side_by_side.set_opt_out(caller_name(request), bool(value))
        return "You will not be asked to compare replies." if value else "You may sometimes see two replies to compare."

    opt_out.input(on_opt_out, [opt_out], hint, api_name="opt_out")
    ab_opt_out.input(on_ab_opt_out, [ab_opt_out], hint, api_name="ab_opt_out")
    def picker(choice):
        def handler(pending, history, row_ids, request: gr.Request):
            return on_pick(choice, pending, history, row_ids, request)
        return handler

    for button, choice in ((pick_left, "left"), (pick_right, "right"), (pick_tie, "tie"), (pick_bad, "both_bad")):
        button.click(picker(choice), [ab_turn, chatbot, ids], [chatbot, ids, hint, ab_box, ab_turn],
                     api_name=f"pick_{choice}") \
            .then(versions.refresh, [conv_id], versions.outputs, queue=False, api_visibility="private")
    export_btn.click(on_export, None, my_file, api_name="export_my_data")
    search.change(on_search, [search], [convs, hint], api_name="search_conversations", trigger_mode="always_last")
    rename_btn.click(on_rename, [conv_id, title_box], [convs, hint, title_box], api_name="rename_conversation")
    title_box.submit(on_rename, [conv_id, title_box], [convs, hint, title_box], api_visibility="private")
    delete_chat_btn.click(on_delete_chat, [delete_chat_confirmed, conv_id], [chatbot, ids, conv_id, convs, hint, ab_turn],
                          api_name="delete_conversation",
                          js="(ok, cid) => [confirm('Delete this conversation? This cannot be undone.'), cid]") \
        .then(versions.refresh, [conv_id], versions.outputs, queue=False, api_visibility="private")
    delete_btn.click(on_delete, [delete_confirmed], [chatbot, ids, conv_id, hint, convs, my_file],
                     api_name="delete_my_data",
                     js="() => confirm('Delete all your conversations, votes and rankings?')") \
        .then(versions.refresh, [conv_id], versions.outputs, queue=False, api_visibility="private")

    send_inputs = [outgoing, chatbot, ids, conv_id, ab_turn, system, *sampling]
    send_outputs = [box, chatbot, ids, conv_id, hint, convs, ab_box, left_md, right_md, ab_turn]
    # Take the text out of the box and show Stop (no queue: at once), stream the reply (progress on
    # the chat only), then show Send again. The API's /send is the middle step.
    # An example on the welcome screen is sent as if typed.
    chosen = chatbot.example_select(use_example, None, box, queue=False, api_visibility="private").then
    for trigger, api in ((send.click, {"api_name": "send"}), (box.submit, {"api_visibility": "private"}),
                         (chosen, {"api_visibility": "private"})):
        trigger(take_message, [box], [box, outgoing, send, stop], queue=False, api_visibility="private") \
            .then(on_send, send_inputs, send_outputs, concurrency_limit=None, show_progress_on=[chatbot], **api) \
            .then(show_send, None, [send, stop], queue=False, api_visibility="private") \
            .then(versions.refresh, [conv_id], versions.outputs, queue=False, api_visibility="private")
    regen.click(show_stop, None, [send, stop], queue=False, api_visibility="private") \
        .then(on_regen, [chatbot, ids, conv_id, ab_turn, *sampling], [chatbot, ids, conv_id, hint],
              api_name="regenerate", show_progress_on=[chatbot]) \
        .then(show_send, None, [send, stop], queue=False, api_visibility="private") \
        .then(versions.refresh, [conv_id], versions.outputs, queue=False, api_visibility="private")
    versions.wire(chatbot, ids, conv_id, ab_turn, hint)
    stop.click(on_stop, None, None, api_name="stop")
    chatbot.like(on_like, [ids], [voted, hint, why_row], api_visibility="private")
    save_why.click(on_save_why, [voted, reason, comment], [hint, why_row, voted, comment], api_visibility="private")
    new_btn.click(on_new, None, [chatbot, ids, conv_id, hint, convs, ab_box, ab_turn], api_visibility="private") \
        .then(versions.refresh, [conv_id], versions.outputs, queue=False, api_visibility="private")
    # The chat's trash icon starts a new chat too: clearing only the screen made the next message
    # continue the old conversation out of sight.
    chatbot.clear(on_new, None, [chatbot, ids, conv_id, hint, convs, ab_box, ab_turn], api_visibility="private") \
        .then(versions.refresh, [conv_id], versions.outputs, queue=False, api_visibility="private")
    convs.input(on_open, [convs], [chatbot, ids, conv_id, system, hint, ab_box, ab_turn], api_visibility="private") \
        .then(versions.refresh, [conv_id], versions.outputs, queue=False, api_visibility="private")
    wire_drawer(drawer_toggle, drawer_close, new_btn.click)
    # Regenerate only in a conversation (a new, empty chat has no reply to redo).
    conv_id.change(lambda cid: gr.update(visible=cid is not None), conv_id, regen, queue=False,
                   api_visibility="private")
    return refresh_list, convs, model_label, chatbot

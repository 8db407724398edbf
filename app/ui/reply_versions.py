"""‹ n / m › beside Regenerate: step through the versions Regenerate made of the last reply.

Regenerate keeps the old reply as a sibling (and its vote); these controls bring it back, as
ChatGPT's and Open WebUI's "< 1/2 >" do. The next message continues from the version shown
(feedback.repository.show_reply_version). The controls are hidden while a reply has one version.
"""

from __future__ import annotations

import gradio as gr

from app.auth import caller_name
from app.service import ChatError


def conversation_view(service, user: str, conversation_id: int) -> tuple:
    """(chatbot update with this user's thumbs, message id per row, system prompt) of the shown thread."""
    msgs, system_prompt = service.open_conversation(user, conversation_id)
    rows = [{"role": m["role"], "content": m["content"]} for m in msgs]
    # The thumbs show the votes this user gave (one value per assistant message).
    feedback = [{1: "Like", -1: "Dislike"}.get(m["vote"]) for m in msgs if m["role"] == "assistant"]
    return gr.update(value=rows, feedback_value=feedback), [m["id"] for m in msgs], system_prompt


class ReplyVersions:
    """Create inside the Row that holds Regenerate; ``busy(request)`` says a reply is streaming."""

    def __init__(self, service, busy):
        self.service, self.busy = service, busy
        self.prev = gr.Button("‹", size="sm", visible=False, scale=0, min_width=40, elem_id="version-prev")
        # A button that does nothing: it sizes like its neighbours in the row (a Markdown stretched).
        self.label = gr.Button("", size="sm", visible=False, interactive=False, scale=0, min_width=110,
                               elem_id="version-label")
        self.next = gr.Button("›", size="sm", visible=False, scale=0, min_width=40, elem_id="version-next")
        self.outputs = [self.prev, self.label, self.next]

    def refresh(self, conversation_id, request: gr.Request):
        """Show the controls when the last reply has two or more versions, else hide them."""
        hidden = (gr.update(visible=False),) * 3
        if conversation_id is None:
            return hidden
        try:
            position, count = self.service.reply_version(caller_name(request), conversation_id)
        except ChatError:
            return hidden
        if count < 2:
            return hidden
        return (gr.update(visible=True, interactive=position > 1),
                gr.update(value=f"version {position} / {count}", visible=True),
                gr.update(visible=True, interactive=position < count))

    def wire(self, chatbot, ids, conv_id, ab_turn, hint) -> None:
        def step(delta):
            def handler(conversation_id, pending, request: gr.Request):
                if self.busy(request) or pending is not None:
                    why = "Pick one of the two replies first." if pending is not None else \
                        "Wait for the reply to finish (or press Stop)."
                    return (gr.skip(), gr.skip(), why, *(gr.skip(),) * 3)
                user = caller_name(request)
                try:
                    self.service.step_reply_version(user, conversation_id, delta)
                    rows, row_ids, _ = conversation_view(self.service, user, int(conversation_id))
                except ChatError as exc:
                    return (gr.skip(), gr.skip(), f"⚠ {exc}", *(gr.skip(),) * 3)
                return (rows, row_ids, "", *self.refresh(conversation_id, request))
            return handler

        outputs = [chatbot, ids, hint, *self.outputs]
        self.prev.click(step(-1), [conv_id, ab_turn], outputs, api_name="previous_reply_version")
        self.next.click(step(1), [conv_id, ab_turn], outputs, api_name="next_reply_version")

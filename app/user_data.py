"""What a user does with their own conversations and data: list, search, rename, delete, reopen,
vote, export, delete everything, opt out. The chat pipeline (app/service.py) mixes this in; every
method takes the caller's name and only ever touches that user's rows.
"""

from __future__ import annotations

from feedback import repository
from feedback import trial_repo
from feedback.db import session_scope

# Shown in place of a reply that was never written (not stored: the conversation stays as it was).
REPLY_INTERRUPTED = "⚠ This reply was interrupted before it was finished. Press Regenerate to try again."
REPLY_FAILED = "⚠ The model failed while answering. Press Regenerate to try again."


class ChatError(Exception):
    """A refusal the user should read (too long, rate limited, busy, not found...).

    ``status`` is the HTTP status the API answers with: 400 the request, 429 come back later,
    503 the server failed."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class UserData:
    """Mixed into ChatService (it provides ``session_factory`` and ``data_links``)."""

    def conversations(self, user_name: str, query: str = "") -> list[tuple[str, int]]:
        """(title, id) of the user's conversations, newest first; ``query`` searches titles and messages."""
        query = _checked_text(query if isinstance(query, str) else "", "The search", 200)
        with session_scope(self.session_factory) as s:
            user = repository.get_or_create_user(session=s, name=user_name)
            return [(c.title, c.id) for c in repository.list_conversations(session=s, owner=user, query=query)]

    def rename_conversation(self, user_name: str, conversation_id, title) -> str:
        title = _checked_text(title if isinstance(title, str) else "", "The title", 200)
        if not title:
            raise ChatError("Type a new title first.")
        with session_scope(self.session_factory) as s:
            user = repository.get_or_create_user(session=s, name=user_name)
            self._owned(s, user, _conversation_id(conversation_id)).title = title
        return title

    def delete_conversation(self, user_name: str, conversation_id) -> dict[str, int]:
        with session_scope(self.session_factory) as s:
            user = repository.get_or_create_user(session=s, name=user_name)
            conv = self._owned(s, user, _conversation_id(conversation_id))
            return repository.delete_conversation(session=s, conversation=conv)

    def open_conversation(self, user_name: str, conversation_id: int) -> tuple[list[dict], str]:
        """(messages for display with their ids and this user's vote, +1 / -1 / None; system prompt)
        of the latest thread."""
        with session_scope(self.session_factory) as s:
            user = repository.get_or_create_user(session=s, name=user_name)
            try:
                conv = repository.get_conversation(session=s, conversation_id=conversation_id, owner=user)
            except repository.NotFoundError as exc:
                raise ChatError(str(exc)) from exc
            trial_repo.close_unpicked(session=s, conversation_id=conv.id)  # a pick left undone when they left
            thread = [m for m in repository.latest_thread(session=s, conversation=conv) if m.role != "system"]
            votes = repository.votes_by_message(session=s, user=user, message_ids=[m.id for m in thread])
            msgs = []
            for i, m in enumerate(thread):
                if m.role == "assistant" and m.status == "failed" and not m.content:
                    msgs.append({"role": "assistant", "content": REPLY_FAILED, "id": m.id, "vote": votes.get(m.id)})
                    continue
                msgs.append({"role": m.role, "content": m.content, "id": m.id, "vote": votes.get(m.id)})
                answered = i + 1 < len(thread) and thread[i + 1].role == "assistant"
                if m.role == "user" and not answered and m.status in ("stopped", "pending"):
                    # Its reader left (tab closed) or the server stopped before a reply was stored:
                    # say so, with the way to retry, and keep the next question in its own bubble.
                    msgs.append({"role": "assistant", "content": REPLY_INTERRUPTED, "id": None, "vote": None})
            return msgs, conv.system_prompt

    def reply_version(self, user_name: str, conversation_id) -> tuple[int, int]:
        """(1-based position, count) of the shown last reply among its regenerated versions;
        (0, 0) when the conversation has no reply yet."""
        with session_scope(self.session_factory) as s:
            user = repository.get_or_create_user(session=s, name=user_name)
            versions, shown = repository.reply_versions(session=s, conversation=self._owned(
                s, user, _conversation_id(conversation_id)))
            return shown + 1, len(versions)

    def step_reply_version(self, user_name: str, conversation_id, step) -> tuple[int, int]:
        """Show the previous (-1) or next (+1) version of the last reply (< 1/2 >): the next
        message continues from the one shown. Returns (position, count)."""
        with session_scope(self.session_factory) as s:
            user = repository.get_or_create_user(session=s, name=user_name)
            conv = self._owned(s, user, _conversation_id(conversation_id))
            try:
                return repository.show_reply_version(session=s, conversation=conv, step=step)
            except repository.ValidationError as exc:
                raise ChatError(str(exc)) from None

    def my_data(self, user_name: str) -> dict:
        with session_scope(self.session_factory) as s:
            return repository.export_user_data(session=s, user=repository.get_or_create_user(session=s, name=user_name))

    def delete_my_data(self, user_name: str) -> dict[str, int]:
        self.data_links.revoke(user_name)  # a link issued before keeps nothing: it is gone too
        with session_scope(self.session_factory) as s:
            return repository.delete_user_data(session=s, user=repository.get_or_create_user(session=s, name=user_name))

    def set_opt_out(self, user_name: str, opted_out: bool) -> None:
        with session_scope(self.session_factory) as s:
            repository.get_or_create_user(session=s, name=user_name).opted_out = bool(opted_out)

    def vote(self, user_name: str, message_id: int, value: int, reason: str | None = None,
             comment: str | None = None) -> None:
        if isinstance(comment, str):
            try:
                comment = _checked_text(comment, "Your comment", 2000)
            except ChatError as exc:  # the vote handlers show repository errors
                raise repository.ValidationError(str(exc)) from None
        with session_scope(self.session_factory) as s:
            user = repository.get_or_create_user(session=s, name=user_name)
            msg = repository.get_message(session=s, message_id=message_id)
            if msg.conversation.owner_id != user.id:
                raise repository.NotFoundError(f"Cannot vote: message {message_id} does not exist.")
            repository.add_vote(session=s, message_id=message_id, user=user, value=value, reason=reason, comment=comment)

    def _owned(self, s, user, conversation_id):
        try:
            return repository.get_conversation(session=s, conversation_id=conversation_id, owner=user)
        except repository.NotFoundError as exc:
            raise ChatError(str(exc)) from exc


def _conversation_id(value) -> int:
    if value is None:
        raise ChatError("Open a conversation first.")
    try:
        return repository.checked_id(value, "The conversation id")
    except repository.ValidationError as exc:
        raise ChatError(str(exc)) from None


def _checked_text(text: str, what: str, limit: int) -> str:
    """``text`` cleaned; ChatError if it is longer than ``limit`` or not valid Unicode."""
    try:
        return repository.checked_text(text, what, limit)
    except repository.ValidationError as exc:
        raise ChatError(str(exc)) from None

"""ChatService: the chat pipeline every front end (Gradio, HTTP API) goes through.

    1. validate and rate-limit the user's message
    2. moderate the input           (model/moderation)  -> template reply, model not called
    3. generate, streaming          (model/engine)
    4. moderate the output, growing and in full          -> template replaces the reply
    5. log every step               (feedback/)

The engine can be swapped while serving (promote / roll back): a reply keeps the engine
it started with, so in-flight replies finish on the old version.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Iterator

from app.my_data import DataLinks
from app.user_data import ChatError, UserData, _checked_text  # ChatError: front ends import it from here
from feedback import moderation_repo
from feedback import repository
from feedback import trial_repo
from feedback.db import session_scope
from feedback.models import Message
from model.engine import ContextTooLongError, EngineBusyError, SamplingParams


@dataclass
class ChatUpdate:
    conversation_id: int
    text: str  # the assistant reply as the user may see it so far
    user_message_id: int | None = None
    assistant_message_id: int | None = None
    done: bool = False
    blocked: bool = False
    status: str = "streaming"
    finish_reason: str | None = None  # stop | length | cancelled | content_filter (final update only)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    model_version: str | None = None


@dataclass
class _Turn:
    """A reply being generated, by cancel key: Stop sets ``cancel``; a reader that went away
    (the client disconnected) sets ``gone`` as well, so the turn ends as stopped, not answered."""

    cancel: threading.Event = field(default_factory=threading.Event)
    gone: bool = False


class ChatService(UserData):
    def __init__(self, engine, session_factory, settings, moderator=None):
        from app.metrics import ChatMetrics

        self.metrics = ChatMetrics()
        self._engine = engine
        self.metrics.watch_engine(lambda: self._engine)
        self.session_factory = session_factory
        self.settings = settings
        self.moderator = moderator
        self._turns: dict[str, _Turn] = {}
        self._recent: dict[str, deque] = defaultdict(deque)
        self._lock = threading.Lock()
        self._in_flight = 0  # our own count: the Prometheus gauge has no public read
        self._known_users: set[str] = set()
        self.data_links = DataLinks()  # one-time links to a user's own data (app.my_data)
        self.export_links = DataLinks()  # one-time links to an admin's training-data export
        from app.side_by_side import SideBySide

        self.side_by_side = SideBySide(self)  # blind A/B turns while a trial runs

    def in_flight(self) -> int:
        """Chat replies being generated right now (background work waits for zero)."""
        return self._in_flight

    # engine hot swap ---------------------------------------------------------------------
    @property
    def engine(self):
        return self._engine

    def swap_engine(self, engine) -> None:
        """Replies already streaming hold a reference to the old engine and finish on it."""
        old, self._engine = self._engine, engine
        if old is not engine and hasattr(old, "retire"):
            old.retire()  # frees its memory once those replies are done

    def _ensure_user(self, name: str) -> None:
        """Create the user row in its own transaction: a user's first requests may arrive at
        once, and only one insert can win (the others see it on retry)."""
        if name in self._known_users:
            return
        from sqlalchemy.exc import IntegrityError

        for _ in range(3):
            try:
                with session_scope(self.session_factory) as s:
                    repository.get_or_create_user(session=s, name=name)
                break
            except IntegrityError:
                continue
        self._known_users.add(name)

    # commands ----------------------------------------------------------------------------
    def stop(self, key: str) -> None:
        turn = self._turns.get(key)
        if turn is not None:
            turn.cancel.set()

    def disconnect(self, key: str) -> None:
        """The reply's reader went away: stop generating at the engine's next step, free its slot
        and mark the turn stopped. Safe to call after the reply ended."""
        turn = self._turns.get(key)
        if turn is not None:
            turn.gone = True
            turn.cancel.set()

    def send(self, user_name: str, text: str, conversation_id: int | None = None,
             params: SamplingParams | None = None, system_prompt: str | None = None,
             cancel_key: str | None = None) -> Iterator[ChatUpdate]:
        """Post a user message and stream the assistant reply. Raises ChatError before any write."""
        text = self._validate(user_name, text)
        params = self._check_params(params)
        if system_prompt is not None:
            system_prompt = _checked_text(str(system_prompt), "The system prompt", self.settings.max_message_chars)
        conv_id, user_msg_id = self._post_user_message(user_name, text, conversation_id, system_prompt)
        yield from self._reply(user_name, conv_id, user_msg_id, params, cancel_key)

    def _post_user_message(self, user_name: str, text: str, conversation_id: int | None,
                           system_prompt: str | None) -> tuple[int, int]:
        """Store a validated user message as the next turn (pending); (conversation id, message id)."""
        self._ensure_user(user_name)
        with session_scope(self.session_factory) as s:
            user = repository.get_or_create_user(session=s, name=user_name)
            if conversation_id is None:
                conv = repository.create_conversation(session=s, owner=user, system_prompt=system_prompt or "",
                                                title=_title(text))
                parent = None
            else:
                conv = self._owned(s, user, conversation_id)
                if repository.count_messages(session=s, conversation=conv) + 2 > self.settings.max_turns:
                    raise ChatError(f"This conversation reached {self.settings.max_turns} messages; start a new chat.")
                if system_prompt is not None:
                    conv.system_prompt = system_prompt
                trial_repo.close_unpicked(session=s, conversation_id=conv.id)  # went on without a pick
                thread = repository.latest_thread(session=s, conversation=conv)
                parent = thread[-1] if thread else None
            # "pending" until the outcome is written: a crash leaves the turn marked, not lost.
            user_msg = repository.add_message(session=s, conversation=conv, role="user", content=text,
                                        parent=parent, status="pending")
            return conv.id, user_msg.id

    def complete(self, user_name: str, messages: list[dict], params: SamplingParams | None = None,
                 cancel_key: str | None = None) -> Iterator[ChatUpdate]:
        """A stateless API call: log the given messages as a new conversation, answer the last one."""
        messages = _clean_messages(messages, self.settings.max_message_chars, self.settings.max_turns)
        text = self._validate(user_name, messages[-1]["content"])
        params = self._check_params(params)
        system = "\n".join(m["content"] for m in messages if m["role"] == "system")
        self._ensure_user(user_name)
        with session_scope(self.session_factory) as s:
            user = repository.get_or_create_user(session=s, name=user_name)
            conv = repository.create_conversation(session=s, owner=user, system_prompt=system, title="API: " + _title(text))
            parent = None
            for m in messages[:-1]:
                if m["role"] != "system":
                    parent = repository.add_message(session=s, conversation=conv, role=m["role"], content=m["content"],
                                              parent=parent)
            user_msg = repository.add_message(session=s, conversation=conv, role="user", content=text, parent=parent,
                                        status="pending")
            conv_id, user_msg_id = conv.id, user_msg.id
        yield from self._reply(user_name, conv_id, user_msg_id, params, cancel_key)

    def regenerate(self, user_name: str, conversation_id: int, params: SamplingParams | None = None,
                   cancel_key: str | None = None) -> Iterator[ChatUpdate]:
        """A new reply to the last user message: a sibling of the old one, both kept."""
        params = self._check_params(params)
        self._rate_limit(user_name)
        with session_scope(self.session_factory) as s:
            user = repository.get_or_create_user(session=s, name=user_name)
            conv = self._owned(s, user, conversation_id)
            thread = repository.latest_thread(session=s, conversation=conv)
            user_msgs = [m for m in thread if m.role == "user"]
            if not user_msgs:
                raise ChatError("Nothing to regenerate yet: send a message first.")
            user_msg_id = user_msgs[-1].id
        yield from self._reply(user_name, conversation_id, user_msg_id, params, cancel_key)

    # the pipeline ------------------------------------------------------------------------
    def _reply(self, user_name, conv_id, user_msg_id, params, cancel_key, engine=None, turn=None,
               check_input=True) -> Iterator[ChatUpdate]:
        """The pipeline, counted in /metrics. A side-by-side turn (app.side_by_side) passes each side's
        engine and turn, and checks the input once itself."""
        m = self.metrics
        turn = turn or _Turn()
        if cancel_key:  # from the start: a reader may go away while input moderation runs
            self._turns[cancel_key] = turn
        m.in_flight.inc()
        with self._lock:
            self._in_flight += 1
        outcome = "error"
        try:
            for up in self._pipeline(user_name, conv_id, user_msg_id, params, turn, engine, check_input):
                if up.done:
                    outcome = "blocked" if up.blocked else up.status
                    m.tokens.inc(up.completion_tokens)
                    m.prompt_tokens.inc(up.prompt_tokens)
                yield up
            if outcome == "error":  # ended without a final update: its reader went away
                outcome = "disconnected"
        except GeneratorExit:  # also after the final update, when the reader stops there (Gradio does)
            if outcome == "error":
                outcome = "disconnected"
            raise
        finally:
            if cancel_key and self._turns.get(cancel_key) is turn:  # a newer turn may reuse the key
                del self._turns[cancel_key]
            m.in_flight.dec()
            with self._lock:
                self._in_flight -= 1
            m.requests.labels(outcome).inc()

    def _pipeline(self, user_name, conv_id, user_msg_id, params, turn: _Turn, engine=None,
                  check_input=True) -> Iterator[ChatUpdate]:
        engine = engine or self._engine  # pinned for this reply: a promote mid-stream does not affect it
        with session_scope(self.session_factory) as s:
            user_msg = repository.get_message(session=s, message_id=user_msg_id)
            conv = user_msg.conversation
            history = _model_context(repository.thread(session=s, leaf=user_msg), conv.system_prompt)
            user_id = conv.owner_id
        if check_input:
            blocked = self.check_input(conv_id, user_msg_id, engine.version)
            if blocked is not None:
                yield blocked
                return
        yield from self._generate(engine, conv_id, user_msg_id, user_id, history, params, turn)

    def check_input(self, conv_id: int, user_msg_id: int, version: str | None) -> ChatUpdate | None:
        """Input moderation of a stored user message: the final (template) update when flagged."""
        with session_scope(self.session_factory) as s:
            user_msg = repository.get_message(session=s, message_id=user_msg_id)
            text, user_id = user_msg.content, user_msg.conversation.owner_id
        verdict = self._moderate(text, "in", user_id, user_msg_id)
        if verdict is not None and verdict.flagged:
            template = self.moderator.template("in", verdict.category)
            with session_scope(self.session_factory) as s:
                user_msg = repository.get_message(session=s, message_id=user_msg_id)
                user_msg.status, user_msg.moderation = "answered", "flagged"
                reply = repository.add_message(session=s, conversation=user_msg.conversation, role="assistant",
                                         content=template, parent=user_msg, status="blocked",
                                         finish_reason="content_filter", moderation="flagged", model_version=None)
                reply_id = reply.id
            return ChatUpdate(conv_id, template, user_msg_id, reply_id, done=True, blocked=True, status="blocked",
                              finish_reason="content_filter", model_version=version)
        if verdict is not None:
            self._set_moderation(user_msg_id, "pass")
        return None

    def _generate(self, engine, conv_id, user_msg_id, user_id, history, params, turn: _Turn) -> Iterator[ChatUpdate]:
        cancel = turn.cancel
        shown, status, out_verdict, gen = "", "complete", None, None
        every = max(1, self.settings.moderation_stream_every)
        checked_len = 0
        try:
            gen = engine.stream(history, params, cancel=cancel)
            for _delta in gen:
                # Show only text that passed output moderation: the screen lags the model by
                # at most `every` characters and never shows an unchecked flagged reply.
                if self.moderator is None:
                    shown = repository.storable(gen.text)
                    yield ChatUpdate(conv_id, shown, user_msg_id)
                elif len(gen.text) - checked_len >= every:
                    checked_len = len(gen.text)
                    out_verdict = self._moderate(gen.text, "out", user_id, None, log_pass=False, partial=True)
                    if out_verdict.flagged:
                        cancel.set()
                        break
                    shown = repository.storable(gen.text)
                    yield ChatUpdate(conv_id, shown, user_msg_id)
            if turn.gone:
                self._end_abandoned(user_msg_id, gen)
                return
            if cancel.is_set() and (out_verdict is None or not out_verdict.flagged):
                status = "stopped"
        except GeneratorExit:  # the consumer closed us (Gradio does when the browser goes away)
            self._end_abandoned(user_msg_id, gen)
            raise
        except (EngineBusyError, ContextTooLongError) as exc:
            self._finish_failed(user_msg_id, str(exc))
            raise ChatError(str(exc), 429 if isinstance(exc, EngineBusyError) else 400) from exc
        except Exception as exc:
            self._finish_failed(user_msg_id, f"{exc.__class__.__name__}: {exc}")
            raise ChatError("The model failed while answering; the error is logged. Please try again.", 503) from exc

        full = repository.storable(gen.text)  # a sampled NUL is neither shown nor stored (PostgreSQL refuses it)
        if self.moderator is not None and (out_verdict is None or not out_verdict.flagged):
            out_verdict = self._moderate(full, "out", user_id, None)
        flagged = out_verdict is not None and out_verdict.flagged
        final = self.moderator.template("out", out_verdict.category) if flagged else full
        st = gen.stats
        if st.ttft_ms is not None:
            self.metrics.ttft.observe(st.ttft_ms / 1000)
        self.metrics.latency.observe(st.latency_ms / 1000)
        with session_scope(self.session_factory) as s:
            user_msg = repository.get_message(session=s, message_id=user_msg_id)
            user_msg.status = "answered"
            reply = repository.add_message(
                session=s, conversation=user_msg.conversation, role="assistant", content=full, parent=user_msg,
                status="blocked" if flagged else status, model_version=engine.version,
                finish_reason="content_filter" if flagged else st.finish_reason, sampling=params.to_dict(),
                prompt_tokens=st.prompt_tokens, completion_tokens=st.completion_tokens,
                ttft_ms=st.ttft_ms, latency_ms=st.latency_ms, served_by=st.served_by or None,
                moderation=None if out_verdict is None else ("flagged" if flagged else "pass"))
            reply_id = reply.id
            if out_verdict is not None:
                # The original flagged text stays in the database for review only.
                moderation_repo.record_verdict(session=s, verdict=out_verdict, message_id=reply_id)
        yield ChatUpdate(conv_id, final, user_msg_id, reply_id, done=True, blocked=flagged,
                         status="blocked" if flagged else status,
                         finish_reason="content_filter" if flagged else st.finish_reason,
                         prompt_tokens=st.prompt_tokens, completion_tokens=st.completion_tokens,
                         model_version=engine.version)

    # helpers -----------------------------------------------------------------------------
    def _moderate(self, text, direction, user_id, message_id, log_pass=True, partial=False):
        if self.moderator is None:
            return None
        verdict = self.moderator.check(text, direction=direction, partial=partial)
        if verdict.flagged:
            self.metrics.flags.labels(direction).inc()
        if message_id is not None and (log_pass or verdict.flagged):
            with session_scope(self.session_factory) as s:
                moderation_repo.record_verdict(session=s, verdict=verdict, message_id=message_id, user_id=user_id)
        return verdict

    def _set_moderation(self, message_id: int, value: str) -> None:
        with session_scope(self.session_factory) as s:
            repository.get_message(session=s, message_id=message_id).moderation = value

    def _end_abandoned(self, user_msg_id: int, gen) -> None:
        """Nobody reads this reply any more: stop the engine now, and mark a new turn stopped
        rather than leave it pending. The partial reply is not stored."""
        if gen is not None:
            gen.close()
        with session_scope(self.session_factory) as s:
            msg = repository.get_message(session=s, message_id=user_msg_id)
            if msg.status == "pending":  # a regenerated turn keeps the status it had
                msg.status = "stopped"

    def _finish_failed(self, user_msg_id: int, error: str) -> None:
        with session_scope(self.session_factory) as s:
            msg = repository.get_message(session=s, message_id=user_msg_id)
            msg.status = "failed"
            repository.add_message(session=s, conversation=msg.conversation, role="assistant", content="",
                             parent=msg, status="failed", model_version=self._engine.version)

    def _validate(self, user_name: str, text: str) -> str:
        text = _checked_text(text if isinstance(text, str) else "", "Your message", self.settings.max_message_chars)
        if not text:
            raise ChatError("Type a message first: empty messages are not sent.")
        self._rate_limit(user_name)
        return text

    def _rate_limit(self, user_name: str) -> None:
        limit = getattr(self.settings, "messages_per_minute", 0)
        if not limit:
            return
        now = time.monotonic()
        with self._lock:
            q = self._recent[user_name]
            while q and now - q[0] > 60:
                q.popleft()
            if len(q) >= limit:
                raise ChatError(f"You can send {limit} messages a minute; wait {60 - (now - q[0]):.0f} s.", 429)
            q.append(now)

    @staticmethod
    def _check_params(params: SamplingParams | None) -> SamplingParams:
        try:
            return (params or SamplingParams()).validate()
        except ValueError as exc:
            raise ChatError(str(exc)) from exc


def _clean_messages(messages: list[dict], max_chars: int, max_count: int) -> list[dict]:
    """Every message checked and cleaned before anything is written: earlier and system messages
    are stored too."""
    if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "user":
        raise ChatError("The last message must come from the user.")
    if len(messages) > max_count:
        raise ChatError(f"{len(messages):,} messages is over the limit of {max_count:,} in one request.")
    cleaned = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ChatError(f"Message {i}: the role must be system, user or assistant.")
        if not isinstance(m.get("content"), str):
            raise ChatError(f"Message {i}: the content must be a string.")
        content = _checked_text(m["content"], f"Message {i} ({m['role']})", max_chars)
        cleaned.append({"role": m["role"], "content": content})
    return cleaned


def _title(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "New chat"
    return line[:60] + ("…" if len(line) > 60 else "")


def _model_context(thread: list[Message], system_prompt: str) -> list[dict]:
    """What the model sees: the thread without blocked or failed turns."""
    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for m in thread:
        if m.role == "system" or m.moderation == "flagged" or m.status in ("blocked", "failed"):
            continue
        msgs.append({"role": m.role, "content": m.content})
    return msgs

"""Blind A/B turns in the chat: a version on trial answers next to the serving one.

While an admin runs a trial (feedback.trial_repo), a share of chat turns in the browser get two
replies, streamed side by side in a random order with no version names. The input is moderated
once; each reply goes through output moderation on its own. The user picks one (or tie / both
bad) and the conversation continues with it; the pick is stored with both versions and becomes
a preference pair for training (feedback.pairs) and a comparison for the leaderboard
(feedback.leaderboard). Users may turn these turns off; the HTTP API never gets them.

Only the candidate's engine is extra: non-trial turns use the serving engine exactly as before.
"""

from __future__ import annotations

import queue
import random
import threading
from dataclasses import dataclass
from typing import Iterator

from feedback import repository
from feedback import trial_repo
from feedback.db import session_scope
from feedback.models import AbTurn

SIDE_CHOICES = {"left", "right", "tie", "both_bad"}


@dataclass
class PairUpdate:
    """Both sides of a side-by-side turn as the user may see them so far."""

    conversation_id: int
    user_message_id: int
    left: str
    right: str
    done: bool = False
    turn_id: int | None = None  # the A/B turn to pick on (final update only)
    single: object = None  # a ChatUpdate when the input was blocked: one template reply, no trial


@dataclass
class PickResult:
    text: str  # the reply the conversation continues with
    message_id: int
    reveal: str  # which version wrote which side, shown after the pick


@dataclass
class _Trial:
    trial_id: int
    engine: object
    share: float


class SideBySide:
    def __init__(self, service, rng: random.Random | None = None):
        self.service = service
        self._trial: _Trial | None = None
        self._rng = rng or random.Random()

    @property
    def trial_id(self) -> int | None:
        return self._trial.trial_id if self._trial else None

    def start(self, trial_id: int, engine, share: float) -> None:
        self.stop()
        self._trial = _Trial(trial_id, engine, share)

    def stop(self) -> None:
        old, self._trial = self._trial, None
        if old is not None and old.engine is not self.service.engine and hasattr(old.engine, "retire"):
            old.engine.retire()  # frees its memory once its replies are done

    def wanted(self, user_name: str) -> bool:
        """Whether this user's next turn is a side-by-side one (a coin with the trial's share)."""
        trial = self._trial
        if trial is None:
            return False
        with session_scope(self.service.session_factory) as s:
            if repository.get_or_create_user(session=s, name=user_name).ab_opt_out:
                return False
        return self._rng.random() < trial.share

    def set_opt_out(self, user_name: str, opted_out: bool) -> None:
        with session_scope(self.service.session_factory) as s:
            repository.get_or_create_user(session=s, name=user_name).ab_opt_out = bool(opted_out)

    def send(self, user_name: str, text: str, conversation_id: int | None, params=None, system_prompt=None,
             cancel_key: str | None = None) -> Iterator[PairUpdate]:
        """Like ChatService.send, with two replies. Raises ChatError before any write."""
        from app.service import ChatError, _checked_text, _Turn

        svc, trial = self.service, self._trial
        if trial is None:
            raise ChatError("No trial is running any more; send again for a normal reply.")
        text = svc._validate(user_name, text)
        params = svc._check_params(params)
        if system_prompt is not None:
            system_prompt = _checked_text(str(system_prompt), "The system prompt", svc.settings.max_message_chars)
        baseline = svc.engine
        conv_id, user_msg_id = svc._post_user_message(user_name, text, conversation_id, system_prompt)
        blocked = svc.check_input(conv_id, user_msg_id, baseline.version)
        if blocked is not None:
            yield PairUpdate(conv_id, user_msg_id, "", "", done=True, single=blocked)
            return
        left = self._rng.choice(("candidate", "baseline"))
        engines = {"candidate": trial.engine, "baseline": baseline}
        parent, sides = _Turn(), {"candidate": _Turn(), "baseline": _Turn()}
        if cancel_key:
            svc._turns[cancel_key] = parent  # Stop and a reader that left end both sides
        events: queue.Queue = queue.Queue()

        def run(side: str) -> None:
            try:
                for up in svc._reply(user_name, conv_id, user_msg_id, params, None, engine=engines[side],
                                     turn=sides[side], check_input=False):
                    events.put((side, up))
            except BaseException as exc:  # ChatError or a crash: raised again below
                events.put((side, exc))
            events.put((side, None))

        for side in sides:
            threading.Thread(target=run, args=(side,), name=f"ab-{side}", daemon=True).start()
        texts, finals, running, error = {"candidate": "", "baseline": ""}, {}, set(sides), None
        try:
            while running:
                try:
                    side, item = events.get(timeout=0.1)
                except queue.Empty:
                    side, item = None, None
                for t in sides.values():  # pass Stop / disconnect on to both sides
                    if parent.cancel.is_set():
                        t.cancel.set()
                    t.gone = t.gone or parent.gone
                if side is None:
                    continue
                if item is None:
                    running.discard(side)
                elif isinstance(item, BaseException):
                    error = error or item
                    for t in sides.values():
                        t.cancel.set()
                else:
                    texts[side] = item.text
                    if item.done:
                        finals[side] = item
                    yield self._update(conv_id, user_msg_id, left, texts)
        except GeneratorExit:
            for t in sides.values():
                t.gone = True
                t.cancel.set()
            raise
        finally:
            if cancel_key and svc._turns.get(cancel_key) is parent:
                del svc._turns[cancel_key]
        if error is not None:
            raise error if isinstance(error, ChatError) else ChatError(
                "The model failed while answering; the error is logged. Please try again.", 503)
        if len(finals) < 2:  # the reader went away: nothing to pick on
            return
        with session_scope(svc.session_factory) as s:
            user = repository.get_or_create_user(session=s, name=user_name)
            msgs = {side: repository.get_message(session=s, message_id=finals[side].assistant_message_id) for side in sides}
            turn = trial_repo.add_turn(session=s, trial=trial_repo.get_trial(session=s, trial_id=trial.trial_id),
                                       user=user, user_message=repository.get_message(session=s, message_id=user_msg_id),
                                       candidate_message=msgs["candidate"], baseline_message=msgs["baseline"],
                                       left=left)
            turn_id = turn.id
        final = self._update(conv_id, user_msg_id, left, {k: finals[k].text for k in sides})
        final.done, final.turn_id = True, turn_id
        yield final

    @staticmethod
    def _update(conv_id, user_msg_id, left, texts) -> PairUpdate:
        right = "baseline" if left == "candidate" else "candidate"
        return PairUpdate(conv_id, user_msg_id, texts[left], texts[right])

    def pick(self, user_name: str, turn_id, choice: str) -> PickResult:
        """``choice`` is left | right | tie | both_bad, as the user saw the sides."""
        if choice not in SIDE_CHOICES:
            raise repository.ValidationError("Pick left, right, tie or both_bad.")
        with session_scope(self.service.session_factory) as s:
            user = repository.get_or_create_user(session=s, name=user_name)
            turn = s.get(AbTurn, repository.checked_id(turn_id, "an A/B turn id"))
            if turn is None or turn.user_id != user.id:
                raise repository.NotFoundError(f"A/B turn {turn_id} does not exist: only a side-by-side turn of yours "
                                         "can be picked.")
            right = "baseline" if turn.left == "candidate" else "candidate"
            pick = {"left": turn.left, "right": right}.get(choice, choice)
            trial_repo.record_pick(session=s, turn_id=turn.id, user=user, pick=pick)
            kept_id = turn.candidate_message_id if pick == "candidate" else turn.baseline_message_id
            kept = repository.get_message(session=s, message_id=kept_id)
            names = {"candidate": turn.candidate_version, "baseline": f"{turn.baseline_version} (serving)"}
            reveal = f"Left was {names[turn.left]}; right was {names[right]}."
            return PickResult(kept.content, kept.id, reveal)

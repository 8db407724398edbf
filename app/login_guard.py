"""Login throttling: failed logins are counted per user name and per client address.

After ``per_name`` failures for one name, or ``per_address`` from one address, within
``window_s`` seconds, further logins for that name (from that address) are refused without
checking the password, until the oldest of those failures is ``window_s`` old: 30 guesses then
the right password no longer gets in. Unknown names count like known ones, so a refusal says
nothing about which names exist.

Gradio calls the login check with (name, password) only, so the caller's address comes from
``ClientAddress``, a pure ASGI middleware that records it for the request being served.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from contextvars import ContextVar

client_address: ContextVar[str | None] = ContextVar("client_address", default=None)

MAX_KEYS = 50_000  # names and addresses tracked at once; the stalest are forgotten first


class ClientAddress:
    """Pure ASGI middleware: the client's address of the request, for ``client_address``."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            client = scope.get("client")
            client_address.set(client[0] if client else None)
        await self.app(scope, receive, send)


class LoginThrottled(Exception):
    """Too many failed logins: ``message`` says for what and for how long."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class LoginThrottle:
    def __init__(self, per_name: int = 5, per_address: int = 20, window_s: float = 300.0,
                 attempts: str = "logins", secrets: str = "passwords", names: str = "this user name"):
        self.per_name, self.per_address, self.window_s = per_name, per_address, window_s
        self.words = attempts, secrets, names  # what the refusal calls them: logins or API calls
        self._failures: dict[tuple[str, str], deque] = {}
        self._lock = threading.Lock()

    def attempt(self, name: str, address: str | None) -> float:
        """Raise LoginThrottled if this name or this address may not try now; else count the
        attempt as a failure until ``succeeded`` says otherwise (so parallel guesses count too)
        and return its time stamp."""
        now = time.monotonic()
        with self._lock:
            attempts, secrets, names = self.words
            for kind, key, limit, what in (("name", name, self.per_name, names),
                                           ("address", address, self.per_address, "your address")):
                if key is None or limit <= 0:
                    continue
                q = self._recent(kind, key, now)
                if q is not None and len(q) >= limit:
                    wait = max(1, int(q[-limit] + self.window_s - now + 0.999))
                    raise LoginThrottled(
                        f"Too many failed {attempts} for {what}: try again in {_duration(wait)}. "
                        f"After {limit} wrong {secrets} within {_duration(int(self.window_s))}, "
                        f"{attempts} wait until the oldest of them is that old.", wait)
            for kind, key in (("name", name), ("address", address)):
                if key is not None:
                    self._failures.setdefault((kind, key), deque()).append(now)
            if len(self._failures) > MAX_KEYS:
                self._forget_stale(now)
        return now

    def succeeded(self, name: str, address: str | None, stamp: float) -> None:
        """The password was right: the name's failures are cleared; the address keeps its
        earlier failures but not this attempt."""
        with self._lock:
            self._failures.pop(("name", name), None)
            q = self._failures.get(("address", address))
            if q is not None and stamp in q:
                q.remove(stamp)

    def _recent(self, kind: str, key: str, now: float) -> deque | None:
        q = self._failures.get((kind, key))
        if q is None:
            return None
        while q and now - q[0] > self.window_s:
            q.popleft()
        if not q:
            del self._failures[(kind, key)]
            return None
        return q

    def _forget_stale(self, now: float) -> None:
        for kind, key in list(self._failures):
            self._recent(kind, key, now)
        extra = len(self._failures) - MAX_KEYS
        if extra > 0:  # still too many live keys: forget those that failed longest ago
            for k in sorted(self._failures, key=lambda k: self._failures[k][-1])[:extra]:
                del self._failures[k]


def _duration(seconds: int) -> str:
    return f"{seconds} s" if seconds < 120 else f"{round(seconds / 60)} minutes"

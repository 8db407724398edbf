"""A user's own data as a download that only they can fetch, and that nothing keeps.

"Download all my data" used to write the JSON to a temporary file that Gradio copied into its
cache: the copy outlived "Delete all my data" and Gradio served it to anyone logged in who had
its URL. Now the button gives a one-time link (``/my-data/<ticket>``, valid ``TTL_S``) bound to
the user. Fetching it checks that the caller is that user (Gradio's login cookie; the local
user in single-user mode), builds the JSON from the database at that moment and sends it with
``Cache-Control: no-store``: no file is written anywhere, so there is none to delete, and
"Delete all my data" revokes the user's link.
"""

from __future__ import annotations

import glob
import os
import secrets
import tempfile
import threading
import time

TTL_S = 600
PATH = "/my-data/"
EXPORT_PATH = "/admin-export/"  # an admin's training-data export, the same way (app/ui/data_panel.py)
LEGACY_EXPORTS = "my-chat-data-*.json"  # the files earlier versions left in the temp dir and Gradio's cache


class DataLinks:
    """One-time download tickets, by user: at most one open ticket per user."""

    def __init__(self, ttl_s: float = TTL_S):
        self.ttl_s = ttl_s
        self._tickets: dict[str, tuple[str, float, object]] = {}  # ticket -> (user name, expiry, payload)
        self._lock = threading.Lock()

    def issue(self, user_name: str, payload=None, path: str = PATH) -> str:
        """A new link for ``user_name`` (their previous one stops working); ``payload`` is what
        the link serves when it is not the user's own data (an admin's export file)."""
        ticket = secrets.token_urlsafe(32)
        with self._lock:
            self._drop(lambda user, expiry: user == user_name or expiry < time.monotonic())
            self._tickets[ticket] = (user_name, time.monotonic() + self.ttl_s, payload)
        return path + ticket

    def take(self, ticket: str, caller: str | None) -> str | None:
        """The user whose data ``ticket`` opens, if ``caller`` is that user and the ticket is
        open; the ticket is then used up. Someone else's attempt leaves it to its owner."""
        entry = self._take(ticket, caller)
        return entry[0] if entry else None

    def take_payload(self, ticket: str, caller: str | None):
        """Like ``take``, returning the ticket's payload (None when the link does not work)."""
        entry = self._take(ticket, caller)
        return entry[2] if entry else None

    def _take(self, ticket: str, caller: str | None):
        with self._lock:
            entry = self._tickets.get(ticket)
            if entry is None or caller is None or entry[0] != caller:
                return None
            del self._tickets[ticket]
        return entry if entry[1] >= time.monotonic() else None

    def revoke(self, user_name: str) -> None:
        with self._lock:
            self._drop(lambda user, expiry: user == user_name)

    def _drop(self, which) -> None:
        for ticket in [t for t, (user, expiry, _) in self._tickets.items() if which(user, expiry)]:
            del self._tickets[ticket]


def remove_legacy_exports() -> int:
    """Delete data exports that earlier versions wrote to the temp dir and Gradio's cache;
    returns how many were removed."""
    from gradio.utils import get_upload_folder

    gradio_cache = get_upload_folder()
    removed = 0
    for path in (glob.glob(os.path.join(tempfile.gettempdir(), LEGACY_EXPORTS))
                 + glob.glob(os.path.join(gradio_cache, "**", LEGACY_EXPORTS), recursive=True)):
        try:
            os.remove(path)
            removed += 1
        except OSError:
            pass
    return removed

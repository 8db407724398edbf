"""Who is calling, and may they? Checked on the server in every handler.

With no password-protected users the app runs in single-user local mode: the caller is
``local`` with the admin role, and the app refuses to bind to a non-local address.
With users, Gradio's login is on and roles come from the database.
"""

from __future__ import annotations

import functools
import hashlib
import threading
import time

from app.login_guard import LoginThrottle, LoginThrottled, client_address
from feedback import repository
from feedback.db import session_scope
from feedback.models import User

LOCAL_USER = "local"
USER_NAME_CHARS = 80  # the users.name and audit_log.user_name columns


def _printable(name: str) -> str:
    """A refused login name as the audit log can hold it: visible, valid Unicode, cut to fit."""
    return "".join(c if c.isprintable() else "?" for c in name)[:USER_NAME_CHARS]  # lone surrogates too


class PermissionDenied(PermissionError):
    """The caller's role does not allow this action (an audit row was written)."""


def auth_enabled(session_factory) -> bool:
    from sqlalchemy import select

    with session_scope(session_factory) as s:
        return s.scalar(select(User.id).where(User.password_hash.is_not(None)).limit(1)) is not None


def caller_name(request) -> str:
    name = getattr(request, "username", None) if request is not None else None
    return name or LOCAL_USER


def role_of(session_factory, user_name: str) -> str | None:
    if user_name == LOCAL_USER:
        return "admin"
    with session_scope(session_factory) as s:
        user = repository.get_user(session=s, name=user_name)
        return user.role if user else None


def require_role(session_factory, user_name: str, roles: tuple[str, ...], action: str, detail: str = "",
                 audit_allowed: bool = True) -> None:
    """Raise PermissionDenied unless the user holds one of ``roles``. Denials are always audited;
    allowed calls too unless ``audit_allowed`` is False (read-only views polled every few seconds)."""
    with session_scope(session_factory) as s:
        user = repository.get_user(session=s, name=user_name)
        # Single-user local mode: the machine's owner (bound to 127.0.0.1, no logins) is the admin.
        # "local" is reserved: `python -m app.users` refuses to create a login with that name.
        role = "admin" if user_name == LOCAL_USER else (user.role if user else None)
        allowed = role in roles
        if audit_allowed or not allowed:
            repository.audit(session=s, user_name=user_name, action=action, allowed=allowed, detail=detail)
    if not allowed:
        raise PermissionDenied(f"'{user_name}' may not {action}: this needs the {' or '.join(roles)} role.")


def hash_secret(secret: str) -> str:
    from argon2 import PasswordHasher

    return PasswordHasher().hash(secret)


def verify_secret(stored_hash: str | None, secret: str) -> bool:
    from argon2 import PasswordHasher
    from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

    if not stored_hash or not isinstance(secret, str):
        return False
    try:
        return PasswordHasher().verify(stored_hash, secret)
    except (VerifyMismatchError, VerificationError, InvalidHashError, UnicodeEncodeError):  # lone surrogate
        return False


class ApiKeyCache:
    """API keys verified in the last ``ttl_s`` seconds, by their SHA-256 (the key itself is not
    kept), with the user id and the stored hash they were checked against. A hit still reads
    the user's row, so a new key (a new hash) or a deleted user ends the old key at once."""

    def __init__(self, ttl_s: float = 60.0):
        self.ttl_s = ttl_s
        self._verified: dict[bytes, tuple[int, str, float]] = {}
        self._lock = threading.Lock()

    def user_name(self, session_factory, user_id: int, key: str) -> str | None:
        """The name of user ``user_id`` if ``key`` is their API key, else None."""
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
        with session_scope(session_factory) as s:
            user = s.get(User, user_id)
            if user is None or not user.api_key_hash:
                return None
            name, stored = user.name, user.api_key_hash
        now = time.monotonic()
        with self._lock:
            hit = self._verified.get(digest)
        if hit is not None and hit[0] == user_id and hit[1] == stored and hit[2] > now:
            return name
        if not verify_secret(stored, key):
            return None
        if self.ttl_s > 0:
            with self._lock:
                self._verified = {d: v for d, v in self._verified.items() if v[2] > now}  # expired ones go
                self._verified[digest] = (user_id, stored, now + self.ttl_s)
        return name


@functools.cache
def _dummy_hash() -> str:
    """A hash of a random secret, made with the same parameters as every stored hash: checking a
    password against it costs what checking a real one does."""
    import secrets

    return hash_secret(secrets.token_urlsafe(16))


def login_checker(session_factory, throttle: LoginThrottle | None = None):
    """The callable Gradio's login awaits: (name, password) -> bool. Throttled per name and per
    address (429 with the reason), and the same argon2 work whether the name exists or not."""
    throttle = throttle or LoginThrottle()

    def verify(name, password, address: str | None) -> bool:
        name = name if isinstance(name, str) else ""
        # No user has such a name (they are made by app.users): refuse without a query, which
        # PostgreSQL would fail on (NUL, or longer than the column), and audit what can be stored.
        possible = 0 < len(name) <= USER_NAME_CHARS and name.isprintable()
        shown = name if possible else _printable(name)
        try:
            stamp = throttle.attempt(shown, address)
        except LoginThrottled:
            with session_scope(session_factory) as s:
                repository.audit(session=s, user_name=shown, action="login", allowed=False, detail="throttled")
            raise
        with session_scope(session_factory) as s:
            user = repository.get_user(session=s, name=name) if possible else None
            stored = user.password_hash if user is not None else None
        # An unknown name, or one without a password, is checked against a dummy hash: the same
        # work, so the time taken does not tell which names exist.
        ok = verify_secret(stored or _dummy_hash(), password) and stored is not None
        if ok:
            throttle.succeeded(shown, address, stamp)
        with session_scope(session_factory) as s:
            repository.audit(session=s, user_name=shown, action="login", allowed=ok)
        return ok

    async def check(name, password) -> bool:
        from fastapi import HTTPException
        from starlette.concurrency import run_in_threadpool

        try:  # argon2 takes ~0.1 s of CPU: not on the event loop, which serves every stream
            return await run_in_threadpool(verify, name, password, client_address.get())
        except LoginThrottled as exc:
            raise HTTPException(429, detail=str(exc), headers={"Retry-After": str(exc.retry_after_s)}) from None

    return check

"""Who is calling, and may they? Checked on the server in every handler.

With no password-protected users the app runs in single-user local mode: the caller is
``local`` with the admin role, and the app refuses to bind to a non-local address.
With users, Gradio's login is on and roles come from the database.
"""

from __future__ import annotations

from feedback import repository as repo
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
        user = repo.get_user(session=s, name=user_name)
        return user.role if user else None


def require_role(session_factory, user_name: str, roles: tuple[str, ...], action: str, detail: str = "",
                 audit_allowed: bool = True) -> None:
    """Raise PermissionDenied unless the user holds one of ``roles``. Denials are always audited;
    allowed calls too unless ``audit_allowed`` is False (read-only views polled every few seconds)."""
    with session_scope(session_factory) as s:
        user = repo.get_user(session=s, name=user_name)
        # Single-user local mode: the machine's owner (bound to 127.0.0.1, no logins) is the admin.
        # "local" is reserved: `python -m app.users` refuses to create a login with that name.
        role = "admin" if user_name == LOCAL_USER else (user.role if user else None)
        allowed = role in roles
        if audit_allowed or not allowed:
            repo.audit(session=s, user_name=user_name, action=action, allowed=allowed, detail=detail)
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


def login_checker(session_factory):
    """The callable Gradio's login calls: (name, password) -> bool."""

    def check(name: str, password: str) -> bool:
        name = name if isinstance(name, str) else ""
        # No user has such a name (they are made by app.users): refuse without a query, which
        # PostgreSQL would fail on (NUL, or longer than the column), and audit what can be stored.
        possible = 0 < len(name) <= USER_NAME_CHARS and name.isprintable()
        with session_scope(session_factory) as s:
            user = repo.get_user(session=s, name=name) if possible else None
            ok = user is not None and verify_secret(user.password_hash, password)
            repo.audit(session=s, user_name=name if possible else _printable(name), action="login", allowed=ok)
        return ok

    return check

"""Server-side role checks for Gradio handlers (hiding a tab is not protection)."""

from __future__ import annotations

import gradio as gr

from app.auth import PermissionDenied, caller_name, require_role, role_of

ADMIN = ("admin",)
ANNOTATOR = ("annotator", "admin")


def unless_admin_skip(service, fn, n_outputs: int):
    """``fn`` for an admin; for anyone else every output unchanged and no audit row. For what the
    page itself polls (its load, timers): a non-admin's browser asks without the user doing
    anything, so a refusal there is not an attempt worth an audit row (three per page load and
    one every 2 s were before). Actions and the Refresh button still audit through ``denied``."""
    # gr must be a module global: with postponed annotations Gradio resolves "gr.Request" there,
    # and an unresolved one made it pass None for the request (None reads as the local admin).
    def guarded(request: gr.Request):
        if role_of(service.session_factory, caller_name(request)) != "admin":
            return tuple(gr.skip() for _ in range(n_outputs))
        return fn(request)

    return guarded


def denied(service, request, roles: tuple[str, ...], action: str, detail: str = "", view: bool = False) -> str | None:
    """None if allowed; otherwise the message to show. Actions are audited either way; views
    (``view=True``, polled by timers) only when denied."""
    try:
        require_role(service.session_factory, caller_name(request), roles, action, detail, audit_allowed=not view)
    except PermissionDenied as exc:
        return f"Denied: {exc}"
    return None

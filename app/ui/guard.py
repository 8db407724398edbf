"""Server-side role checks for Gradio handlers (hiding a tab is not protection)."""

from __future__ import annotations

from app.auth import PermissionDenied, caller_name, require_role

ADMIN = ("admin",)
ANNOTATOR = ("annotator", "admin")


def denied(service, request, roles: tuple[str, ...], action: str, detail: str = "", view: bool = False) -> str | None:
    """None if allowed; otherwise the message to show. Actions are audited either way; views
    (``view=True``, polled by timers) only when denied."""
    try:
        require_role(service.session_factory, caller_name(request), roles, action, detail, audit_allowed=not view)
    except PermissionDenied as exc:
        return f"Denied: {exc}"
    return None

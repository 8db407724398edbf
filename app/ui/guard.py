"""Server-side role checks for Gradio handlers (hiding a tab is not protection)."""

from __future__ import annotations

from app.auth import PermissionDenied, caller_name, require_role

ADMIN = ("admin",)
ANNOTATOR = ("annotator", "admin")


def denied(service, request, roles: tuple[str, ...], action: str, detail: str = "") -> str | None:
    """None if allowed; otherwise the message to show. Either way an audit row is written."""
    try:
        require_role(service.session_factory, caller_name(request), roles, action, detail)
    except PermissionDenied as exc:
        return f"Denied: {exc}"
    return None

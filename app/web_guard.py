"""Which requests may reach the app at all, checked before any route (API, Gradio, files).

* Host allow-list, against DNS rebinding: a page on evil.example whose name is made to point
  at 127.0.0.1 reaches this server with ``Host: evil.example`` and an Origin that matches it,
  so a same-origin check alone lets it act (and read answers) as the local user.
* Same-origin writes, against CSRF: a state-changing request from a browser must come from a
  page of ours. ``Origin: null`` (sandboxed iframes, some redirects) names no page: refused.

Refusals use OpenAI's error shape, so API clients show the message.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
WILDCARD_BINDS = ("", "0.0.0.0", "::")  # binding to these names no host of its own
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def host_name(value: str) -> str:
    """The name in a Host header or setting, lower case, without port, brackets or final dot:
    '[::1]:7860' -> '::1', 'LocalHost.:80' -> 'localhost'."""
    value = value.strip().lower()
    if value.startswith("["):
        value = value[1:].split("]", 1)[0]
    elif value.count(":") == 1:  # name:port (a bare IPv6 address has more colons)
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def allowed_hosts(settings) -> frozenset[str]:
    """127.0.0.1, localhost and ::1, the configured bind address unless it is a wildcard, and
    the names in CHAT_ALLOWED_HOSTS ('*' there allows any)."""
    names = set(LOCAL_HOSTS)
    if host_name(settings.host) not in WILDCARD_BINDS:
        names.add(host_name(settings.host))
    names.update(host_name(n) for n in settings.allowed_hosts.split(",") if n.strip())
    return frozenset(names)


def _netloc(origin: str) -> str | None:
    try:
        return urlsplit(origin.strip()).netloc.lower()
    except ValueError:  # e.g. 'http://[bad': no origin of ours
        return None


def _refuse(status: int, message: str, code: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": None,
                                                               "code": code}})


class RequestGuard:
    """Pure ASGI middleware (a BaseHTTPMiddleware would get between a stream and its disconnect)."""

    def __init__(self, app, hosts: frozenset[str]):
        self.app = app
        self.hosts = hosts

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            refusal = self.refusal(scope)
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refusal(self, scope) -> JSONResponse | None:
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        if "*" not in self.hosts and host_name(host) not in self.hosts:
            shown = ", ".join(sorted(f"[{h}]" if ":" in h else h for h in self.hosts))
            return _refuse(400, f"Host '{host[:100]}' is not served here (this app answers to {shown}). "
                                "To reach it under another name, add that name to CHAT_ALLOWED_HOSTS.",
                           "host_not_allowed")
        # A WebSocket handshake is a GET, but it opens a channel that acts: check it like a write.
        if scope["type"] == "http" and scope["method"] in SAFE_METHODS:
            return None
        origin = headers.get("origin")
        if origin is None:  # not sent by a browser (API clients, scripts): nothing to forge
            return None
        if origin.strip().lower() == "null":
            return _refuse(403, "Requests from an opaque origin ('Origin: null', e.g. a sandboxed frame) "
                                "may not change anything.", "null_origin", "permission_error")
        if _netloc(origin) != host.lower():
            return _refuse(403, "Cross-origin request refused.", "foreign_origin", "permission_error")
        return None

"""Run the app: migrate the database, load the model, serve chat + API on one port.

    python -m app.main            # http://127.0.0.1:7860 (CHAT_HOST / CHAT_PORT to change)
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from starlette.requests import Request  # resolved by FastAPI from this module's names

from app.settings import Settings, engine_options, load_settings, settings_env

log = logging.getLogger("app")


class StartupError(RuntimeError):
    """Startup cannot continue; the message says what to do."""


def build_service(settings: Settings, engine=None):
    """Migrate, load the model and moderation, and wire the ChatService."""
    from feedback.db import DatabaseUnavailableError, check_connection, make_engine, make_session_factory, migrate
    from model.moderation import moderator_from_env

    try:
        migrate(settings.db_url)
    except DatabaseUnavailableError as exc:
        raise StartupError(str(exc)) from exc
    db = make_engine(settings.db_url)
    check_connection(db)
    factory = make_session_factory(db)
    if engine is None:
        engine = load_engine(settings, factory)
    moderator = moderator_from_env(settings_env(settings))
    from app.service import ChatService
    from feedback.db import session_scope
    from feedback.moderation_repo import load_templates

    with session_scope(factory) as s:
        moderator.templates.update(load_templates(session=s))  # the admin's edits win over defaults
    return ChatService(engine, factory, settings, moderator=moderator)


def load_engine(settings: Settings, session_factory):
    """Load the promoted version if there is one, else the configured model (registered as base)."""
    import torch

    from feedback import training_repo
    from feedback.db import session_scope
    from model.loader import ModelNotFoundError, build_engine, resolve_model

    if settings.threads:
        torch.set_num_threads(settings.threads)
    start = time.perf_counter()
    try:
        resolved = resolve_model(settings.model, Path(settings.data_dir))
    except ModelNotFoundError as exc:
        raise StartupError(str(exc)) from exc
    if resolved.converted_now:
        log.warning("converted %s to %s (one time)", resolved.name, resolved.path)
    with session_scope(session_factory) as s:
        training_repo.ensure_base_version(session=s, name=resolved.name, path=str(resolved.path))
        active = training_repo.active_version(session=s)
        path, name, remote_model = active.path, active.name, active.remote_model
    if not Path(path, "config.json").is_file():
        log.warning("promoted version %s has no weights at %s; serving %s", name, path, resolved.name)
        path, name, remote_model = str(resolved.path), resolved.name, None
    engine = build_engine(path, name, **engine_options(settings, remote_model))
    log.warning("model %s loaded in %.1f s", name, time.perf_counter() - start)
    return engine


def create_app(service, worker=None, control=None):
    """FastAPI app with the Gradio UI mounted at /."""
    import gradio as gr
    from fastapi import FastAPI
    from gradio.routes import App as GradioApp

    from app.my_data import EXPORT_PATH
    from app.my_data import PATH as MY_DATA_PATH

    from app.ui.demo import CSS, PAGE_JS, build_demo

    api = FastAPI(title="Feedback Chat")
    api.state.service = service

    from app.api import build_router
    from app.login_guard import ClientAddress, LoginThrottle
    from app.web_guard import RequestGuard, allowed_hosts

    api.add_middleware(RequestGuard, hosts=allowed_hosts(service.settings))
    api.add_middleware(ClientAddress)  # the login check's per-address throttle reads it
    api.include_router(build_router(service))

    @api.get("/metrics")
    def metrics():
        from fastapi.responses import Response

        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4")

    gradio_app = {}  # the mounted Gradio app, whose login cookies say who is calling

    @api.get(MY_DATA_PATH + "{ticket}")
    def my_data_download(ticket: str, request: Request):
        return my_data_response(service, ticket, gradio_app.get("app"), request)

    @api.get(EXPORT_PATH + "{ticket}")
    def admin_export_download(ticket: str, request: Request):
        return export_response(service, ticket, gradio_app.get("app"), request)

    @api.get("/healthz")
    def healthz():
        return {"status": "ok", "model": service.engine.version,
                "backend": getattr(service.engine, "backend", type(service.engine).__name__)}

    from app.auth import auth_enabled, login_checker

    demo = build_demo(service, worker, control)
    st = service.settings
    demo.queue(default_concurrency_limit=st.max_concurrent * 4)
    # Gradio's queue polls for work every 1 ms when idle (and for progress every 10 ms): ~1,600
    # event-loop wakeups a second, 9% of a core with nobody using the app (bench.idle).
    # Private attributes of the pinned Gradio; the setting's help says what it costs.
    queue = getattr(demo, "_queue", None)
    if queue is not None and hasattr(queue, "sleep_when_free"):
        queue.sleep_when_free = st.queue_poll_s
        queue.progress_update_sleep_when_free = max(5 * st.queue_poll_s, 0.01)  # Gradio: 0.01
    throttle = LoginThrottle(st.login_failures_per_name, st.login_failures_per_address, st.login_window_s)
    auth = login_checker(service.session_factory, throttle) if auth_enabled(service.session_factory) else None
    app = gr.mount_gradio_app(api, demo, path="/", css=CSS, js=PAGE_JS, footer_links=[], show_error=True,
                              auth=auth, auth_message=login_message(throttle))
    gradio_app["app"] = next(r.app for r in app.routes if isinstance(getattr(r, "app", None), GradioApp))
    return app


def login_message(throttle) -> str:
    """The login page's note. Gradio's page shows any refusal as "incorrect credentials", so the
    throttling rule is stated here; HTTP clients get it in the 429 reply."""
    rule = ""
    if throttle.per_name > 0:
        minutes = max(1, round(throttle.window_s / 60))
        rule = (f" After {throttle.per_name} wrong passwords for a name within {minutes} minutes, logins with "
                f"that name pause for up to {minutes} minutes, even with the right password.")
    return "Log in with the account your admin created." + rule


def _caller(gradio_app, request) -> str | None:
    """Who is calling, from Gradio's login cookie (the local user in single-user mode)."""
    from app.auth import LOCAL_USER

    if gradio_app is None or gradio_app.auth is None:
        return LOCAL_USER  # single-user local mode: no logins, one user
    cookie = gradio_app.cookie_id
    token = request.cookies.get(f"access-token-{cookie}") or request.cookies.get(f"access-token-unsecure-{cookie}")
    return gradio_app.tokens.get(token)


def export_response(service, ticket: str, gradio_app, request):
    """An admin's training-data export through its one-time link: the caller must be the admin who
    exported it and still be an admin now. Nothing goes through Gradio's file cache."""
    from fastapi.responses import FileResponse

    from app.api import error
    from app.auth import role_of

    caller = _caller(gradio_app, request)
    allowed = caller is not None and role_of(service.session_factory, caller) == "admin"
    path = service.export_links.take_payload(ticket, caller) if allowed else None
    if path is None:
        return error(404, "This download link does not work (any more): it was used, it expired, it is someone "
                          "else's, or you are not logged in as an admin. Export again.", code="link_not_valid")
    return FileResponse(path, media_type="application/jsonl", filename=Path(path).name,
                        headers={"Cache-Control": "no-store, private"})


def my_data_response(service, ticket: str, gradio_app, request):
    """A user's data export through their one-time link (app.my_data), built now, stored nowhere."""
    import json

    from fastapi.responses import Response

    from app.api import error

    caller = _caller(gradio_app, request)
    user = service.data_links.take(ticket, caller)
    if user is None:
        return error(404, "This download link does not work (any more): it was used, it expired, it is someone "
                          "else's, or you are not logged in. Press 'Download all my data' again.", code="link_not_valid")
    body = json.dumps(service.my_data(user), ensure_ascii=False, indent=1)
    return Response(body, media_type="application/json", headers={
        "Content-Disposition": 'attachment; filename="my-chat-data.json"', "Cache-Control": "no-store, private"})


def main() -> None:
    import uvicorn

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    settings = load_settings()
    try:
        service = build_service(settings)
    except StartupError as exc:
        print(f"\nCannot start: {exc}\n", file=sys.stderr)
        sys.exit(2)
    from app.candidates import CandidateWorker

    from app.auth import auth_enabled
    from app.training_control import TrainingControl

    if not auth_enabled(service.session_factory):
        if not settings.is_local_bind:
            print(f"\nCannot start: binding to {settings.host} needs logins, and no user has one yet.\n"
                  "Create the admin first:  python -m app.users add NAME --role admin\n", file=sys.stderr)
            sys.exit(2)
        print("Single-user local mode: no logins, you are the admin. To add logins and roles:\n"
              "  python -m app.users add NAME --role admin", flush=True)
    if not settings.is_local_bind and not settings.allowed_hosts:
        from app.web_guard import allowed_hosts

        log.warning("CHAT_ALLOWED_HOSTS is empty, so only requests to %s are answered: set it to the names "
                    "people use to reach this server", ", ".join(sorted(allowed_hosts(settings))))
    from app.my_data import remove_legacy_exports

    if removed := remove_legacy_exports():
        log.warning("removed %d data export files that an earlier version left in the temp dir", removed)
    control = TrainingControl(service)
    if failed := control.recover():
        log.warning("training runs %s were left running by a crash or kill; marked failed", failed)
    worker = CandidateWorker(service, k=settings.ranking_candidates)
    worker.start()
    app = create_app(service, worker, control)
    print(f"Serving on http://{settings.host}:{settings.port}  (model: {service.engine.version})", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")


if __name__ == "__main__":
    main()

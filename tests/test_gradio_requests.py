"""Every handler of the built app receives the caller's request: Gradio passes gr.Request only to a
parameter whose type hint it can resolve, and fills an unresolved one with None, which
app.auth.caller_name reads as the single-user local admin."""

import inspect

import gradio as gr
from gradio import utils

from app.service import ChatService
from tests.fakes import ScriptedEngine


def test_every_handler_with_a_request_parameter_gets_the_request(session_factory, settings):
    from app.ui.demo import build_demo

    demo = build_demo(ChatService(ScriptedEngine("ok"), session_factory, settings))
    checked, unresolved = 0, []
    for block_fn in demo.fns.values():
        fn = block_fn.fn
        if fn is None or "request" not in inspect.signature(fn).parameters:
            continue
        checked += 1
        if utils.get_type_hints(fn).get("request") is not gr.Request:
            unresolved.append(getattr(fn, "__qualname__", repr(fn)))
    assert checked >= 30 and unresolved == []

"""A chat writer for the crash test: sends messages forever with a slow scripted engine."""

import sys

from app.service import ChatService
from app.settings import Settings
from feedback.db import make_engine, make_session_factory
from tests.fakes import ScriptedEngine


class SlowEngine(ScriptedEngine):
    def stream(self, messages, params=None, cancel=None):
        import time

        gen = super().stream(messages, params, cancel)
        inner = gen._deltas

        def slow():
            for d in inner:
                time.sleep(0.002)
                yield d

        gen._deltas = slow()
        return gen


if __name__ == "__main__":
    url = sys.argv[1]
    factory = make_session_factory(make_engine(url))
    service = ChatService(SlowEngine("word " * 20), factory, Settings(database_url=url, messages_per_minute=0))
    conv = None
    i = 0
    while True:
        i += 1
        for up in service.send("crash", f"message {i}", conversation_id=conv):
            conv = up.conversation_id
        if i % 3 == 0:
            service.vote("crash", up.assistant_message_id, 1)

"""Test doubles that keep the real interfaces (engine, moderation backend)."""

from __future__ import annotations

import threading

from model.engine import Generation, GenerationStats, SamplingParams


class ScriptedEngine:
    """An engine that streams a fixed reply word by word and records every call (a spy)."""

    def __init__(self, reply="Hello there, friend.", version="fake-v1"):
        self.reply = reply
        self.version = version
        self.calls: list[list[dict]] = []

    def stream(self, messages, params=None, cancel=None):
        self.calls.append(messages)
        cancel = cancel or threading.Event()
        stats = GenerationStats(prompt_tokens=sum(len(m["content"].split()) for m in messages))
        reply = self.reply(messages) if callable(self.reply) else self.reply

        def deltas():
            words = reply.split(" ")
            for i, w in enumerate(words):
                if cancel.is_set():
                    stats.finish_reason = "cancelled"
                    return
                stats.completion_tokens += 1
                if stats.ttft_ms is None:
                    stats.ttft_ms = 1.0
                yield w if i == 0 else " " + w
            stats.finish_reason = "stop"

        return Generation(deltas(), stats, cancel)

    def generate(self, messages, params=None):
        gen = self.stream(messages, params)
        for _ in gen:
            pass
        return gen.text, gen.stats


class ExplodingBackend:
    name = "exploding"

    def score(self, texts):
        raise RuntimeError("classifier crashed")

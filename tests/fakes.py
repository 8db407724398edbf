"""Test doubles that keep the real interfaces (engine, moderation backend).

ScriptedEngine lives in bench/inprocess.py (bench.load uses it too); it is re-exported here.
"""

from __future__ import annotations

from bench.inprocess import ScriptedEngine

__all__ = ["ExplodingBackend", "ScriptedEngine"]


class ExplodingBackend:
    name = "exploding"

    def score(self, texts):
        raise RuntimeError("classifier crashed")

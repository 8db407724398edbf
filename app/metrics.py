"""Prometheus metrics at /metrics: requests, tokens, time to first token, latency, queue, flags.

Each app gets its own registry so tests (and several apps in one process) never collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TTFT_BUCKETS = (0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30)
LATENCY_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120)


class ChatMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("chat_requests", "Chat requests by outcome", ["outcome"], registry=self.registry)
        self.tokens = Counter("chat_completion_tokens", "Tokens generated", registry=self.registry)
        self.prompt_tokens = Counter("chat_prompt_tokens", "Prompt tokens processed", registry=self.registry)
        self.ttft = Histogram("chat_time_to_first_token_seconds", "Time to first token", buckets=TTFT_BUCKETS,
                              registry=self.registry)
        self.latency = Histogram("chat_latency_seconds", "Whole reply latency", buckets=LATENCY_BUCKETS,
                                 registry=self.registry)
        self.in_flight = Gauge("chat_in_flight", "Replies being generated or waiting for a slot",
                               registry=self.registry)
        self.flags = Counter("chat_moderation_flags", "Messages blocked by moderation", ["direction"],
                             registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)

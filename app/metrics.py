"""Prometheus metrics at /metrics: requests, tokens, time to first token, latency, queue, flags,
and the serving engine's own counters (forward passes, rows per pass, reused prompt tokens).

Each app gets its own registry so tests (and several apps in one process) never collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# engine.counters key -> (metric name, help); engines without counters export nothing
ENGINE_COUNTERS = {
    "steps": ("chat_engine_forward_passes", "Forward passes of the serving engine"),
    "decode_rows": ("chat_engine_decode_rows", "Reply tokens decoded (rows / passes = users sharing a pass)"),
    "prefill_tokens": ("chat_engine_prompt_tokens_read", "Prompt tokens the model read"),
    "reused_tokens": ("chat_engine_prompt_tokens_reused", "Prompt tokens taken from the prefix cache instead"),
    "decode_s": ("chat_engine_forward_seconds", "Seconds inside the engine's forward passes"),
    "remote_failovers": ("chat_engine_remote_failures", "Requests a remote replica failed (then retried elsewhere)"),
}
ENGINE_GAUGES = {
    "remote_replicas_up": ("chat_engine_remote_replicas_up", "Remote replicas not taken out after a failure"),
}


class EngineCollector:
    """Reads the engine's counters at scrape time; the engine is looked up each time because
    a retrained version swaps it (its counters then start again from zero, a normal reset)."""

    def __init__(self, get_engine):
        self.get_engine = get_engine

    def collect(self):
        engine = self.get_engine()
        counters = getattr(engine, "counters", None) or {}
        for kinds, family_of in ((ENGINE_COUNTERS, CounterMetricFamily), (ENGINE_GAUGES, GaugeMetricFamily)):
            for key, (name, doc) in kinds.items():
                if key in counters:
                    family = family_of(name, doc, labels=["version", "backend"])
                    family.add_metric([str(engine.version), getattr(engine, "backend", "")], counters[key])
                    yield family

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

    def watch_engine(self, get_engine) -> None:
        self.registry.register(EngineCollector(get_engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)

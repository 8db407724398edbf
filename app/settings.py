"""Runtime settings: one place, read from ``CHAT_*`` environment variables and a ``.env`` file.

``DATABASE_URL`` is also honoured without the prefix, as most tools expect.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path


def _env(name: str, default):
    raw = os.environ.get(f"CHAT_{name.upper()}")
    if raw is None:
        return default
    if isinstance(default, bool):
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    return raw


@dataclass
class Settings:
    host: str = field(default="127.0.0.1", metadata={"help": "Address to bind; 127.0.0.1 keeps it on this machine."})
    port: int = field(default=7860, metadata={"help": "HTTP port of the app."})
    allowed_hosts: str = field(default="", metadata={"help": (
        "Extra names the app answers to in the Host header, comma list (e.g. 'chat.example.com'), besides "
        "127.0.0.1, localhost, [::1] and CHAT_HOST; other Hosts are refused (DNS rebinding). "
        "'*' = any, only behind a proxy that checks Host itself.")})
    data_dir: str = field(default="data", metadata={"help": "Database, converted models, versions, logs."})
    database_url: str = field(default="", metadata={"help": "SQLAlchemy URL; empty = SQLite in data_dir."})
    model: str = field(default="embedded", metadata={"help": "embedded, a HF directory, a .gguf file or a hub id."})
    device: str = field(default="auto", metadata={"help": "auto (CUDA if present, else CPU), cpu or cuda."})
    threads: int = field(default=0, metadata={"help": "CPU threads for torch and llama.cpp; 0 = all cores."})
    trial_threads: int = field(default=1, metadata={"help": "CPU threads of the engine of a version on A/B trial; "
                                                            "0 = all cores (two engines with all cores each spin "
                                                            "against each other on a small machine: bench.ab_serving)."})
    trial_yields: bool = field(default=True, metadata={"help": "The A/B candidate's engine pauses while the serving "
                                                          "engine has a user waiting for a first token (at most 1 s "
                                                          "a step), so a trial does not slow everyone else's first "
                                                          "token (bench.ab_serving)."})
    trial_nice: int = field(default=10, metadata={"help": "How much lower the CPU priority of the A/B candidate's "
                                                        "engine is (Unix nice, 0-19): when both engines want the "
                                                        "cores, the serving engine gets them (bench.ab_serving)."})
    max_message_chars: int = field(default=8000, metadata={"help": "Longer messages (any role, API too) are refused."})
    max_turns: int = field(default=200, metadata={"help": "Messages allowed in one conversation (and in one API call)."})
    max_request_bytes: int = field(default=1_000_000, metadata={"help": "Larger HTTP API bodies are refused (413) unread."})
    login_failures_per_name: int = field(default=5, metadata={"help": (
        "Failed logins one user name may have within CHAT_LOGIN_WINDOW_S; then its logins wait (0 = no limit).")})
    login_failures_per_address: int = field(default=20, metadata={"help": (
        "Failed logins one client address may have within CHAT_LOGIN_WINDOW_S; then its logins wait (0 = no limit).")})
    login_window_s: float = field(default=300.0, metadata={"help": "The window, in seconds, that login failures count in."})
    api_key_cache_s: float = field(default=60.0, metadata={"help": (
        "Seconds a verified API key is remembered, so each call skips the ~0.1 s argon2 check (0 = off). "
        "A new key for the user (app.users api-key) ends the old one at once.")})
    messages_per_minute: int = field(default=30, metadata={"help": "Messages one user may send a minute; 0 = no limit."})
    engine: str = field(default="auto", metadata={"help": "auto, llamacpp (GGUF, continuous batching), batched (transformers), simple, or openai (remote servers, CHAT_REMOTE_URLS)."})
    remote_urls: str = field(default="", metadata={"help": "CHAT_ENGINE=openai: base URLs of OpenAI-compatible servers, comma list (e.g. http://10.0.0.5:8000/v1); requests go to the least busy healthy one."})
    remote_api_key: str = field(default="", metadata={"help": "CHAT_ENGINE=openai: bearer key the servers expect (empty = none)."})
    remote_model: str = field(default="", metadata={"help": "CHAT_ENGINE=openai: the model id to ask the servers for (empty = the served version's name)."})
    gguf_type: str = field(default="q8_0", metadata={"help": "Weights llama.cpp serves: q8_0 (fast, within 1% perplexity), f16 or f32."})
    context_tokens: int = field(default=2048, metadata={"help": "llama.cpp context per conversation, in tokens."})
    prefix_cache: int = field(default=-1, metadata={"help": (
        "Finished replies whose llama.cpp KV cache is kept so the next turn skips re-reading the history "
        "(-1 = one per concurrent slot, 0 = off: seeded replies then repeat exactly on quantized weights).")})
    queue_poll_s: float = field(default=0.01, metadata={"help": (
        "How often Gradio's idle queue looks for work, in seconds (Gradio's own 0.001 costs ~9% of a core "
        "with nobody using the app; 0.01 adds at most 10 ms before an event starts).")})
    max_queue: int = field(default=64, metadata={"help": "Requests waiting for the model; more get 'busy, try again'."})
    max_concurrent: int = field(default=16, metadata={"help": "Replies generated at the same time (the batch size)."})
    busy_wait_s: float = field(default=30.0, metadata={"help": "How long a request waits for a free slot."})
    moderation_backends: str = field(default="auto", metadata={"help": "Comma list: rules,profanity,detoxify,learned; auto = best available, plus the learned head once one is trained (the newest, or the one switched on)."})
    moderation_threshold: float = field(default=0.5, metadata={"help": "Default per-category flag threshold."})
    moderation_thresholds: str = field(default="", metadata={"help": "Per-category overrides, e.g. 'toxicity=0.6,insult=0.7'."})
    moderation_rules_file: str = field(default="", metadata={"help": "JSON file of regex/blocklist rules with a category each."})
    moderation_stream_every: int = field(default=24, metadata={"help": "Check the growing reply every N characters."})
    detoxify_checkpoint: str = field(default="", metadata={"help": "Local Detoxify checkpoint (.ckpt) to use offline."})
    detoxify_config_dir: str = field(default="", metadata={"help": "Local HF config/tokenizer dir for that checkpoint."})
    retrain_nice: int = field(default=19, metadata={"help": (
        "Niceness of the retrain process (0-19; 0 = the same priority as chat). It shares the cores with "
        "chat: at 19 the kernel gives chat's threads the CPU whenever they want it (bench.chat_contention).")})
    ranking_candidates: int = field(default=4, metadata={"help": "Candidate replies per ranking task (K)."})
    ranking_candidate_tokens: int = field(default=128, metadata={"help": (
        "New tokens per candidate reply on the Rank tab. 128 keeps candidates quick to write and read; 256 (the "
        "chat's own budget) still left 76% of SmolLM2's candidates cut, and on bench.learning's concise cell it "
        "gave no gain while SFT, the reward model and the judge read replies twice as long (a 32-minute "
        "retrain; README, simulated-user benchmark).")})
    annotations_per_task: int = field(default=1, metadata={"help": "Rankings each task wants (N)."})

    @property
    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{Path(self.data_dir).resolve() / 'chat.db'}"

    @property
    def is_local_bind(self) -> bool:
        return self.host in ("127.0.0.1", "localhost", "::1")


def load_settings(env_file: str | None = ".env", **overrides) -> Settings:
    if env_file and Path(env_file).is_file():
        from dotenv import load_dotenv

        load_dotenv(env_file, override=False)
    values = {f.name: _env(f.name, f.default) for f in fields(Settings)}
    if not values["database_url"]:
        values["database_url"] = os.environ.get("DATABASE_URL", "")
    values.update(overrides)
    return Settings(**values)


def settings_env(settings: Settings) -> dict[str, str]:
    """The CHAT_* variables that give these settings, for code below app/ that reads the
    environment (e.g. model.moderation.moderator_from_env); load_settings reads them back."""
    return {f"CHAT_{f.name.upper()}": str(getattr(settings, f.name)) for f in fields(Settings)}


def engine_options(settings: Settings, remote_model: str | None = None) -> dict:
    """The keyword arguments model.loader.build_engine takes from the settings. ``remote_model``:
    the id mapped to the version in Admin > Training, which wins over CHAT_REMOTE_MODEL."""
    return dict(kind=settings.engine, device=settings.device, max_concurrent=settings.max_concurrent,
                max_queue=settings.max_queue, busy_wait_s=settings.busy_wait_s, threads=settings.threads,
                gguf_type=settings.gguf_type, context_tokens=settings.context_tokens,
                prefix_cache=settings.prefix_cache, remote_urls=settings.remote_urls,
                remote_api_key=settings.remote_api_key, remote_model=remote_model or settings.remote_model)


def trial_engine_options(settings: Settings, share: float, remote_model: str | None = None) -> dict:
    """Options for the engine of a version on A/B trial: slots in proportion to the trial's share
    of turns (its KV cache is most of an engine's memory), ``trial_threads`` threads and a CPU
    priority ``trial_nice`` lower than the serving engine's."""
    import math

    slots = max(2, math.ceil(settings.max_concurrent * min(max(share, 0.0), 1.0)))
    return {**engine_options(settings, remote_model), "max_concurrent": slots, "threads": settings.trial_threads,
            "nice": settings.trial_nice}

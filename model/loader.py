"""Build the serving engine for a model directory, and convert the embedded model ahead of time.

The top of model/: it imports the engines (engine, batching, llamacpp, gguf_export) and the
weights helpers (model.weights), and none of them imports it. The weights names are
re-exported, so ``from model.loader import resolve_model, load_model`` keeps working.

Convert ahead of time (optional, ``make run`` does it on first start):

    python -m model.loader --data-dir data
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time
from pathlib import Path

from model.weights import ModelNotFoundError, embedded_gguf_path, load_model, pick_device, pick_dtype, resolve_model

__all__ = ["ModelNotFoundError", "build_engine", "embedded_gguf_path", "llamacpp_available", "load_model",
           "pick_device", "pick_dtype", "resolve_model"]


def llamacpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def build_engine(path, version: str, kind: str = "auto", device: str = "auto", max_concurrent: int = 16,
                 max_queue: int = 64, busy_wait_s: float = 30.0, threads: int = 0, gguf_type: str = "q8_0",
                 context_tokens: int = 2048, prefix_cache: int = -1, remote_urls: str = "", remote_api_key: str = "",
                 remote_model: str = "", yields_to=None, nice: int = 0):
    """The serving engine for a model directory.

    ``llamacpp``: the checkpoint as a GGUF (written once next to it) served by llama.cpp with
    continuous batching, the fastest path on CPU (see bench/serving.py). ``batched``: transformers
    with static batching (CUDA when present, any architecture). ``simple``: one ``generate`` per
    request. ``auto``: llamacpp on CPU when the checkpoint exports to GGUF, else batched. ``openai``:
    no local model; replies come from the OpenAI-compatible servers at ``remote_urls`` (comma list,
    model/remote.py), asked for ``remote_model`` (default: the version's name). ``yields_to``: a
    callable giving how many users another engine has waiting for a first token; a llama.cpp
    engine pauses its steps while it is above zero (the engine of a version on A/B trial); ``nice``
    lowers a llama.cpp engine's CPU priority by that much (other kinds ignore both).
    """
    import logging

    from model.batching import BatchedEngine
    from model.engine import Engine

    if kind == "openai":
        from model.remote import RemoteEngine

        return RemoteEngine(remote_urls.split(","), version, model=remote_model, api_key=remote_api_key,
                            max_concurrent=max_concurrent, busy_wait_s=busy_wait_s)
    if kind in ("auto", "llamacpp"):
        wanted = kind == "llamacpp"
        if not llamacpp_available():
            if wanted:
                raise ModelNotFoundError("engine 'llamacpp' needs llama-cpp-python: run `make setup`")
        elif wanted or pick_device(device) == "cpu":
            from model.gguf_export import GGUFExportError, ensure_gguf
            from model.llamacpp import LlamaCppEngine

            try:
                gguf = ensure_gguf(path, gguf_type)
            except (GGUFExportError, OSError, KeyError) as exc:
                if wanted:
                    raise
                logging.getLogger(__name__).warning("serving %s with transformers: no GGUF (%s)", version, exc)
            else:
                return LlamaCppEngine(gguf, version, max_batch=max_concurrent, max_queue=max_queue,
                                      busy_wait_s=busy_wait_s, threads=threads, context_tokens=context_tokens,
                                      prefix_cache=prefix_cache, yields_to=yields_to, nice=nice)
        kind = "batched"
    if kind == "batched":
        return BatchedEngine.from_path(path, version, device=device, max_batch=max_concurrent, max_queue=max_queue,
                                       busy_wait_s=busy_wait_s)
    if kind == "simple":
        return Engine.from_path(path, version, device=device, max_concurrent=max_concurrent, busy_wait_s=busy_wait_s)
    raise ValueError(f"Unknown engine '{kind}': use auto, llamacpp, batched, simple or openai")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded", help="embedded, a directory, a .gguf file or a hub id")
    parser.add_argument("--data-dir", default=os.environ.get("CHAT_DATA_DIR", "data"))
    args = parser.parse_args()
    start = time.perf_counter()
    resolved = resolve_model(args.model, Path(args.data_dir))
    verb = "converted" if resolved.converted_now else "found cached"
    print(f"{verb} {resolved.name} at {resolved.path} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()

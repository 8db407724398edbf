"""Write a HF Llama-family checkpoint (e.g. a retrained version) as a GGUF for llama.cpp.

Every version we serve shares the embedded model's tokenizer and architecture (training starts
from it), so the embedded GGUF is the template: its metadata (tokenizer, chat template,
hyper-parameters) is copied as is, and each of its tensors is replaced by the checkpoint's
weight under the same name. Q and K projections are permuted into llama.cpp's rotary layout,
the inverse of what transformers undoes when it reads a GGUF.

    python -m model.gguf_export data/versions/run4-ppo            # -> data/versions/run4-ppo/model-q8_0.gguf
    python -m model.gguf_export data/models/smollm2-135m-instruct --type f32
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

QUANT_TYPES = ("q8_0", "f16", "f32")


class GGUFExportError(RuntimeError):
    """The checkpoint cannot be written as a GGUF; the message says why."""


def gguf_name(qtype: str) -> str:
    return f"model-{qtype}.gguf"


def _permute(w, n_head: int):
    """HF q/k rows -> llama.cpp's interleaved rotary order (same as convert_hf_to_gguf.py)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_tensors(hf_dir: Path) -> dict:
    from safetensors.numpy import load_file

    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise GGUFExportError(f"{hf_dir} has no .safetensors weights")
    tensors: dict = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors


def copy_metadata(reader, writer, replace: dict | None = None) -> None:
    """Every key of ``reader`` (a GGUFReader) into ``writer``, except the architecture (the writer
    sets it) and the reader's own GGUF.* keys; ``replace``: {key: (value, GGUFValueType)}."""
    import gguf

    replace = replace or {}
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        if field.name in replace:
            value, vtype = replace[field.name]
            writer.add_key_value(field.name, value, vtype)
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)


def export_gguf(hf_dir: str | Path, out_path: str | Path, template: str | Path | None = None,
                qtype: str = "q8_0", name: str | None = None) -> Path:
    """Write ``hf_dir``'s weights as a GGUF at ``out_path`` (atomically). Returns the path."""
    import gguf
    import numpy as np

    from model.weights import embedded_gguf_path

    if qtype not in QUANT_TYPES:
        raise GGUFExportError(f"unknown GGUF type '{qtype}'; use one of {', '.join(QUANT_TYPES)}")
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    config = json.loads((hf_dir / "config.json").read_text())
    if config.get("model_type") != "llama":
        raise GGUFExportError(f"only Llama-family checkpoints export to GGUF here (got {config.get('model_type')})")
    reader = gguf.GGUFReader(str(template or embedded_gguf_path()))
    n_layers, n_head = config["num_hidden_layers"], config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads", n_head)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    source = {}
    for hf_name, value in _hf_tensors(hf_dir).items():
        mapped = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            continue
        if hf_name.endswith("self_attn.q_proj.weight"):
            value = _permute(value, n_head)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            value = _permute(value, n_kv)
        source[mapped] = value  # the map keeps the .weight/.bias suffix

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(str(tmp), arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    file_type = {"q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "f32": gguf.LlamaFileType.ALL_F32}[qtype]
    replace = {gguf.Keys.General.FILE_TYPE: (int(file_type), gguf.GGUFValueType.UINT32)}
    if name:
        replace[gguf.Keys.General.NAME] = (name, gguf.GGUFValueType.STRING)
    copy_metadata(reader, writer, replace)
    try:
        for t in reader.tensors:
            if t.name not in source:
                raise GGUFExportError(f"{hf_dir} has no weight for {t.name}; is it a different architecture?")
            data = np.ascontiguousarray(source[t.name], dtype=np.float32)
            expected = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost first
            if data.shape != expected:
                raise GGUFExportError(f"{t.name}: checkpoint shape {data.shape} does not match the template's "
                                      f"{expected}; only checkpoints of the embedded model's size export")
            if qtype == "q8_0" and data.ndim == 2 and data.shape[-1] % 32 == 0:
                q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
                writer.add_tensor(t.name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            elif qtype == "f16" and data.ndim == 2:
                writer.add_tensor(t.name, data.astype(np.float16))
            else:  # norms (1-D) stay float32, as llama.cpp's converter keeps them
                writer.add_tensor(t.name, data)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


def ensure_gguf(hf_dir: str | Path, qtype: str = "q8_0") -> Path:
    """The GGUF next to a checkpoint, written on first use (the one-time cost of a new version)."""
    hf_dir = Path(hf_dir)
    out = hf_dir / gguf_name(qtype)
    if not out.is_file() or out.stat().st_mtime < (hf_dir / "config.json").stat().st_mtime:
        export_gguf(hf_dir, out, qtype=qtype, name=hf_dir.name)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hf_dir", help="a directory with config.json and .safetensors weights")
    parser.add_argument("--type", default="q8_0", choices=QUANT_TYPES)
    parser.add_argument("--out", default="", help="output file; default: <hf_dir>/model-<type>.gguf")
    args = parser.parse_args()
    start = time.perf_counter()
    out = Path(args.out) if args.out else Path(args.hf_dir) / gguf_name(args.type)
    export_gguf(args.hf_dir, out, qtype=args.type, name=Path(args.hf_dir).name)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.0f} MB) in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()

"""Perplexity on a fixed held-out text: the quality check next to every speed claim.

    python -m model.perplexity data/models/smollm2-135m-instruct data/models/smollm2-135m-instruct/model-q8_0.gguf

Both scorers use the same token ids (the HF tokenizer), so a converted or quantized GGUF is
compared with the float32 checkpoint on exactly the same predictions.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

HELDOUT = Path(__file__).resolve().parent / "data" / "heldout_hh.jsonl"


def heldout_texts(n: int = 12) -> list[str]:
    """Fixed held-out English text: the first 12 chosen dialogues of the public HH-RLHF sample."""
    texts = [json.loads(line)["text"] for line in HELDOUT.read_text(encoding="utf-8").splitlines() if line.strip()]
    if n > len(texts):
        raise ValueError(f"{HELDOUT} holds {len(texts)} texts, {n} asked for")
    return texts[:n]


def perplexity_hf(model, tok, texts: list[str], max_tokens: int = 512) -> float:
    import torch

    nll, count = 0.0, 0
    with torch.inference_mode():
        for text in texts:
            ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"][:, :max_tokens]
            out = model(input_ids=ids, labels=ids)
            nll += float(out.loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    return math.exp(nll / count)


def perplexity_gguf(gguf: Path, texts: list[str], tok, threads: int = 0, max_tokens: int = 512) -> float:
    """Same token ids as the float32 run, scored by llama.cpp (llama-cpp-python's ``Llama``)."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(str(gguf), n_ctx=1024, n_batch=512, logits_all=True, n_threads=threads or None, verbose=False)
    nll, count = 0.0, 0
    try:
        for text in texts:
            ids = tok(text, add_special_tokens=False)["input_ids"][:max_tokens]
            llm.reset()
            llm.eval(ids)
            logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
            top = logits.max(-1, keepdims=True)
            logz = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
            nll += float((logz - logits[np.arange(len(ids) - 1), ids[1:]]).sum())
            count += len(ids) - 1
    finally:
        llm.close()
    return math.exp(nll / count)


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("hf_dir", help="float32 HF checkpoint (also gives the tokenizer)")
    ap.add_argument("gguf", nargs="*", help="GGUF files to compare with it")
    ap.add_argument("--texts", type=int, default=12, help="how many held-out texts (at most 12)")
    args = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(args.hf_dir)
    texts = heldout_texts(args.texts)
    base = perplexity_hf(AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype="float32"), tok, texts)
    print(f"| weights | perplexity | vs float32 |\n| --- | --- | --- |\n| float32 | {base:.3f} | 1.000 |")
    for path in args.gguf:
        ppl = perplexity_gguf(Path(path), texts, tok)
        print(f"| {Path(path).name} | {ppl:.3f} | {ppl / base:.4f} |")


if __name__ == "__main__":
    main()

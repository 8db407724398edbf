"""llama.cpp's own batched generation, the reference the serving goal is stated against.

This is what llama.cpp's ``batched`` example (and ``llama-batched-bench``) does with N prompts:
one ``llama_decode`` reads all N prompts, then every step decodes one token for each sequence
still running, greedy, until each ends (end of turn or ``max_new_tokens``). No scheduler: the
N requests start together and the batch ends when the longest reply ends. It measures what
llama.cpp's kernels give for N users on given weights, with no serving overhead at all.

    python -m bench.llama_batched --users 1 4 8 16        # the shipped Q4_1 and our Q8_0
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path


class LlamaBatched:
    """One GGUF loaded once; ``run`` generates for a list of prompts in a fresh context."""

    def __init__(self, gguf: Path, threads: int = 2):
        import llama_cpp as ll

        from model.llamacpp import _quiet_logs

        _quiet_logs()
        ll.llama_backend_init()
        self.model = ll.llama_model_load_from_file(str(gguf).encode(), ll.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        self.threads = threads
        self.run(["Hi"], 4)  # warm up: the first pass after loading pages the weights in

    def run(self, prompts: list[str], max_new_tokens: int = 64) -> dict:
        return batched_generate(self.model, prompts, max_new_tokens, self.threads)

    def close(self) -> None:
        import llama_cpp as ll

        ll.llama_model_free(self.model)


def batched_generate(model, prompts: list[str], max_new_tokens: int = 64, threads: int = 2) -> dict:
    """Generate for all ``prompts`` at once; aggregate tokens/s and the time to the first tokens."""
    import llama_cpp as ll

    from model.llamacpp import _chat_template

    vocab = ll.llama_model_get_vocab(model)
    template = _chat_template(model)
    tokens = []
    for p in prompts:
        text = template.render(messages=[{"role": "system", "content": "You are a helpful assistant."},
                                         {"role": "user", "content": p}], add_generation_prompt=True)
        data = text.encode()
        buf = (ll.llama_token * (len(data) + 8))()
        tokens.append(list(buf[: ll.llama_tokenize(vocab, data, len(data), buf, len(buf), False, True)]))
    n_prompt = sum(len(t) for t in tokens)
    cparams = ll.llama_context_default_params()
    cparams.n_ctx = n_prompt + len(prompts) * (max_new_tokens + 1)
    cparams.n_seq_max, cparams.kv_unified = len(prompts), True
    cparams.n_batch = cparams.n_ubatch = max(n_prompt, 512)
    cparams.n_threads = cparams.n_threads_batch = threads
    ctx = ll.llama_init_from_model(model, cparams)
    batch = ll.llama_batch_init(max(n_prompt, len(prompts)), 0, 1)
    n_vocab = ll.llama_vocab_n_tokens(vocab)
    try:
        start = time.perf_counter()
        rows = [(tok, pos, seq, pos == len(t) - 1) for seq, t in enumerate(tokens) for pos, tok in enumerate(t)]
        logit_row = _decode(ll, ctx, batch, rows)
        pos = [len(t) for t in tokens]
        running, generated, first = set(range(len(prompts))), 0, None
        per_seq = [0] * len(prompts)
        while running:
            rows = []
            for seq in sorted(running):
                tok = _argmax(ll.llama_get_logits_ith(ctx, logit_row[seq]), n_vocab)
                if first is None:
                    first = time.perf_counter() - start
                if ll.llama_vocab_is_eog(vocab, tok):
                    running.discard(seq)
                    continue
                generated += 1
                per_seq[seq] += 1
                if per_seq[seq] >= max_new_tokens:
                    running.discard(seq)
                    continue
                rows.append((tok, pos[seq], seq, True))
                pos[seq] += 1
            if rows:
                logit_row = _decode(ll, ctx, batch, rows)
        wall = time.perf_counter() - start
    finally:
        ll.llama_batch_free(batch)
        ll.llama_free(ctx)
    return {"tok_s": generated / wall, "ttft": first, "wall": wall, "tokens": generated}


def _decode(ll, ctx, batch, rows) -> dict:
    """One forward pass over ``rows`` (token, pos, seq, wants_logits); returns seq -> its logits row."""
    batch.n_tokens = len(rows)
    out = {}
    for i, (tok, pos, seq, logits) in enumerate(rows):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos, 1, logits
        batch.seq_id[i][0] = seq
        if logits:
            out[seq] = i
    rc = ll.llama_decode(ctx, batch)
    if rc != 0:
        raise RuntimeError(f"llama_decode failed ({rc})")
    return out


def _argmax(logits, n_vocab: int) -> int:
    import numpy as np

    return int(np.ctypeslib.as_array(logits, shape=(n_vocab,)).argmax())


def main() -> None:
    from bench.serving import PROMPTS
    from model.gguf_export import ensure_gguf
    from model.loader import embedded_gguf_path, resolve_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--users", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    weights = {"Q4_1 (shipped)": embedded_gguf_path(),
               "Q8_0 (ours)": ensure_gguf(resolve_model("embedded", Path(args.data_dir)).path, "q8_0")}
    runners = {name: LlamaBatched(path, args.threads) for name, path in weights.items()}
    print("| users | weights | tokens/s (all users) | time to first tokens s |\n| --- | --- | --- | --- |")
    for users in args.users:
        prompts = [f"Request {i}. {PROMPTS[i % len(PROMPTS)]}" for i in range(users)]
        for name, runner in runners.items():
            r = runner.run(prompts, args.max_new_tokens)
            print(f"| {users} | {name} | {r['tok_s']:.1f} | {r['ttft']:.2f} |", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()

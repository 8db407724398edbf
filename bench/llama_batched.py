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
import time
from pathlib import Path


class LlamaBatched:
    """One GGUF and one context (cleared between batches), like the ``batched`` example."""

    def __init__(self, gguf: Path, threads: int = 2, max_users: int = 16, context_tokens: int = 512,
                 step_tokens: int = 512):
        import llama_cpp as ll

        from model.llama_native import chat_template, quiet_logs

        quiet_logs()
        ll.llama_backend_init()
        self.model = ll.llama_model_load_from_file(str(gguf).encode(), ll.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        cparams = ll.llama_context_default_params()
        cparams.n_ctx = max_users * context_tokens
        cparams.n_seq_max, cparams.kv_unified = max_users, True
        cparams.n_batch = cparams.n_ubatch = step_tokens
        cparams.n_threads = cparams.n_threads_batch = threads
        self.ctx = ll.llama_init_from_model(self.model, cparams)
        self.batch = ll.llama_batch_init(step_tokens, 0, 1)
        self.step_tokens = step_tokens
        self.vocab = ll.llama_model_get_vocab(self.model)
        self.template = chat_template(self.model)
        self.run(["Hi"], 4)  # warm up: the first pass after loading pages the weights in

    def tokenize(self, prompt: str) -> list[int]:
        from model.engine import DEFAULT_SYSTEM_PROMPT
        from model.llama_native import tokenize

        return tokenize(self.vocab, self.template.render(
            messages=[{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": prompt}],
            add_generation_prompt=True))

    def run(self, prompts: list[str], max_new_tokens: int = 64) -> dict:
        """Generate for all ``prompts`` at once; aggregate tokens/s and the time to the first tokens."""
        import llama_cpp as ll
        import numpy as np

        from model.llama_native import piece

        tokens = [self.tokenize(p) for p in prompts]
        n_vocab = ll.llama_vocab_n_tokens(self.vocab)
        ll.llama_memory_clear(ll.llama_get_memory(self.ctx), True)
        start = time.perf_counter()
        # Prompts in chunks of one batch. Only the last decode call's logits survive, so every
        # prompt's last token goes in a final call of its own (<= max_users rows).
        rows = [(tok, pos, seq, False) for seq, t in enumerate(tokens) for pos, tok in enumerate(t[:-1])]
        for i in range(0, len(rows), self.step_tokens):
            _decode(ll, self.ctx, self.batch, rows[i:i + self.step_tokens])
        logit_row = _decode(ll, self.ctx, self.batch, [(t[-1], len(t) - 1, seq, True) for seq, t in enumerate(tokens)])
        pos = [len(t) for t in tokens]
        new, pieces = [0] * len(prompts), [[] for _ in prompts]
        running, first = set(range(len(prompts))), None
        while running:
            rows = []
            for seq in sorted(running):
                logits = ll.llama_get_logits_ith(self.ctx, logit_row[seq])
                tok = int(np.ctypeslib.as_array(logits, shape=(n_vocab,)).argmax())  # greedy
                first = first or time.perf_counter() - start
                if ll.llama_vocab_is_eog(self.vocab, tok):
                    running.discard(seq)
                    continue
                new[seq] += 1
                pieces[seq].append(tok)
                if new[seq] >= max_new_tokens:
                    running.discard(seq)
                    continue
                rows.append((tok, pos[seq], seq, True))
                pos[seq] += 1
            if rows:
                logit_row = _decode(ll, self.ctx, self.batch, rows)
        wall = time.perf_counter() - start
        texts = [b"".join(piece(self.vocab, t) for t in p).decode(errors="replace") for p in pieces]
        return {"tok_s": sum(new) / wall, "ttft": first, "wall": wall, "tokens": sum(new), "texts": texts}

    def close(self) -> None:
        import llama_cpp as ll

        ll.llama_batch_free(self.batch)
        ll.llama_free(self.ctx)
        ll.llama_model_free(self.model)


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


def main() -> None:
    from bench.serving import request_prompt
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
        prompts = [request_prompt(i) for i in range(users)]
        for name, runner in runners.items():
            r = runner.run(prompts, args.max_new_tokens)
            print(f"| {users} | {name} | {r['tok_s']:.1f} | {r['ttft']:.2f} |", flush=True)


if __name__ == "__main__":
    main()

"""llama.cpp backend with continuous batching: the fast path for GGUF weights on CPU.

llama-cpp-python's high-level ``Llama`` serves one request at a time. This engine drives the
C API directly (``llama_decode`` on a multi-sequence ``llama_batch``) with a scheduler thread:

* every step decodes one token for each running reply and, in the same forward pass, feeds
  prompt tokens of newly admitted requests (chunked prefill, ``step_tokens`` per step), so a
  new user gets a first token after one step, not after the current batch ends;
* each request owns a KV-cache sequence (dropped when it finishes) and a native sampler chain
  (repetition penalty, top-k, top-p, temperature, seeded) so users never share randomness;
* the queue is bounded; a request that waits longer than ``busy_wait_s`` gets EngineBusyError;
* prefix cache: a finished reply's KV cache is kept (up to ``prefix_cache`` of them, least
  recently used dropped first, all dropped when memory runs short). The next turn of that
  conversation, or any prompt sharing its start (the system prompt), shares those cells
  instead of recomputing them: a long conversation's next first token does not re-read it;
* an engine built with ``yields_to`` (the serving engine's ``first_tokens_pending``) pauses
  before each step while that engine has a user waiting for a first token (at most
  ``max_yield_s`` a step): a version on A/B trial shares the cores without slowing everyone
  else's first token (bench/ab_serving.py). ``nice`` lowers the CPU priority of its scheduler
  thread (and the compute threads it starts), so between first tokens the serving engine's
  steps still win the cores whenever both are runnable.

Try it:

    python -m model.llamacpp "What is the capital of France?"
"""

from __future__ import annotations

import codecs
import os
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from model.chat_prompt import with_system
from model.engine import (DEFAULT_SYSTEM_PROMPT, DONE, ContextTooLongError, Engine, EngineBusyError, Generation,
                          GenerationStats, QueuedRequest, SamplingParams)
from model.llama_native import (chat_template, control_tokens, lib, piece, prompt_tokens, quiet_logs, tokenize,
                                uses_openmp, warn_if_openmp)

__all__ = ["LlamaCppEngine", "tokenize", "uses_openmp"]  # re-exported: tests and benches import them here


@dataclass
class _Request(QueuedRequest):
    seq: int = -1  # its KV-cache sequence once admitted
    pending: list[int] = field(default_factory=list)  # prompt tokens not yet fed to the model
    pos: int = 0
    fed: list[int] = field(default_factory=list)  # tokens whose KV this request's sequence holds
    last: int = -1  # the token sampled last step, fed next step
    max_new: int = 0
    sampler: object = None
    decoder: object = None
    awaiting_first: bool = True  # counted in the engine's first_tokens_pending until it has one


class LlamaCppEngine:
    """Serves one GGUF file. Thread-safe: all llama.cpp calls happen on the scheduler thread."""

    backend = "llama.cpp"

    def __init__(self, gguf_path: str | Path, version: str = "unversioned", max_batch: int = 16,
                 max_queue: int = 64, busy_wait_s: float = 30.0, threads: int = 0, context_tokens: int = 2048,
                 step_tokens: int = 512, kv_unified: bool = True, flash_attn: int = -1, prefix_cache: int = -1,
                 system_prompt: str = DEFAULT_SYSTEM_PROMPT, yields_to=None, max_yield_s: float = 1.0,
                 nice: int = 0):
        ll = lib()
        self.path = Path(gguf_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file {self.path} does not exist")
        self.version = version
        self.default_system_prompt = system_prompt
        self.max_batch = max_batch
        self.busy_wait_s = busy_wait_s
        self.context_tokens = context_tokens
        self.step_tokens = step_tokens
        # Sharing cells between sequences needs the unified KV pool; -1 = one cached prefix per slot.
        self.prefix_cache = 0 if not kv_unified else max_batch if prefix_cache < 0 else prefix_cache
        quiet_logs()
        ll.llama_backend_init()
        warn_if_openmp()
        mparams = ll.llama_model_default_params()
        self._model = ll.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not self._model:
            raise RuntimeError(f"llama.cpp could not load {self.path} (not a GGUF model, or a damaged file)")
        cparams = ll.llama_context_default_params()
        # One KV pool shared by all sequences (measured faster here than per-sequence streams at 16
        # users); sized so that every running request can reach context_tokens.
        cparams.n_ctx = context_tokens * max_batch
        cparams.n_seq_max = max_batch + self.prefix_cache
        cparams.kv_unified = kv_unified
        cparams.flash_attn_type = flash_attn  # -1 auto, 0 off, 1 on
        cparams.n_batch = cparams.n_ubatch = step_tokens
        cparams.n_threads = cparams.n_threads_batch = threads or os.cpu_count() or 1
        self._ctx = ll.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            ll.llama_model_free(self._model)
            raise RuntimeError(f"llama.cpp could not create a context for {self.path} (out of memory?)")
        self._vocab = ll.llama_model_get_vocab(self._model)
        self._mem = ll.llama_get_memory(self._ctx)
        self._batch = ll.llama_batch_init(step_tokens, 0, 1)
        self._template = chat_template(self._model)
        self._controls = control_tokens(self._vocab)
        self._queue: queue.Queue[_Request] = queue.Queue(maxsize=max_queue)
        self._free = list(range(max_batch + self.prefix_cache))
        self._cached: OrderedDict[int, list[int]] = OrderedDict()  # finished seq id -> tokens in its KV
        self._active: list[_Request] = []
        self._yields_to, self.max_yield_s, self.nice = yields_to, max_yield_s, nice
        self.scheduler_tid: int | None = None  # the scheduler thread's OS id, once it runs
        self._awaiting_lock = threading.Lock()
        self._awaiting = 0  # requests submitted that have no first token yet
        # Where scheduler time goes (read by bench/serving.py): forward passes, rows decoded,
        # prompt tokens fed, seconds inside llama_decode and inside sampling/detokenizing.
        self.counters = {"steps": 0, "decode_rows": 0, "prefill_tokens": 0, "reused_tokens": 0, "decode_s": 0.0,
                         "sample_s": 0.0, "yield_s": 0.0}
        self._closed = threading.Event()
        self._retiring = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="llama-batcher", daemon=True)
        self._thread.start()

    # public interface (same as model.engine.Engine) -------------------------------------------
    def stream(self, messages: list[dict], params: SamplingParams | None = None,
               cancel: threading.Event | None = None) -> Generation:
        params = (params or SamplingParams()).validate()
        if self._retiring.is_set():
            raise EngineBusyError("The model is being switched to a new version; please try again in a moment.")
        req = _Request(messages, params, cancel or threading.Event(), GenerationStats())
        with self._awaiting_lock:
            self._awaiting += 1
        try:
            req.submit(self._queue)
        except BaseException:
            self._first_token_done(req)
            raise
        return Generation(req.drain(self.busy_wait_s, lambda r: r.seq >= 0), req.stats, req.cancel)

    generate = Engine.generate  # stream, then return the text and stats

    def build_prompt(self, messages: list[dict]) -> str:
        """The rendered prompt, for reading: the model is fed ``prompt_ids``, not this text."""
        return self._render(with_system(messages, self.default_system_prompt))

    def _render(self, messages: list[dict]) -> str:
        return self._template.render(messages=messages, add_generation_prompt=True, bos_token="", eos_token="")

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The prompt's token ids: the template's markers are control tokens, and the same text
        inside a message (``<|im_end|>`` typed by a user) is tokenized as plain text."""
        return prompt_tokens(self._vocab, self._controls, self._render,
                             with_system(messages, self.default_system_prompt))

    def tokenize(self, text: str) -> list[int]:
        return tokenize(self._vocab, text)

    def first_tokens_pending(self) -> int:
        """Requests submitted that have not had their first token (queued, or in prefill)."""
        return self._awaiting

    def _first_token_done(self, r: _Request) -> None:
        if r.awaiting_first:
            r.awaiting_first = False
            with self._awaiting_lock:
                self._awaiting -= 1

    def _yield(self) -> None:
        """Wait while the engine we yield to has users waiting for a first token (capped)."""
        if self._yields_to is None:
            return
        start = time.perf_counter()
        while self._yields_to() > 0 and not self._closed.is_set() and time.perf_counter() - start < self.max_yield_s:
            time.sleep(0.002)
        self.counters["yield_s"] += time.perf_counter() - start

    def unbatched(self):
        return self  # background work goes through the same scheduler; it is cheap to share

    def retire(self) -> None:
        """Take no new requests; free the model once the replies in flight have finished."""
        self._retiring.set()
        self._wake()

    def close(self) -> None:
        """Stop the scheduler now and free llama.cpp memory (idempotent)."""
        self._retiring.set()
        self._closed.set()
        self._wake()
        self._thread.join(timeout=60)

    def _wake(self) -> None:
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass  # a full queue means the scheduler is awake anyway

    # the scheduler --------------------------------------------------------------------------
    def _lower_priority(self) -> None:
        """Raise this thread's nice value by ``nice`` (Linux: per thread; threads it starts inherit
        it). Lowering priority needs no privilege; where it is unsupported the engine runs as is."""
        self.scheduler_tid = threading.get_native_id()
        if self.nice > 0:
            try:
                os.setpriority(os.PRIO_PROCESS, self.scheduler_tid,
                               min(19, os.getpriority(os.PRIO_PROCESS, self.scheduler_tid) + self.nice))
            except (AttributeError, OSError):
                pass

    def _loop(self) -> None:
        ll = lib()
        self._lower_priority()
        try:
            while not self._closed.is_set():
                if self._retiring.is_set() and not self._active and self._queue.empty():
                    break
                self._admit(block=not self._active)
                if not self._active:
                    continue
                self._yield()
                try:
                    self._step()
                except BaseException as exc:  # hand the error to everyone running, start clean
                    for r in list(self._active):
                        self._release(r, error=exc)
                    self._drop_cached(len(self._cached))
        finally:
            for r in list(self._active):
                self._release(r, error=RuntimeError("the model was unloaded; please try again"))
            ll.llama_batch_free(self._batch)
            ll.llama_free(self._ctx)
            ll.llama_model_free(self._model)

    def _admit(self, block: bool) -> None:
        while len(self._active) < self.max_batch:
            try:
                req = self._queue.get(timeout=0.5) if block else self._queue.get_nowait()
            except queue.Empty:
                return
            if req is None:  # close() wakes us up
                return
            block = False
            if req.cancel.is_set():
                self._first_token_done(req)
                req.out.put(DONE)
                continue
            try:
                prompt = self.prompt_ids(req.messages)
                limit = self.context_tokens - 1
                if len(prompt) >= limit:
                    raise ContextTooLongError(
                        f"The conversation is too long for the model ({len(prompt)} tokens, limit {limit}). "
                        "Start a new conversation or shorten the message.")
            except Exception as exc:
                self._first_token_done(req)
                req.out.put(exc)
                continue
            req.stats.prompt_tokens = len(prompt)
            req.pending = prompt
            req.max_new = min(req.params.max_new_tokens, limit - len(prompt))
            req.sampler = self._make_sampler(req.params, prompt)
            req.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            if not self._free:
                self._drop_cached(1)
            req.seq = self._free.pop(0)
            self._reuse_prefix(req)
            self._active.append(req)

    # prefix cache ---------------------------------------------------------------------------
    def _reuse_prefix(self, req: _Request) -> None:
        """Share the KV cells of the cached sequence with the longest common start."""
        prompt, best, best_len = req.pending, None, 0
        for seq, tokens in self._cached.items():
            n = len(os.path.commonprefix([tokens, prompt]))  # works on any sequences, token lists too
            if n > best_len:
                best, best_len = seq, n
        best_len = min(best_len, len(prompt) - 1)  # feed at least one token: it gives the logits
        if best is None or best_len < 8:
            return
        ll = lib()
        ll.llama_memory_seq_cp(self._mem, best, req.seq, 0, best_len)
        self._cached.move_to_end(best)
        req.fed, req.pending, req.pos = prompt[:best_len], prompt[best_len:], best_len
        self.counters["reused_tokens"] += best_len

    def _drop_cached(self, n: int) -> int:
        """Forget the ``n`` least recently used cached prefixes; returns how many were dropped."""
        ll = lib()
        dropped = 0
        while self._cached and dropped < n:
            seq, _ = self._cached.popitem(last=False)
            ll.llama_memory_seq_rm(self._mem, seq, -1, -1)
            self._free.append(seq)
            dropped += 1
        return dropped

    def _make_sampler(self, p: SamplingParams, prompt: list[int]):
        ll = lib()
        chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        if p.repetition_penalty != 1.0:
            n_vocab = ll.llama_vocab_n_tokens(self._vocab)
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_penalties(
                n_vocab, self.context_tokens, p.repetition_penalty, 0.0, 0.0))
        if p.temperature <= 0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_greedy())
        else:
            if p.top_k:
                ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_k(p.top_k))
            if p.top_p < 1.0:
                ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_p(p.top_p, 1))
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_temp(p.temperature))
            seed = p.seed if p.seed is not None else time.time_ns() % 2**31
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_dist(seed))
        for tok in prompt:  # like transformers, the penalty covers the prompt too
            ll.llama_sampler_accept(chain, tok)
        return chain

    def _step(self) -> None:
        ll = lib()
        b = self._batch
        n = 0
        wants_logits: list[tuple[_Request, int]] = []

        def add(tok: int, r: _Request, logits: bool):
            nonlocal n
            b.token[n], b.pos[n], b.n_seq_id[n] = tok, r.pos, 1
            b.seq_id[n][0] = r.seq
            b.logits[n] = logits
            r.fed.append(tok)
            if logits:
                wants_logits.append((r, n))
            r.pos += 1
            n += 1

        for r in list(self._active):
            if r.cancel.is_set():
                r.stats.finish_reason = "cancelled"
                self._release(r)
        for r in self._active:
            if not r.pending:
                add(r.last, r, True)
        decoding = n
        for r in self._active:  # prefill in admission order with what is left of the step
            if r.pending and n < self.step_tokens:
                take = r.pending[: self.step_tokens - n]
                r.pending = r.pending[len(take):]
                for i, tok in enumerate(take):
                    add(tok, r, not r.pending and i == len(take) - 1)
        if n == 0:
            return
        b.n_tokens = n
        c = self.counters
        c["steps"] += 1
        c["decode_rows"] += decoding
        c["prefill_tokens"] += n - decoding
        t0 = time.perf_counter()
        rc = ll.llama_decode(self._ctx, b)
        while rc == 1 and self._drop_cached(max(1, len(self._cached) // 2)):  # 1: no room in the KV cache
            rc = ll.llama_decode(self._ctx, b)
        t1 = time.perf_counter()
        c["decode_s"] += t1 - t0
        if rc != 0:
            raise RuntimeError(f"llama.cpp decode failed (code {rc}): the KV cache is full" if rc == 1
                               else f"llama.cpp decode failed (code {rc})")
        for r, idx in wants_logits:
            tok = ll.llama_sampler_sample(r.sampler, self._ctx, idx)
            r.last = tok
            self._emit(r, tok)
        c["sample_s"] += time.perf_counter() - t1

    def _emit(self, r: _Request, tok: int) -> None:
        self._first_token_done(r)
        st = r.stats
        if lib().llama_vocab_is_eog(self._vocab, tok):
            reason = r.end_reason("stop")
        else:
            st.completion_tokens += 1
            reason = r.offer(r.text + r.decoder.decode(piece(self._vocab, tok)), st.completion_tokens >= r.max_new)
        if reason is not None:
            st.finish_reason = reason
            self._release(r)

    def _release(self, r: _Request, error: BaseException | None = None) -> None:
        ll = lib()
        self._first_token_done(r)
        if r in self._active:
            self._active.remove(r)
            ll.llama_sampler_free(r.sampler)
            if self.prefix_cache and error is None and r.fed:
                for seq, tokens in list(self._cached.items()):  # a cached start this one extends is redundant
                    if len(tokens) <= len(r.fed) and r.fed[:len(tokens)] == tokens:
                        del self._cached[seq]
                        ll.llama_memory_seq_rm(self._mem, seq, -1, -1)
                        self._free.append(seq)
                self._cached[r.seq] = r.fed  # keep its KV: the next turn starts with these tokens
                if len(self._cached) > self.prefix_cache:
                    self._drop_cached(1)
            else:
                ll.llama_memory_seq_rm(self._mem, r.seq, -1, -1)
                self._free.append(r.seq)
        r.stats.latency_ms = (time.perf_counter() - r.submitted) * 1000
        if error is not None:
            r.out.put(error)
        r.out.put(DONE)


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Generate one reply with the llama.cpp engine.")
    parser.add_argument("prompt")
    parser.add_argument("--gguf", default="", help="a GGUF file; default: the embedded model's GGUF")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    args = parser.parse_args()
    from model.engine import print_reply
    from model.weights import embedded_gguf_path

    engine = LlamaCppEngine(args.gguf or embedded_gguf_path(), "cli", max_batch=1)
    print_reply(engine, args.prompt, SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens))
    engine.close()


if __name__ == "__main__":
    main()

"""Generation engine: chat messages in, streamed text out. No web, no database.

One ``Engine`` wraps one loaded model. ``stream()`` returns a ``Generation`` that yields
text deltas as they are decoded and, once exhausted, carries token counts and timings.
Stop (the user's button) and stop strings end generation early.

Try it:

    python -m model.engine "What is the capital of France?"
"""

from __future__ import annotations

import argparse
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Iterator

from model.chat_prompt import hf_prompt_ids, with_system

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."


class EngineBusyError(RuntimeError):
    """Every generation slot is taken and none freed up within the wait limit."""


class ContextTooLongError(ValueError):
    """The prompt does not fit the model's context window; the message says what to do."""


@dataclass
class SamplingParams:
    temperature: float = 0.3  # SmolLM2 rambles at higher temperatures
    top_p: float = 0.9
    top_k: int = 50
    max_new_tokens: int = 256
    repetition_penalty: float = 1.1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def validate(self) -> "SamplingParams":
        if not 0 <= self.temperature <= 5:
            raise ValueError("temperature must be between 0 and 5")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 1 <= self.max_new_tokens <= 8192:
            raise ValueError("max_new_tokens must be between 1 and 8192")
        if not 0.5 <= self.repetition_penalty <= 3:
            raise ValueError("repetition_penalty must be between 0.5 and 3")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_ms: float | None = None
    latency_ms: float = 0.0
    finish_reason: str = "length"  # stop | length | cancelled
    served_by: str = ""  # the remote engine's replica URL (model/remote.py); empty in process


class _CancelCriteria:
    """A transformers StoppingCriteria that ends generation when an Event is set."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class Generation:
    """Iterate for text deltas; afterwards ``text`` and ``stats`` are final."""

    def __init__(self, deltas: Iterator[str], stats: GenerationStats, cancel: threading.Event):
        self._deltas = deltas
        self.stats = stats
        self.text = ""
        self._cancel = cancel

    def __iter__(self) -> Iterator[str]:
        for delta in self._deltas:
            self.text += delta
            yield delta

    def cancel(self) -> None:
        self._cancel.set()

    def close(self) -> None:
        """Stop now and free the engine's slot (the reader went away): cancel at the next step,
        and close the decoder instead of waiting for garbage collection to do it."""
        self._cancel.set()
        close = getattr(self._deltas, "close", None)
        if close is not None:
            close()


# Requests handed to a scheduler thread (model.batching, model.llamacpp) ---------------------
DONE = object()  # the scheduler puts this on a request's queue when the reply has ended
BUSY_MESSAGE = "The model is busy with other users; please try again in a moment."


@dataclass
class QueuedRequest:
    """One reply asked of a scheduler thread; the scheduler puts text deltas, an exception or
    DONE on ``out``, and the caller's generator (``drain``) reads them."""

    messages: list[dict]
    params: SamplingParams
    cancel: threading.Event
    stats: GenerationStats
    out: queue.Queue = field(default_factory=queue.Queue)
    submitted: float = field(default_factory=time.perf_counter)
    text: str = ""

    def submit(self, to: queue.Queue) -> None:
        try:
            to.put_nowait(self)
        except queue.Full:
            raise EngineBusyError(BUSY_MESSAGE) from None

    def drain(self, busy_wait_s: float, started) -> Iterator[str]:
        """Yield the reply's deltas. Until ``started(self)`` the request may wait ``busy_wait_s``
        for a slot, then it is cancelled with EngineBusyError; after that, 300 s of silence is."""
        deadline = self.submitted + busy_wait_s
        while True:
            waiting = not started(self)
            if waiting and self.cancel.is_set():  # stopped, or its reader left, before it got a slot
                return
            try:
                # While waiting, wake every 0.1 s to notice a cancel (it ends the wait as stopped).
                item = self.out.get(timeout=min(0.1, max(0.01, deadline - time.perf_counter())) if waiting else 300)
            except queue.Empty:
                if waiting and (started(self) or time.perf_counter() < deadline):
                    continue
                self.cancel.set()
                raise EngineBusyError(BUSY_MESSAGE) from None
            if item is DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    # Called by the scheduler thread for each sampled token (both schedulers share these rules).
    def offer(self, text: str | None, at_limit: bool) -> str | None:
        """The reply so far decodes to ``text`` (None: a multi-byte character is half done): cut it
        at the first stop string, stream what is new, note the first token's time. Returns the
        finish reason when the reply ends here ("stop", "length", "cancelled"), else None."""
        reason = None
        if text is not None:
            cut = _first_stop(text, self.params.stop)
            if cut is not None:
                text, reason = text[:cut], "stop"
            delta = text[len(self.text):] if text.startswith(self.text) else ""
            if delta:
                if self.stats.ttft_ms is None:
                    self.stats.ttft_ms = (time.perf_counter() - self.submitted) * 1000
                self.text = text
                self.out.put(delta)
        if reason is None and at_limit:
            reason = "length"
        return self.end_reason(reason)

    def end_reason(self, reason: str | None) -> str | None:
        """``reason``, or "cancelled" when the reader stopped the reply (checked every token)."""
        return reason if reason is not None or not self.cancel.is_set() else "cancelled"


class Engine:
    """In-process transformers engine. Thread-safe: each call decodes in its own thread."""

    backend = "transformers"

    def __init__(self, model, tokenizer, version: str = "unversioned", max_concurrent: int = 4,
                 busy_wait_s: float = 30.0, system_prompt: str = DEFAULT_SYSTEM_PROMPT):
        self.model = model
        self.tokenizer = tokenizer
        self.version = version
        self.default_system_prompt = system_prompt
        self.busy_wait_s = busy_wait_s
        self._slots = threading.BoundedSemaphore(max_concurrent)

    @classmethod
    def from_path(cls, path, version: str, device: str = "auto", **kw) -> "Engine":
        from model.weights import load_model

        model, tokenizer = load_model(path, device)
        return cls(model, tokenizer, version=version, **kw)

    @property
    def device(self):
        return next(self.model.parameters()).device

    def build_prompt(self, messages: list[dict]) -> str:
        """The rendered prompt, for reading: the model is fed ``prompt_ids``, not this text."""
        return self.tokenizer.apply_chat_template(with_system(messages, self.default_system_prompt),
                                                  tokenize=False, add_generation_prompt=True)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The prompt's token ids; text inside a message never becomes a control token."""
        return hf_prompt_ids(self.tokenizer, with_system(messages, self.default_system_prompt))

    def _gen_kwargs(self, params: SamplingParams) -> dict:
        kw = dict(max_new_tokens=params.max_new_tokens, repetition_penalty=params.repetition_penalty,
                  pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id)
        if params.temperature > 0:
            kw.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kw

    def stream(self, messages: list[dict], params: SamplingParams | None = None,
               cancel: threading.Event | None = None) -> Generation:
        """Start generating; text arrives through the returned Generation."""
        params = (params or SamplingParams()).validate()
        cancel = cancel or threading.Event()
        stats = GenerationStats()
        return Generation(self._decode(messages, params, cancel, stats), stats, cancel)

    def _decode(self, messages, params, cancel, stats) -> Iterator[str]:
        import torch
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        if not self._slots.acquire(timeout=self.busy_wait_s):
            raise EngineBusyError("The model is busy with other users; please try again in a moment.")
        start = time.perf_counter()
        thread = None
        try:
            ids = torch.tensor([self.prompt_ids(messages)], device=self.device)
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            stats.prompt_tokens = int(inputs["input_ids"].shape[1])
            streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=300)
            output: dict = {}

            def run():
                if params.seed is not None:
                    torch.manual_seed(params.seed)
                try:
                    with torch.inference_mode():
                        output["ids"] = self.model.generate(
                            **inputs, streamer=streamer, **self._gen_kwargs(params),
                            stopping_criteria=StoppingCriteriaList([_CancelCriteria(cancel)]))
                except BaseException as exc:  # surface the error in the consumer thread
                    output["error"] = exc
                    streamer.on_finalized_text("", stream_end=True)

            thread = threading.Thread(target=run, daemon=True, name="generate")
            thread.start()
            text = ""
            for piece in streamer:
                if not piece:
                    continue
                if stats.ttft_ms is None:
                    stats.ttft_ms = (time.perf_counter() - start) * 1000
                new_text = text + piece
                cut = _first_stop(new_text, params.stop)
                if cut is not None:
                    delta = new_text[len(text):cut] if cut > len(text) else ""
                    if delta:
                        yield delta
                    stats.finish_reason = "stop"
                    cancel.set()
                    break
                text = new_text
                yield piece
            thread.join()
            if "error" in output:
                raise output["error"]
            if "ids" in output:
                gen = output["ids"][0, stats.prompt_tokens:]
                stats.completion_tokens = int(gen.shape[0])
                if stats.finish_reason != "stop":
                    if cancel.is_set():
                        stats.finish_reason = "cancelled"
                    elif stats.completion_tokens < params.max_new_tokens:
                        stats.finish_reason = "stop"
        finally:
            if thread is not None and thread.is_alive():
                cancel.set()  # consumer went away: let the decoder thread finish quickly
                thread.join(timeout=30)
            stats.latency_ms = (time.perf_counter() - start) * 1000
            self._slots.release()

    def generate(self, messages: list[dict], params: SamplingParams | None = None) -> tuple[str, GenerationStats]:
        gen = self.stream(messages, params)
        for _ in gen:
            pass
        return gen.text, gen.stats


def _first_stop(text: str, stops: list[str]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def main() -> None:
    from pathlib import Path

    from model.weights import resolve_model

    parser = argparse.ArgumentParser(description="Generate one reply from the command line.")
    parser.add_argument("prompt")
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    args = parser.parse_args()
    resolved = resolve_model(args.model, Path(args.data_dir))
    engine = Engine.from_path(resolved.path, resolved.name)
    print_reply(engine, args.prompt, SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens))


def print_reply(engine, prompt: str, params: SamplingParams) -> None:
    """Stream one reply to the terminal, then its token count and speed (the CLIs' output)."""
    gen = engine.stream([{"role": "user", "content": prompt}], params)
    for delta in gen:
        print(delta, end="", flush=True)
    s = gen.stats
    print(f"\n[{s.completion_tokens} tokens, ttft {s.ttft_ms:.0f} ms, "
          f"{s.completion_tokens / (s.latency_ms / 1000):.1f} tok/s, {s.finish_reason}]")


if __name__ == "__main__":
    main()

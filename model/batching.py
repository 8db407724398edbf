"""Batched serving: concurrent requests share forward passes.

A scheduler thread gathers the requests waiting (up to ``max_batch``), prefills them together
(left padding), then decodes one token for every row per forward pass. Finished rows leave the
batch (their KV cache rows are dropped) and waiting requests join at the next batch. Each row
keeps its own sampling parameters and seed. The queue is bounded: when it is full, or a request
waits longer than ``busy_wait_s`` to start, the caller gets EngineBusyError ("try again").
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

from model.engine import DONE, Engine, Generation, GenerationStats, QueuedRequest, SamplingParams


@dataclass
class _Request(QueuedRequest):
    ids: list[int] = field(default_factory=list)
    generator: object = None


class BatchedEngine(Engine):
    backend = "transformers-batched"

    def __init__(self, model, tokenizer, version: str = "unversioned", max_batch: int = 16, max_queue: int = 64,
                 busy_wait_s: float = 30.0, **kw):
        kw.pop("max_concurrent", None)
        super().__init__(model, tokenizer, version=version, max_concurrent=max_batch, busy_wait_s=busy_wait_s, **kw)
        self.max_batch = max_batch
        self._queue: queue.Queue[_Request] = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
        self._thread.start()

    def unbatched(self) -> Engine:
        """A plain engine over the same weights, for background work that must not join batches."""
        return Engine(self.model, self.tokenizer, version=self.version, max_concurrent=1)

    def stream(self, messages, params=None, cancel=None) -> Generation:
        params = (params or SamplingParams()).validate()
        req = _Request(messages, params, cancel or threading.Event(), GenerationStats())
        req.submit(self._queue)
        # started = its first token is out (a batch is prefilled as a whole)
        return Generation(req.drain(self.busy_wait_s, lambda r: r.stats.ttft_ms is not None), req.stats, req.cancel)

    # the scheduler ------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            batch = [r for r in batch if not r.cancel.is_set() or r.out.put(DONE)]
            if not batch:
                continue
            try:
                self._run_batch(batch)
            except BaseException as exc:  # hand the error to every waiting caller
                for r in batch:
                    r.out.put(exc)
                    r.out.put(DONE)

    def _run_batch(self, batch: list[_Request]) -> None:
        import torch

        tok, model = self.tokenizer, self.model
        prompts = [{"input_ids": self.prompt_ids(r.messages)} for r in batch]
        enc = tok.pad(prompts, padding=True, padding_side="left", return_tensors="pt").to(self.device)
        for r, mask in zip(batch, enc["attention_mask"]):
            r.stats.prompt_tokens = int(mask.sum())
            r.generator = torch.Generator().manual_seed(r.params.seed if r.params.seed is not None
                                                        else int(time.time_ns() % 2**31))
        attn = enc["attention_mask"]
        position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
        active = list(batch)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model(input_ids=enc["input_ids"], attention_mask=attn, position_ids=position_ids, use_cache=True)
            cache = out.past_key_values
            logits = out.logits[:, -1, :].float()
            history = enc["input_ids"]
            while active:
                next_ids = torch.stack([self._sample(r, logits[i], history[i]) for i, r in enumerate(active)])
                keep = []
                for i, r in enumerate(active):
                    if self._emit(r, int(next_ids[i]), start):
                        keep.append(i)
                if not keep:
                    break
                if len(keep) < len(active):
                    idx = torch.tensor(keep)
                    cache.batch_select_indices(idx)
                    attn, position_ids, next_ids, history = attn[idx], position_ids[idx], next_ids[idx], history[idx]
                    active = [active[i] for i in keep]
                attn = torch.cat([attn, attn.new_ones((len(active), 1))], dim=1)
                position_ids = position_ids[:, -1:] + 1
                history = torch.cat([history, next_ids[:, None]], dim=1)
                out = model(input_ids=next_ids[:, None], attention_mask=attn, position_ids=position_ids,
                            past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                logits = out.logits[:, -1, :].float()

    def _sample(self, r: _Request, logits, history):
        import torch

        p = r.params
        if p.repetition_penalty != 1.0:
            seen = torch.unique(history)
            vals = logits[seen]
            logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if p.temperature <= 0:
            return logits.argmax()
        logits = logits / p.temperature
        if p.top_k and p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits[logits < kth] = float("-inf")
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cum = torch.softmax(sorted_logits, -1).cumsum(-1)
            drop = cum - torch.softmax(sorted_logits, -1) > p.top_p
            logits[order[drop]] = float("-inf")
        return torch.multinomial(torch.softmax(logits, -1), 1, generator=r.generator)[0]

    def _emit(self, r: _Request, token: int, start: float) -> bool:
        """Stream the new text of one row; False when the row is finished."""
        st = r.stats
        if token == self.tokenizer.eos_token_id:
            done_reason = r.end_reason("stop")
        else:
            r.ids.append(token)
            st.completion_tokens = len(r.ids)
            text = self.tokenizer.decode(r.ids, skip_special_tokens=True)
            # None while a multi-byte character is half decoded: wait for the rest of it.
            done_reason = r.offer(None if text.endswith("\ufffd") else text, len(r.ids) >= r.params.max_new_tokens)
        if done_reason is None:
            return True
        st.finish_reason = done_reason
        st.latency_ms = (time.perf_counter() - r.submitted) * 1000
        r.out.put(DONE)
        return False

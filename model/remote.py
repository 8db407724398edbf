"""Remote engine: generation on one or more OpenAI-compatible servers (vLLM, TGI, llama.cpp's
server, another instance of this app). No web framework, no database: messages in, text out,
exactly like the in-process engines, so moderation, logging, feedback and limits stay ours.

    CHAT_ENGINE=openai CHAT_REMOTE_URLS=http://10.0.0.5:8000/v1,http://10.0.0.6:8000/v1 make run
    python -m model.remote --url http://127.0.0.1:8001/v1 "What is the capital of France?"

Several URLs: each request goes to the healthy replica with the fewest requests outstanding.
A replica that fails (connection refused or reset, a 5xx, a timeout) is taken out for
``retry_after_s`` and tried again afterwards; a request whose replica failed before its first
token is sent to the next one, so the user never sees that failure. One that fails mid-reply is
replayed on another with the same seed: the text already shown is checked and skipped (it only
fails if the replicas serve different weights). Stop strings,
seeds and sampling settings pass through; closing the Generation (Stop, a closed tab) closes
the HTTP stream, which cancels the reply on servers that watch for it (all of the above do).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Iterator

from model.chat_prompt import with_system
from model.engine import DEFAULT_SYSTEM_PROMPT, Engine, EngineBusyError, SamplingParams

log = logging.getLogger(__name__)



def engine_finish_reason(reason: str) -> str:
    """A server's OpenAI finish reason in the engine's words. Only "length" is a reply cut at its
    token budget; any other ("stop", a replica's "content_filter", "tool_calls") ended it, and
    training reads a cut reply differently from an ended one (feedback/pairs.did_not_end)."""
    return "length" if reason == "length" else "stop"

class RemoteEngineError(RuntimeError):
    """Every replica failed, or one failed after the reply had started."""


class _Diverged(Exception):
    """A replica replaying a reply wrote something other than what was already shown."""


class RemoteRequestRefused(ValueError):
    """A replica answered 4xx: the request itself is wrong, so no other replica is tried."""


@dataclass
class Replica:
    url: str
    outstanding: int = 0
    down_until: float = 0.0
    served: int = 0
    failures: int = 0


class RemoteEngine:
    backend = "openai"

    def __init__(self, base_urls: list[str], version: str = "remote", model: str = "", api_key: str = "",
                 max_concurrent: int = 64, busy_wait_s: float = 30.0, retry_after_s: float = 10.0,
                 connect_timeout_s: float = 5.0, read_timeout_s: float = 300.0,
                 system_prompt: str = DEFAULT_SYSTEM_PROMPT):
        import httpx

        urls = [u.strip().rstrip("/") for u in base_urls if u and u.strip()]
        if not urls:
            raise ValueError("the openai engine needs at least one base URL (CHAT_REMOTE_URLS)")
        bad = [u for u in urls if not u.startswith(("http://", "https://"))]
        if bad:
            raise ValueError(f"remote engine URLs must start with http:// or https://: {', '.join(bad)}")
        self.replicas = [Replica(u) for u in urls]
        self.version, self.model, self.system_prompt = version, model or version, system_prompt
        self.retry_after_s, self.busy_wait_s = retry_after_s, busy_wait_s
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_concurrent)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(headers=headers, timeout=httpx.Timeout(read_timeout_s, connect=connect_timeout_s),
                                  limits=httpx.Limits(max_connections=max_concurrent + len(urls)))

    # -- the engine interface ------------------------------------------------------------
    # the same contract as the in-process engine: validate, then _decode() behind a Generation
    stream = Engine.stream
    generate = Engine.generate  # the same contract: stream(), read to the end, (text, stats)

    def unbatched(self):
        return self  # the servers schedule their own batches

    def retire(self) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    @property
    def counters(self) -> dict:
        with self._lock:
            return {"remote_replicas_up": sum(r.down_until <= time.monotonic() for r in self.replicas),
                    "remote_failovers": sum(r.failures for r in self.replicas)}

    # -- replicas ------------------------------------------------------------------------
    def _pick(self, tried: set[str]) -> Replica | None:
        """The healthy untried replica with the fewest requests outstanding; when every untried
        one is marked down, the one that comes back soonest (a cluster that is all down is tried
        rather than refused)."""
        now = time.monotonic()
        with self._lock:
            left = [r for r in self.replicas if r.url not in tried]
            if not left:
                return None
            up = [r for r in left if r.down_until <= now]
            best = min(up, key=lambda r: r.outstanding) if up else min(left, key=lambda r: r.down_until)
            best.outstanding += 1
            return best

    def _release(self, replica: Replica, failed: bool) -> None:
        with self._lock:
            replica.outstanding -= 1
            if failed:
                replica.failures += 1
                replica.down_until = time.monotonic() + self.retry_after_s
            else:
                replica.served += 1

    def _body(self, messages: list[dict], params: SamplingParams, seed: int) -> dict:
        body = {"model": self.model, "messages": with_system(messages, self.system_prompt), "stream": True,
                "stream_options": {"include_usage": True}, "max_tokens": params.max_new_tokens,
                "temperature": params.temperature, "top_p": params.top_p, "seed": seed,
                # not in OpenAI's schema, understood by vLLM, llama.cpp and TGI's OpenAI routes
                "top_k": params.top_k, "repeat_penalty": params.repetition_penalty,
                "repetition_penalty": params.repetition_penalty}
        if params.stop:
            body["stop"] = list(params.stop)[:4]
        return body

    def _decode(self, messages, params, cancel, stats) -> Iterator[str]:
        """Try replicas until one finishes the reply. Every attempt carries the same seed (drawn
        here when the caller gave none), so a replica taking over mid-reply writes the same text
        on the same weights: what was already shown is checked and skipped, the rest streams on."""
        import httpx

        if not self._slots.acquire(timeout=self.busy_wait_s):
            raise EngineBusyError("The model is busy with other users; please try again in a moment.")
        start, tried, errors, shown = time.perf_counter(), set(), [], ""
        body = self._body(messages, params, params.seed if params.seed is not None else random.randrange(2**31))
        try:
            while not cancel.is_set():
                replica = self._pick(tried)
                if replica is None:
                    raise RemoteEngineError("every model server failed: " + "; ".join(errors))
                tried.add(replica.url)
                written, reply = "", self._one(replica, body, cancel, stats, start)
                try:
                    for delta in reply:
                        written += delta
                        if len(written) <= len(shown):  # replaying what an earlier replica showed
                            if not shown.startswith(written):
                                raise _Diverged()
                            continue
                        if not written.startswith(shown):
                            raise _Diverged()
                        new, shown = written[len(shown):], written
                        yield new
                    if len(written) < len(shown):
                        raise _Diverged()
                except (httpx.HTTPError, RemoteEngineError, json.JSONDecodeError) as exc:
                    self._release(replica, failed=True)
                    log.warning("model server %s failed after %d characters: %s", replica.url, len(written), exc)
                    errors.append(f"{replica.url}: {exc}")
                    continue
                except _Diverged:
                    self._release(replica, failed=False)
                    raise RemoteEngineError(f"{replica.url} took over the reply but wrote a different one (the "
                                            "replicas do not serve the same weights?)") from None
                except BaseException:
                    self._release(replica, failed=False)  # our side went away (GeneratorExit): not its fault
                    raise
                finally:
                    reply.close()  # leaves the HTTP stream's block: the connection closes, the server stops
                self._release(replica, failed=False)
                stats.served_by = replica.url
                log.info("reply served by %s: %d tokens, %s%s", replica.url, stats.completion_tokens,
                         stats.finish_reason, f" (after {len(errors)} failed)" if errors else "")
                return
            stats.finish_reason = "cancelled"
        finally:
            stats.latency_ms = (time.perf_counter() - start) * 1000
            self._slots.release()

    def _one(self, replica: Replica, body: dict, cancel, stats, start) -> Iterator[str]:
        """Stream one reply from one replica (server-sent events of chat.completion.chunk)."""
        stats.completion_tokens = 0
        with self._http.stream("POST", f"{replica.url}/chat/completions", json=body) as resp:
            if resp.status_code >= 500 or resp.status_code in (408, 429):
                raise RemoteEngineError(f"HTTP {resp.status_code}")
            if resp.status_code >= 400:  # our request is wrong: another replica would refuse it too
                resp.read()
                raise RemoteRequestRefused(f"the model server refused the request (HTTP {resp.status_code}): "
                                           f"{resp.text[:300]}")
            finished = False
            for line in resp.iter_lines():
                if cancel.is_set():
                    stats.finish_reason = "cancelled"
                    return  # leaving the block closes the connection: the server stops generating
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if chunk.get("error"):
                    raise RemoteEngineError(str(chunk["error"])[:300])
                usage = chunk.get("usage") or {}
                if usage:
                    stats.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                    stats.completion_tokens = int(usage.get("completion_tokens") or 0)
                for choice in chunk.get("choices") or []:
                    delta = (choice.get("delta") or {}).get("content") or ""
                    if choice.get("finish_reason"):
                        finished = True
                        stats.finish_reason = engine_finish_reason(choice["finish_reason"])
                    if delta:
                        if stats.ttft_ms is None:
                            stats.ttft_ms = (time.perf_counter() - start) * 1000
                        if not usage:
                            stats.completion_tokens += 1  # one chunk per token until the usage chunk says
                        yield delta
            if not finished:  # the server closed the stream without ending the reply (interrupted?)
                raise RemoteEngineError("the stream ended before the reply did")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt")
    parser.add_argument("--url", action="append", required=True, help="base URL ending in /v1 (repeat for replicas)")
    parser.add_argument("--model", default="", help="the model id the server knows")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()
    engine = RemoteEngine(args.url, model=args.model)
    gen = engine.stream([{"role": "user", "content": args.prompt}], SamplingParams(max_new_tokens=args.max_new_tokens))
    for delta in gen:
        print(delta, end="", flush=True)
    print(f"\n[{gen.stats.completion_tokens} tokens from {getattr(gen.stats, 'served_by', '?')}]")


if __name__ == "__main__":
    main()

"""Read a ChatService reply from async code, and stop it the moment its HTTP client goes away.

The reply is a blocking generator. Stepping it with one thread-pool call per update cannot be
interrupted: a client that disconnects is only noticed when the next update arrives, and the
generator is left for garbage collection to close. Instead one thread owns the generator from
start to end and hands updates over a queue; ``abandon()`` tells the service at once (the engine
stops at its next step) and that thread closes the generator, so the turn is marked stopped and
the in-flight count drops without waiting for anyone.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Callable, Iterator

_END = object()


class ReplyPump:
    def __init__(self, updates: Iterator, on_abandon: Callable[[], None]):
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._abandoned = threading.Event()
        self._ended = False
        self._on_abandon = on_abandon
        self._watcher: asyncio.Task | None = None
        threading.Thread(target=self._run, args=(updates,), name="reply", daemon=True).start()

    def _run(self, updates: Iterator) -> None:
        try:
            for up in updates:
                if self._abandoned.is_set():
                    break
                self._put(up)
            self._put(_END)
        except BaseException as exc:  # ChatError or a crash: raised again in the reader
            self._put(exc)
        finally:
            updates.close()  # after abandon(): GeneratorExit in the pipeline, which marks the turn

    def _put(self, item) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server shut down): nobody is reading
            self._abandoned.set()

    def watch(self, request) -> None:
        """Abandon the reply if the HTTP client disconnects before it has ended. Needed as long as
        nothing else is listening: before a stream starts, and for a reply sent in one piece."""
        self._watcher = asyncio.create_task(until_disconnected(request))
        self._watcher.add_done_callback(self._watch_done)

    def _watch_done(self, task: asyncio.Task) -> None:
        # Cancelled = the reply ended first. A receive() that failed means the connection is gone too.
        if not task.cancelled():
            task.exception()  # retrieved, so asyncio does not warn about it
            self.abandon()

    async def next(self):
        """The next update; StopAsyncIteration at the end; the pipeline's exception if it raised."""
        item = await self._queue.get()
        if item is _END or isinstance(item, BaseException):
            self._ended = True
            if self._watcher is not None:
                self._watcher.cancel()
            if item is _END:
                raise StopAsyncIteration
            raise item
        return item

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self.next()

    def abandon(self) -> None:
        """The reader went away: stop the reply. Does nothing once the reply has ended."""
        if not self._ended and not self._abandoned.is_set():
            self._abandoned.set()
            self._on_abandon()


async def until_disconnected(request) -> None:
    """Return when the HTTP client closes the connection (the body must have been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass

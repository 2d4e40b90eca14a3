"""Group commit: calls made while a write is in flight go together in the next write.

A worker finishing several subtasks at once would otherwise send one command
per result and per count; with a :class:`Coalescer` the first call sends at
once and every call that arrives meanwhile waits for the next send, which
carries them all (one ``HSET`` per task, one pipeline of scripts, ...). Each
caller gets its own reply or its own error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

#: Sends a batch; returns one reply (or the error of that item) per item, in order.
Send = Callable[[list[T]], Awaitable[Sequence[R | BaseException]]]


class Coalescer(Generic[T, R]):
    """Runs ``send`` on batches of the items callers hand it, one batch at a time."""

    def __init__(self, send: Send[T, R]) -> None:
        self._send = send
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._sender: asyncio.Task[None] | None = None

    async def __call__(self, item: T) -> R:
        """``send``'s reply for ``item`` (raised when it is an error)."""
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, fut))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._drain())
        # Shielded: a caller cancelled while its batch is out does not cancel the batch.
        return await asyncio.shield(fut)

    async def _drain(self) -> None:
        while self._pending:
            batch, self._pending = self._pending, []
            replies: Sequence[R | BaseException]
            try:
                replies = await self._send([item for item, _ in batch])
            except BaseException as e:  # the whole batch failed (or was cancelled)
                replies = [e] * len(batch)
                if isinstance(e, asyncio.CancelledError):
                    _settle(batch, replies)
                    raise
            _settle(batch, replies)


def _settle(batch: list[tuple[T, asyncio.Future[R]]], replies: Sequence[R | BaseException]) -> None:
    for (_, fut), reply in zip(batch, replies, strict=True):
        if fut.done():
            continue
        if isinstance(reply, BaseException):
            fut.set_exception(reply)
            fut.add_done_callback(lambda f: f.exception())  # retrieved even if nobody waits
        else:
            fut.set_result(reply)

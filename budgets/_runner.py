"""Sending the ledger's scripts to Redis: batching, NOSCRIPT recovery, error mapping.

Python's cost per command, not Redis, usually limits a ledger client. The
runner therefore sends every operation that is waiting at the same moment in
one pipeline (``EVALSHA`` each, no ``MULTI``): while one batch is on the wire
the next one fills up. A lone operation goes out at once, so a sequential
caller pays one round trip and no extra latency.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from redis import exceptions as rex
from redis.asyncio import Redis
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from budgets.errors import LedgerUnavailable
from budgets.scripts import Op, Script, load_scripts

log = logging.getLogger(__name__)

Arg = str | int
_Call = tuple[Script, Sequence[str], Sequence[Arg]]
_Pending = tuple[Script, Sequence[str], Sequence[Arg], "asyncio.Future[list[Any]]"]


def redact_url(url: str) -> str:
    """The URL without user name or password, for messages and logs."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class ScriptRunner:
    """Runs ledger scripts on one Redis client, batching what is in flight together."""

    def __init__(self, redis: Redis, *, url: str, batch: bool = True, attempts: int = 3) -> None:
        self._redis = redis
        self._url = redact_url(url)
        self._batch = batch
        self._attempts = attempts
        self._scripts = load_scripts()
        self._queue: list[_Pending] = []
        self._flusher: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        """The Redis URL, redacted."""
        return self._url

    async def run(self, op: Op, keys: Sequence[str], args: Sequence[Arg]) -> list[Any]:
        """Run one operation's script and return its reply."""
        script = self._scripts[op]
        if not self._batch:
            replies = await self._retrying([(script, keys, args)])
            if isinstance(replies[0], Exception):
                raise replies[0]
            reply: list[Any] = replies[0]
            return reply
        fut: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._queue.append((script, keys, args, fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        return await fut

    async def _flush(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                replies = await self._retrying([(s, k, a) for s, k, a, _ in batch])
            except BaseException as e:  # every waiter must hear of the failure
                for *_, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                if isinstance(e, asyncio.CancelledError):
                    raise
                continue
            for (*_, fut), reply in zip(batch, replies, strict=True):
                if fut.done():
                    continue
                if isinstance(reply, Exception):
                    fut.set_exception(reply)
                else:
                    fut.set_result(reply)

    async def _retrying(self, calls: list[_Call]) -> list[Any]:
        # Every operation is idempotent, so a batch cut off by a dropped
        # connection is safe to send again.
        retrying = AsyncRetrying(
            retry=retry_if_exception_type((rex.ConnectionError, rex.TimeoutError)),
            stop=stop_after_attempt(self._attempts),
            wait=wait_random_exponential(multiplier=0.05, max=0.5),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._send(calls)
        except (rex.ConnectionError, rex.TimeoutError) as e:
            raise LedgerUnavailable(self._url, type(e).__name__) from e
        raise AssertionError("unreachable")  # pragma: no cover

    async def _send(self, calls: list[_Call]) -> list[Any]:
        if len(calls) == 1:
            script, keys, args = calls[0]
            try:
                return [await self._redis.evalsha(script.sha, len(keys), *keys, *args)]
            except rex.NoScriptError:
                await self._load()
                return [await self._redis.evalsha(script.sha, len(keys), *keys, *args)]
        replies = await self._pipeline(calls)
        if any(isinstance(r, rex.NoScriptError) for r in replies):
            await self._load()
            replies = await self._pipeline(calls)
        return replies

    async def _pipeline(self, calls: list[_Call]) -> list[Any]:
        pipe = self._redis.pipeline(transaction=False)
        for script, keys, args in calls:
            pipe.evalsha(script.sha, len(keys), *keys, *args)
        return list(await pipe.execute(raise_on_error=False))

    async def _load(self) -> None:
        log.debug("loading %d ledger scripts into Redis", len(self._scripts))
        for script in self._scripts.values():
            await self._redis.script_load(script.source)

    async def ping(self) -> None:
        """Check that Redis answers; raise :class:`LedgerUnavailable` if not."""
        try:
            await self._redis.ping()
        except (rex.ConnectionError, rex.TimeoutError, OSError) as e:
            raise LedgerUnavailable(self._url, type(e).__name__) from e

"""Sending the ledger's scripts to Redis: batching, NOSCRIPT recovery, error mapping.

Python's cost per command, and Redis's cost per script call, limit a ledger
client long before Redis's cost per operation does. The runner therefore
collects every operation waiting at the same moment and sends, per task, one
``FCALL`` (or ``EVALSHA``) of the task script that runs them all in order (each
atomic, each with its own reply); the calls for several tasks go in one
pipeline. While one batch is on the wire the next fills up. When nothing is
on the wire, the operation that finds it so sends what is pending from its
own task (no flusher task to start): at once, so a sequential caller pays one
round trip; or, when the last batch's replies woke several callers, after
one turn of the event loop, in which the others issue their next operations
and join it (they go as one batch, not as the first alone and the rest behind
it). If that caller is cancelled while its batch is out, the others'
operations go again in the next batch (every operation is idempotent).

On a standalone server the batches travel on a connection of the runner's
own, outside the client's pool (one batch is in flight at a time, so nothing
else reads it): a round trip then costs no pool checkout and return, which
cost a lone operation more than its own Python.

On a Redis Cluster a task's batch is still one call (one command, on its
task's slot), but the calls for several tasks go concurrently, each to its own
master: redis-py refuses scripts in a cluster pipeline. Scripts and the
function library are loaded on every master, and a node that lost them (a
restart, a promoted replica) is reloaded when it says so.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from redis import exceptions as rex
from redis.asyncio.connection import AbstractConnection as Connection
from redis.asyncio.connection import ConnectionPool
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from budgets.connection import Client, clustered, redact_url
from budgets.errors import LedgerUnavailable, forbidden
from budgets.keys import TaskKeys
from budgets.scripts import Op, Script, TenantOp, load_scripts

log = logging.getLogger(__name__)

Arg = str | int

#: Command heads the runner keeps (one per task it has sent to) before it starts afresh.
_HEADS = 4096
#: Separates the fields of one operation in its one script argument (ASCII unit separator).
SEP = "\x1f"


@dataclass(slots=True)
class _Batch:
    """Operations of one task waiting to be sent together."""

    keys: TaskKeys
    args: list[Arg] = field(default_factory=list)
    waiters: list[asyncio.Future[list[Any]]] = field(default_factory=list)


class ScriptRunner:
    """Runs ledger scripts on one Redis client, batching what is in flight together."""

    def __init__(
        self,
        redis: Client,
        *,
        url: str,
        batch: bool = True,
        attempts: int = 3,
        functions: bool = True,
    ) -> None:
        self._redis = redis
        self._cluster = clustered(redis)
        self._url = redact_url(url)
        self._batching = batch
        # The task script as a Redis Function (FCALL) where the server has them; by
        # EVALSHA on a cluster, whose client finds EVALSHA's slot alone but asks a
        # node for FCALL's (one more round trip per call).
        self._functions = functions and not self._cluster
        self._attempts = attempts
        self._scripts = load_scripts()
        self._pending: dict[str, _Batch] = {}
        # True while a batch is on the wire or a flusher is about to send one.
        self._sending = False
        self._flusher: asyncio.Task[None] | None = None
        # True when the last batch's replies woke more than one caller: the next
        # batch waits a turn of the loop for the operations they issue in it.
        self._woke = False
        # The batches' own connection (standalone): one batch is in flight at a
        # time, so it needs no pool, whose checkout and return cost a lone
        # operation more than its round trip's own Python does.
        self._line: Connection | None = None
        # Each task's command head (name, keys, prefixes), built once per task.
        self._heads: dict[TaskKeys, tuple[bool, tuple[Arg, ...]]] = {}
        self._pool: ConnectionPool | None = None if clustered(redis) else redis.connection_pool

    @property
    def url(self) -> str:
        """The Redis URL, redacted."""
        return self._url

    async def task_op(
        self, keys: TaskKeys, op: Op, accounts: Sequence[str], args: Sequence[Arg]
    ) -> list[Any]:
        """Run one operation of the task script and return its reply.

        The operation travels as one argument, its fields joined by :data:`SEP`
        (which no name, number or JSON text holds; free text is checked by the
        ledger): packing one string costs the client far less than one argument
        per field, and the script splits it for about the same as Redis's own
        argument handling.
        """
        encoded: list[Arg] = [_encode(op, accounts, args)]
        if not self._batching:
            replies = await self._retrying([(keys, 1, encoded)])
            return _first(replies[0])
        fut: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        batch = self._pending.get(keys.task_id)
        if batch is None:
            batch = self._pending[keys.task_id] = _Batch(keys)
        batch.args.extend(encoded)
        batch.waiters.append(fut)
        if not self._sending:
            await self._lead(fut)
        return await fut

    async def _lead(self, mine: asyncio.Future[list[Any]]) -> None:
        """Send what is pending from this caller's task.

        Nothing was on the wire when ``mine`` was queued, so nothing else was
        pending either. If the last batch's replies woke several callers, the
        rest of them are about to issue their next operations in this same turn
        of the loop: this one waits the turn out so that they join it. Otherwise
        it goes at once (a lone caller pays no turn of a busy loop). Whatever
        arrives while this batch is out waits for the flusher started at the end.
        """
        self._sending = True
        batches: list[_Batch] = []
        try:
            if self._woke:
                await asyncio.sleep(0)
            batches = self._take()
            await self._send_batches(batches, share_cancel=False)
        except asyncio.CancelledError:
            # Not one reply was handed out: the others' operations go again, first.
            self._requeue(batches or self._take(), without=mine)
            raise
        finally:
            if self._pending:
                self._flusher = asyncio.create_task(self._flush())
            else:
                self._sending = False

    async def task_ops(
        self, keys: TaskKeys, ops: Sequence[tuple[Op, Sequence[str], Sequence[Arg]]]
    ) -> list[Any]:
        """Run several operations of the task script in one call, in the order given.

        Each is atomic and has its own reply, as in a batch; unlike operations sent
        one by one, they run in this order whether batching is on or not.
        """
        encoded: list[Arg] = [_encode(op, accounts, args) for op, accounts, args in ops]
        replies = await self._retrying([(keys, len(encoded), encoded)])
        return _all(replies[0])

    async def tenant_op(self, op: TenantOp, keys: Sequence[str], args: Sequence[Arg]) -> list[Any]:
        """Run a tenant script (rare: once when a task opens and once when it closes)."""
        script = self._scripts.tenant[op]
        reply: list[Any] = await self._call(
            lambda: self._redis.evalsha(script.sha, len(keys), *keys, *args)
        )
        return reply

    async def _flush(self) -> None:
        try:
            await self._drain()
        finally:
            self._sending = False

    async def _drain(self) -> None:
        while self._pending:
            await self._send_batches(self._take(), share_cancel=True)

    def _take(self) -> list[_Batch]:
        batches = list(self._pending.values())
        self._pending = {}
        self._woke = False
        return batches

    def _requeue(self, batches: list[_Batch], *, without: asyncio.Future[list[Any]]) -> None:
        """Put ``batches`` back ahead of what arrived since, less the operation of ``without``."""
        merged: dict[str, _Batch] = {}
        for b in batches:
            if without in b.waiters:
                i = b.waiters.index(without)
                del b.waiters[i], b.args[i]
            if b.waiters:
                merged[b.keys.task_id] = b
        for task_id, later in self._pending.items():
            into = merged.get(task_id)
            if into is None:
                merged[task_id] = later
            else:
                into.args.extend(later.args)
                into.waiters.extend(later.waiters)
        self._pending = merged

    async def _send_batches(self, batches: list[_Batch], *, share_cancel: bool) -> None:
        """Send ``batches`` and hand each waiter its reply or its error.

        ``share_cancel``: whether the waiters hear of this task's cancellation
        too (the flusher's, at shutdown), or are left to be sent again (a
        leading caller's, see :meth:`_lead`).
        """
        calls = [(b.keys, len(b.waiters), b.args) for b in batches]
        try:
            replies = await self._retrying(calls, line=True)
        except BaseException as e:  # every waiter must hear of the failure
            if share_cancel or not isinstance(e, asyncio.CancelledError):
                _fail(batches, e)
            if isinstance(e, Exception):
                return
            raise
        woke = 0
        for b, reply in zip(batches, replies, strict=True):
            for i, fut in enumerate(b.waiters):
                if fut.done():
                    continue
                woke += 1
                if isinstance(reply, Exception):
                    fut.set_exception(reply)
                else:
                    fut.set_result(reply[i])
        self._woke = woke > 1

    async def _retrying(
        self, calls: list[tuple[TaskKeys, int, list[Arg]]], *, line: bool = False
    ) -> list[Any]:
        replies: list[Any] = await self._call(lambda: self._send(calls, line=line))
        return replies

    async def _call(self, send: Any) -> Any:
        try:  # the common case, without building a retry loop
            return await self._once(send)
        except (rex.ConnectionError, rex.TimeoutError):
            pass
        # Every operation is idempotent, so a batch cut off by a dropped
        # connection is safe to send again.
        retrying = AsyncRetrying(
            retry=retry_if_exception_type((rex.ConnectionError, rex.TimeoutError)),
            stop=stop_after_attempt(max(1, self._attempts - 1)),  # the first try was above
            wait=wait_random_exponential(multiplier=0.05, max=0.5),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._once(send)
        except (rex.ConnectionError, rex.TimeoutError) as e:
            raise LedgerUnavailable(self._url, type(e).__name__) from e
        raise AssertionError("unreachable")  # pragma: no cover

    async def _once(self, send: Any) -> Any:
        try:
            return await send()
        except rex.NoPermissionError as e:
            raise forbidden(self._url, e) from e
        except rex.ResponseError as e:
            # A restarted or flushed server: load everything, send again.
            if not isinstance(e, rex.NoScriptError) and not _no_function(e):
                raise
            await self._load()
            return await send()

    async def _send(
        self, calls: list[tuple[TaskKeys, int, list[Arg]]], *, line: bool = False
    ) -> list[Any]:
        if line and self._pool is not None:
            replies = await self._on_line([self._command(*call) for call in calls])
        elif len(calls) == 1:
            return [await self._call_task(*calls[0])]
        elif self._cluster:
            replies = await asyncio.gather(
                *(self._call_task(*call) for call in calls), return_exceptions=True
            )
            for r in replies:
                if isinstance(r, BaseException) and not isinstance(r, rex.ResponseError):
                    raise r  # unreachable, cancelled: the whole send is retried or fails
        else:
            replies = await self._pipelined(calls)
        for r in replies:
            # Scripts to load, or a user the server refuses: the whole send is redone or fails.
            if isinstance(r, rex.NoScriptError | rex.NoPermissionError) or _no_function(r):
                raise r
        return replies

    def _command(self, keys: TaskKeys, count: int, args: list[Arg]) -> tuple[Arg, ...]:
        head = self._heads.get(keys)
        if head is None or head[0] != self._functions:
            named = keys.script_keys()
            if self._functions:
                call: tuple[Arg, ...] = ("FCALL", self._scripts.library.function)
            else:
                call = ("EVALSHA", self._scripts.task.sha)
            if len(self._heads) >= _HEADS:
                self._heads.clear()
            head = self._heads[keys] = (
                self._functions,
                (*call, len(named), *named, *keys.script_argv()),
            )
        return (*head[1], count, *args)

    async def _on_line(self, commands: list[tuple[Arg, ...]]) -> list[Any]:
        """Send ``commands`` on the batches' own connection, one reply (or error) each.

        Only one batch is on the wire at a time (``_sending``), so nothing else
        reads this connection. A dropped connection is retried by the
        connection's own policy, as the client's commands are; one cut off
        mid-reply (a cancelled caller) is closed by redis-py and opened afresh by
        the next send.
        """
        conn = self._line
        if conn is None:
            assert self._pool is not None  # standalone only
            made = self._pool.make_connection()  # type: ignore[no-untyped-call]
            conn = self._line = cast("Connection", made)
        line = conn

        async def round_trip() -> list[Any]:
            await line.send_packed_command(line.pack_commands(commands), check_health=False)
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(await line.read_response())
                except rex.ResponseError as e:  # that command's refusal; the rest still come
                    replies.append(e)
            return replies

        async def dropped(_: Exception) -> None:
            await line.disconnect()

        # The connection's retry policy, as the client applies it to its own commands.
        replies: list[Any] = await line.retry.call_with_retry(round_trip, dropped)
        return replies

    async def aclose(self) -> None:
        """Close the batches' own connection (the client's pool is closed with the client)."""
        if self._line is not None:
            await self._line.disconnect()
            self._line = None

    async def _call_task(self, keys: TaskKeys, count: int, args: list[Arg]) -> Any:
        return await self._redis.execute_command(*self._command(keys, count, args))

    async def _pipelined(self, calls: list[tuple[TaskKeys, int, list[Arg]]]) -> list[Any]:
        pipe = self._redis.pipeline(transaction=False)
        for call in calls:
            pipe.execute_command(*self._command(*call))
        return list(await pipe.execute(raise_on_error=False))

    async def _load(self) -> None:
        log.debug("loading the ledger's scripts into Redis")
        for script in self._scripts.all():
            await self._redis.script_load(script.source)
        if self._functions:
            try:
                await self._redis.function_load(self._scripts.library.source, replace=True)
            except rex.ResponseError as e:
                # Redis before 7.0 has no functions: the task script goes by EVALSHA.
                log.info("Redis functions unavailable (%s); calling the task script by EVALSHA", e)
                self._functions = False

    async def ping(self) -> None:
        """Check that Redis answers; raise :class:`LedgerUnavailable` if not."""
        try:
            await self._redis.ping()
        except (rex.ConnectionError, rex.TimeoutError, OSError) as e:
            raise LedgerUnavailable(self._url, type(e).__name__) from e


def _fail(batches: list[_Batch], error: BaseException) -> None:
    for b in batches:
        for fut in b.waiters:
            if not fut.done():
                fut.set_exception(error)


def _no_function(reply: Any) -> bool:
    """True for FCALL's reply when the library is not loaded (a fresh or flushed server)."""
    return isinstance(reply, rex.ResponseError) and "Function not found" in str(reply)


def _encode(op: Op, accounts: Sequence[str], args: Sequence[Arg]) -> str:
    return SEP.join([op, str(len(accounts)), *accounts, *map(str, args)])


def _all(reply: Any) -> list[Any]:
    if isinstance(reply, Exception):
        raise reply
    return list(reply)


def _first(reply: Any) -> list[Any]:
    if isinstance(reply, Exception):
        raise reply
    first: list[Any] = reply[0]
    return first


__all__ = ["SEP", "Script", "ScriptRunner", "redact_url"]

"""Waiting for held money: how a reservation that waits learns it was granted.

A reserve that cannot be covered only because other calls' holds are in flight
joins its account's queue in Redis (``reserve.lua``); the script that settles
enough money grants it there, oldest first. The waiter only has to notice: one
poller per task and ledger reads the records of every reservation of that task
waiting in this process with a single ``HMGET``, at once when this process
settled money on the task, otherwise on a short timer that backs off while
nothing changes. Granting never depends on the poll; only noticing does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from redis import exceptions as rex

from budgets.connection import Client
from budgets.keys import SHARED_SPACE, KeySpace

log = logging.getLogger(__name__)

#: The poll's first and longest interval while waiters of a task wait here.
POLL_FIRST_S = 0.002
POLL_MAX_S = 0.05

#: What a waiter hears: the hold's lease deadline (ms), or ``None`` when its
#: record is gone (its wait ended without a hold).
Grant = int | None


@dataclass(slots=True)
class _Task:
    """The waiters of one task in this process, and what wakes its poller."""

    waiters: dict[str, asyncio.Future[Grant]] = field(default_factory=dict)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    poller: asyncio.Task[None] | None = None


class Admissions:
    """Tells each waiting reservation of this process when its wait ended."""

    def __init__(self, redis: Client, *, space: KeySpace = SHARED_SPACE) -> None:
        self._redis = redis
        self._space = space
        self._tasks: dict[str, _Task] = {}

    def settled(self, task_id: str) -> None:
        """Money of ``task_id`` was settled here: look at its waiters now."""
        found = self._tasks.get(task_id)
        if found is not None:
            found.wake.set()

    async def wait(self, task_id: str, reservation_id: str, *, timeout_s: float) -> Grant:
        """The grant of a waiting reservation; raises ``TimeoutError`` after ``timeout_s``."""
        entry = self._tasks.get(task_id)
        if entry is None:
            entry = self._tasks[task_id] = _Task()
        fut: asyncio.Future[Grant] = asyncio.get_running_loop().create_future()
        entry.waiters[reservation_id] = fut
        if entry.poller is None or entry.poller.done():
            entry.poller = asyncio.create_task(self._poll(task_id, entry))
        entry.wake.set()
        try:
            return await asyncio.wait_for(asyncio.shield(fut), max(0.0, timeout_s))
        finally:
            if entry.waiters.get(reservation_id) is fut:
                del entry.waiters[reservation_id]
            if not fut.done():
                fut.cancel()

    async def _poll(self, task_id: str, entry: _Task) -> None:
        key = self._space.task(task_id).reservations
        interval = POLL_FIRST_S
        while entry.waiters:
            entry.wake.clear()
            ids = list(entry.waiters)
            try:
                raw: list[str | bytes | None] = await self._redis.hmget(key, ids)
            except (rex.ConnectionError, rex.TimeoutError) as e:
                # Redis is away: the grants wait there; each waiter's own deadline bounds it.
                log.debug("polling the waiters of %s failed (%s); trying again", task_id, e)
                await asyncio.sleep(POLL_MAX_S)
                continue
            changed = False
            for rid, got in zip(ids, raw, strict=True):
                record = got.decode() if isinstance(got, bytes) else got
                fut = entry.waiters.get(rid)
                if fut is None or fut.done():
                    continue
                if record is None:
                    fut.set_result(None)
                elif not record.startswith("waiting|"):
                    fut.set_result(int(record.split("|", 5)[4]))
                else:
                    continue
                changed = True
            interval = POLL_FIRST_S if changed else min(POLL_MAX_S, interval * 2)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(entry.wake.wait(), interval)
        if self._tasks.get(task_id) is entry:
            del self._tasks[task_id]

"""The task record in Redis: status, text, budget, answer, and the results already paid for."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, cast

from pydantic import BaseModel

from budgets import Budget
from budgets.coalesce import Coalescer
from budgets.connection import Client
from budgets.keys import SHARED_SPACE, KeySpace, new_incarnation


class Status(StrEnum):
    """Where a task is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    #: Every subtask ran, but some stayed cut short or rejected after the last escalation.
    PARTIAL = "partial"
    FAILED = "failed"
    CANCELLED = "cancelled"
    BUDGET_EXHAUSTED = "budget_exhausted"

    @property
    def final(self) -> bool:
        """True once the task will not change again."""
        return self not in (Status.QUEUED, Status.RUNNING)


class Spent(BaseModel):
    """What a task spent, rolled up over its whole account tree."""

    tokens: int
    usd: str


class TaskRecord(BaseModel):
    """A task as the API returns it."""

    id: str
    status: Status
    task: str
    budget: Budget
    tenant: str | None = None
    answer: str | None = None
    error: str | None = None
    spent: Spent | None = None
    created_s: float
    started_s: float | None = None
    finished_s: float | None = None
    deliveries: int = 0
    cancel_requested: bool = False


# KEYS[1] task record   ARGV[1] now (s)
# returns {deliveries, field, value, ...}: the delivery count and the record as it is
#   after marking it running, or {-1, field, value, ...} when it is already final (nothing
#   written); {} when there is no record
_START = """
if redis.call('HEXISTS', KEYS[1], 'task') == 0 then return {} end
local status = redis.call('HGET', KEYS[1], 'status')
local n = -1
if status == 'queued' or status == 'running' then
  redis.call('HSET', KEYS[1], 'status', 'running', 'started_s', ARGV[1])
  n = redis.call('HINCRBY', KEYS[1], 'deliveries', 1)
end
local out = redis.call('HGETALL', KEYS[1])
table.insert(out, 1, n)
return out
"""

# KEYS[1] task record
# returns 1 when a queued task became cancelled, 0 when it was not queued (nothing written)
_CANCEL_QUEUED = """
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'cancelled', 'cancel', '1')
return 1
"""


# KEYS[1] task record
# ARGV[1] task text  ARGV[2] budget (JSON)  ARGV[3] tenant ('' none)  ARGV[4] now (s)
# ARGV[5] incarnation (kept if this call creates the record)
# returns {1, incarnation, 'queued', text, budget, tenant} when it wrote the record, or
#   {0, incarnation, status, text, budget, tenant} of the record already there (nothing written)
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  local r = redis.call('HMGET', KEYS[1], 'inc', 'status', 'task', 'budget', 'tenant')
  return {0, r[1] or '', r[2] or '', r[3] or '', r[4] or '', r[5] or ''}
end
redis.call('HSET', KEYS[1], 'status', 'queued', 'task', ARGV[1], 'budget', ARGV[2],
  'tenant', ARGV[3], 'created_s', ARGV[4], 'inc', ARGV[5])
return {1, ARGV[5], 'queued', ARGV[1], ARGV[2], ARGV[3]}
"""

# KEYS[1] task record   KEYS[2..] the task's results, plan and plans
# ARGV[1] retention (s)   ARGV[2] '1': only when the task is not final yet
# ARGV[3..] field, value, ... of the final state
# returns {written (1 or 0), field, value, ...}: whether it wrote, and the record as it is
#   then; when it writes, every key gets the retention
_FINISH = """
local status = redis.call('HGET', KEYS[1], 'status')
local written = 0
if ARGV[2] ~= '1' or not status or status == 'queued' or status == 'running' then
  redis.call('HSET', KEYS[1], unpack(ARGV, 3))
  for i = 1, #KEYS do redis.call('EXPIRE', KEYS[i], ARGV[1]) end
  written = 1
end
local out = redis.call('HGETALL', KEYS[1])
table.insert(out, 1, written)
return out
"""

# KEYS[1] task record   ARGV[1] incarnation
# returns 1 when the record of that incarnation, still queued, was removed; else 0
_DISCARD = """
local r = redis.call('HMGET', KEYS[1], 'inc', 'status')
if r[1] ~= ARGV[1] or r[2] ~= 'queued' then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""


@dataclass(frozen=True, slots=True)
class Created:
    """What :meth:`Records.create` wrote, or found under the id.

    ``incarnation`` tells this record from any earlier task under the same id;
    the API opens the task's ledger with an op id made from it.
    """

    created: bool
    incarnation: str
    status: Status | None
    task: str
    budget: Budget | None
    tenant: str | None

    def same(self, *, task: str, budget: Budget, tenant: str | None) -> bool:
        """Whether a submit with these arguments is a retry of this record's."""
        return (self.task, self.budget, self.tenant) == (task, budget, tenant)


def result_text(result: Mapping[str, Any]) -> str:
    """A finished subtask's result as the results hash keeps it (JSON)."""
    return json.dumps(result)


def _record(task_id: str, raw: Mapping[str, str]) -> TaskRecord | None:
    """A record read from its hash; ``None`` when there is none (or no task in it)."""
    if not raw or "task" not in raw:
        return None
    spent = Spent.model_validate_json(raw["spent"]) if raw.get("spent") else None
    return TaskRecord(
        id=task_id,
        status=Status(raw["status"]),
        task=raw["task"],
        budget=Budget.model_validate_json(raw["budget"]),
        tenant=raw.get("tenant") or None,
        answer=raw.get("answer"),
        error=raw.get("error") or None,
        spent=spent,
        created_s=float(raw["created_s"]),
        started_s=_opt_float(raw.get("started_s")),
        finished_s=_opt_float(raw.get("finished_s")),
        deliveries=int(raw.get("deliveries", 0)),
        cancel_requested=raw.get("cancel") == "1",
    )


def _opt_float(value: str | None) -> float | None:
    return float(value) if value else None


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class Records:
    """Reads and writes task records; one instance per process, sharing the Redis client."""

    def __init__(self, redis: Client, *, space: KeySpace = SHARED_SPACE) -> None:
        self.redis = redis
        #: Where the records live (``pm:``, or ``pm:<tenant>:`` when fenced).
        self.space = space
        self._create = redis.register_script(_CREATE)
        self._discard = redis.register_script(_DISCARD)
        self._start = redis.register_script(_START)
        self._cancel_queued = redis.register_script(_CANCEL_QUEUED)
        self._finish = redis.register_script(_FINISH)
        # Results saved while a write is in flight go together, one HSET per task.
        self._save: Coalescer[tuple[str, str, str], None] = Coalescer(self._save_batch)

    async def create(
        self, task_id: str, *, task: str, budget: Budget, tenant: str | None
    ) -> Created:
        """Write a new record in state ``queued``, unless the id is in use.

        One atomic step: either this call wrote the record (``created``), or it
        found the one already there and changed nothing; :meth:`Created.same`
        then tells a client's retry from a clash.
        """
        now = time.time()
        reply = await self._create(
            keys=[self.space.task(task_id).record],
            args=[task, budget.model_dump_json(), tenant or "", repr(now), new_incarnation()],
        )
        created, incarnation, status, text, raw_budget, raw_tenant = (
            _text(v) for v in cast("list[Any]", reply)
        )
        return Created(
            created=created == "1",
            incarnation=incarnation,
            status=Status(status) if status in {s.value for s in Status} else None,
            task=text,
            budget=Budget.model_validate_json(raw_budget) if raw_budget else None,
            tenant=raw_tenant or None,
        )

    async def discard(self, task_id: str, incarnation: str) -> bool:
        """Remove a record :meth:`create` wrote whose task could not be opened.

        Only that incarnation's, and only while still ``queued``; ``False`` otherwise.
        """
        removed = await self._discard(keys=[self.space.task(task_id).record], args=[incarnation])
        return bool(removed)

    async def get(self, task_id: str) -> TaskRecord | None:
        """The record, or ``None`` if there is no such task."""
        raw = cast(
            "dict[str, str]",
            await self.redis.hgetall(self.space.task(task_id).record),
        )
        return _record(task_id, raw)

    async def start(self, task_id: str) -> tuple[TaskRecord, int | None] | None:
        """Record a delivery: the record as it is then, and how many times it was delivered.

        The count is ``None`` when the task is final (nothing is written, so a task
        cancelled while queued is never marked running again); ``None`` alone when
        there is no such task. One atomic step with the status check.
        """
        keys = self.space.task(task_id)
        reply = cast("list[Any]", await self._start(keys=[keys.record], args=[repr(time.time())]))
        if not reply:
            return None
        count, *flat = reply
        record = _record(task_id, dict(zip(flat[::2], flat[1::2], strict=True)))
        assert record is not None  # the script checked it has a task
        deliveries = int(count)
        return record, None if deliveries < 0 else deliveries

    async def cancel_queued(self, task_id: str) -> bool:
        """Cancel a task no worker has taken yet; ``False`` if it is not queued."""
        return bool(await self._cancel_queued(keys=[self.space.task(task_id).record]))

    async def finish(
        self,
        task_id: str,
        *,
        status: Status,
        answer: str | None,
        error: str | None,
        spent: Spent | None,
        retention_s: int,
        unless_final: bool = False,
    ) -> tuple[TaskRecord, bool]:
        """Write the final state and let the record expire after ``retention_s``.

        Returns the record as it is then, and whether this call wrote it: with
        ``unless_final``, a task already final (finished by someone else) keeps
        what it has and nothing is written, in the same atomic step as the check.
        """
        keys = self.space.task(task_id)
        fields: list[str] = ["status", status.value, "finished_s", repr(time.time())]
        if answer is not None:
            fields += ["answer", answer]
        if error is not None:
            fields += ["error", error]
        if spent is not None:
            fields += ["spent", spent.model_dump_json()]
        reply = cast(
            "list[Any]",
            await self._finish(
                keys=[keys.record, keys.results, keys.plan, keys.plans],
                args=[retention_s, "1" if unless_final else "0", *fields],
            ),
        )
        written, *flat = reply
        record = _record(task_id, dict(zip(flat[::2], flat[1::2], strict=True)))
        assert record is not None  # it has its task: written just now, or final before
        return record, bool(written)

    async def request_cancel(self, task_id: str) -> bool:
        """Flag the task for cancellation; ``False`` if it is unknown or already final."""
        record = await self.get(task_id)
        if record is None or record.status.final:
            return False
        await self.redis.hset(self.space.task(task_id).record, "cancel", "1")
        return True

    async def cancel_requested(self, task_id: str) -> bool:
        """Whether someone asked to cancel the task."""
        flag = await self.redis.hget(self.space.task(task_id).record, "cancel")
        return flag == "1"

    async def cancel_requested_and_read(
        self, task_id: str, key: str
    ) -> tuple[bool, dict[str, str]]:
        """Whether someone asked to cancel the task, and the hash at ``key`` (another key of
        the task's, so on its slot) read in the same round trip."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hget(self.space.task(task_id).record, "cancel")
        pipe.hgetall(key)
        flag, fields = await pipe.execute()
        return flag == "1", cast("dict[str, str]", fields)

    async def save_plan(self, task_id: str, plan_json: str, *, level: str = "") -> None:
        """Keep a level's plan so a re-delivered task does not plan (and pay) again.

        ``level`` is the work id of the composite subtask planned (``""``: the task).
        """
        keys = self.space.task(task_id)
        if level:
            await self.redis.hset(keys.plans, level, plan_json)
        else:
            await self.redis.set(keys.plan, plan_json)

    async def load_plan(self, task_id: str, *, level: str = "") -> str | None:
        """The saved plan of a level, if any."""
        keys = self.space.task(task_id)
        value = await (self.redis.hget(keys.plans, level) if level else self.redis.get(keys.plan))
        return cast("str | None", value)

    async def save_result(self, task_id: str, subtask_id: str, result: Mapping[str, Any]) -> None:
        """Keep a finished subtask's result (by its work id).

        Results of one task saved at the same moment (subtasks finishing
        together) are written with one ``HSET``; each call returns once its own
        result is written, or raises what the write raised.
        """
        await self._save((task_id, subtask_id, result_text(result)))

    async def _save_batch(self, items: list[tuple[str, str, str]]) -> list[BaseException | None]:
        by_task: dict[str, dict[str, str]] = {}
        for task_id, field, value in items:
            by_task.setdefault(task_id, {})[field] = value
        writes = [
            self.redis.hset(self.space.task(t).results, mapping=cast(Any, fields))
            for t, fields in by_task.items()
        ]
        replies = await asyncio.gather(*writes, return_exceptions=True)
        outcomes = dict(zip(by_task, replies, strict=True))
        return [e if isinstance(e := outcomes[t], BaseException) else None for t, _, _ in items]

    async def load_results(self, task_id: str) -> dict[str, dict[str, Any]]:
        """Every result already paid for, by subtask id."""
        raw = cast(
            "dict[str, str]",
            await self.redis.hgetall(self.space.task(task_id).results),
        )
        return {sid: json.loads(value) for sid, value in raw.items()}

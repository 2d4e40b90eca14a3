"""The Python API: submit tasks, wait for answers, read ledgers. Async inside, a thin sync facade.

Every method has one async body (``a``-prefixed, or ``result()`` on a task);
the sync methods run that body on a private event loop in a background thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Coroutine, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from agents.endpoints import DEFAULT_LOCAL_PORT, EndpointsConfig, load_config
from agents.plan import Plan
from budgets import Budget, Ledger, LedgerEvent, TaskTree
from budgets.errors import LedgerError, TaskExists, UnknownTask
from budgets.keys import check_task_id, check_tenant, new_op_id, submit_op_id
from budgets.stats import Stats, StatsBook
from orchestrator.embedded import ensure_redis
from orchestrator.errors import (
    InvalidTask,
    SubtaskNotFound,
    TaskNotFound,
    TaskTimeout,
    WrongTenant,
)
from orchestrator.flow import stats_scope
from orchestrator.queue import TaskQueue
from orchestrator.records import Records, Status, TaskRecord
from orchestrator.runtime import Runtime, finish_task
from orchestrator.settings import Settings
from orchestrator.telemetry import Telemetry

T = TypeVar("T")


class _Portal:
    """An event loop in a daemon thread, so sync callers can run coroutines on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="pm-loop")
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)


class Task:
    """A submitted task: its id, and ways to ask after it (sync and async)."""

    def __init__(self, pm: Paymaster, task_id: str) -> None:
        self._pm = pm
        self.id = task_id

    def __repr__(self) -> str:
        return f"Task(id={self.id!r})"

    async def astatus(self) -> TaskRecord:
        """The task's record now."""
        return await self._pm.arecord(self.id)

    async def result(self, *, timeout: float | None = None) -> TaskRecord:
        """Wait for a final state; :class:`TaskTimeout` after ``timeout`` seconds."""
        return await self._pm.await_final(self.id, timeout=timeout)

    def status(self) -> TaskRecord:
        """Sync :meth:`astatus`."""
        return self._pm._sync(self.astatus())

    def wait(self, timeout: float | None = None) -> TaskRecord:
        """Sync :meth:`result`."""
        return self._pm._sync(self.result(timeout=timeout))

    def cancel(self) -> bool:
        """Ask the task to stop at its next step; ``False`` if it already ended."""
        return self._pm._sync(self._pm.acancel(self.id))


class Paymaster:
    """Entry point: ``Paymaster.from_env()`` or ``Paymaster(redis_url=..., config=...)``.

    With no Redis URL a private Redis is started (``PAYMASTER_HOME``); with no
    endpoint configuration the bundled local model is used, its server
    started on demand when a task first runs in this process.
    """

    def __init__(
        self,
        *,
        redis_url: str | None = None,
        config: EndpointsConfig | Path | None = None,
        settings: Settings | None = None,
        env: Mapping[str, str] | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        self._telemetry = telemetry
        self._env = dict(os.environ if env is None else env)
        self.settings = settings or Settings.from_env(self._env)
        self.redis_url = redis_url or self.settings.redis_url or ensure_redis(self.settings.home)
        if isinstance(config, EndpointsConfig):
            self._config: EndpointsConfig | None = config
        else:
            path = config if config is not None else self.settings.config_path
            self._config = load_config(path, env=self._env) if path is not None else None
        self._portal: _Portal | None = None
        self._ledger: Ledger | None = None
        self._runtime: Runtime | None = None
        self._statsbook: StatsBook | None = None

    @classmethod
    def from_env(cls, *, telemetry: Telemetry | None = None) -> Paymaster:
        """Settings from ``REDIS_URL``, ``PAYMASTER_CONFIG`` and ``PAYMASTER_*``.

        ``telemetry`` observes the tasks this process runs (see
        :mod:`orchestrator.telemetry`); OpenTelemetry joins it where the
        environment configures an OTLP endpoint.
        """
        return cls(telemetry=telemetry)

    # -- plumbing ----------------------------------------------------------

    def _sync(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._portal is None:
            self._portal = _Portal()
        return self._portal.call(coro)

    @property
    def books(self) -> Ledger:
        """The ledger client (built on first use in the calling event loop)."""
        if self._ledger is None:
            self._ledger = Ledger.from_url(
                self.redis_url, lease_s=self.settings.lease_s, space=self.settings.space()
            )
        return self._ledger

    def _records(self) -> Records:
        return Records(self.books.redis, space=self.books.space)

    @property
    def endpoints(self) -> EndpointsConfig:
        """The endpoint configuration; the bundled local model when none was given.

        That model is the server at ``PAYMASTER_LOCAL_MODEL_URL`` when the
        environment names one (none is started then), else our own server.
        """
        if self._config is None:
            from agents.endpoints import LOCAL_URL_ENV
            from agents.local_model import ensure_running

            env = self._env
            if not env.get(LOCAL_URL_ENV):
                base = ensure_running(self.settings.home, port=DEFAULT_LOCAL_PORT, env=env)
                env = {**env, LOCAL_URL_ENV: base}
            self._config = load_config(None, env=env)
        return self._config

    def runtime(self) -> Runtime:
        """The working parts for running tasks in this process."""
        if self._runtime is None:
            self._runtime = Runtime.build(
                settings=self.settings,
                redis_url=self.redis_url,
                endpoints=self.endpoints,
                env=self._env,
                telemetry=self._telemetry,
            )
        return self._runtime

    async def aclose(self) -> None:
        """Close connections and clients."""
        if self._runtime is not None:
            await self._runtime.aclose()
        if self._ledger is not None:
            await self._ledger.aclose()

    def close(self) -> None:
        """Sync :meth:`aclose`, and stop the background loop."""
        if self._portal is not None:
            self._portal.call(self.aclose())
            self._portal.close()
            self._portal = None

    # -- tasks -----------------------------------------------------------------

    async def _create(
        self, text: str, budget: Budget, tenant: str | None, task_id: str | None
    ) -> tuple[str, bool]:
        """The task's id, and whether this call created it (``False``: a retry's).

        The record first, in one atomic step that either writes it or finds the
        one there: a different task under the id raises :class:`TaskExists` with
        nothing touched. The record's incarnation then names the ledger's open,
        so a retry completes the same open and a reused id (after its retention)
        is a new task its tenant must fund. If the ledger refuses, the record
        goes again and the id stays free.
        """
        if not isinstance(text, str) or not text.strip():
            raise InvalidTask("the task is empty; give it some text")
        if len(text) > self.settings.max_task_chars:
            raise InvalidTask(
                f"the task has {len(text)} characters; the limit is {self.settings.max_task_chars}"
            )
        if not isinstance(budget, Budget):
            raise InvalidTask(
                "budget must be a budgets.Budget, e.g. Budget(tokens=5000, usd='0.10')"
            )
        if budget.is_unlimited:
            raise InvalidTask("give the task a limit in tokens or dollars (or both)")
        task_id = check_task_id(task_id or new_op_id()[:16])
        tenant = self._tenant(tenant)
        records = self._records()
        found = await records.create(task_id, task=text, budget=budget, tenant=tenant)
        if not found.created and not found.same(task=text, budget=budget, tenant=tenant):
            raise TaskExists(task_id)
        if found.created or found.status is Status.QUEUED:
            try:
                await self.books.open_task(
                    task_id, budget, tenant=tenant, op_id=submit_op_id(found.incarnation)
                )
            except LedgerError:
                await records.discard(task_id, found.incarnation)
                raise
        return task_id, found.created

    async def asubmit(
        self, text: str, *, budget: Budget, tenant: str | None = None, task_id: str | None = None
    ) -> Task:
        """Queue a task for a worker; raises on bad input and stores nothing then.

        Submitting again with the same text, budget and tenant (a client's retry)
        returns the same task and queues nothing more; anything else under a used
        id raises :class:`~budgets.errors.TaskExists` and changes nothing.
        """
        task_id, created = await self._create(text, budget, tenant, task_id)
        if created:
            queue = TaskQueue(self.books.redis, space=self.books.space)
            await queue.ensure_group()
            await queue.enqueue(task_id)
        return Task(self, task_id)

    def submit(
        self, text: str, *, budget: Budget, tenant: str | None = None, task_id: str | None = None
    ) -> Task:
        """Sync :meth:`asubmit`."""
        return self._sync(self.asubmit(text, budget=budget, tenant=tenant, task_id=task_id))

    async def arun(
        self, text: str, *, budget: Budget, tenant: str | None = None, task_id: str | None = None
    ) -> TaskRecord:
        """Run a task in this process (no worker needed) and return its final record.

        The same arguments under an id already in use wait for that task instead
        of running it twice; other arguments raise :class:`~budgets.errors.TaskExists`.
        """
        task_id, created = await self._create(text, budget, tenant, task_id)
        if not created:
            return await self.await_final(task_id)
        try:
            return await self.runtime().execute(task_id)
        except BaseException as e:
            # No queue will deliver an in-process task again: end it now, its
            # ledger closed and its tenant's funding back, then say why.
            with contextlib.suppress(Exception):
                await finish_task(
                    self.books,
                    self._records(),
                    task_id,
                    status=Status.FAILED,
                    answer=None,
                    error=f"{type(e).__name__}: {e}",
                    retention_s=self.settings.retention_s,
                )
            raise

    def run(
        self, text: str, *, budget: Budget, tenant: str | None = None, task_id: str | None = None
    ) -> TaskRecord:
        """Sync :meth:`arun`."""
        return self._sync(self.arun(text, budget=budget, tenant=tenant, task_id=task_id))

    async def arecord(self, task_id: str) -> TaskRecord:
        """A task's record; :class:`TaskNotFound` if there is none."""
        check_task_id(task_id)
        record = await self._records().get(task_id)
        if record is None:
            raise TaskNotFound(task_id)
        return record

    def status(self, task_id: str) -> TaskRecord:
        """Sync :meth:`arecord`."""
        return self._sync(self.arecord(task_id))

    async def await_final(self, task_id: str, *, timeout: float | None = None) -> TaskRecord:
        """Poll until the task is final."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.02
        while True:
            record = await self.arecord(task_id)
            if record.status.final:
                return record
            if deadline is not None and time.monotonic() >= deadline:
                raise TaskTimeout(task_id, timeout or 0)
            await asyncio.sleep(delay)
            delay = min(0.5, delay * 1.5)

    async def acancel(self, task_id: str) -> bool:
        """Ask a task to stop; ``False`` if it is already final.

        A task no worker has taken yet is cancelled at once: its ledger closes
        and its tenant gets the funding back. A running one stops at its next step.
        """
        await self.arecord(task_id)
        records = self._records()
        if await records.cancel_queued(task_id):
            await finish_task(
                self.books,
                records,
                task_id,
                status=Status.CANCELLED,
                answer=None,
                error=None,
                retention_s=self.settings.retention_s,
            )
            return True
        return await records.request_cancel(task_id)

    async def asubtasks(self, task_id: str) -> list[str]:
        """Ids of the task's finished subtasks, in plan order (what :meth:`feedback` takes)."""
        await self.arecord(task_id)
        records = self._records()
        results = await records.load_results(task_id)
        saved = await records.load_plan(task_id)
        order = [s.id for s in Plan.model_validate_json(saved).subtasks] if saved else []
        done = [sid for sid in order if results.get(sid, {}).get("outcome")]
        return done + sorted(sid for sid in results if sid not in order)

    def subtasks(self, task_id: str) -> list[str]:
        """Sync :meth:`asubtasks`."""
        return self._sync(self.asubtasks(task_id))

    def task(self, task_id: str) -> Task:
        """A handle on an existing task."""
        return Task(self, check_task_id(task_id))

    async def aledger(self, task_id: str) -> TaskTree:
        """The task's account tree."""
        try:
            return await self.books.snapshot(task_id)
        except UnknownTask as e:
            raise TaskNotFound(task_id) from e

    def ledger(self, task_id: str) -> TaskTree:
        """Sync :meth:`aledger`."""
        return self._sync(self.aledger(task_id))

    async def aevents(self, task_id: str, *, after: str = "-") -> list[LedgerEvent]:
        """The task's audit events."""
        if not await self.books.redis.exists(self.books.space.task(task_id).events):
            raise TaskNotFound(task_id)
        return await self.books.events(task_id, after=after)

    def events(self, task_id: str, *, after: str = "-") -> list[LedgerEvent]:
        """Sync :meth:`aevents`."""
        return self._sync(self.aevents(task_id, after=after))

    def _tenant(self, asked: str | None) -> str | None:
        """The tenant a task or setting is for: ``asked`` (validated), or the fence's.

        A process fenced to a tenant (``PAYMASTER_TENANT``) acts for that tenant
        only; another name raises :class:`WrongTenant` before anything is written.
        """
        fence = self.settings.tenant
        if asked is None:
            return fence
        check_tenant(asked)
        if fence is not None and asked != fence:
            raise WrongTenant(fence, asked)
        return asked

    async def aset_tenant(self, name: str, budget: Budget, *, period: str = "month") -> None:
        """Create or update a tenant's per-period budget."""
        name = self._tenant(name) or name
        await self.books.set_tenant(name, budget, period=period)  # type: ignore[arg-type]

    def set_tenant(self, name: str, budget: Budget, *, period: str = "month") -> None:
        """Sync :meth:`aset_tenant`."""
        self._sync(self.aset_tenant(name, budget, period=period))

    # -- what the policies learn from -------------------------------------

    def _stats(self) -> StatsBook:
        if self._statsbook is None:
            self._statsbook = StatsBook(self.books.redis, space=self.books.space)
        return self._statsbook

    async def afeedback(self, task_id: str, subtask_id: str, *, ok: bool) -> bool:
        """Record whether a subtask's answer was right; the ``adaptive`` policy learns from it.

        Counted once per subtask: repeating a verdict changes nothing, a new
        verdict replaces the old. Returns ``False`` when nothing changed.
        Raises :class:`TaskNotFound` or :class:`SubtaskNotFound`, and
        :class:`~budgets.errors.UnknownOutcome` once the outcome's statistics expired.
        """
        record = await self.arecord(task_id)
        results = await self._records().load_results(task_id)
        res = results.get(subtask_id)
        if res is None or not res.get("outcome") or not res.get("endpoint"):
            raise SubtaskNotFound(
                task_id, subtask_id, [k for k, v in results.items() if v.get("outcome")]
            )
        # the verdict lands in the cells the outcome was recorded in, stored with its marker
        return await self._stats().verdict(
            stats_scope(record.tenant, self.settings.stats_scope), str(res["outcome"]), ok=bool(ok)
        )

    def feedback(self, task_id: str, subtask_id: str, *, ok: bool) -> bool:
        """Sync :meth:`afeedback`."""
        return self._sync(self.afeedback(task_id, subtask_id, ok=ok))

    async def astats(self, tenant: str | None = None) -> Stats:
        """The statistics the policies read for ``tenant`` (the shared scope when ``None``)."""
        return await self._stats().read(stats_scope(tenant, self.settings.stats_scope))

    def stats(self, tenant: str | None = None) -> Stats:
        """Sync :meth:`astats`."""
        return self._sync(self.astats(tenant))

"""The worker process: takes tasks from the queue and runs them to a final state.

Heartbeats keep a running task's delivery alive; a worker that dies stops
heartbeating and another takes the task over after the visibility timeout.
A delivery is owned (see :mod:`orchestrator.queue`): the heartbeat refreshes
only what this worker still holds, and a task whose delivery was taken over
stops before its next paid step, leaving the task to its new holder.

Redis may go away and come back: every command rides out an outage for up
to the visibility timeout (:mod:`orchestrator.outage` logs ``Redis
unreachable, retrying in …`` once, and ``Redis back after …``); past it, a
running task is handed back to the queue and the loops here keep retrying
with backoff. The worker never exits because of Redis.

SIGTERM stops taking work and lets running tasks finish within a grace
period; what does not finish stays pending for another worker. A second
signal exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import cast

from agents.redact import redact
from orchestrator.errors import DeliveryLost
from orchestrator.outage import UNREACHABLE, backoff_s
from orchestrator.queue import Delivery, TaskQueue
from orchestrator.records import Status
from orchestrator.runtime import Runtime

log = logging.getLogger(__name__)

#: How often the heartbeat also forgets workers and consumers long silent.
PRUNE_EVERY_S = 60.0
#: A worker silent this long is forgotten (its heartbeat entry, and its
#: consumer once it holds nothing).
FORGET_AFTER_S = 86_400.0


@dataclass(slots=True)
class _Run:
    """A delivery this worker is running; whether it was lost, or is being acknowledged."""

    delivery: Delivery
    task: asyncio.Task[None] | None = None
    lost: bool = field(default=False)
    acking: bool = field(default=False)


class Worker:
    """Runs up to ``concurrency`` tasks at once from the shared queue."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        concurrency: int = 4,
        name: str | None = None,
        grace_s: float = 30.0,
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        self.runtime = runtime
        self.concurrency = concurrency
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.grace_s = grace_s
        self.queue = TaskQueue(runtime.ledger.redis, consumer=self.name, space=runtime.ledger.space)
        self._registry = runtime.ledger.space.workers
        self._running: dict[str, _Run] = {}
        self.stopping = asyncio.Event()
        #: Heartbeats sent (a test watches it go on after an outage).
        self.beats = 0

    async def run(self) -> None:
        """Take and run tasks until :attr:`stopping` is set, then drain."""
        await self._until_done(self.queue.ensure_group)
        beat = asyncio.create_task(self._heartbeat())
        try:
            await self._take_loop()
        finally:
            await self._drain()
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat
            with contextlib.suppress(*UNREACHABLE):
                await self.runtime.ledger.redis.hdel(self._registry, self.name)

    async def _take_loop(self) -> None:
        idle_ms = int(self.runtime.settings.visibility_timeout_s * 1000)
        failures = 0
        while not self.stopping.is_set():
            free = self.concurrency - len(self._running)
            if free <= 0:
                await asyncio.sleep(0.05)
                continue
            try:
                batch = await self.queue.take_over(
                    idle_ms=idle_ms, count=free, running=list(self._running)
                )
                if batch:  # observability hook
                    self.runtime.telemetry.queue("takeover", len(batch))
                else:
                    batch = await self.queue.take(count=free, block_ms=500)
            except UNREACHABLE as e:
                failures += 1
                delay = self._retry_in_s(failures)
                self.runtime.outage.failed(e, retry_in_s=delay)
                await self._sleep_unless_stopping(delay)
                continue
            failures = 0
            self.runtime.outage.answered()
            for delivery in batch:
                if delivery.message_id not in self._running:
                    run = self._running[delivery.message_id] = _Run(delivery)
                    run.task = asyncio.create_task(self._run_one(run))

    def _retry_in_s(self, failures: int) -> float:
        cap = min(2.0, self.runtime.settings.visibility_timeout_s / 2)
        return backoff_s(failures, cap_s=max(0.05, cap))

    async def _sleep_unless_stopping(self, delay_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), timeout=delay_s)

    async def _until_done(self, step: Callable[[], Awaitable[None]]) -> None:
        """Run ``step()`` until Redis answers it (or the worker is told to stop)."""
        failures = 0
        while True:
            try:
                await step()
                return
            except UNREACHABLE as e:
                if self.stopping.is_set():
                    raise
                failures += 1
                delay = self._retry_in_s(failures)
                self.runtime.outage.failed(e, retry_in_s=delay)
                await self._sleep_unless_stopping(delay)

    async def _run_one(self, run: _Run) -> None:
        runtime, delivery = self.runtime, run.delivery
        task_id = delivery.task_id
        try:
            record = await runtime.records.get(task_id)
            if record is None:
                await self.queue.ack(delivery)
                return
            if not record.status.final and record.deliveries >= runtime.settings.max_deliveries:
                reason = f"gave up after {record.deliveries} deliveries"
                await runtime.fail(task_id, reason, claim=delivery)
                run.acking = True
                if await self.queue.dead_letter(delivery, reason=reason):
                    self.runtime.telemetry.queue("dead_letter")  # observability hook
                return
            log.info("took task %s (delivery %d)", task_id, record.deliveries + 1)
            started = time.monotonic()
            final = await runtime.execute(task_id, claim=delivery)
            spent = final.spent
            log.info(
                "finished task %s: %s, spent %s tokens and $%s in %.1fs",
                task_id,
                final.status.value,
                f"{spent.tokens:,}" if spent else "0",
                spent.usd if spent else "0",
                time.monotonic() - started,
            )
            run.acking = True  # from here on the heartbeat leaves it alone
            if final.status is Status.FAILED:
                # Failed on its last delivery: keep it in the dead letter for inspection.
                done = await self.queue.dead_letter(delivery, reason=final.error or "failed")
                if done:
                    self.runtime.telemetry.queue("dead_letter")  # observability hook
            else:
                done = await self.queue.ack(delivery)
            if not done:
                log.info("task %s: its delivery is another worker's now; not acknowledged", task_id)
        except DeliveryLost:
            log.warning(
                "stopped task %s: another worker took it over; stopped before its next paid step",
                task_id,
            )
        except asyncio.CancelledError:
            # Shutting down: the message stays pending for another worker.
            log.info("handed back task %s: stopping before it finished", task_id)
            raise
        except UNREACHABLE as e:
            log.warning(
                "handed back task %s: Redis unreachable (%s); it runs again once Redis is back",
                task_id,
                type(e).__name__,
            )
        except Exception:
            log.exception("task %s failed; it will be delivered again", task_id)
        finally:
            self._running.pop(delivery.message_id, None)

    async def _heartbeat(self) -> None:
        """Keep held deliveries alive; survive any error, back off while Redis is down."""
        settings = self.runtime.settings
        failures = 0
        pruned = time.monotonic()
        while True:
            try:
                await self._beat()
                self.runtime.outage.answered()
                failures, delay = 0, settings.heartbeat_s
                if time.monotonic() - pruned >= PRUNE_EVERY_S:
                    pruned = time.monotonic()
                    await self._prune()
            except UNREACHABLE as e:
                failures += 1
                delay = min(settings.heartbeat_s, self._retry_in_s(failures))
                self.runtime.outage.failed(e, retry_in_s=delay)
            except Exception:
                failures += 1
                delay = min(settings.heartbeat_s, self._retry_in_s(failures))
                log.exception("heartbeat failed; trying again in %.1fs", delay)
            await asyncio.sleep(delay)

    async def _beat(self) -> None:
        runs = [r for r in self._running.values() if not (r.lost or r.acking)]
        lost = await self.queue.keep_alive([r.delivery for r in runs])
        for d in lost:
            run = self._running.get(d.message_id)
            if run is not None and not (run.lost or run.acking):
                run.lost = True
                log.warning(
                    "lost task %s: another worker took its delivery over; "
                    "it stops before its next paid step",
                    d.task_id,
                )
        state = {"pid": os.getpid(), "running": len(self._running), "at_s": time.time()}
        await self.runtime.ledger.redis.hset(self._registry, self.name, json.dumps(state))
        self.beats += 1

    async def _prune(self) -> None:
        """Forget workers silent for :data:`FORGET_AFTER_S`, and their consumers once empty."""
        redis = self.runtime.ledger.redis
        seen = cast("dict[str, str]", await redis.hgetall(self._registry))
        cutoff = time.time() - FORGET_AFTER_S
        stale = []
        for worker, raw in seen.items():
            try:
                at_s = float(json.loads(raw).get("at_s", 0))
            except (ValueError, AttributeError):
                at_s = 0.0
            if at_s < cutoff:
                stale.append(worker)
        if stale:
            await redis.hdel(self._registry, *stale)
        await self.queue.forget_consumers(idle_ms=int(FORGET_AFTER_S * 1000))

    async def _drain(self) -> None:
        tasks = [r.task for r in self._running.values() if r.task is not None]
        if not tasks:
            return
        log.info("waiting up to %.0fs for %d running task(s)", self.grace_s, len(tasks))
        _, pending = await asyncio.wait(tasks, timeout=self.grace_s)
        for task in pending:
            task.cancel()  # handed back: the message stays pending
        if pending:
            await asyncio.wait(pending, timeout=5)


class RedactingFormatter(logging.Formatter):
    """Formats a record as usual, then masks anything that looks like a credential.

    Applied to the whole line, traceback included: a provider's error body
    echoing a key reaches a log through a chained exception.
    """

    def format(self, record: logging.LogRecord) -> str:
        """The formatted record, redacted."""
        return redact(super().format(record))


def configure_logging() -> None:
    """The worker's log: our packages at INFO, libraries from WARNING, credentials redacted.

    httpx's one line per request would drown what the worker says about its tasks.
    """
    handler = logging.StreamHandler()
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    for ours in ("orchestrator", "agents", "budgets"):
        logging.getLogger(ours).setLevel(logging.INFO)


def install_signal_handlers(worker: Worker) -> None:
    """First SIGTERM/SIGINT: stop taking work and drain. Second: exit at once."""
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if worker.stopping.is_set():
            os._exit(128 + signum)
        log.info("signal %d: finishing running tasks, taking no more", signum)
        worker.stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)

"""The worker process: takes tasks from the queue and runs them to a final state.

Heartbeats keep a running task's message alive; a worker that dies stops
heartbeating and another takes the task over after the visibility timeout.
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

from budgets.keys import WORKERS
from orchestrator.queue import Delivery, TaskQueue
from orchestrator.records import Status
from orchestrator.runtime import Runtime

log = logging.getLogger(__name__)


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
        self.queue = TaskQueue(runtime.ledger.redis, consumer=self.name)
        self._running: dict[str, asyncio.Task[None]] = {}
        self.stopping = asyncio.Event()

    async def run(self) -> None:
        """Take and run tasks until :attr:`stopping` is set, then drain."""
        settings = self.runtime.settings
        await self.queue.ensure_group()
        beat = asyncio.create_task(self._heartbeat())
        idle_ms = int(settings.visibility_timeout_s * 1000)
        try:
            while not self.stopping.is_set():
                free = self.concurrency - len(self._running)
                if free <= 0:
                    await asyncio.sleep(0.05)
                    continue
                batch = await self.queue.take_over(idle_ms=idle_ms, count=free)
                if not batch:
                    batch = await self.queue.take(count=free, block_ms=500)
                for delivery in batch:
                    if delivery.message_id not in self._running:
                        self._running[delivery.message_id] = asyncio.create_task(
                            self._run_one(delivery)
                        )
        finally:
            await self._drain()
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat
            await self.runtime.ledger.redis.hdel(WORKERS, self.name)

    async def _run_one(self, delivery: Delivery) -> None:
        runtime = self.runtime
        try:
            record = await runtime.records.get(delivery.task_id)
            if record is None:
                await self.queue.ack(delivery.message_id)
                return
            if not record.status.final and record.deliveries >= runtime.settings.max_deliveries:
                reason = f"gave up after {record.deliveries} deliveries"
                await runtime.fail(delivery.task_id, reason)
                await self.queue.dead_letter(delivery, reason=reason)
                return
            log.info("took task %s (delivery %d)", delivery.task_id, record.deliveries + 1)
            started = time.monotonic()
            final = await runtime.execute(delivery.task_id)
            spent = final.spent
            log.info(
                "finished task %s: %s, spent %s tokens and $%s in %.1fs",
                delivery.task_id,
                final.status.value,
                f"{spent.tokens:,}" if spent else "0",
                spent.usd if spent else "0",
                time.monotonic() - started,
            )
            if final.status is Status.FAILED:
                # Failed on its last delivery: keep it in the dead letter for inspection.
                await self.queue.dead_letter(delivery, reason=final.error or "failed")
            else:
                await self.queue.ack(delivery.message_id)
        except asyncio.CancelledError:
            # Shutting down: the message stays pending for another worker.
            log.info("handed back task %s: stopping before it finished", delivery.task_id)
            raise
        except Exception:
            log.exception("task %s failed; it will be delivered again", delivery.task_id)
        finally:
            self._running.pop(delivery.message_id, None)

    async def _heartbeat(self) -> None:
        redis = self.runtime.ledger.redis
        while True:
            await self.queue.keep_alive(list(self._running))
            state = {"pid": os.getpid(), "running": len(self._running), "at_s": time.time()}
            await redis.hset(WORKERS, self.name, json.dumps(state))
            await asyncio.sleep(self.runtime.settings.heartbeat_s)

    async def _drain(self) -> None:
        if not self._running:
            return
        log.info("waiting up to %.0fs for %d running task(s)", self.grace_s, len(self._running))
        _, pending = await asyncio.wait(list(self._running.values()), timeout=self.grace_s)
        for task in pending:
            task.cancel()  # handed back: the message stays pending
        if pending:
            await asyncio.wait(pending, timeout=5)


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

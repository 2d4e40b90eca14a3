"""The task queue: a Redis Stream read by a consumer group, with takeover and a dead letter."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, cast

from redis import exceptions as rex
from redis.asyncio import Redis

from budgets.keys import DEAD_LETTER, QUEUE, WORKER_GROUP


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message of the stream handed to this consumer."""

    message_id: str
    task_id: str


def _deliveries(rows: Any) -> list[Delivery]:
    out = []
    for message_id, fields in cast("list[tuple[str, dict[str, str] | None]]", rows):
        if fields and "task_id" in fields:  # a deleted entry comes back without fields
            out.append(Delivery(message_id, fields["task_id"]))
    return out


class TaskQueue:
    """Submit, take, keep alive, acknowledge and dead-letter tasks."""

    def __init__(self, redis: Redis, *, consumer: str = "api") -> None:
        self.redis = redis
        self.consumer = consumer

    async def ensure_group(self) -> None:
        """Create the stream and the consumer group if they do not exist yet."""
        try:
            await self.redis.xgroup_create(QUEUE, WORKER_GROUP, id="0", mkstream=True)
        except rex.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def enqueue(self, task_id: str) -> str:
        """Put a task on the stream; returns the message id."""
        return cast("str", await self.redis.xadd(QUEUE, {"task_id": task_id}))

    async def take(self, *, count: int, block_ms: int) -> list[Delivery]:
        """New messages for this consumer, waiting up to ``block_ms`` for one."""
        reply = await self.redis.xreadgroup(
            WORKER_GROUP, self.consumer, {QUEUE: ">"}, count=count, block=block_ms
        )
        streams = cast("list[tuple[str, Any]]", reply)  # RESP2: [[stream, entries]]
        rows = streams[0][1] if streams else []
        return _deliveries(rows)

    async def take_over(self, *, idle_ms: int, count: int) -> list[Delivery]:
        """Messages another consumer took and went silent on for ``idle_ms`` (XAUTOCLAIM)."""
        reply = await self.redis.xautoclaim(
            QUEUE, WORKER_GROUP, self.consumer, min_idle_time=idle_ms, start_id="0-0", count=count
        )
        return _deliveries(reply[1])

    async def keep_alive(self, message_ids: list[str]) -> None:
        """Heartbeat: reset the idle time of messages this consumer is working on."""
        if message_ids:
            await self.redis.xclaim(
                QUEUE,
                WORKER_GROUP,
                self.consumer,
                min_idle_time=0,
                message_ids=cast(Any, message_ids),
                justid=True,
            )

    async def ack(self, message_id: str) -> None:
        """The task reached a final state: remove the message from the pending list."""
        await self.redis.xack(QUEUE, WORKER_GROUP, message_id)

    async def dead_letter(self, delivery: Delivery, *, reason: str) -> None:
        """Move a message that failed too often to the dead-letter stream."""
        await self.redis.xadd(
            DEAD_LETTER,
            {
                "task_id": delivery.task_id,
                "message_id": delivery.message_id,
                "reason": reason,
                "at_s": repr(time.time()),
            },
        )
        await self.ack(delivery.message_id)

    async def dead(self, *, count: int = 100) -> list[dict[str, str]]:
        """The newest dead-lettered tasks."""
        rows = await self.redis.xrevrange(DEAD_LETTER, count=count)
        return [fields for _, fields in cast("list[tuple[str, dict[str, str]]]", rows)]

"""The task queue: a Redis Stream read by a consumer group, with fenced takeover and trimming.

**A delivery is owned.** Its fencing token is the stream's own record of it,
the pending entry: which consumer holds the message and how many times it
has been delivered. Taking a message over (``XCLAIM``) moves it to the new
consumer and adds one to the count in the same atomic step, so the worker
that lost it holds a stale token from that moment on. The heartbeat, the
ownership check made before every paid step, and the acknowledgement all
compare the token first and change nothing when it is stale: a heartbeat
never claims back what another worker took.

**Nothing grows for ever.** An acknowledgement deletes the entry and trims
the stream below the oldest entry any consumer group still needs (pending,
or not delivered yet), so the stream holds what is in flight; the dead letter keeps the newest
:data:`DEAD_LETTER_MAX` entries; consumers silent for long with nothing
pending are forgotten.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, cast

from redis import exceptions as rex

from budgets.connection import Client
from budgets.keys import SHARED_SPACE, WORKER_GROUP, KeySpace

#: The dead letter keeps this many of the newest entries.
DEAD_LETTER_MAX = 10_000

# Shared by the scripts below: is stream id a older than b ("<ms>-<seq>")?
_OLDER = """
local function older(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am < bm or (am == bm and as < bs)
end
"""

# KEYS[1] the stream   ARGV[1] group   ARGV[2] consumer   ARGV[3] min idle (ms)
# ARGV[4] how many to take   ARGV[5..] message ids this consumer is running (left alone)
# Claims messages idle for ARGV[3] ms that are not running here: each claim
# adds one to the message's delivery count, the new holder's fencing token.
# returns {id, task_id, deliveries, id, task_id, deliveries, ...}; an entry
# whose message was deleted is dropped from the pending list and not returned
_TAKE_OVER = """
local running = {}
for i = 5, #ARGV do running[ARGV[i]] = true end
local want = tonumber(ARGV[4])
local rows = redis.call('XPENDING', KEYS[1], ARGV[1], 'IDLE', ARGV[3], '-', '+',
                        want + #ARGV - 4)
local out = {}
for _, row in ipairs(rows) do
  if #out >= 3 * want then break end
  local id = row[1]
  if not running[id] then
    local got = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], id)
    local entry = got[1]
    if entry and entry[2] then
      local task_id = false
      for i = 1, #entry[2], 2 do
        if entry[2][i] == 'task_id' then task_id = entry[2][i + 1] end
      end
      if task_id then
        table.insert(out, id)
        table.insert(out, task_id)
        table.insert(out, tonumber(row[4]) + 1)
      else
        redis.call('XACK', KEYS[1], ARGV[1], id)
      end
    elseif #got == 0 then
      redis.call('XACK', KEYS[1], ARGV[1], id)
    end
  end
end
return out
"""

# KEYS[1] the stream   ARGV[1] group   ARGV[2] consumer
# ARGV[3..] pairs: message id, delivery count (the fencing token)
# Resets the idle time of each message this consumer still holds under that
# token (XCLAIM JUSTID leaves the delivery count alone); touches no other.
# returns the ids whose token is stale: taken over, acknowledged or gone
_KEEP_ALIVE = """
local lost = {}
for i = 3, #ARGV, 2 do
  local id, token = ARGV[i], tonumber(ARGV[i + 1])
  local row = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)[1]
  if row and row[2] == ARGV[2] and tonumber(row[4]) == token then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'JUSTID')
  else
    table.insert(lost, id)
  end
end
return lost
"""

# KEYS[1] the stream   ARGV[1] group   ARGV[2] message id   ARGV[3] consumer
# ARGV[4] delivery count (the fencing token)
# Acknowledges the message if this consumer still holds it under that token
# and deletes it once no group needs it (XACKDEL, which Redis 7.0 lacks), then
# trims the stream below the oldest entry any group still needs (its oldest
# pending entry, else its last delivered one).
# returns 1 when acknowledged, 0 when the token is stale (nothing written)
_ACK = (
    _OLDER
    + """
local id = ARGV[2]
local row = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)[1]
if not row or row[2] ~= ARGV[3] or tonumber(row[4]) ~= tonumber(ARGV[4]) then
  return 0
end
redis.call('XACK', KEYS[1], ARGV[1], id)
local floor, done = false, true
for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local info = {}
  for i = 1, #group, 2 do info[group[i]] = group[i + 1] end
  local need = info['last-delivered-id']
  if older(need, id) or redis.call('XPENDING', KEYS[1], info['name'], id, id, 1)[1] then
    done = false
  end
  if tonumber(info['pending']) > 0 then
    local first = redis.call('XPENDING', KEYS[1], info['name'])[2]
    if older(first, need) then need = first end
  end
  if not floor or older(need, floor) then floor = need end
end
if done then redis.call('XDEL', KEYS[1], id) end
if floor then redis.call('XTRIM', KEYS[1], 'MINID', floor) end
return 1
"""
)

# KEYS[1] the stream   ARGV[1] group   ARGV[2] idle (ms)
# Deletes consumers idle for ARGV[2] ms with nothing pending (deleting one
# with pending entries would lose them, so those stay until taken over).
# returns how many were deleted
_FORGET = """
local n = 0
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local info = {}
  for i = 1, #c, 2 do info[c[i]] = c[i + 1] end
  if tonumber(info['pending']) == 0 and tonumber(info['idle']) >= tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    n = n + 1
  end
end
return n
"""


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message of the stream held by one consumer, with its fencing token.

    ``deliveries`` is the stream's delivery count when ``consumer`` took the
    message; any later takeover raises it, which is how a worker learns it
    no longer owns the task.
    """

    message_id: str
    task_id: str
    consumer: str
    deliveries: int = 1


class TaskQueue:
    """Submit, take, keep alive, acknowledge and dead-letter tasks."""

    def __init__(
        self,
        redis: Client,
        *,
        consumer: str = "api",
        dead_letter_max: int = DEAD_LETTER_MAX,
        space: KeySpace = SHARED_SPACE,
    ) -> None:
        self.redis = redis
        #: Whose queue: the shared one, or a fenced tenant's (``pm:<tenant>:queue``).
        self.space = space
        self._stream = space.queue
        self._dead = space.dead_letter
        self.consumer = consumer
        self.dead_letter_max = dead_letter_max
        self._take_over = redis.register_script(_TAKE_OVER)
        self._keep_alive = redis.register_script(_KEEP_ALIVE)
        self._ack = redis.register_script(_ACK)
        self._forget = redis.register_script(_FORGET)

    async def ensure_group(self) -> None:
        """Create the stream and the consumer group if they do not exist yet."""
        try:
            await self.redis.xgroup_create(self._stream, WORKER_GROUP, id="0", mkstream=True)
        except rex.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def enqueue(self, task_id: str) -> str:
        """Put a task on the stream; returns the message id."""
        return cast("str", await self.redis.xadd(self._stream, {"task_id": task_id}))

    async def take(self, *, count: int, block_ms: int) -> list[Delivery]:
        """New messages for this consumer, waiting up to ``block_ms`` for one."""
        reply = await self.redis.xreadgroup(
            WORKER_GROUP, self.consumer, {self._stream: ">"}, count=count, block=block_ms
        )
        streams = cast("list[tuple[str, Any]]", reply)  # RESP2: [[stream, entries]]
        rows = cast("list[tuple[str, dict[str, str] | None]]", streams[0][1] if streams else [])
        out = []
        for message_id, fields in rows:
            if fields and "task_id" in fields:
                out.append(Delivery(message_id, fields["task_id"], self.consumer, 1))
            else:  # not a task: nothing will ever run it
                await self.redis.xack(self._stream, WORKER_GROUP, message_id)
        return out

    async def take_over(
        self, *, idle_ms: int, count: int, running: list[str] | None = None
    ) -> list[Delivery]:
        """Messages silent for ``idle_ms`` (their worker died or was cut off), now this one's.

        ``running`` are the ids this consumer is working on; they are never
        taken again (a worker cut off from Redis would otherwise take its own
        running task a second time).
        """
        flat = await self._take_over(
            keys=[self._stream],
            args=[WORKER_GROUP, self.consumer, idle_ms, count, *(running or [])],
        )
        rows = cast("list[Any]", flat)
        return [
            Delivery(str(rows[i]), str(rows[i + 1]), self.consumer, int(rows[i + 2]))
            for i in range(0, len(rows), 3)
        ]

    async def keep_alive(self, held: list[Delivery]) -> list[Delivery]:
        """Heartbeat: reset the idle time of the deliveries still this consumer's.

        Returns those it no longer owns (another worker took them over, or they
        were acknowledged); they are left as they are.
        """
        if not held:
            return []
        args: list[str | int] = [WORKER_GROUP, self.consumer]
        for d in held:
            args.extend((d.message_id, d.deliveries))
        lost = {
            str(i)
            for i in cast("list[Any]", await self._keep_alive(keys=[self._stream], args=args))
        }
        return [d for d in held if d.message_id in lost]

    async def owns(self, delivery: Delivery) -> bool:
        """Whether ``delivery``'s consumer still holds it under its token (one ``XPENDING``)."""
        rows = await self.redis.xpending_range(
            self._stream, WORKER_GROUP, min=delivery.message_id, max=delivery.message_id, count=1
        )
        if not rows:
            return False
        row = rows[0]
        return bool(
            row["consumer"] == delivery.consumer
            and int(row["times_delivered"]) == delivery.deliveries
        )

    async def ack(self, delivery: Delivery) -> bool:
        """The task reached a final state: acknowledge it and trim what is done.

        ``False`` (and nothing changed) when the delivery was taken over: the
        new holder acknowledges it.
        """
        args: list[str | int] = [
            WORKER_GROUP,
            delivery.message_id,
            delivery.consumer,
            delivery.deliveries,
        ]
        return bool(await self._ack(keys=[self._stream], args=args))

    async def dead_letter(self, delivery: Delivery, *, reason: str) -> bool:
        """Move a message that failed too often to the dead letter (if still ours)."""
        if not await self.owns(delivery):
            return False
        await self.redis.xadd(
            self._dead,
            {
                "task_id": delivery.task_id,
                "message_id": delivery.message_id,
                "reason": reason,
                "at_s": repr(time.time()),
            },
            maxlen=self.dead_letter_max,
            approximate=False,
        )
        return await self.ack(delivery)

    async def dead(self, *, count: int = 100) -> list[dict[str, str]]:
        """The newest dead-lettered tasks."""
        rows = await self.redis.xrevrange(self._dead, count=count)
        return [fields for _, fields in cast("list[tuple[str, dict[str, str]]]", rows)]

    async def forget_consumers(self, *, idle_ms: int) -> int:
        """Delete consumers silent for ``idle_ms`` that hold nothing; how many went."""
        return int(await self._forget(keys=[self._stream], args=[WORKER_GROUP, idle_ms]))

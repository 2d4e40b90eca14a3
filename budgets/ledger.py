"""The Redis ledger: what a task may spend, reserved before each call and settled after.

Each operation is one atomic, idempotent Lua script (see ``budgets/lua/`` and
``docs/ledger.md``). This module turns Python calls into script calls and
script replies into values; ``budgets/replies.py`` turns refusals into typed
errors, ``budgets/keys.py`` builds every key, op id and marker, and
``budgets/tenants.py`` keeps the tenant's side of each task's funding.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from budgets._admission import Admissions
from budgets._runner import SEP, ScriptRunner
from budgets.connection import Client, redis_client
from budgets.errors import (
    InvalidAmount,
    InvalidTransfer,
    LedgerError,
    UnknownAccount,
    UnknownReservation,
    UnknownTask,
)
from budgets.keys import (
    ROOT,
    SHARED_SPACE,
    KeySpace,
    TaskKeys,
    check_op_id,
    check_path,
    check_task_id,
    check_tenant,
    close_marker,
    kept_marker,
    new_incarnation,
    new_op_id,
    open_marker,
    open_op_id,
    open_task_op_id,
    parent_of,
    transfer_marker,
)
from budgets.money import UNLIMITED, Amount, Budget, check_nanos, check_tokens
from budgets.replies import Context, check, error_of
from budgets.scripts import Op
from budgets.tenants import (
    FUNDING_GRACE_S,
    TENANT_EVENTS_MAX,
    Period,
    TenantBooks,
    TenantView,
)
from budgets.tree import (
    AccountView,
    LedgerEvent,
    ReservationRecord,
    ReservationState,
    ReservationView,
    TaskTree,
    account_from_hash,
    assemble,
    parse_tags,
    reservation_from_record,
)

log = logging.getLogger(__name__)

Tags = Mapping[str, str]

#: The longest a reserve may wait for held money, in seconds.
MAX_WAIT_S = 3600.0
# Separates the events of one stream entry written by one script call (see _prelude.lua).
_EVENT_SEP = "\x1e"
# Operations after which this process's waiters of the task look at once.
_SETTLING = frozenset({Op.COMMIT, Op.RELEASE, Op.WITHDRAW, Op.TRANSFER, Op.CLOSE, Op.REAP})

__all__ = [
    "Closed",
    "Ledger",
    "Period",
    "Reservation",
    "Settlement",
    "TenantView",
]


@dataclass(frozen=True, slots=True)
class Reservation:
    """A hold on an account for one call; commit or release it by ``id``."""

    task_id: str
    account: str
    id: str
    tokens: int
    nanos: int
    deadline_ms: int


@dataclass(frozen=True, slots=True)
class Settlement:
    """What a commit recorded: the spend, any overrun, and how it was known."""

    account: str
    tokens: int
    nanos: int
    overrun_tokens: int
    overrun_nanos: int
    late: bool
    estimated: bool


@dataclass(frozen=True, slots=True)
class Closed:
    """What closing an account returned to its parent (``None`` where unlimited) and spent."""

    returned_tokens: int | None
    returned_nanos: int | None
    spent_tokens: int
    spent_nanos: int


async def _members(redis: Client, key: str) -> set[str]:
    # The client is built with decode_responses=True: replies are str.
    return cast("set[str]", await redis.smembers(key))


async def _hash(redis: Client, key: str) -> dict[str, str]:
    return cast("dict[str, str]", await redis.hgetall(key))


def _limit(value: int | None) -> int:
    return UNLIMITED if value is None else value


def _tags(tags: Tags | None) -> str:
    if not tags:
        return ""
    return json.dumps({str(k): str(v) for k, v in tags.items()}, sort_keys=True)


class Ledger:
    """Hierarchical budgets of tasks in Redis.

    Build one per process (``Ledger.from_url``) and share it: concurrent
    operations are batched into one pipeline per round trip. All methods are
    coroutines; a refused operation raises and changes nothing.
    """

    def __init__(
        self,
        redis: Client,
        *,
        url: str = "redis://",
        batch: bool = True,
        lease_s: float = 120.0,
        tenant_events_max: int = TENANT_EVENTS_MAX,
        functions: bool = True,
        space: KeySpace = SHARED_SPACE,
    ) -> None:
        self.redis = redis
        #: Where this ledger's keys live (``pm:``, or ``pm:<tenant>:`` when fenced).
        self.space = space
        # A task's keys, built once per task (the hot path asks for them on every call).
        self._task_keys = functools.lru_cache(maxsize=4096)(space.task)
        # functions: the task script as a Redis Function (FCALL) where the server
        # has them (7.0+), else by EVALSHA; False always uses EVALSHA.
        self._runner = ScriptRunner(redis, url=url, batch=batch, functions=functions)
        self._lease_ms = self._lease(lease_s)
        self._tenants = TenantBooks(redis, self._runner, events_max=tenant_events_max, space=space)
        self._admissions = Admissions(redis, space=space)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        batch: bool = True,
        lease_s: float = 120.0,
        tenant_events_max: int = TENANT_EVENTS_MAX,
        space: KeySpace = SHARED_SPACE,
    ) -> Ledger:
        """A ledger on the Redis at ``url`` (``redis://[user:password@]host:port/db``, or
        any node of a Redis Cluster)."""
        redis = redis_client(url)
        return cls(
            redis,
            url=url,
            batch=batch,
            lease_s=lease_s,
            tenant_events_max=tenant_events_max,
            space=space,
        )

    @property
    def url(self) -> str:
        """The Redis URL without credentials."""
        return self._runner.url

    async def aclose(self) -> None:
        """Close the Redis connections."""
        await self._runner.aclose()
        await self.redis.aclose()

    async def ping(self) -> None:
        """Raise :class:`~budgets.errors.LedgerUnavailable` unless Redis answers."""
        await self._runner.ping()

    @staticmethod
    def _lease(lease_s: float) -> int:
        if not isinstance(lease_s, int | float) or not 0 < lease_s <= 86_400:
            raise InvalidAmount("lease_s", lease_s, "must be between 0 and 86400 seconds")
        return max(1, int(lease_s * 1000))

    async def _run(
        self,
        op: Op,
        task_id: str,
        accounts: Sequence[str],
        args: Sequence[str | int],
        ctx: Context | None = None,
        *,
        reservation_id: str = "",
    ) -> list[Any]:
        """Run one operation of the task script; its reply, or the error its refusal means.

        The error names ``ctx``'s ids, or the task's and ``reservation_id``
        (built only for a refusal: most replies are ``ok``).
        """
        reply = await self._runner.task_op(self._task_keys(task_id), op, accounts, args)
        if op in _SETTLING:
            self._admissions.settled(task_id)
        if reply[0] == "ok":
            return reply
        raise error_of(op, reply, ctx or Context(task_id=task_id, reservation_id=reservation_id))

    def _close_args(
        self, path: str, force: bool, result: tuple[str, str] | None = None
    ) -> tuple[list[str], list[str | int]]:
        """The accounts and arguments of one ``close`` (see close.lua)."""
        parent = parent_of(path)
        accounts = [path] if parent is None else [path, parent]
        work, text = ("", "") if result is None else (check_op_id(result[0], "work id"), result[1])
        if SEP in text or _EVENT_SEP in text:
            raise InvalidAmount("result", result, "the text must not hold U+001E or U+001F")
        return accounts, [path, "1" if force else "0", close_marker(path), work, text]

    # -- tasks and accounts ---------------------------------------------------

    async def open_task(
        self, task_id: str, budget: Budget, *, tenant: str | None = None, op_id: str | None = None
    ) -> None:
        """Create a task's root account with ``budget``.

        With ``tenant``, the budget is first taken out of the tenant's current
        period (refused with :class:`BudgetExceeded` if it cannot pay) and goes
        back when the task closes. Retrying with the same ``op_id`` (or, by
        default, the same arguments) is safe at any point: nothing is funded twice.
        A task id reused after its keys expired is a new task, funded afresh.
        """
        check_task_id(task_id)
        if tenant is not None:
            check_tenant(tenant)
        lt, ln = _limit(budget.tokens), _limit(budget.nanos)
        if op_id is None:
            op_id = open_task_op_id(tokens=lt, nanos=ln, tenant=tenant or "")
        else:
            check_op_id(op_id)
        ctx = Context(task_id=task_id, op_id=op_id, tenant=tenant or "")
        incarnation, period = new_incarnation(), ""
        if tenant is not None:
            # The saga: claim the id for one incarnation, fund that incarnation,
            # open it. A retry finds the claim and funds the same incarnation.
            claim: list[str | int] = [op_id, incarnation, lt, ln, tenant, task_id]
            status, incarnation = (await self._run(Op.CLAIM, task_id, [], claim, ctx))[1:3]
            if status != "claimed":
                if status == "open":
                    await self.redis.sadd(self.space.open_tasks, task_id)
                return
            try:
                period = await self._tenants.fund(tenant, task_id, incarnation, budget)
            except LedgerError:
                await self._run(Op.UNCLAIM, task_id, [], [incarnation])
                raise
        args: list[str | int] = [op_id, incarnation, lt, ln, tenant or "", period, task_id]
        try:
            reply = await self._run(Op.OPEN_TASK, task_id, [ROOT], args, ctx)
        except LedgerError:
            if tenant is not None:
                await self._tenants.settle(tenant, task_id, incarnation, mode="undo")
            raise
        if reply[3] == "open":
            await self.redis.sadd(self.space.open_tasks, task_id)

    async def open_account(
        self,
        task_id: str,
        path: str,
        budget: Budget,
        *,
        op_id: str | None = None,
        tags: Tags | None = None,
    ) -> Budget:
        """Carve a child account at ``path`` out of its parent's available budget.

        Returns what the parent has left. A child may be unlimited only in a unit
        its parent does not limit.
        """
        reply = await self._open(task_id, path, budget.tokens, budget.nanos, op_id, tags)
        return _budget(reply[1], reply[2])

    async def carve(
        self,
        task_id: str,
        path: str,
        *,
        tokens: int | None,
        nanos: int | None,
        op_id: str | None = None,
        tags: Tags | None = None,
    ) -> None:
        """:meth:`open_account` with the limit in the ledger's own integers (``None``:
        unlimited), for callers that hold them so: no :class:`Budget` is built."""
        if tokens is not None:
            check_tokens(tokens)
        if nanos is not None:
            check_nanos(nanos)
        await self._open(task_id, path, tokens, nanos, op_id, tags)

    async def _open(
        self,
        task_id: str,
        path: str,
        tokens: int | None,
        nanos: int | None,
        op_id: str | None,
        tags: Tags | None,
    ) -> list[Any]:
        check_task_id(task_id)
        check_path(path)
        parent = parent_of(path)
        if parent is None:
            raise InvalidAmount("path", path, "the root is opened with open_task()")
        op_id = check_op_id(op_id) if op_id is not None else open_op_id(path)
        return await self._run(
            Op.OPEN,
            task_id,
            [parent, path],
            [open_marker(op_id), parent, path, _limit(tokens), _limit(nanos), _tags(tags), op_id],
            Context(task_id=task_id, op_id=op_id),
        )

    async def reserve(
        self,
        task_id: str,
        account: str,
        *,
        tokens: int,
        nanos: int,
        lease_s: float | None = None,
        reservation_id: str | None = None,
        tags: Tags | None = None,
        wait_s: float = 0.0,
    ) -> Reservation:
        """Hold ``tokens`` and ``nanos`` on ``account`` for one call.

        Raises :class:`BudgetExceeded` when the account cannot cover either.
        With ``wait_s`` > 0, an ask that cannot be covered only because other
        calls' holds are in flight waits up to ``wait_s`` seconds for them to
        settle, in line behind earlier waiters of the account; one the account
        could not cover even if every hold came back unspent is refused at once.
        The hold expires after ``lease_s`` (default: the ledger's) if it is
        neither committed nor released. A cancelled waiter leaves nothing held.
        """
        check_task_id(task_id)
        check_path(account)
        check_tokens(tokens)
        check_nanos(nanos)
        lease_ms = self._lease_ms if lease_s is None else self._lease(lease_s)
        wait_ms = self._wait_ms(wait_s)
        rid = check_op_id(reservation_id, "reservation id") if reservation_id else new_op_id()
        until = time.monotonic() + wait_ms / 1000
        while True:
            reply = await self._run(
                Op.RESERVE,
                task_id,
                [],
                [account, rid, tokens, nanos, lease_ms, _tags(tags), wait_ms],
                reservation_id=rid,
            )
            deadline_ms: int | None = int(reply[1])
            if reply[2] == "waiting":
                deadline_ms = await self._await_grant(task_id, rid, until=until)
            if deadline_ms is not None:
                return Reservation(
                    task_id=task_id,
                    account=account,
                    id=rid,
                    tokens=tokens,
                    nanos=nanos,
                    deadline_ms=deadline_ms,
                )
            # The wait ended without a hold (the money is spent, or its deadline
            # passed in Redis first): ask afresh with whatever wait is left.
            wait_ms = max(0, math.floor((until - time.monotonic()) * 1000))

    async def _await_grant(self, task_id: str, rid: str, *, until: float) -> int | None:
        """The lease deadline of a waiting reservation once granted; ``None`` if it ended.

        At ``until`` the wait is withdrawn (a grant that came first is kept); a
        cancelled waiter is withdrawn and any hold it was granted released.
        """
        try:
            return await self._admissions.wait(task_id, rid, timeout_s=until - time.monotonic())
        except TimeoutError:
            reply = await self._run(Op.WITHDRAW, task_id, [], [rid, "deadline"])
            return int(reply[2]) if reply[1] == "held" else None
        except asyncio.CancelledError:
            await asyncio.shield(self._cancel_wait(task_id, rid))
            raise

    async def _cancel_wait(self, task_id: str, rid: str) -> None:
        reply = await self._run(Op.WITHDRAW, task_id, [], [rid, "cancelled"])
        if reply[1] == "held":
            await self.release(task_id, rid, reason="cancelled while waiting")

    @staticmethod
    def _wait_ms(wait_s: float) -> int:
        ok = isinstance(wait_s, int | float) and not isinstance(wait_s, bool)
        if not ok or not 0 <= wait_s <= MAX_WAIT_S:
            raise InvalidAmount("wait_s", wait_s, f"must be between 0 and {MAX_WAIT_S} seconds")
        return math.ceil(wait_s * 1000)

    async def commit(
        self,
        task_id: str,
        reservation_id: str,
        *,
        used: Amount | None,
        tags: Tags | None = None,
        keep: tuple[str, str] | None = None,
    ) -> Settlement:
        """Record what a call really used; ``used=None`` charges the whole reservation.

        A retry returns the first answer and changes nothing. A commit after the
        lease expired is still recorded, flagged ``late``; after the task was
        closed, its spend still reaches the task's tenant. ``keep=(name, text)``
        stores ``text`` (the call's reply) in the same atomic step, readable with
        :meth:`kept`: what was paid for is never lost to a crash after the commit.
        The first text kept under a name stays.
        """
        check_task_id(task_id)
        check_op_id(reservation_id, "reservation id")
        tokens, nanos = (-1, -1) if used is None else (used.tokens, used.nanos)
        marker, text = ("", "") if keep is None else (kept_marker(keep[0]), keep[1])
        if SEP in text or _EVENT_SEP in text:
            raise InvalidAmount("keep", keep, "the text must not hold U+001E or U+001F")
        reply = await self._run(
            Op.COMMIT,
            task_id,
            [],
            [reservation_id, tokens, nanos, _tags(tags), marker, text],
            reservation_id=reservation_id,
        )
        tenant, incarnation = str(reply[8]), str(reply[9])
        if tenant:
            # Late, after the task's close settled its tenant: report the root's
            # spend now (a total, so a repeat counts nothing twice).
            spent = (int(reply[10]), int(reply[11]))
            await self._tenants.settle(tenant, task_id, incarnation, mode="spend", spent=spent)
        return Settlement(
            account=str(reply[1]),
            tokens=int(reply[2]),
            nanos=int(reply[3]),
            overrun_tokens=int(reply[4]),
            overrun_nanos=int(reply[5]),
            late=bool(reply[6]),
            estimated=bool(reply[7]),
        )

    async def kept(self, task_id: str, name: str) -> str | None:
        """The reply a commit kept under ``name`` (see :meth:`commit`), or ``None``."""
        check_task_id(task_id)
        value = await self.redis.hget(self.space.task(task_id).ops, kept_marker(name))
        return None if value is None else str(value)

    async def release(self, task_id: str, reservation_id: str, *, reason: str = "") -> bool:
        """Drop a reservation unspent. Returns ``True`` if its lease had already run out.

        After an expiry the hold is already gone, so nothing changes and a late
        commit stays possible: money a provider did bill is never refused.
        """
        check_task_id(task_id)
        check_op_id(reservation_id, "reservation id")
        reply = await self._run(
            Op.RELEASE,
            task_id,
            [],
            [reservation_id, _free_text(reason[:200])],
            reservation_id=reservation_id,
        )
        return bool(reply[4])

    async def transfer(
        self,
        task_id: str,
        *,
        src: str,
        dst: str,
        amount: Amount | None,
        op_id: str | None = None,
    ) -> tuple[Budget, Budget]:
        """Move unallocated budget from ``src`` to ``dst``; returns both accounts' availability.

        ``src`` and ``dst`` must be parent and child, or siblings (the money then
        passes through their parent in the same atomic step). ``amount=None`` moves
        all ``src`` has available in each unit it limits, read and moved in one step
        (nothing at all, and no event, when it has none).
        """
        check_task_id(task_id)
        check_path(src)
        check_path(dst)
        if amount is not None and amount.tokens == 0 and amount.nanos == 0:
            raise InvalidAmount("amount", amount, "transfer something")
        if parent_of(dst) == src:
            direction, mid = "down", src
        elif parent_of(src) == dst:
            direction, mid = "up", dst
        elif parent_of(src) is not None and parent_of(src) == parent_of(dst) and src != dst:
            direction, mid = "across", parent_of(src) or ROOT
        else:
            raise InvalidTransfer(task_id, src, dst, "they are not parent and child or siblings")
        op_id = check_op_id(op_id) if op_id is not None else new_op_id()
        reply = await self._run(
            Op.TRANSFER,
            task_id,
            [src, dst, mid],
            [
                transfer_marker(op_id),
                src,
                dst,
                "all" if amount is None else amount.tokens,
                "all" if amount is None else amount.nanos,
                direction,
                op_id,
            ],
            Context(task_id=task_id, op_id=op_id),
        )
        return _budget(reply[1], reply[2]), _budget(reply[3], reply[4])

    async def close_account(
        self,
        task_id: str,
        path: str,
        *,
        force: bool = False,
        result: tuple[str, str] | None = None,
    ) -> Closed:
        """Return what ``path`` did not spend to its parent and seal it.

        Refused with :class:`AccountBusy` while it has open children, or open
        reservations unless ``force`` (which expires them: a call still in
        flight may commit late and is still charged). ``result=(work_id, text)``
        saves ``text`` in the task's results hash (``TaskKeys.results``) under
        ``work_id`` in the same atomic step, when the close succeeds or repeats:
        the try's account is never closed without its result kept.
        """
        check_task_id(task_id)
        check_path(path)
        accounts, args = self._close_args(path, force, result)
        return _closed(await self._run(Op.CLOSE, task_id, accounts, args))

    async def close_accounts(
        self, task_id: str, paths: Sequence[str], *, force: bool = False
    ) -> list[Closed]:
        """Close several accounts in one call, in the order given (children before parents).

        Each close is atomic and as :meth:`close_account`'s; the first refusal among them is
        raised, and the closes before and after it have still run.
        """
        check_task_id(task_id)
        for path in paths:
            check_path(path)
        ops = [(Op.CLOSE, *self._close_args(p, force)) for p in paths]
        return [_closed(r) for r in await self._closes(task_id, ops, len(ops))]

    async def _closes(
        self, task_id: str, ops: Sequence[tuple[Op, Sequence[str], Sequence[str | int]]], n: int
    ) -> list[list[Any]]:
        """Run ``ops`` in one call; the replies of the first ``n`` (closes), each checked."""
        replies = await self._runner.task_ops(self._task_keys(task_id), ops)
        self._admissions.settled(task_id)
        ctx = Context(task_id=task_id)
        return [check(Op.CLOSE.value, r, ctx) for r in replies[:n]]

    async def close_task(
        self, task_id: str, *, force: bool = False, retention_s: int | None = None
    ) -> Closed:
        """Close every open account of the task, deepest first, then the root.

        The root's leftover goes back to the tenant, if the task had one, and its
        spend counts for the tenant. Safe to call again after a crash part way
        through; each call reports the task's spend as it is then. A task only
        claimed (its open never completed) is given up: any funding goes back,
        and :class:`UnknownTask` is raised. With ``retention_s``, the task's keys
        are then given that retention, as :meth:`expire_task` does.
        """
        check_task_id(task_id)
        keys = self.space.task(task_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(keys.meta)
        pipe.smembers(keys.accounts)
        meta, paths = cast("tuple[dict[str, str], set[str]]", tuple(await pipe.execute()))
        if not meta:
            raise UnknownTask(task_id)
        tenant, incarnation = meta.get("tenant") or "", meta.get("inc") or ""
        if meta.get("status") == "claimed":
            await self._tenants.settle(tenant, task_id, incarnation, mode="undo")
            await self._run(Op.UNCLAIM, task_id, [], [incarnation])
            raise UnknownTask(task_id)
        # Deepest first, then the root, in one script call that runs them in that order
        # (a closed account answers its first reply again); with a retention, the keys
        # are given it in the same call.
        order = sorted((p for p in paths if p != ROOT), key=lambda p: (-p.count("/"), p))
        order.append(ROOT)
        ops: list[tuple[Op, Sequence[str], Sequence[str | int]]]
        ops = [(Op.CLOSE, *self._close_args(p, force)) for p in order]
        if retention_s is not None:
            ops.append((Op.EXPIRE, [], [_retention(retention_s)]))
        closed = _closed((await self._closes(task_id, ops, len(order)))[-1])
        if tenant and incarnation:
            # The root's spend now, late commits included, not the first close's.
            root = await _hash(self.redis, keys.account(ROOT))
            spent = (
                int(root["st"]) + int(root["ct"]),
                int(root["sn"]) + int(root["cn"]),
            )
            await self._tenants.settle(tenant, task_id, incarnation, mode="close", spent=spent)
        elif tenant:
            log.warning("task %s has no incarnation; its tenant %s is not settled", task_id, tenant)
        if retention_s is None:
            await self.redis.srem(self.space.open_tasks, task_id)
        else:
            await self._expire_rest(keys, meta, retention_s, closed=True)
        return closed

    async def expire_task(self, task_id: str, *, retention_s: int) -> None:
        """Let Redis delete a closed task's keys after ``retention_s`` seconds.

        The tenant's record of the task's funding expires a day later, so late
        spend reported while the task's keys exist still finds it.
        """
        check_task_id(task_id)
        keys = self.space.task(task_id)
        meta = await _hash(self.redis, keys.meta)
        await self._run(Op.EXPIRE, task_id, [], [_retention(retention_s)])
        await self._expire_rest(keys, meta, retention_s)

    async def _expire_rest(
        self, keys: TaskKeys, meta: Mapping[str, str], retention_s: int, *, closed: bool = False
    ) -> None:
        """What the task script cannot reach: the tenant's funding record of the task (on
        the tenant's slot) gets ``retention_s`` and a grace; with ``closed``, the task
        leaves the set of open tasks."""
        task_id = keys.task_id
        tenant, incarnation = meta.get("tenant") or "", meta.get("inc") or ""
        funded = bool(tenant and incarnation)
        if not funded and not closed:
            return
        pipe = self.redis.pipeline(transaction=False)
        if closed:
            pipe.srem(self.space.open_tasks, task_id)
        if funded:
            funding = self.space.tenant_keys(tenant).funding(task_id, incarnation)
            pipe.expire(funding, retention_s + FUNDING_GRACE_S)
        await pipe.execute()

    async def reap(self, task_id: str, *, batch: int = 256) -> int:
        """Release every reservation of the task whose lease ran out; returns how many."""
        check_task_id(task_id)
        total = 0
        while True:
            reply = await self._run(Op.REAP, task_id, [], [batch])
            total += int(reply[1])
            if int(reply[1]) < batch:
                return total

    async def reap_all(self) -> int:
        """Reap every open task; what a periodic reaper calls."""
        tasks = await _members(self.redis, self.space.open_tasks)
        total = 0
        for task_id in tasks:
            total += await self.reap(task_id)
        return total

    # -- reading ---------------------------------------------------------------

    async def snapshot(self, task_id: str) -> TaskTree:
        """The task's account tree with open reservations, in one round trip after the index."""
        check_task_id(task_id)
        keys = self.space.task(task_id)
        paths = await _members(self.redis, keys.accounts)
        if not paths:
            raise UnknownTask(task_id)
        ordered = sorted(paths)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hgetall(keys.meta)
        pipe.hgetall(keys.reservations)
        for path in ordered:
            pipe.hgetall(keys.account(path))
        meta, raw_res, *hashes = cast("list[dict[str, str]]", await pipe.execute())
        holds: dict[str, list[ReservationView]] = {}
        for rid, packed in sorted(raw_res.items()):
            record = reservation_from_record(rid, packed)
            if record.state is ReservationState.HELD:
                holds.setdefault(record.account, []).append(record.view())
        flat = {
            path: account_from_hash(path, fields, holds.get(path, []))
            for path, fields in zip(ordered, hashes, strict=True)
        }
        return TaskTree(
            task_id=task_id,
            tenant=meta.get("tenant") or None,
            status=meta.get("status", "unknown"),
            created_ms=int(meta.get("created_ms", 0)),
            root=assemble(flat),
        )

    async def account(self, task_id: str, path: str) -> AccountView:
        """One account (without children), read directly."""
        check_task_id(task_id)
        check_path(path)
        fields = await _hash(self.redis, self.space.task(task_id).account(path))
        if not fields:
            raise UnknownAccount(task_id, path)
        return account_from_hash(path, fields, [])

    async def reservation(self, task_id: str, reservation_id: str) -> ReservationRecord:
        """A reservation's one record, in whatever state it is."""
        check_task_id(task_id)
        check_op_id(reservation_id, "reservation id")
        packed = await self.redis.hget(self.space.task(task_id).reservations, reservation_id)
        if packed is None:
            raise UnknownReservation(task_id, reservation_id)
        return reservation_from_record(reservation_id, cast(str, packed))

    async def events(
        self, task_id: str, *, after: str = "-", count: int | None = None
    ) -> list[LedgerEvent]:
        """The task's audit events, oldest first, strictly after event id ``after``.

        One script call that made several events wrote them in one stream entry;
        they come out one by one, with ids ``<entry id>.<index>``, and ``after``
        may be either kind of id.
        """
        check_task_id(task_id)
        skip_in, skip_upto = "", -1
        if after == "-":
            start = "-"
        elif "." in after:
            skip_in, _, index = after.partition(".")
            skip_upto, start = int(index), skip_in
        else:
            start = f"({after}"
        # The entry of ``after`` is read again, so one more keeps ``count`` events.
        entries = None if count is None else count + (1 if skip_in else 0)
        rows = await self.redis.xrange(self.space.task(task_id).events, min=start, count=entries)
        out: list[LedgerEvent] = []
        for eid, fields in cast("list[tuple[str, dict[str, str]]]", rows):
            if fields.get("op") != "batch":
                if eid != skip_in:
                    out.append(_event(eid, fields))
                continue
            for i, packed in enumerate(fields.get("events", "").split(_EVENT_SEP)):
                if eid == skip_in and i <= skip_upto:
                    continue
                parts = packed.split(SEP)
                out.append(_event(f"{eid}.{i}", dict(zip(parts[::2], parts[1::2], strict=True))))
        return out if count is None else out[:count]

    async def note(
        self, task_id: str, account: str, text: str, *, tags: Mapping[str, str] | None = None
    ) -> str:
        """Append a note (op ``note``, no money moved) to the task's audit stream.

        For what the books alone do not say: how a plan was made, why a step was
        skipped. ``text`` is cut at 500 characters. Returns the stream id.
        """
        check_task_id(task_id)
        check_path(account)
        fields = {"op": "note", "acct": account, "t": 0, "n": 0, "id": "", "text": text[:500]}
        if tags:
            fields["tags"] = json.dumps(dict(tags), sort_keys=True)
        eid = await self.redis.xadd(self.space.task(task_id).events, cast(Any, fields))
        return str(eid)

    # -- tenants ---------------------------------------------------------------

    async def set_tenant(self, name: str, budget: Budget, *, period: Period = "month") -> None:
        """Create or update a tenant: ``budget`` per ``period`` (day, month, or none)."""
        await self._tenants.set(name, budget, period=period)

    async def tenants(self) -> list[str]:
        """Every configured tenant's name, sorted."""
        return await self._tenants.names()

    async def tenant(self, name: str, *, period_id: str | None = None) -> TenantView:
        """A tenant's limits and one period's use (default: the latest funded period)."""
        return await self._tenants.view(name, period_id=period_id)


def _free_text(text: str) -> str:
    """Audit text safe to travel in an operation's fields (no separator characters)."""
    return text.replace(SEP, " ").replace(_EVENT_SEP, " ")


def _retention(retention_s: int) -> int:
    if type(retention_s) is not int or retention_s < 1:
        raise InvalidAmount("retention_s", retention_s, "must be a whole number of seconds, >= 1")
    return retention_s


def _closed(reply: Sequence[Any]) -> Closed:
    return Closed(
        returned_tokens=_opt(reply[1]),
        returned_nanos=_opt(reply[2]),
        spent_tokens=int(reply[3]),
        spent_nanos=int(reply[4]),
    )


def _opt(value: Any) -> int | None:
    number = int(value)
    return None if number == UNLIMITED else number


def _budget(tokens: Any, nanos: Any) -> Budget:
    return Budget.from_nanos(tokens=_opt(tokens), nanos=_opt(nanos))


def _event(eid: str, fields: Mapping[str, str]) -> LedgerEvent:
    known = {"op", "acct", "t", "n", "id", "tags"}
    return LedgerEvent(
        id=eid,
        op=fields.get("op", ""),
        account=fields.get("acct", ""),
        tokens=int(fields.get("t") or 0),
        nanos=int(fields.get("n") or 0),
        op_id=fields.get("id", ""),
        tags=parse_tags(fields.get("tags")),
        extra={k: v for k, v in fields.items() if k not in known},
    )

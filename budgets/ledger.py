"""The Redis ledger: what a task may spend, reserved before each call and settled after.

Each operation is one atomic, idempotent Lua script (see ``budgets/lua/`` and
``docs/ledger.md``). This module turns Python calls into script calls and
script replies into values or typed errors.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

from redis.asyncio import Redis

from budgets._runner import ScriptRunner
from budgets.errors import (
    AccountBusy,
    AccountClosed,
    AccountExists,
    BudgetExceeded,
    InvalidAmount,
    InvalidTransfer,
    LedgerError,
    OperationConflict,
    ReservationSettled,
    TaskExists,
    UnknownAccount,
    UnknownReservation,
    UnknownTask,
    UnknownTenant,
    UnlimitedChild,
)
from budgets.keys import (
    OPEN_TASKS,
    ROOT,
    TENANTS,
    TaskKeys,
    TenantKeys,
    check_name,
    check_path,
    parent_of,
)
from budgets.money import UNLIMITED, Amount, Budget, check_nanos, check_tokens
from budgets.scripts import Op, TenantOp
from budgets.tree import (
    AccountView,
    LedgerEvent,
    ReservationView,
    TaskTree,
    account_from_hash,
    assemble,
    parse_tags,
)

Period = Literal["day", "month", "none"]
Tags = Mapping[str, str]


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


@dataclass(frozen=True, slots=True)
class TenantView:
    """A tenant's limits and what its current period has handed out and spent."""

    name: str
    period: Period
    period_id: str
    limit: Budget
    funded_tokens: int
    funded_nanos: int
    spent_tokens: int
    spent_nanos: int


async def _members(redis: Redis, key: str) -> set[str]:
    # The client is built with decode_responses=True: replies are str.
    return cast("set[str]", await redis.smembers(key))


async def _hash(redis: Redis, key: str) -> dict[str, str]:
    return cast("dict[str, str]", await redis.hgetall(key))


def _limit(value: int | None) -> int:
    return UNLIMITED if value is None else value


def _tags(tags: Tags | None) -> str:
    if not tags:
        return ""
    return json.dumps({str(k): str(v) for k, v in tags.items()}, sort_keys=True)


def _new_id() -> str:
    return uuid.uuid4().hex


class Ledger:
    """Hierarchical budgets of tasks in Redis.

    Build one per process (``Ledger.from_url``) and share it: concurrent
    operations are batched into one pipeline per round trip. All methods are
    coroutines; a refused operation raises and changes nothing.
    """

    def __init__(
        self, redis: Redis, *, url: str = "redis://", batch: bool = True, lease_s: float = 120.0
    ) -> None:
        self.redis = redis
        self._runner = ScriptRunner(redis, url=url, batch=batch)
        self._lease_ms = self._lease(lease_s)

    @classmethod
    def from_url(cls, url: str, *, batch: bool = True, lease_s: float = 120.0) -> Ledger:
        """A ledger on the Redis at ``url`` (``redis://host:port/db``)."""
        redis = Redis.from_url(url, decode_responses=True)
        return cls(redis, url=url, batch=batch, lease_s=lease_s)

    @property
    def url(self) -> str:
        """The Redis URL without credentials."""
        return self._runner.url

    async def aclose(self) -> None:
        """Close the Redis connections."""
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
        self, op: Op, keys: TaskKeys, accounts: Sequence[str], args: Sequence[str | int]
    ) -> list[Any]:
        return await self._runner.task_op(keys, op, accounts, args)

    # -- tasks and accounts ---------------------------------------------------

    async def open_task(
        self, task_id: str, budget: Budget, *, tenant: str | None = None, op_id: str | None = None
    ) -> None:
        """Create a task's root account with ``budget``.

        With ``tenant``, the budget is first taken out of the tenant's current
        period (refused with :class:`BudgetExceeded` if it cannot pay) and goes
        back when the task closes. Retrying with the same ``op_id`` is safe.
        """
        check_name("task id", task_id)
        op_id = check_name("op id", op_id) if op_id is not None else _new_id()
        keys = TaskKeys(task_id)
        period = ""
        if tenant is not None:
            period = await self._fund(tenant, task_id, budget, op_id=op_id)
        reply = await self._run(
            Op.OPEN_TASK,
            keys,
            [ROOT],
            [op_id, _limit(budget.tokens), _limit(budget.nanos), tenant or "", period, task_id],
        )
        if reply[0] == "err":
            if tenant is not None:
                await self._settle(tenant, task_id, period, budget, (0, 0), op_id=f"undo:{op_id}")
            self._raise(reply, task_id=task_id, account=ROOT, op_id=op_id)
        await self.redis.sadd(OPEN_TASKS, task_id)

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
        check_name("task id", task_id)
        check_path(path)
        parent = parent_of(path)
        if parent is None:
            raise InvalidAmount("path", path, "the root is opened with open_task()")
        op_id = check_name("op id", op_id) if op_id is not None else f"open:{path}"
        reply = await self._run(
            Op.OPEN,
            TaskKeys(task_id),
            [parent, path],
            [op_id, parent, path, _limit(budget.tokens), _limit(budget.nanos), _tags(tags)],
        )
        self._raise(reply, task_id=task_id, account=parent, child=path, op_id=op_id)
        return _budget(reply[1], reply[2])

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
    ) -> Reservation:
        """Hold ``tokens`` and ``nanos`` on ``account`` for one call.

        Raises :class:`BudgetExceeded` when the account cannot cover either.
        The hold expires after ``lease_s`` (default: the ledger's) if it is
        neither committed nor released.
        """
        check_name("task id", task_id)
        check_path(account)
        check_tokens(tokens)
        check_nanos(nanos)
        lease_ms = self._lease_ms if lease_s is None else self._lease(lease_s)
        rid = check_name("reservation id", reservation_id) if reservation_id else _new_id()
        reply = await self._run(
            Op.RESERVE,
            TaskKeys(task_id),
            [account],
            [account, rid, tokens, nanos, lease_ms, _tags(tags)],
        )
        self._raise(reply, task_id=task_id, account=account, reservation_id=rid)
        return Reservation(
            task_id=task_id,
            account=account,
            id=rid,
            tokens=tokens,
            nanos=nanos,
            deadline_ms=int(reply[1]),
        )

    async def commit(
        self,
        task_id: str,
        reservation_id: str,
        *,
        used: Amount | None,
        tags: Tags | None = None,
    ) -> Settlement:
        """Record what a call really used; ``used=None`` charges the whole reservation.

        A retry returns the first answer and changes nothing. A commit after the
        lease expired is still recorded, flagged ``late``.
        """
        check_name("task id", task_id)
        check_name("reservation id", reservation_id)
        tokens, nanos = (-1, -1) if used is None else (used.tokens, used.nanos)
        reply = await self._run(
            Op.COMMIT, TaskKeys(task_id), [], [reservation_id, tokens, nanos, _tags(tags)]
        )
        self._raise(reply, task_id=task_id, reservation_id=reservation_id)
        return Settlement(
            account=str(reply[1]),
            tokens=int(reply[2]),
            nanos=int(reply[3]),
            overrun_tokens=int(reply[4]),
            overrun_nanos=int(reply[5]),
            late=bool(reply[6]),
            estimated=bool(reply[7]),
        )

    async def release(self, task_id: str, reservation_id: str, *, reason: str = "") -> bool:
        """Drop a reservation unspent. Returns ``True`` if its lease had already run out."""
        check_name("task id", task_id)
        check_name("reservation id", reservation_id)
        reply = await self._run(Op.RELEASE, TaskKeys(task_id), [], [reservation_id, reason[:200]])
        self._raise(reply, task_id=task_id, reservation_id=reservation_id)
        return bool(reply[4])

    async def transfer(
        self, task_id: str, *, src: str, dst: str, amount: Amount, op_id: str | None = None
    ) -> tuple[Budget, Budget]:
        """Move unallocated budget from ``src`` to ``dst``; returns both accounts' availability.

        ``src`` and ``dst`` must be parent and child, or siblings (the money then
        passes through their parent in the same atomic step).
        """
        check_name("task id", task_id)
        check_path(src)
        check_path(dst)
        if amount.tokens == 0 and amount.nanos == 0:
            raise InvalidAmount("amount", amount, "transfer something")
        if parent_of(dst) == src:
            direction, mid = "down", src
        elif parent_of(src) == dst:
            direction, mid = "up", dst
        elif parent_of(src) is not None and parent_of(src) == parent_of(dst) and src != dst:
            direction, mid = "across", parent_of(src) or ROOT
        else:
            raise InvalidTransfer(task_id, src, dst, "they are not parent and child or siblings")
        op_id = check_name("op id", op_id) if op_id is not None else _new_id()
        reply = await self._run(
            Op.TRANSFER,
            TaskKeys(task_id),
            [src, dst, mid],
            [op_id, src, dst, amount.tokens, amount.nanos, direction],
        )
        if reply[0] == "err" and reply[1] == "relation":
            raise InvalidTransfer(task_id, src, dst, "the ledger's tree does not relate them")
        self._raise(reply, task_id=task_id, account=src, op_id=op_id)
        return _budget(reply[1], reply[2]), _budget(reply[3], reply[4])

    async def close_account(self, task_id: str, path: str, *, force: bool = False) -> Closed:
        """Return what ``path`` did not spend to its parent and seal it.

        Refused with :class:`AccountBusy` while it has open children, or open
        reservations unless ``force`` (which expires them: a call still in
        flight may commit late and is still charged).
        """
        check_name("task id", task_id)
        check_path(path)
        parent = parent_of(path)
        accounts = [path] if parent is None else [path, parent]
        reply = await self._run(
            Op.CLOSE, TaskKeys(task_id), accounts, [path, "1" if force else "0"]
        )
        self._raise(reply, task_id=task_id, account=path)
        return Closed(
            returned_tokens=_opt(reply[1]),
            returned_nanos=_opt(reply[2]),
            spent_tokens=int(reply[3]),
            spent_nanos=int(reply[4]),
        )

    async def close_task(self, task_id: str, *, force: bool = False) -> Closed:
        """Close every open account of the task, deepest first, then the root.

        The root's leftover goes back to the tenant, if the task had one. Safe
        to call again after a crash part way through.
        """
        check_name("task id", task_id)
        keys = TaskKeys(task_id)
        meta = await _hash(self.redis, keys.meta)
        if not meta:
            raise UnknownTask(task_id)
        paths = await _members(self.redis, keys.accounts)
        for path in sorted(paths, key=lambda p: (-p.count("/"), p)):
            if path != ROOT:
                await self.close_account(task_id, path, force=force)
        closed = await self.close_account(task_id, ROOT, force=force)
        tenant = meta.get("tenant") or ""
        if tenant:
            funded = Budget.from_nanos(tokens=_opt(meta["lt"]), nanos=_opt(meta["ln"]))
            spent = (closed.spent_tokens, closed.spent_nanos)
            await self._settle(
                tenant, task_id, meta["period"], funded, spent, op_id=f"close:{task_id}"
            )
        await self.redis.srem(OPEN_TASKS, task_id)
        return closed

    async def expire_task(self, task_id: str, *, retention_s: int) -> None:
        """Let Redis delete a closed task's keys after ``retention_s`` seconds."""
        keys = TaskKeys(task_id)
        paths = await _members(self.redis, keys.accounts)
        pipe = self.redis.pipeline(transaction=False)
        for key in [*keys.script_keys(), *(keys.account(p) for p in paths)]:
            pipe.expire(key, retention_s)
        await pipe.execute()

    async def reap(self, task_id: str, *, batch: int = 256) -> int:
        """Release every reservation of the task whose lease ran out; returns how many."""
        check_name("task id", task_id)
        total = 0
        while True:
            reply = await self._run(Op.REAP, TaskKeys(task_id), [], [batch])
            total += int(reply[1])
            if int(reply[1]) < batch:
                return total

    async def reap_all(self) -> int:
        """Reap every open task; what a periodic reaper calls."""
        tasks = await _members(self.redis, OPEN_TASKS)
        total = 0
        for task_id in tasks:
            total += await self.reap(task_id)
        return total

    # -- reading ---------------------------------------------------------------

    async def snapshot(self, task_id: str) -> TaskTree:
        """The task's account tree with open reservations, in one round trip after the index."""
        check_name("task id", task_id)
        keys = TaskKeys(task_id)
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
        for rid, packed in raw_res.items():
            view = _reservation(rid, packed)
            holds.setdefault(view.account, []).append(view)
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
        check_name("task id", task_id)
        check_path(path)
        fields = await _hash(self.redis, TaskKeys(task_id).account(path))
        if not fields:
            raise UnknownAccount(task_id, path)
        return account_from_hash(path, fields, [])

    async def events(
        self, task_id: str, *, after: str = "-", count: int | None = None
    ) -> list[LedgerEvent]:
        """The task's audit events, oldest first, strictly after stream id ``after``."""
        check_name("task id", task_id)
        start = after if after == "-" else f"({after}"
        rows = await self.redis.xrange(TaskKeys(task_id).events, min=start, count=count)
        return [
            _event(eid, fields) for eid, fields in cast("list[tuple[str, dict[str, str]]]", rows)
        ]

    async def note(
        self, task_id: str, account: str, text: str, *, tags: Mapping[str, str] | None = None
    ) -> str:
        """Append a note (op ``note``, no money moved) to the task's audit stream.

        For what the books alone do not say: how a plan was made, why a step was
        skipped. ``text`` is cut at 500 characters. Returns the stream id.
        """
        check_name("task id", task_id)
        check_path(account)
        fields = {"op": "note", "acct": account, "t": 0, "n": 0, "id": "", "text": text[:500]}
        if tags:
            fields["tags"] = json.dumps(dict(tags), sort_keys=True)
        eid = await self.redis.xadd(TaskKeys(task_id).events, cast(Any, fields))
        return str(eid)

    # -- tenants ---------------------------------------------------------------

    async def set_tenant(self, name: str, budget: Budget, *, period: Period = "month") -> None:
        """Create or update a tenant: ``budget`` per ``period`` (day, month, or none)."""
        check_name("tenant", name)
        if period not in ("day", "month", "none"):
            raise InvalidAmount("period", period, "use 'day', 'month' or 'none'")
        keys = TenantKeys(name)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(
            keys.config,
            mapping={"lt": _limit(budget.tokens), "ln": _limit(budget.nanos), "period": period},
        )
        pipe.sadd(TENANTS, name)
        await pipe.execute()

    async def tenants(self) -> list[str]:
        """Every configured tenant's name, sorted."""
        return sorted(await _members(self.redis, TENANTS))

    async def tenant(self, name: str, *, period_id: str | None = None) -> TenantView:
        """A tenant's limits and one period's use (default: the latest funded period)."""
        check_name("tenant", name)
        keys = TenantKeys(name)
        cfg = await _hash(self.redis, keys.config)
        if not cfg:
            raise UnknownTenant(name)
        if period_id is None:
            last = await self.redis.xrevrange(keys.events, count=1)
            rows = cast("list[tuple[str, dict[str, str]]]", last)
            period_id = rows[0][1].get("period", "all") if rows else "all"
        used = await _hash(self.redis, keys.period(period_id))
        return TenantView(
            name=name,
            period=cast(Period, cfg["period"]),
            period_id=period_id,
            limit=Budget.from_nanos(tokens=_opt(cfg["lt"]), nanos=_opt(cfg["ln"])),
            funded_tokens=int(used.get("ft", 0)),
            funded_nanos=int(used.get("fn", 0)),
            spent_tokens=int(used.get("st", 0)),
            spent_nanos=int(used.get("sn", 0)),
        )

    async def _fund(self, tenant: str, task_id: str, budget: Budget, *, op_id: str) -> str:
        check_name("tenant", tenant)
        keys = TenantKeys(tenant)
        reply = await self._runner.tenant_op(
            TenantOp.FUND,
            [keys.config, keys.ops, keys.events],
            [
                keys.period(""),
                f"{task_id}:{op_id}",
                task_id,
                _limit(budget.tokens),
                _limit(budget.nanos),
            ],
        )
        if reply[0] == "err" and reply[1] == "no_tenant":
            raise UnknownTenant(tenant)
        self._raise(reply, task_id=task_id, account=f"tenant:{tenant}")
        return str(reply[1])

    async def _settle(
        self,
        tenant: str,
        task_id: str,
        period: str,
        funded: Budget,
        spent: tuple[int, int],
        *,
        op_id: str,
    ) -> None:
        keys = TenantKeys(tenant)
        await self._runner.tenant_op(
            TenantOp.SETTLE,
            [keys.period(period), keys.ops, keys.events],
            [op_id, task_id, _limit(funded.tokens), _limit(funded.nanos), *spent, period],
        )

    # -- replies -----------------------------------------------------------------

    @staticmethod
    def _raise(
        reply: list[Any],
        *,
        task_id: str,
        account: str = "",
        child: str = "",
        reservation_id: str = "",
        op_id: str = "",
    ) -> None:
        if reply[0] == "ok":
            return
        code = reply[1]
        if code == "insufficient":
            raise BudgetExceeded(
                task_id=task_id,
                account=account,
                unit=str(reply[2]),
                requested=int(reply[3]),
                available=int(reply[4]),
            )
        if code == "no_account":
            missing = str(reply[2]) if len(reply) > 2 else account
            if missing == ROOT:
                raise UnknownTask(task_id)
            raise UnknownAccount(task_id, missing)
        if code == "closed":
            raise AccountClosed(task_id, account)
        if code == "exists":
            if child:
                raise AccountExists(task_id, child)
            raise TaskExists(task_id)
        if code == "unlimited":
            raise UnlimitedChild(task_id, child or account, str(reply[2]))
        if code == "busy":
            raise AccountBusy(task_id, account, children=int(reply[2]), reservations=int(reply[3]))
        if code == "unknown":
            raise UnknownReservation(task_id, reservation_id)
        if code in ("released", "committed"):
            raise ReservationSettled(task_id, reservation_id, str(code))
        if code == "conflict":
            raise OperationConflict(str(reply[2]) if len(reply) > 2 else op_id or reservation_id)
        raise LedgerError(f"unexpected ledger reply {reply!r}")


def _opt(value: Any) -> int | None:
    number = int(value)
    return None if number == UNLIMITED else number


def _budget(tokens: Any, nanos: Any) -> Budget:
    return Budget.from_nanos(tokens=_opt(tokens), nanos=_opt(nanos))


def _reservation(rid: str, packed: str) -> ReservationView:
    # Written by pack_res in budgets/lua/_prelude.lua.
    account, tokens, nanos, deadline, tags = packed.split("|", 4)
    return ReservationView(
        id=rid,
        account=account,
        tokens=int(tokens),
        nanos=int(nanos),
        deadline_ms=int(deadline),
        tags=parse_tags(tags),
    )


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

"""A tenant's side of the books: per-period budgets, and the funding of each task incarnation.

A tenant's keys live on its own slot (``{t:<tenant>}``), apart from any task's, so a
task is funded by a saga of idempotent steps (``docs/ledger.md``, Tenants):
the task's slot claims the id for one **incarnation**, this module funds that
incarnation from the tenant, the task's slot opens it. The tenant keeps one record per
incarnation (:meth:`budgets.keys.TenantKeys.funding`): a reused task id is a new
incarnation, funded afresh and settled at its own close.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, cast

from budgets._runner import ScriptRunner
from budgets.connection import Client
from budgets.errors import InvalidAmount, UnknownTenant
from budgets.keys import SHARED_SPACE, KeySpace, check_tenant
from budgets.money import UNLIMITED, Budget
from budgets.replies import Context, check
from budgets.scripts import TenantOp

Period = Literal["day", "month", "none"]
Settle = Literal["close", "undo", "spend"]

#: How long a tenant keeps an incarnation's funding record after the task's own keys
#: were given their retention (:meth:`Ledger.expire_task`): late spend may still be
#: reported while the task's keys exist.
FUNDING_GRACE_S = 86_400
#: How long a funding record given back (its open undone) is kept.
UNDONE_RETENTION_S = 86_400
#: Default cap of a tenant's event stream (``XADD MAXLEN ~``).
TENANT_EVENTS_MAX = 100_000


@dataclass(frozen=True, slots=True)
class TenantView:
    """A tenant's limits and what one period has handed out and spent."""

    name: str
    period: Period
    period_id: str
    limit: Budget
    funded_tokens: int
    funded_nanos: int
    spent_tokens: int
    spent_nanos: int


def _limit(value: int | None) -> int:
    return UNLIMITED if value is None else value


def _opt(value: str) -> int | None:
    number = int(value)
    return None if number == UNLIMITED else number


async def _hash(redis: Client, key: str) -> dict[str, str]:
    return cast("dict[str, str]", await redis.hgetall(key))


class TenantBooks:
    """Tenants' configuration, their period totals, and each incarnation's funding."""

    def __init__(
        self,
        redis: Client,
        runner: ScriptRunner,
        *,
        events_max: int = TENANT_EVENTS_MAX,
        space: KeySpace = SHARED_SPACE,
    ) -> None:
        if not isinstance(events_max, int) or events_max < 1:
            raise InvalidAmount("tenant_events_max", events_max, "must be a positive int")
        self.redis = redis
        self._runner = runner
        self._events_max = events_max
        self._space = space

    async def set(self, name: str, budget: Budget, *, period: Period) -> None:
        """Create or update a tenant: ``budget`` per ``period``."""
        check_tenant(name)
        if period not in ("day", "month", "none"):
            raise InvalidAmount("period", period, "use 'day', 'month' or 'none'")
        keys = self._space.tenant_keys(name)
        # Two slots on a cluster, so two steps: the config, then the index that lists
        # it. Each is idempotent; a failure between them is repaired by setting again.
        await self.redis.hset(
            keys.config,
            mapping={"lt": _limit(budget.tokens), "ln": _limit(budget.nanos), "period": period},
        )
        await self.redis.sadd(self._space.tenants, name)

    async def names(self) -> list[str]:
        """Every configured tenant's name, sorted."""
        return sorted(cast("set[str]", await self.redis.smembers(self._space.tenants)))

    async def view(self, name: str, *, period_id: str | None = None) -> TenantView:
        """A tenant's limits and one period's use (default: the latest funded period)."""
        check_tenant(name)
        keys = self._space.tenant_keys(name)
        cfg = await _hash(self.redis, keys.config)
        if not cfg:
            raise UnknownTenant(name)
        pid = period_id or cfg.get("last") or "all"
        used = await _hash(self.redis, keys.period(pid))
        return TenantView(
            name=name,
            period=cast(Period, cfg["period"]),
            period_id=pid,
            limit=Budget.from_nanos(tokens=_opt(cfg["lt"]), nanos=_opt(cfg["ln"])),
            funded_tokens=int(used.get("ft", 0)),
            funded_nanos=int(used.get("fn", 0)),
            spent_tokens=int(used.get("st", 0)),
            spent_nanos=int(used.get("sn", 0)),
        )

    async def fund(self, tenant: str, task_id: str, incarnation: str, budget: Budget) -> str:
        """Fund one incarnation from the tenant's current period; returns the period id.

        Refused (:class:`~budgets.errors.BudgetExceeded`, ``UnknownTenant``,
        ``UnlimitedChild``) with nothing written. A repeat returns the first answer.
        """
        keys = self._space.tenant_keys(tenant)
        reply = await self._runner.tenant_op(
            TenantOp.FUND,
            [keys.config, keys.funding(task_id, incarnation), keys.events],
            [
                keys.period_prefix,
                task_id,
                incarnation,
                _limit(budget.tokens),
                _limit(budget.nanos),
                self._events_max,
                f"tenant:{tenant}",
            ],
        )
        check(TenantOp.FUND.value, reply, Context(task_id=task_id, tenant=tenant))
        return str(reply[1])

    async def settle(
        self,
        tenant: str,
        task_id: str,
        incarnation: str,
        *,
        mode: Settle,
        spent: tuple[int, int] = (0, 0),
    ) -> None:
        """Report ``spent`` (the task's total so far) and, unless ``spend``, end the funding.

        ``close`` ends it at the task's close, ``undo`` when its open did not complete.
        Repeats, and totals arriving out of order, never count anything twice.
        """
        keys = self._space.tenant_keys(tenant)
        reply = await self._runner.tenant_op(
            TenantOp.SETTLE,
            [keys.funding(task_id, incarnation), keys.events],
            [keys.period_prefix, mode, *spent, self._events_max, UNDONE_RETENTION_S],
        )
        check(TenantOp.SETTLE.value, reply, Context(task_id=task_id, tenant=tenant))

"""What a policy trades in: the pool, subtasks' needs, grants, endpoints, outcomes, the menu.

Plain frozen values and the :class:`Policy` protocol (:mod:`budgets.policy`
holds the built-in policies), with the few helpers every policy shares.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from budgets.money import Price
from budgets.stats import Stats, clean_tag

#: Signals that say a reply failed, whatever the policy.
FAILURE_SIGNALS = frozenset({"cut_short", "empty", "rejected"})
#: Output-token tier per difficulty (HBPO's 512/1024/2048/2560 ladder).
TIERS: dict[int, int] = {1: 512, 2: 512, 3: 1024, 4: 2048, 5: 2560}


@dataclass(frozen=True, slots=True)
class Pool:
    """What the task can still hand out; ``None`` means unlimited in that unit."""

    tokens: int | None
    nanos: int | None

    def less(self, grant: Grant) -> Pool:
        """The pool after ``grant`` was carved out of it."""

        def minus(have: int | None, take: int | None) -> int | None:
            return None if have is None else max(0, have - (take or 0))

        return Pool(tokens=minus(self.tokens, grant.tokens), nanos=minus(self.nanos, grant.nanos))

    def covers(self, *, tokens: int, nanos: int) -> bool:
        """True when the pool holds at least ``tokens`` and ``nanos``."""
        return (self.tokens is None or self.tokens >= tokens) and (
            self.nanos is None or self.nanos >= nanos
        )


@dataclass(frozen=True, slots=True)
class Need:
    """A subtask waiting for a budget: its labels and an estimate of its prompt's size."""

    subtask_id: str
    difficulty: int
    tags: tuple[str, ...] = ()
    attempt: int = 1
    prompt_tokens: int = 256


@dataclass(frozen=True, slots=True)
class Grant:
    """A subtask's budget: limits, the output tokens to ask for, and the endpoint to use.

    ``endpoint=None`` means the configuration's default worker endpoint.
    ``explore``: the policy chose it to learn, not for its gain; its outcome is
    recorded with ``Observation(explored=True)``, an unbiased sample.
    """

    subtask_id: str
    tokens: int | None
    nanos: int | None
    max_output_tokens: int
    endpoint: str | None = None
    explore: bool = False


@dataclass(frozen=True, slots=True)
class Option:
    """An endpoint as a policy sees it: where it runs, how capable, what it costs."""

    name: str
    kind: Literal["local", "remote"]
    tier: int
    price: Price

    def cost(self, *, input_tokens: int, output_tokens: int) -> int:
        """What a call of this size costs, in nano-dollars (rounded up)."""
        return self.price.cost_nanos(input_tokens=input_tokens, output_tokens=output_tokens)

    @property
    def rank(self) -> tuple[int, int, int, int]:
        """Cheapest first: local before remote, then by price, then by tier."""
        return (
            0 if self.kind == "local" else 1,
            self.cost(input_tokens=0, output_tokens=1000),
            self.cost(input_tokens=1000, output_tokens=0),
            self.tier,
        )


@dataclass(frozen=True, slots=True)
class Outcome:
    """A finished try of a subtask: where it ran, what it asked for and used, what it showed."""

    need: Need
    endpoint: str
    asked: int
    used: int
    cut_short: bool = False
    signals: frozenset[str] = frozenset()

    @property
    def tags(self) -> tuple[str, ...]:
        """The subtask's tags and this try's signals, as statistics cells name them."""
        signals = set(self.signals) | ({"cut_short"} if self.cut_short else set())
        return tuple(sorted({clean_tag(t) for t in (*self.need.tags, *signals)}))

    def failed(self, extra: Iterable[str] = ()) -> bool:
        """True when a failure signal (or one of ``extra``) was seen."""
        bad = FAILURE_SIGNALS | frozenset(extra)
        return self.cut_short or bool(bad & set(self.signals))


@dataclass(frozen=True, slots=True)
class Menu:
    """The endpoints to choose from, the statistics of earlier calls, and the default."""

    options: tuple[Option, ...] = ()
    stats: Stats = field(default_factory=Stats)
    default: str | None = None

    def option(self, name: str | None) -> Option | None:
        """The option called ``name`` (``None`` picks the default)."""
        wanted = name or self.default
        return next((o for o in self.options if o.name == wanted), None)

    def by_cost(self) -> list[Option]:
        """Every option, cheapest first."""
        return sorted(self.options, key=lambda o: o.rank)


class Policy(Protocol):
    """How a task's budget is split and spent; the flow depends on nothing else."""

    @property
    def name(self) -> str:
        """The name the policy is chosen by in configuration."""
        ...

    def synthesis_reserve(self, pool: Pool) -> Pool:
        """What the manager keeps back for planning and the final answer."""
        ...

    def split(
        self, pool: Pool, needs: Sequence[Need], *, pending_after: int, menu: Menu
    ) -> list[Grant]:
        """Budgets for ``needs`` out of ``pool``, keeping shares for ``pending_after`` more."""
        ...

    def escalate(self, pool: Pool, outcomes: Sequence[Outcome], *, menu: Menu) -> list[Grant]:
        """Another, better paid try for some finished subtasks; the pool must cover them all."""
        ...


def _share(total: int | None, part: int, whole: int) -> int | None:
    if total is None:
        return None
    return total * part // whole if whole else 0


def _reserve(pool: Pool, share: float) -> Pool:
    per_mille = int(share * 1000)
    return Pool(
        tokens=_share(pool.tokens, per_mille, 1000), nanos=_share(pool.nanos, per_mille, 1000)
    )


def _split_by(
    pool: Pool,
    needs: Sequence[Need],
    weights: Sequence[int],
    later: int,
    output: Callable[[Need], int],
    endpoint: Callable[[Need], str | None],
) -> list[Grant]:
    """Shares of ``pool`` by weight; each asks for ``output(need)`` tokens, capped by its share."""
    whole = sum(weights) + later
    grants = []
    for need, weight in zip(needs, weights, strict=True):
        tokens = _share(pool.tokens, weight, whole)
        nanos = _share(pool.nanos, weight, whole)
        wanted = output(need)
        out = wanted if tokens is None else min(wanted, max(0, tokens - need.prompt_tokens))
        grants.append(Grant(need.subtask_id, tokens, nanos, max(0, out), endpoint(need)))
    return grants


def _tier(difficulty: int) -> int:
    return TIERS[max(1, min(5, difficulty))]


def _next_tier(asked: int) -> int:
    return next((t for t in sorted(set(TIERS.values())) if t > asked), asked * 2)


def _priced_grant(
    pool: Pool, need: Need, option: Option | None, output_tokens: int
) -> Grant | None:
    """A grant big enough for one call of ``output_tokens`` on ``option``, if the pool covers it."""
    tokens = need.prompt_tokens + output_tokens
    if option is not None:
        nanos = option.cost(input_tokens=need.prompt_tokens, output_tokens=output_tokens)
    else:  # unknown price: half of what is left, as before prices were known
        nanos = 0 if pool.nanos is None else pool.nanos // 2
        if pool.nanos is not None and nanos == 0:
            return None
    if not pool.covers(tokens=tokens, nanos=nanos):
        return None
    return Grant(
        need.subtask_id,
        None if pool.tokens is None else tokens,
        None if pool.nanos is None else nanos,
        output_tokens,
        None if option is None else option.name,
    )


__all__ = [
    "FAILURE_SIGNALS",
    "TIERS",
    "Grant",
    "Menu",
    "Need",
    "Option",
    "Outcome",
    "Policy",
    "Pool",
]

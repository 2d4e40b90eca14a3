"""Allocation policy: pure functions from a plan, the pool and the ledger's statistics.

The flow asks a :class:`Policy` three questions and does what it answers:

* :meth:`~Policy.synthesis_reserve` — what the manager keeps back for the final answer;
* :meth:`~Policy.split` — for the subtasks about to run: which endpoint, how
  many output tokens (the *tier*), and how much of the pool each may spend;
* :meth:`~Policy.escalate` — given what finished (which endpoint, tokens asked
  and used, run-time signals such as ``cut_short``), who gets another, better
  paid try. Money a finished subtask did not spend is back in the pool by
  then, so this is also where returned money is handed out.

Policies do no I/O: statistics arrive as a :class:`~budgets.stats.Stats`
snapshot inside the :class:`Menu`. The ledger clamps whatever a policy answers
(a child is never carved bigger than its parent's available amount), so a
policy bug can waste money but never overspend it.

Four policies are built in, chosen by name with :func:`make_policy`:
``uniform``, ``tiered``, ``local-first`` and ``adaptive``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from budgets.money import Price
from budgets.stats import ANY_DIFFICULTY, Stats, clean_tag

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
    """

    subtask_id: str
    tokens: int | None
    nanos: int | None
    max_output_tokens: int
    endpoint: str | None = None


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


@dataclass(frozen=True, slots=True)
class Uniform:
    """The baseline: equal shares, the default endpoint, no escalation."""

    name: str = "uniform"
    manager_share: float = 0.15
    output_tokens: int = 1024

    def synthesis_reserve(self, pool: Pool) -> Pool:
        """``manager_share`` of the pool in each unit."""
        return _reserve(pool, self.manager_share)

    def split(
        self, pool: Pool, needs: Sequence[Need], *, pending_after: int, menu: Menu
    ) -> list[Grant]:
        """One equal share per subtask now and per subtask still to come."""
        return _split_by(
            pool,
            needs,
            [1] * len(needs),
            pending_after,
            lambda _: self.output_tokens,
            lambda _: None,
        )

    def escalate(self, pool: Pool, outcomes: Sequence[Outcome], *, menu: Menu) -> list[Grant]:
        """Never."""
        return []


@dataclass(frozen=True, slots=True)
class Tiered:
    """HBPO style: the output-token tier follows difficulty; a cut-short reply climbs a tier.

    Shares of the pool are weighted by tier, so a hard subtask gets more than
    an easy one; subtasks of later waves are counted at ``later_tier`` each so
    an early wave cannot take everything.
    """

    name: str = "tiered"
    manager_share: float = 0.15
    later_tier: int = 1024
    max_attempts: int = 2

    def synthesis_reserve(self, pool: Pool) -> Pool:
        """``manager_share`` of the pool in each unit."""
        return _reserve(pool, self.manager_share)

    def split(
        self, pool: Pool, needs: Sequence[Need], *, pending_after: int, menu: Menu
    ) -> list[Grant]:
        """Shares weighted by each subtask's tier, on the default endpoint."""
        weights = [_tier(n.difficulty) for n in needs]
        return _split_by(
            pool,
            needs,
            weights,
            self.later_tier * pending_after,
            lambda n: _tier(n.difficulty),
            lambda _: None,
        )

    def escalate(self, pool: Pool, outcomes: Sequence[Outcome], *, menu: Menu) -> list[Grant]:
        """Cut-short or rejected replies, hardest first, one tier up on the same endpoint,
        while paid for."""
        grants = []
        for out in sorted(outcomes, key=lambda o: -o.need.difficulty):
            redo = out.cut_short or "rejected" in out.signals
            if not redo or out.need.attempt >= self.max_attempts:
                continue
            grant = _priced_grant(pool, out.need, menu.option(out.endpoint), _next_tier(out.asked))
            if grant is not None:
                grants.append(grant)
                pool = pool.less(grant)
        return grants


@dataclass(frozen=True, slots=True)
class LocalFirst:
    """HASHIRU style: start on the cheapest endpoint; pay for a stronger one only on failure.

    A try has failed when it was cut short, came back empty or was rejected,
    or showed one of ``failure_signals``. Its retry goes to the next endpoint
    up the cost ladder with a tier at least as high, if the pool covers it.
    """

    name: str = "local-first"
    manager_share: float = 0.15
    failure_signals: frozenset[str] = frozenset()
    max_attempts: int = 3

    def synthesis_reserve(self, pool: Pool) -> Pool:
        """``manager_share`` of the pool in each unit."""
        return _reserve(pool, self.manager_share)

    def split(
        self, pool: Pool, needs: Sequence[Need], *, pending_after: int, menu: Menu
    ) -> list[Grant]:
        """Tier-weighted shares, every subtask on the cheapest endpoint."""
        ladder = menu.by_cost()
        cheapest = ladder[0].name if ladder else None
        weights = [_tier(n.difficulty) for n in needs]
        return _split_by(
            pool,
            needs,
            weights,
            TIERS[3] * pending_after,
            lambda n: _tier(n.difficulty),
            lambda _: cheapest,
        )

    def escalate(self, pool: Pool, outcomes: Sequence[Outcome], *, menu: Menu) -> list[Grant]:
        """Failed tries, hardest first, one step up the ladder, while the pool covers them."""
        ladder = menu.by_cost()
        grants = []
        for out in sorted(outcomes, key=lambda o: -o.need.difficulty):
            if not out.failed(self.failure_signals) or out.need.attempt >= self.max_attempts:
                continue
            here = menu.option(out.endpoint)
            up = [o for o in ladder if here is None or (o.rank > here.rank and o.tier >= here.tier)]
            if not up:
                continue
            output = max(_tier(out.need.difficulty), _next_tier(out.asked) if out.cut_short else 0)
            grant = _priced_grant(pool, out.need, up[0], output)
            if grant is not None:
                grants.append(grant)
                pool = pool.less(grant)
        return grants


def _logit(p: float) -> float:
    p = min(1 - 1e-6, max(1e-6, p))
    return math.log(p / (1 - p))


@dataclass(frozen=True, slots=True)
class Adaptive:
    """Learns from the ledger's statistics which endpoint and tier pay off.

    *Tier*: a high quantile (``quantile``) of the output tokens this endpoint
    really used at this difficulty, times ``headroom`` — larger when replies
    were often cut short — once ``min_calls`` calls were counted; the
    ``tiered`` ladder before that.

    *Chance of success* of an endpoint for a subtask: naive Bayes over its
    cells — the endpoint's success rate at this difficulty, moved by the
    evidence of each tag and signal (each tag cell's rate against the base, both
    at this difficulty, or both across all difficulties while it has few verdicts),
    with priors rising with the endpoint's tier.

    *Choice*: the cheapest endpoint is tried first when it costs at most
    ``probe_ratio`` of the most likely one and its chance is at least
    ``probe_floor`` (a cheap first answer whose signals decide whether to pay
    more); otherwise the most likely endpoint the share can pay for.

    *Escalation*: every finished try is scored by the gain in chance of the
    best other endpoint over this try's (which now includes its signals), per
    nano-dollar; the best scores are granted while the pool covers their
    reservations and the gain is at least ``min_gain``.
    """

    name: str = "adaptive"
    manager_share: float = 0.15
    quantile: float = 0.9
    headroom: float = 1.25
    min_calls: int = 8
    min_output: int = 64
    max_output: int = 4096
    prior_weight: float = 4.0
    probe_ratio: float = 0.25
    probe_floor: float = 0.2
    min_gain: float = 0.05
    max_attempts: int = 3

    def synthesis_reserve(self, pool: Pool) -> Pool:
        """``manager_share`` of the pool in each unit."""
        return _reserve(pool, self.manager_share)

    def tier(self, option: str, difficulty: int, stats: Stats) -> int:
        """Output tokens to ask ``option`` for at ``difficulty``."""
        cell = stats.cell(option, difficulty)
        if cell.calls < self.min_calls:
            cell = stats.cell(option, ANY_DIFFICULTY)
        seen = cell.quantile(self.quantile) if cell.calls >= self.min_calls else None
        if seen is None:
            return _tier(difficulty)
        grow = self.headroom * (1 + 2 * cell.cut_rate)
        return max(self.min_output, min(self.max_output, math.ceil(seen * grow)))

    def chance(self, option: Option, difficulty: int, tags: Iterable[str], stats: Stats) -> float:
        """Estimated chance that ``option`` answers right, given the tags and signals."""
        prior = min(0.9, 0.42 + 0.08 * option.tier)
        # Tag cells are read at the base rate's own level (this difficulty, or all of them when
        # it has too few verdicts): a tag is evidence only against a base of the same calls.
        level = difficulty
        if stats.cell(option.name, level).judged < self.min_calls:
            level = ANY_DIFFICULTY
        base_cell = stats.cell(option.name, level)
        base = base_cell.success(prior, self.prior_weight)
        # The tag's rate is shrunk toward the base; so is the base's own rate it is measured
        # against, so a tag every call carries (its cell equals the base's) moves nothing.
        same = _logit(base_cell.success(base, self.prior_weight))
        score = _logit(base)
        for tag in {clean_tag(t) for t in tags}:
            cell = stats.cell(option.name, level, tag)
            if cell.judged:
                score += _logit(cell.success(base, self.prior_weight)) - same
        return 1 / (1 + math.exp(-score))

    def _cost(self, option: Option, need: Need, stats: Stats) -> int:
        cell = stats.cell(option.name, ANY_DIFFICULTY)
        if cell.mean_nanos is not None:
            return math.ceil(cell.mean_nanos)
        out = self.tier(option.name, need.difficulty, stats) // 2
        return option.cost(input_tokens=need.prompt_tokens, output_tokens=out)

    def _pick(self, need: Need, share: int | None, menu: Menu) -> Option | None:
        if not menu.options:
            return None
        stats = menu.stats

        def reservation(o: Option) -> int:
            out = self.tier(o.name, need.difficulty, stats)
            return o.cost(input_tokens=need.prompt_tokens, output_tokens=out)

        affordable = [o for o in menu.options if share is None or reservation(o) <= share]
        candidates = affordable or menu.by_cost()[:1]
        chances = {o.name: self.chance(o, need.difficulty, need.tags, stats) for o in candidates}
        best = max(candidates, key=lambda o: (chances[o.name], -o.rank[1]))
        cheap = min(candidates, key=lambda o: (self._cost(o, need, stats), o.rank))
        probe = self._cost(cheap, need, stats) <= self.probe_ratio * self._cost(best, need, stats)
        if cheap is best or (probe and chances[cheap.name] >= self.probe_floor):
            return cheap
        return best

    def split(
        self, pool: Pool, needs: Sequence[Need], *, pending_after: int, menu: Menu
    ) -> list[Grant]:
        """Difficulty-weighted shares; each subtask on the endpoint :meth:`_pick` chooses."""
        weights = [max(1, min(5, n.difficulty)) for n in needs]
        whole = sum(weights) + 3 * pending_after
        picks = {
            n.subtask_id: self._pick(n, _share(pool.nanos, w, whole), menu)
            for n, w in zip(needs, weights, strict=True)
        }

        def output(need: Need) -> int:
            pick = picks[need.subtask_id]
            return (
                _tier(need.difficulty)
                if pick is None
                else self.tier(pick.name, need.difficulty, menu.stats)
            )

        def endpoint(need: Need) -> str | None:
            pick = picks[need.subtask_id]
            return None if pick is None else pick.name

        return _split_by(pool, needs, weights, 3 * pending_after, output, endpoint)

    def escalate(self, pool: Pool, outcomes: Sequence[Outcome], *, menu: Menu) -> list[Grant]:
        """The tries with the best gain in chance per nano-dollar, while the pool covers them."""
        stats = menu.stats
        scored: list[tuple[float, Outcome, Option, int]] = []
        for out in outcomes:
            here = menu.option(out.endpoint)
            if here is None or out.need.attempt >= self.max_attempts:
                continue
            now = self.chance(here, out.need.difficulty, out.tags, stats)
            for other in menu.options:
                if other.name == here.name and not out.cut_short:
                    continue  # the same endpoint again only helps a reply cut short
                gain = self.chance(other, out.need.difficulty, out.need.tags, stats) - now
                if gain < self.min_gain:
                    continue
                output = self.tier(other.name, out.need.difficulty, stats)
                if other.name == here.name:
                    output = max(output, _next_tier(out.asked))
                cost = max(1, self._cost(other, out.need, stats))
                scored.append((gain / cost, out, other, output))
        grants: list[Grant] = []
        taken: set[str] = set()
        for _, out, other, output in sorted(scored, key=lambda s: -s[0]):
            if out.need.subtask_id in taken:
                continue
            grant = _priced_grant(pool, out.need, other, output)
            if grant is not None:
                grants.append(grant)
                taken.add(out.need.subtask_id)
                pool = pool.less(grant)
        return grants


_BUILT_IN: dict[str, Callable[[], Policy]] = {
    "uniform": Uniform,
    "tiered": Tiered,
    "local-first": LocalFirst,
    "adaptive": Adaptive,
}
#: The policy used when none is configured.
DEFAULT_POLICY = "tiered"


def policy_names() -> list[str]:
    """The names :func:`make_policy` accepts."""
    return sorted(_BUILT_IN)


def make_policy(name: str) -> Policy:
    """A built-in policy by name; ``ValueError`` naming the choices otherwise."""
    try:
        return _BUILT_IN[name]()
    except KeyError:
        raise ValueError(
            f"unknown allocation policy {name!r}; choose one of {', '.join(policy_names())}"
        ) from None


__all__ = [
    "DEFAULT_POLICY",
    "FAILURE_SIGNALS",
    "TIERS",
    "Adaptive",
    "Grant",
    "LocalFirst",
    "Menu",
    "Need",
    "Option",
    "Outcome",
    "Policy",
    "Pool",
    "Tiered",
    "Uniform",
    "make_policy",
    "policy_names",
]

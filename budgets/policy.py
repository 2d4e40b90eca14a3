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
``uniform``, ``tiered``, ``local-first`` and ``adaptive``. The values they
trade in live in :mod:`budgets.grants` and ``adaptive`` in
:mod:`budgets.adaptive`; both are re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from budgets.adaptive import Adaptive, Target
from budgets.grants import (
    FAILURE_SIGNALS,
    TIERS,
    Grant,
    Menu,
    Need,
    Option,
    Outcome,
    Policy,
    Pool,
    _next_tier,
    _priced_grant,
    _reserve,
    _split_by,
    _tier,
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


def make_policy(name: str, *, target: Target | None = None, explore: float | None = None) -> Policy:
    """A built-in policy by name; ``ValueError`` naming the choices otherwise.

    ``target`` (``PAYMASTER_TARGET``) and ``explore`` (``PAYMASTER_EXPLORE``) set
    the ``adaptive`` policy's spending target and exploration share; other
    policies have neither and ignore them.
    """
    try:
        make = _BUILT_IN[name]
    except KeyError:
        raise ValueError(
            f"unknown allocation policy {name!r}; choose one of {', '.join(policy_names())}"
        ) from None
    if make is Adaptive:
        chosen = Adaptive(target=target or Target())
        return chosen if explore is None else replace(chosen, explore=explore)
    return make()


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
    "Target",
    "Tiered",
    "Uniform",
    "make_policy",
    "policy_names",
]

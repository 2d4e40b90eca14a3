"""Allocation policy: pure functions from a plan and what is available to each subtask's budget.

The flow asks a :class:`Policy` three questions: how to split the pool among
the subtasks about to run, how much the manager keeps for synthesis, and
whether a result that was cut short deserves another, bigger try. Policies do
no I/O; the ledger clamps whatever they answer (a child can never be carved
bigger than its parent's available amount).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Pool:
    """What the task can still hand out; ``None`` means unlimited in that unit."""

    tokens: int | None
    nanos: int | None


@dataclass(frozen=True, slots=True)
class Need:
    """A subtask waiting for a budget."""

    subtask_id: str
    difficulty: int
    attempt: int = 1


@dataclass(frozen=True, slots=True)
class Grant:
    """The budget a subtask gets: a token limit, a money limit, the output tokens to ask for."""

    subtask_id: str
    tokens: int | None
    nanos: int | None
    max_output_tokens: int


class Policy(Protocol):
    """How a task's budget is split; the flow depends on nothing else."""

    def split(self, pool: Pool, needs: Sequence[Need], *, pending_after: int) -> list[Grant]:
        """Budgets for ``needs`` out of ``pool``, keeping shares for ``pending_after`` more."""
        ...

    def synthesis_reserve(self, pool: Pool) -> Pool:
        """What the manager keeps back for planning and the final answer."""
        ...

    def escalate(self, pool: Pool, need: Need, *, spent_tokens: int) -> Grant | None:
        """A bigger budget for a retry of a cut-short subtask, or ``None`` if not worth it."""
        ...


def _share(total: int | None, part: int, whole: int) -> int | None:
    if total is None:
        return None
    return total * part // whole if whole else 0


@dataclass(frozen=True, slots=True)
class WeightedSplit:
    """Difficulty-weighted split with a reserve kept for synthesis.

    Each subtask's weight is its difficulty (1-5). Subtasks still to come in
    later waves are counted at ``later_weight`` each so an early wave cannot
    take everything. Output tokens per call are capped at ``max_output_tokens``
    and, with no token limit at all, sized by ``tokens_per_difficulty``.
    """

    manager_share: float = 0.15
    later_weight: int = 3
    tokens_per_difficulty: int = 256
    max_output_tokens: int = 2048
    escalation_factor: int = 2
    max_attempts: int = 2

    def synthesis_reserve(self, pool: Pool) -> Pool:
        """``manager_share`` of the pool in each unit."""
        per_mille = int(self.manager_share * 1000)
        return Pool(
            tokens=_share(pool.tokens, per_mille, 1000), nanos=_share(pool.nanos, per_mille, 1000)
        )

    def split(self, pool: Pool, needs: Sequence[Need], *, pending_after: int) -> list[Grant]:
        """Shares proportional to difficulty; output tokens capped by the token share."""
        weights = [max(1, min(5, n.difficulty)) for n in needs]
        whole = sum(weights) + self.later_weight * pending_after
        grants = []
        for need, weight in zip(needs, weights, strict=True):
            tokens = _share(pool.tokens, weight, whole)
            nanos = _share(pool.nanos, weight, whole)
            wanted = min(self.max_output_tokens, self.tokens_per_difficulty * weight)
            out = wanted if tokens is None else min(wanted, tokens)
            grants.append(Grant(need.subtask_id, tokens, nanos, max(0, out)))
        return grants

    def escalate(self, pool: Pool, need: Need, *, spent_tokens: int) -> Grant | None:
        """Twice what the last try used, if the pool can pay for it and tries remain."""
        if need.attempt > self.max_attempts:
            return None
        wanted_tokens = max(1, spent_tokens) * self.escalation_factor
        if pool.tokens is not None and pool.tokens < wanted_tokens:
            return None
        nanos = None if pool.nanos is None else pool.nanos // 2
        if nanos == 0:
            return None
        out = min(self.max_output_tokens * self.escalation_factor, wanted_tokens)
        tokens = None if pool.tokens is None else wanted_tokens
        return Grant(need.subtask_id, tokens, nanos, out)

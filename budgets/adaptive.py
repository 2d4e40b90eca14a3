"""The ``adaptive`` policy: learned chances, a spending target, cold start and exploration.

See :class:`Adaptive`; the chances come from :mod:`budgets.learner` and the
statistics cells, both inside the :class:`~budgets.grants.Menu`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation

from budgets.grants import (
    Grant,
    Menu,
    Need,
    Option,
    Outcome,
    Pool,
    _next_tier,
    _priced_grant,
    _reserve,
    _share,
    _split_by,
    _tier,
)
from budgets.learner import (
    FAULT_SIGNALS,
    RUNTIME_SIGNALS,
    Head,
    question_features,
    reply_features,
)
from budgets.stats import ANY_DIFFICULTY, Stats, clean_tag


def _logit(p: float) -> float:
    p = min(1 - 1e-6, max(1e-6, p))
    return math.log(p / (1 - p))


def _unit(*parts: object) -> float:
    """A number in [0, 1) that depends only on ``parts``: the policy's own, repeatable dice."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass(frozen=True, slots=True)
class Target:
    """What the adaptive policy aims to spend; the task's budget stays a hard cap beneath it.

    ``cost_ratio``: spend about this share of what asking the strongest endpoint
    (the highest tier) for every subtask would cost, escalating the tries with the
    best expected gain per extra dollar first. ``usd_per_point``: pay for an
    escalation when it costs at most this many dollars per expected point (a 1%
    chance) of a right answer. Exactly one of the two is set.
    """

    cost_ratio: float | None = 0.4
    usd_per_point: Decimal | None = None

    def __post_init__(self) -> None:
        if (self.cost_ratio is None) == (self.usd_per_point is None):
            raise ValueError("a target is a cost ratio or a price per point, exactly one")
        if self.cost_ratio is not None and not 0 < self.cost_ratio <= 10:
            raise ValueError(f"a cost ratio must be in (0, 10], got {self.cost_ratio}")
        if self.usd_per_point is not None and not self.usd_per_point >= 0:
            raise ValueError(f"a price per point must be >= 0, got {self.usd_per_point}")

    @classmethod
    def parse(cls, text: str) -> Target:
        """``0.35`` or ``ratio:0.35`` (a cost ratio); ``usd_per_point:0.0002`` (a price).

        This is the syntax of ``PAYMASTER_TARGET``; ``ValueError`` says what is wrong.
        """
        kind, sep, value = text.strip().rpartition(":")
        kind = kind.strip().lower() if sep else "ratio"
        try:
            number = Decimal(value.strip())
        except InvalidOperation:
            raise ValueError(
                f"target {text!r}: expected ratio:<share> or usd_per_point:<usd>"
            ) from None
        if not number.is_finite():
            raise ValueError(f"target {text!r}: not a finite number")
        if kind in ("ratio", "cost_ratio"):
            return cls(cost_ratio=float(number))
        if kind == "usd_per_point":
            return cls(cost_ratio=None, usd_per_point=number)
        raise ValueError(f"target {text!r}: the kind is 'ratio' or 'usd_per_point', not {kind!r}")


@dataclass(frozen=True, slots=True)
class _Candidate:
    value: float
    gain: float
    extra_nanos: int
    expected_nanos: int  # what it is expected to cost: never below the mean call
    charge_nanos: int  # what the allowance is charged until it ran: never below its hold
    out: Outcome
    option: Option
    output_tokens: int
    explore: bool = False


@dataclass(frozen=True, slots=True)
class Adaptive:
    """Learns from the ledger's statistics which endpoint and tier pay off, and spends to a target.

    *Tier*: a high quantile (``quantile``) of the output tokens this endpoint
    really used at this difficulty, times ``headroom`` — larger when replies
    were often cut short — once ``min_calls`` calls were counted. Before that
    (*cold start*) the endpoint is sized from what the other endpoints used at
    this difficulty, or, for an escalation, from the reply it is asked to
    improve on (``cold_headroom`` times either, at least ``cold_floor``, at most
    the ladder); the ``tiered`` ladder only when nothing at all was seen.

    *Chance of success* of an endpoint for a subtask: the learner's logistic
    model (:mod:`budgets.learner`) over difficulty, tags, prompt size and, after
    a reply, that reply's signals; blended with the endpoint's success rate at
    this difficulty (shrunk toward a prior that rises with its tier) until it
    learned from ``model_weight`` verdicts. After a reply, that base rate is
    lowered by ``fault_prior`` (in log-odds) for each of up to two fault signals
    (:data:`~budgets.learner.FAULT_SIGNALS`) the reply shows, so a policy with
    no history escalates the replies whose own work does not add up first.

    *Choice*: the cheapest endpoint is tried first when it costs at most
    ``probe_ratio`` of the most likely one and its chance is at least
    ``probe_floor``; otherwise the most likely endpoint the share can pay for
    and, under a cost ratio, that costs at most the ratio of the reference's
    call (or is the cheapest) unless the cheapest is below ``probe_floor``.

    *Escalation*: every finished try is scored by the gain in chance of another
    endpoint over this try's (which now includes its own signals) per extra
    nano-dollar, input tokens included. Under a ``cost_ratio`` target the best
    scores are granted while the task's spend stays within the ratio of what the
    strongest endpoint would cost for its subtasks; under ``usd_per_point``,
    every one whose price per expected point is low enough. Always only what
    the pool covers, and only gains of at least ``min_gain``. A reply cut short
    is finished on its own endpoint, a tier up, whatever the target (only the
    pool limits it): it is the answer the target already paid for.

    *Exploration*: a share ``explore`` of subtasks (chosen by a hash of their
    id, so a replay repeats) is first tried on the cheapest endpoint however bad
    history says it is, and, when its try is finished, escalated to another
    endpoint whatever the gain (inside the target), so no endpoint's
    statistics go stale.
    """

    name: str = "adaptive"
    manager_share: float = 0.15
    quantile: float = 0.9
    headroom: float = 1.25
    cold_headroom: float = 2.0
    cold_floor: int = 256
    min_calls: int = 8
    min_output: int = 64
    max_output: int = 4096
    prior_weight: float = 4.0
    model_weight: float = 30.0
    fault_prior: float = 1.5
    probe_ratio: float = 0.25
    probe_floor: float = 0.2
    min_gain: float = 0.02
    max_attempts: int = 3
    target: Target = field(default_factory=Target)
    explore: float = 0.02

    def __post_init__(self) -> None:
        if not 0 <= self.explore <= 1:
            raise ValueError(f"the exploration share must be in [0, 1], got {self.explore}")

    def synthesis_reserve(self, pool: Pool) -> Pool:
        """``manager_share`` of the pool in each unit."""
        return _reserve(pool, self.manager_share)

    # -- sizes and costs ------------------------------------------------------------

    def tier(self, option: str, difficulty: int, stats: Stats, *, hint: int | None = None) -> int:
        """Output tokens to ask ``option`` for at ``difficulty``.

        ``hint``: the output tokens of a reply to the same subtask, the cold-start
        size when ``option`` has too little history of its own.
        """
        seen = self._seen(option, difficulty, stats)
        if seen is not None:
            used, cut_rate = seen
            grow = self.headroom * (1 + 2 * cut_rate)
            return max(self.min_output, min(self.max_output, math.ceil(used * grow)))
        others = [
            q
            for name in sorted({e for e, _, _ in stats.cells} - {option})
            if (q := self._seen(name, difficulty, stats)) is not None
        ]
        cold = [hint] if hint else [used for used, _ in others]
        if not cold:
            return _tier(difficulty)
        size = max(self.cold_floor, math.ceil(max(cold) * self.cold_headroom))
        return max(self.min_output, min(self.max_output, _tier(difficulty), size))

    def _seen(self, option: str, difficulty: int, stats: Stats) -> tuple[int, float] | None:
        cell = stats.cell(option, difficulty)
        if cell.calls < self.min_calls:
            cell = stats.cell(option, ANY_DIFFICULTY)
        used = cell.quantile(self.quantile) if cell.calls >= self.min_calls else None
        return None if used is None else (used, cell.cut_rate)

    def expected_output(
        self, option: str, difficulty: int, stats: Stats, *, hint: int | None = None
    ) -> int:
        """Output tokens ``option`` is expected to use on a subtask.

        With ``hint`` (another reply's output tokens on the same subtask): the hint times
        how much longer ``option`` answered the subtasks it was escalated to (a ratio
        shrunk toward 1); else its mean; else half its tier.
        """
        every = stats.cell(option, ANY_DIFFICULTY)
        cell = stats.cell(option, difficulty)
        if cell.calls < self.min_calls:
            cell = every
        mean = cell.used / cell.calls if cell.calls else None
        if hint:
            return max(1, math.ceil(every.length_after(hint)))
        if mean is not None:
            return math.ceil(mean)
        return self.tier(option, difficulty, stats) // 2

    def expected_cost(
        self, option: Option, need: Need, stats: Stats, *, hint: int | None = None
    ) -> int:
        """Expected nano-dollars of one call: the prompt's input tokens and the expected output."""
        out = self.expected_output(option.name, need.difficulty, stats, hint=hint)
        return option.cost(input_tokens=need.prompt_tokens, output_tokens=out)

    # -- chances ----------------------------------------------------------------------

    def chance(
        self,
        option: Option,
        difficulty: int,
        tags: Iterable[str],
        stats: Stats,
        *,
        prompt_tokens: int = 256,
        signals: Iterable[str] | None = None,
    ) -> float:
        """Estimated chance that ``option`` answers right.

        Without ``signals``: before it replied (head ``q``); with them: given its
        own reply's signals (head ``r``).
        """
        prior = min(0.9, 0.42 + 0.08 * option.tier)
        level = difficulty
        if stats.cell(option.name, level).judged < self.min_calls:
            level = ANY_DIFFICULTY
        base = stats.cell(option.name, level).success(prior, self.prior_weight)
        plain = [t for t in tags if clean_tag(t) not in RUNTIME_SIGNALS]
        if signals is None:
            head: Head = "q"
            feats = question_features(difficulty, plain, prompt_tokens)
        else:
            head = "r"
            shown = [*signals, *(t for t in tags if clean_tag(t) in RUNTIME_SIGNALS)]
            feats = reply_features(difficulty, plain, prompt_tokens, shown)
            faults = len({clean_tag(s) for s in shown} & FAULT_SIGNALS)
            base = 1 / (1 + math.exp(self.fault_prior * min(2, faults) - _logit(base)))
        n = stats.model.updates(option.name, head)
        if n == 0:
            return base
        learned = stats.model.chance(option.name, head, feats)
        return (n * learned + self.model_weight * base) / (n + self.model_weight)

    def _now(self, here: Option, out: Outcome, stats: Stats) -> float:
        if out.cut_short or "empty" in out.signals:
            return 0.0  # no answer to keep
        need = out.need
        return self.chance(
            here,
            need.difficulty,
            need.tags,
            stats,
            prompt_tokens=need.prompt_tokens,
            signals=out.signals,
        )

    def _before(self, option: Option, need: Need, stats: Stats) -> float:
        return self.chance(
            option, need.difficulty, need.tags, stats, prompt_tokens=need.prompt_tokens
        )

    # -- the first try ------------------------------------------------------------------

    def _pick(self, need: Need, share: int | None, menu: Menu) -> Option | None:
        if not menu.options:
            return None
        stats = menu.stats

        def reservation(o: Option) -> int:
            out = self.tier(o.name, need.difficulty, stats)
            return o.cost(input_tokens=need.prompt_tokens, output_tokens=out)

        affordable = [o for o in menu.options if share is None or reservation(o) <= share]
        candidates = affordable or menu.by_cost()[:1]
        cost = {o.name: self.expected_cost(o, need, stats) for o in candidates}
        cheap = min(candidates, key=lambda o: (cost[o.name], o.rank))
        chances = {o.name: self._before(o, need, stats) for o in candidates}
        ratio, ref = self.target.cost_ratio, self.reference(menu)
        if ratio is not None and ref is not None and chances[cheap.name] >= self.probe_floor:
            # a first try costs no more than the ratio allows, unless nothing is cheaper or
            # the cheapest is hopeless (then its try and an escalation would cost more)
            cap = max(cost[cheap.name], ratio * self.expected_cost(ref, need, stats))
            candidates = [o for o in candidates if cost[o.name] <= cap]
        best = max(candidates, key=lambda o: (chances[o.name], -o.rank[1]))
        probe = cost[cheap.name] <= self.probe_ratio * cost[best.name]
        if cheap is best or (probe and chances[cheap.name] >= self.probe_floor):
            return cheap
        if _unit("explore-first", need.subtask_id) < self.explore:
            return cheap  # keep the cheap endpoint's statistics alive
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

    # -- escalation ----------------------------------------------------------------------

    def reference(self, menu: Menu) -> Option | None:
        """The endpoint a cost ratio is measured against: the highest tier, then the priciest."""
        if not menu.options:
            return None
        return max(menu.options, key=lambda o: (o.tier, o.rank[1], o.rank[2]))

    def allowance(self, outcomes: Sequence[Outcome], menu: Menu) -> int | None:
        """Nano-dollars the target still allows these subtasks; ``None`` without a ratio target.

        The ratio times what the reference endpoint is expected to cost for them,
        less what their tries cost so far (earlier attempts at the cheapest
        endpoint's expected price).
        """
        ratio, ref = self.target.cost_ratio, self.reference(menu)
        if ratio is None or ref is None:
            return None
        stats, ladder = menu.stats, menu.by_cost()
        every = stats.cell(ref.name)
        strong = spent = 0
        for out in outcomes:
            here = menu.option(out.endpoint)
            if out.endpoint == ref.name and not out.cut_short:
                strong += ref.cost(input_tokens=out.need.prompt_tokens, output_tokens=out.used)
            elif out.cut_short or (unbiased := every.length_explored(out.used)) is None:
                hint = None if out.cut_short else out.used
                strong += self.expected_cost(ref, out.need, stats, hint=hint)
            else:  # escalations chosen at random tell how long the reference answers any subtask
                strong += ref.cost(
                    input_tokens=out.need.prompt_tokens, output_tokens=math.ceil(unbiased)
                )
            if here is not None:
                spent += here.cost(input_tokens=out.need.prompt_tokens, output_tokens=out.used)
            earlier = max(0, out.need.attempt - 1)
            spent += earlier * self.expected_cost(ladder[0], out.need, stats)
        return math.floor(ratio * strong) - spent

    def _candidates(self, outcomes: Sequence[Outcome], menu: Menu) -> list[_Candidate]:
        stats = menu.stats
        found: list[_Candidate] = []
        for out in outcomes:
            here = menu.option(out.endpoint)
            if here is None or out.need.attempt >= self.max_attempts:
                continue
            now = self._now(here, out, stats)
            hint = None if out.cut_short else out.used
            explore = out.need.attempt == 1 and _unit("explore", out.need.subtask_id) < self.explore
            others = [o for o in menu.options if o.name != here.name]
            wild = (
                others[int(_unit("explore-to", out.need.subtask_id) * len(others))]
                if explore and others
                else None
            )
            for other in menu.options:
                if other.name == here.name and not out.cut_short:
                    continue  # the same endpoint again only helps a reply cut short
                if out.need.attempt > 1 and other.tier < here.tier:
                    continue  # a later try never goes back down: that answer is known
                gain = self._before(other, out.need, stats) - now
                forced = other is wild
                if gain < self.min_gain and not forced:
                    continue
                output = self.tier(other.name, out.need.difficulty, stats, hint=hint)
                if hint:  # room for this subtask's reply, however long its first one was
                    longer = stats.cell(other.name).length_after(hint) * self.cold_headroom
                    output = max(output, min(self.max_output, math.ceil(longer)))
                if other.name == here.name:
                    output = max(output, _next_tier(out.asked))
                out_tokens = self.expected_output(other.name, out.need.difficulty, stats, hint=hint)
                extra = max(
                    1, other.cost(input_tokens=out.need.prompt_tokens, output_tokens=out_tokens)
                )
                # once the endpoint has history, never charged below its mean call
                seen = stats.cell(other.name).calls > 0
                mean = self.expected_cost(other, out.need, stats) if seen else 0
                held = other.cost(input_tokens=out.need.prompt_tokens, output_tokens=output)
                expected = max(extra, mean)
                found.append(
                    _Candidate(
                        gain / extra,
                        gain,
                        extra,
                        expected,
                        max(expected, held),
                        out,
                        other,
                        output,
                        forced,
                    )
                )
        return found

    def escalate(self, pool: Pool, outcomes: Sequence[Outcome], *, menu: Menu) -> list[Grant]:
        """The tries with the best gain per extra nano-dollar, within the target and the pool."""
        allowed = self.allowance(outcomes, menu)
        per_point = self.target.usd_per_point
        point_nanos = None if per_point is None else float(per_point) * 1e9 * 100
        grants: list[Grant] = []
        taken: set[str] = set()
        rolled = False
        ranked = sorted(self._candidates(outcomes, menu), key=lambda c: (not c.explore, -c.value))
        for c in ranked:
            sid = c.out.need.subtask_id
            if sid in taken:
                continue
            # finishing a reply cut short on its own endpoint is paid by the pool alone: it
            # is the answer the target already paid for, not a second opinion
            finish = c.out.cut_short and c.option.name == c.out.endpoint
            if allowed is not None and not finish and c.charge_nanos > allowed:
                # The first whose hold does not fit is granted by the policy's dice with the
                # share of its expected cost that does, so a task of one subtask still spends
                # its ratio on average.
                if rolled or _unit("fit", sid, c.out.need.attempt) * c.expected_nanos >= allowed:
                    rolled = True
                    continue
                rolled = True
            if point_nanos is not None and not c.explore and c.gain * point_nanos < c.extra_nanos:
                continue
            grant = _priced_grant(pool, c.out.need, c.option, c.output_tokens)
            if grant is None:
                continue
            grants.append(replace(grant, explore=True) if c.explore else grant)
            taken.add(sid)
            pool = pool.less(grant)
            if allowed is not None and not finish:
                allowed -= c.charge_nanos
        return grants


__all__ = ["Adaptive", "Target"]

"""What earlier calls teach the next allocation: counts per endpoint x difficulty x tag.

Every finished model call is counted once in a few **cells**: one per tag it
carried (the subtask's tags plus run-time signals such as ``cut_short``) and
one for all tags (``*``), each for its own difficulty and for all difficulties
(``0``). A cell counts calls, output tokens asked for and used, replies cut
short, escalations, money, a histogram of output tokens used (for sizing the
next budget by a quantile), and verdicts — right or wrong — when they become
known (a review, or feedback a user records).

The counts live in one Redis hash per **scope** (a tenant, or the shared
scope), updated by a Lua script so an outcome's cells change together, and
exactly once: each outcome and each verdict carries an id whose marker Redis
keeps for ``retention_s``. Reading is one ``HGETALL``; the result is a pure
:class:`Stats` value that policies read without I/O.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from redis.exceptions import NoScriptError

from budgets.coalesce import Coalescer
from budgets.connection import Client, clustered
from budgets.errors import InvalidObservation, UnknownOutcome
from budgets.keys import SHARED_SCOPE, SHARED_SPACE, KeySpace, check_name, check_scope, clean_tag
from budgets.learner import (
    L2,
    LEARNING_RATE,
    RUNTIME_SIGNALS,
    Weights,
    encode,
    question_features,
    reply_features,
)

#: Tag of the cell that counts every call of an endpoint and difficulty.
ANY_TAG = "*"
#: Difficulty of the cell that counts every difficulty.
ANY_DIFFICULTY = 0
#: Scope shared by every task when statistics are not kept per tenant.

_HIST_BASE = 16
_HIST_BUCKETS = 32
#: Largest count one observation may add to a field (the Lua refuses more than 16 digits).
MAX_COUNT = 10**15


def bucket_of(tokens: int) -> int:
    """Histogram bucket of an output-token count: bounds grow by sqrt(2) from 16.

    The last bucket also takes every count above its bound; :meth:`Cell.quantile`
    reports the largest count observed (kept beside the histogram) for it.
    """
    if tokens <= _HIST_BASE:
        return 0
    return min(_HIST_BUCKETS - 1, math.ceil(2 * math.log2(tokens / _HIST_BASE)))


def bucket_bound(index: int) -> int:
    """The largest token count bucket ``index`` holds."""
    return math.floor(_HIST_BASE * 2 ** (index / 2))


@dataclass(frozen=True, slots=True)
class Cell:
    """The counts of one endpoint x difficulty x tag.

    ``peak`` is the most output tokens one call used (kept on ``*`` cells, with the histogram).
    ``pairs``, ``pair_before``, ``pair_used``, ``pair_before_sq``, ``pair_cross``: over
    escalated calls that know the output tokens *b* of the try they escalated from, their
    count and the sums of *b*, of their own output *u*, of *b²* and of *b·u* — a line of how
    long this endpoint answers a subtask given how long the escalated-from reply was.
    """

    calls: int = 0
    asked: int = 0
    used: int = 0
    cut: int = 0
    escalated: int = 0
    ok: int = 0
    bad: int = 0
    nanos: int = 0
    hist: tuple[int, ...] = ()
    peak: int = 0
    pair_before: int = 0
    pair_used: int = 0
    pairs: int = 0
    pair_before_sq: int = 0
    pair_cross: int = 0
    #: The same sums over explored escalations only (chosen at random, so unbiased).
    explored: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)

    @property
    def judged(self) -> int:
        """How many calls have a verdict."""
        return self.ok + self.bad

    def success(self, prior: float, weight: float = 2.0) -> float:
        """Share of judged calls that were right, shrunk toward ``prior`` by ``weight`` calls."""
        return (self.ok + prior * weight) / (self.judged + weight)

    @property
    def cut_rate(self) -> float:
        """Share of calls whose reply was cut short by its token limit."""
        return self.cut / self.calls if self.calls else 0.0

    @property
    def mean_nanos(self) -> float | None:
        """Average cost of a call, or ``None`` before the first."""
        return self.nanos / self.calls if self.calls else None

    @property
    def idle_ratio(self) -> float:
        """Share of asked-for output tokens that went unused."""
        return 1 - self.used / self.asked if self.asked else 0.0

    def length_ratio(self, prior_weight: float = 50.0) -> float:
        """Output tokens per output token of the try escalated from, shrunk toward 1."""
        return (self.pair_used + prior_weight) / (self.pair_before + prior_weight)

    def length_after(self, before: int, *, min_pairs: int = 10) -> float:
        """Expected output tokens after a reply of ``before`` tokens was escalated here.

        A least-squares line over the pairs (slope clamped to 0-3), once ``min_pairs`` were
        seen; the shrunk ratio before. A line, not a ratio: the short replies escalated
        first are often followed by long ones.
        """
        sums = (self.pairs, self.pair_before, self.pair_used, self.pair_before_sq, self.pair_cross)
        line = _line(sums, before, min_pairs)
        return before * self.length_ratio() if line is None else line

    def length_explored(self, before: int, *, min_pairs: int = 8) -> float | None:
        """:meth:`length_after` from explored escalations only; ``None`` with too few."""
        return _line(self.explored, before, min_pairs)

    def quantile(self, q: float) -> int | None:
        """Output tokens that ``q`` of calls stayed within (a bucket bound); ``None`` if none.

        The last bucket has no upper bound: for it the largest count observed is reported.
        """
        total = sum(self.hist)
        if total == 0:
            return None
        goal, seen = q * total, 0
        for index, count in enumerate(self.hist):
            seen += count
            if seen >= goal:
                return self._bound(index)
        return self._bound(len(self.hist) - 1)

    def _bound(self, index: int) -> int:
        if index >= _HIST_BUCKETS - 1 and self.peak:
            return self.peak
        return bucket_bound(index)


def _line(sums: tuple[int, int, int, int, int], before: int, min_pairs: int) -> float | None:
    """Least squares of u on b at ``before`` from (n, Σb, Σu, Σb², Σbu); slope within 0-3."""
    n, sb, su, sbb, sbu = sums
    spread = sbb - sb**2 / n if n else 0.0
    if n < min_pairs or spread <= 0:
        return None
    slope = min(3.0, max(0.0, (sbu - sb * su / n) / spread))
    return max(1.0, (su - slope * sb) / n + slope * before)


_EMPTY = Cell()


@dataclass(frozen=True, slots=True)
class Stats:
    """A scope's cells and learner weights as read at one moment; pure, safe to share."""

    cells: Mapping[tuple[str, int, str], Cell] = field(default_factory=dict)
    model: Weights = field(default_factory=Weights)

    def cell(self, endpoint: str, difficulty: int = ANY_DIFFICULTY, tag: str = ANY_TAG) -> Cell:
        """One cell (empty when nothing was counted there yet)."""
        return self.cells.get((endpoint, difficulty, tag), _EMPTY)

    @classmethod
    def from_fields(cls, raw: Mapping[Any, Any], model: Mapping[Any, Any] | None = None) -> Stats:
        """Parse the Redis hashes: cells (``<endpoint>|<difficulty>|<tag>|<metric>`` -> count)
        and, when given, the learner's (:meth:`Weights.from_fields`)."""
        counts: dict[tuple[str, int, str], dict[str, int]] = {}
        for key, value in raw.items():
            text = key.decode() if isinstance(key, bytes) else str(key)
            parts = text.split("|")
            if len(parts) != 4 or not parts[1].isdigit():
                continue
            endpoint, difficulty, tag, metric = parts
            counts.setdefault((endpoint, int(difficulty), tag), {})[metric] = int(value)
        cells = {}
        for where, metrics in counts.items():
            hist = [metrics.get(f"h{i}", 0) for i in range(_HIST_BUCKETS)]
            while hist and hist[-1] == 0:
                hist.pop()
            cells[where] = Cell(
                calls=metrics.get("n", 0),
                asked=metrics.get("a", 0),
                used=metrics.get("u", 0),
                cut=metrics.get("c", 0),
                escalated=metrics.get("e", 0),
                ok=metrics.get("ok", 0),
                bad=metrics.get("bad", 0),
                nanos=metrics.get("nanos", 0),
                hist=tuple(hist),
                peak=metrics.get("max", 0),
                pair_before=metrics.get("pb", 0),
                pair_used=metrics.get("pu", 0),
                pairs=metrics.get("pn", 0),
                pair_before_sq=metrics.get("pbb", 0),
                pair_cross=metrics.get("pbu", 0),
                explored=(
                    metrics.get("xn", 0),
                    metrics.get("xb", 0),
                    metrics.get("xu", 0),
                    metrics.get("xbb", 0),
                    metrics.get("xbu", 0),
                ),
            )
        return cls(cells, Weights.from_fields(model or {}))


@dataclass(frozen=True, slots=True)
class Observation:
    """One finished call as the statistics count it."""

    endpoint: str
    difficulty: int
    tags: tuple[str, ...]
    asked: int
    used: int
    cut_short: bool
    nanos: int
    escalated: bool = False
    #: The prompt's tokens (a feature of the learner; 0 when unknown).
    prompt_tokens: int = 0
    #: The reply's own signals, apart from the subtask's tags. Run-time signals the
    #: flow puts among the tags (``cut_short``, ``empty``, ``rejected``) count as signals too.
    signals: tuple[str, ...] = ()
    #: Output tokens of the try this one escalated from (0: a first try, or unknown).
    before_used: int = 0
    #: The policy escalated it to learn (``Grant.explore``), not for its gain.
    explored: bool = False

    def check(self) -> None:
        """Raise :class:`InvalidObservation` naming the first field of the wrong type or range."""
        check_name("endpoint", self.endpoint)
        _check_difficulty(self.difficulty)
        for name in ("tags", "signals"):
            value = getattr(self, name)
            if not isinstance(value, (tuple, list)) or not all(isinstance(t, str) for t in value):
                raise InvalidObservation(name, value, "must be a tuple of strings")
        for name in ("asked", "used", "nanos", "prompt_tokens", "before_used"):
            value = getattr(self, name)
            if type(value) is not int:  # bool, float, NaN, str ... are refused
                raise InvalidObservation(name, value, "must be an int")
            if value < 0:
                raise InvalidObservation(name, value, "must not be negative")
            if value > MAX_COUNT:
                raise InvalidObservation(name, value, f"must be at most {MAX_COUNT}")
        for name in ("cut_short", "escalated", "explored"):
            if type(getattr(self, name)) is not bool:
                raise InvalidObservation(name, getattr(self, name), "must be a bool")

    def prefixes(self) -> list[str]:
        """The ``<endpoint>|<difficulty>|<tag>|`` prefix of every cell this call counts in."""
        return cell_prefixes(self.endpoint, self.difficulty, (*self.tags, *self.signals))

    def features(self) -> str:
        """The try's features for the learner, encoded as the outcome's marker keeps them."""
        tags = [t for t in self.tags if clean_tag(t) not in RUNTIME_SIGNALS]
        signals = [*self.signals, *(t for t in self.tags if clean_tag(t) in RUNTIME_SIGNALS)]
        if self.cut_short:
            signals.append("cut_short")
        return encode(
            self.endpoint,
            {
                "q": question_features(self.difficulty, tags, self.prompt_tokens),
                "r": reply_features(self.difficulty, tags, self.prompt_tokens, signals),
            },
        )

    def peaks(self) -> list[str]:
        """The ``max`` field of every cell that keeps a histogram: raised to ``used`` if below."""
        return [p + "max" for p in self.prefixes() if p.endswith(f"|{ANY_TAG}|")]

    def fields(self) -> list[tuple[str, int]]:
        """Every (field, increment) this call adds."""
        values = {
            "n": 1,
            "a": self.asked,
            "u": self.used,
            "c": int(self.cut_short),
            "e": int(self.escalated),
            "nanos": self.nanos,
        }
        if self.before_used:
            b = self.before_used
            pair = {"n": 1, "b": b, "u": self.used, "bb": b * b, "bu": b * self.used}
            values |= {f"p{m}": v for m, v in pair.items()}
            if self.explored:
                values |= {f"x{m}": v for m, v in pair.items()}
        out: list[tuple[str, int]] = []
        for prefix in self.prefixes():
            out.extend((prefix + m, v) for m, v in values.items() if v)
            if prefix.endswith(f"|{ANY_TAG}|"):
                out.append((prefix + f"h{bucket_of(self.used)}", 1))
        return out


def cell_prefixes(endpoint: str, difficulty: int, tags: Iterable[str]) -> list[str]:
    """Prefixes of the cells of a call: its difficulty and all difficulties, each tag and ``*``."""
    check_name("endpoint", endpoint)
    _check_difficulty(difficulty)
    names = [ANY_TAG, *sorted({clean_tag(t) for t in tags})]
    return [f"{endpoint}|{d}|{t}|" for d in (difficulty, ANY_DIFFICULTY) for t in names]


def _check_difficulty(difficulty: object) -> None:
    if type(difficulty) is not int:
        raise InvalidObservation("difficulty", difficulty, "must be an int")
    if not 1 <= difficulty <= 5:
        raise InvalidObservation("difficulty", difficulty, "must be 1-5")


def _read_lua(name: str) -> str:
    return resources.files("budgets").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


class StatsBook:
    """Reads and updates the statistics of each scope in Redis."""

    def __init__(
        self,
        redis: Client,
        *,
        retention_s: int = 30 * 86400,
        learning_rate: float = LEARNING_RATE,
        l2: float = L2,
        space: KeySpace = SHARED_SPACE,
    ) -> None:
        if retention_s < 1:
            raise ValueError(f"retention_s must be at least 1, got {retention_s}")
        if not all(math.isfinite(x) and x >= 0 for x in (learning_rate, l2)):
            raise ValueError(f"learning_rate and l2 must be >= 0, got {learning_rate}, {l2}")
        self.redis = redis
        #: Where the scopes' keys live (``pm:``, or ``pm:<tenant>:`` when fenced).
        self.space = space
        self.retention_s = retention_s
        self.learning_rate = learning_rate
        self.l2 = l2
        self._record = redis.register_script(_read_lua("stats_record"))
        self._verdict = redis.register_script(_read_lua("stats_verdict"))
        # Outcomes counted while a count is in flight go together, in one pipeline.
        self._counts: Coalescer[tuple[list[str], list[str | int]], Any] = Coalescer(
            self._count_batch
        )

    async def _count_batch(self, items: list[tuple[list[str], list[str | int]]]) -> list[Any]:
        if len(items) == 1:
            ((keys, args),) = items
            return [await self._record(keys=keys, args=args)]
        if clustered(self.redis):  # no scripts in a cluster pipeline: each to its slot's node
            return list(
                await asyncio.gather(
                    *(self._record(keys=keys, args=args) for keys, args in items),
                    return_exceptions=True,
                )
            )
        # EVALSHA itself: a registered script in a pipeline would first ask SCRIPT EXISTS,
        # one more round trip for every batch.
        pipe = self.redis.pipeline(transaction=False)
        for keys, args in items:
            pipe.evalsha(self._record.sha, len(keys), *keys, *args)
        replies: list[Any] = list(await pipe.execute(raise_on_error=False))
        lost = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if lost:  # a restarted or flushed server: load the script and send those again
            await self.redis.script_load(self._record.script)
            again = await self._count_batch([items[i] for i in lost])
            for i, reply in zip(lost, again, strict=True):
                replies[i] = reply
        return replies

    async def read(self, scope: str) -> Stats:
        """Every cell of ``scope`` and its learner's weights (two reads of one slot)."""
        keys = self.space.stats(check_scope(scope))
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hgetall(keys.cells)
            pipe.hgetall(keys.model)
            cells, model = await pipe.execute()
        return Stats.from_fields(cells, model)

    async def record(self, scope: str, outcome_id: str, seen: Observation) -> bool:
        """Count a call once; ``False`` when ``outcome_id`` was already counted.

        The outcome's cells are stored with its marker, for :meth:`verdict`.
        Raises :class:`~budgets.errors.InvalidObservation` (nothing written) on a bad field.
        """
        keys = self.space.stats(check_scope(scope))
        check_name("outcome id", outcome_id)
        seen.check()
        prefixes = seen.prefixes()
        peaks = seen.peaks()
        args: list[str | int] = [
            self.retention_s,
            "\n".join(prefixes),
            seen.used,
            seen.features(),
            len(peaks),
        ]
        args.extend(peaks)
        for name, inc in seen.fields():
            args.extend((name, inc))
        where = [
            keys.cells,
            keys.outcome_seen(outcome_id),
            keys.verdict_seen(outcome_id),
            keys.features_seen(outcome_id),
        ]
        counted = await self._counts((where, args))
        if isinstance(counted, list):  # {-1, index}: Python's checks should have caught it
            index = int(counted[1])
            raise InvalidObservation(f"script argument {index}", args[index - 1], "was refused")
        return bool(counted)

    async def verdict(self, scope: str, outcome_id: str, *, ok: bool) -> bool:
        """Count a recorded call as right or wrong, in the cells it was recorded in.

        A repeated verdict changes nothing (``False``); a new one moves the count.
        Raises :class:`~budgets.errors.UnknownOutcome` (nothing changed) when
        ``outcome_id`` was never recorded in ``scope`` or its marker expired.
        """
        keys = self.space.stats(check_scope(scope))
        check_name("outcome id", outcome_id)
        if type(ok) is not bool:
            raise InvalidObservation("ok", ok, "must be a bool")
        where = [
            keys.cells,
            keys.outcome_seen(outcome_id),
            keys.verdict_seen(outcome_id),
            keys.features_seen(outcome_id),
            keys.model,
        ]
        args = [self.retention_s, "ok" if ok else "bad", repr(self.learning_rate), repr(self.l2)]
        moved = await self._verdict(keys=where, args=args)
        if moved == -1:
            raise UnknownOutcome(scope, outcome_id)
        if moved == -2:  # Python's checks should have caught it
            raise InvalidObservation(
                "learning_rate", (self.learning_rate, self.l2), "and l2 must be numbers >= 0"
            )
        return bool(moved)

    async def clear(self, scope: str) -> None:
        """Forget a scope's counts and weights (its markers expire on their own)."""
        keys = self.space.stats(check_scope(scope))
        await self.redis.delete(keys.cells, keys.model)


__all__ = [
    "ANY_DIFFICULTY",
    "ANY_TAG",
    "SHARED_SCOPE",
    "Cell",
    "Observation",
    "Stats",
    "StatsBook",
    "bucket_bound",
    "bucket_of",
    "cell_prefixes",
    "clean_tag",
]

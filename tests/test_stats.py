"""StatsBook against a real redis-server: every cell counted, once, atomically, per scope."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import random
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace
from importlib import resources

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from budgets.connection import redis_client
from budgets.errors import InvalidName, InvalidObservation, PaymasterError, UnknownOutcome
from budgets.keys import StatsKeys
from budgets.learner import learn
from budgets.money import Price
from budgets.policy import Adaptive, Option
from budgets.stats import (
    ANY_DIFFICULTY,
    Cell,
    Observation,
    Stats,
    StatsBook,
    bucket_bound,
    bucket_of,
)

pytestmark = pytest.mark.both_redis

SEEN = Observation(
    endpoint="cheap",
    difficulty=3,
    tags=("math", "Code Review"),
    asked=512,
    used=300,
    cut_short=True,
    nanos=1_234,
    escalated=True,
)
CELLS = {("cheap", d, t) for d in (3, ANY_DIFFICULTY) for t in ("*", "math", "code-review")}
VERDICT = {"endpoint": "cheap", "difficulty": 3, "tags": ("math", "Code Review")}


@pytest.fixture
async def book(redis_url: str) -> AsyncIterator[StatsBook]:
    client = redis_client(redis_url)
    yield StatsBook(client)
    await client.aclose()


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def cells(book: StatsBook, scope: str) -> dict[str, int]:
    """The scope's hash as field -> count."""
    raw = await book.redis.hgetall(StatsKeys(scope).cells)
    return {text(k): int(v) for k, v in raw.items()}


async def everything(book: StatsBook) -> dict[bytes | str, object]:
    """Every key on the server with its value (hashes and strings are all StatsBook writes)."""
    out: dict[bytes | str, object] = {}
    for key in sorted([k async for k in book.redis.scan_iter(match="*")]):  # every node's
        kind = await book.redis.type(key)
        out[key] = await (book.redis.hgetall(key) if kind == "hash" else book.redis.get(key))
    return out


async def judge(book: StatsBook, scope: str, outcome_id: str, *, ok: bool) -> bool:
    return await book.verdict(scope, outcome_id, ok=ok)


# -- record ----------------------------------------------------------------------


async def test_record_counts_every_cell_of_an_observation(book: StatsBook) -> None:
    assert await book.record("t:a", "task1:root:s1.1", SEEN) is True
    stats = await book.read("t:a")
    assert set(stats.cells) == CELLS
    for where in CELLS:
        cell = stats.cells[where]
        assert (cell.calls, cell.asked, cell.used, cell.cut, cell.escalated, cell.nanos) == (
            1, 512, 300, 1, 1, 1_234,
        )  # fmt: skip
        assert (cell.ok, cell.bad) == (0, 0)
    bucket = bucket_of(300)
    for difficulty in (3, ANY_DIFFICULTY):
        hist = stats.cell("cheap", difficulty).hist
        assert len(hist) == bucket + 1
        assert hist[bucket] == 1
        assert sum(hist) == 1
        assert stats.cell("cheap", difficulty, "math").hist == ()  # only '*' cells
    raw = await cells(book, "t:a")
    assert raw[f"cheap|3|*|h{bucket}"] == 1
    assert raw["cheap|0|code-review|u"] == 300


async def test_records_add_up_and_match_the_pure_sum(book: StatsBook) -> None:
    rng = random.Random(7)
    expected: Counter[str] = Counter()
    for i in range(40):
        asked = rng.randint(0, 3_000)
        seen = Observation(
            endpoint=rng.choice(["cheap", "strong"]),
            difficulty=rng.randint(1, 5),
            tags=tuple(rng.sample(["math", "code", "calc-bad"], rng.randint(0, 2))),
            asked=asked,
            used=rng.randint(0, asked),
            cut_short=rng.random() < 0.3,
            nanos=rng.randint(0, 10**6),
            escalated=rng.random() < 0.2,
        )
        assert await book.record("shared", f"o{i}", seen) is True
        for name, inc in seen.fields():
            expected[name] += inc
        for name in seen.peaks():  # the most tokens one call used, beside each histogram
            if seen.used > expected[name]:
                expected[name] = seen.used
    assert await book.read("shared") == Stats.from_fields(dict(expected))
    assert await cells(book, "shared") == dict(expected)


async def test_the_same_outcome_counts_once(book: StatsBook) -> None:
    assert await book.record("t:a", "o1", SEEN) is True
    before = await cells(book, "t:a")
    assert await book.record("t:a", "o1", SEEN) is False
    other = Observation("strong", 5, ("x",), asked=9, used=9, cut_short=False, nanos=9)
    assert await book.record("t:a", "o1", other) is False  # the id decides, not the content
    assert await cells(book, "t:a") == before
    assert (await book.read("t:a")).cell("cheap").calls == 1
    assert (await book.read("t:a")).cell("strong").calls == 0
    assert await book.record("t:a", "o2", SEEN) is True
    assert (await book.read("t:a")).cell("cheap", 3, "math").calls == 2


async def test_outcome_markers_expire_after_retention(book: StatsBook) -> None:
    short = StatsBook(book.redis, retention_s=100)
    await short.record("t:a", "o1", SEEN)
    ttl = await book.redis.ttl(StatsKeys("t:a").outcome_seen("o1"))
    assert 0 < ttl <= 100
    with pytest.raises(ValueError, match="retention_s"):
        StatsBook(book.redis, retention_s=0)


# -- verdicts ----------------------------------------------------------------------


async def test_verdict_counts_ok_in_every_cell(book: StatsBook) -> None:
    await book.record("t:a", "o1", SEEN)
    assert await judge(book, "t:a", "o1", ok=True) is True
    stats = await book.read("t:a")
    for where in CELLS:
        assert (stats.cells[where].ok, stats.cells[where].bad) == (1, 0)
        assert stats.cells[where].calls == 1  # a verdict is no call


async def test_repeated_verdict_is_a_no_op(book: StatsBook) -> None:
    await book.record("t:a", "o1", SEEN)
    assert await judge(book, "t:a", "o1", ok=True) is True
    before = await cells(book, "t:a")
    assert await judge(book, "t:a", "o1", ok=True) is False
    assert await cells(book, "t:a") == before


async def test_changed_verdict_moves_the_count(book: StatsBook) -> None:
    await book.record("t:a", "o1", SEEN)
    await book.record("t:a", "o2", SEEN)
    await judge(book, "t:a", "o1", ok=True)
    await judge(book, "t:a", "o2", ok=True)
    assert await judge(book, "t:a", "o1", ok=False) is True
    stats = await book.read("t:a")
    for where in CELLS:
        cell = stats.cells[where]
        assert (cell.ok, cell.bad, cell.judged) == (1, 1, 2)
    assert await judge(book, "t:a", "o1", ok=False) is False
    assert await judge(book, "t:a", "o1", ok=True) is True  # and back
    cell = (await book.read("t:a")).cell("cheap", 3, "code-review")
    assert (cell.ok, cell.bad) == (2, 0)


# -- concurrency -------------------------------------------------------------------

WORKERS, DISTINCT, DUPLICATES = 4, 200, 50
TOGETHER = Observation("cheap", 2, ("x",), asked=10, used=7, cut_short=False, nanos=3)


def _record_many(url: str, worker: int) -> int:
    """Record DISTINCT own outcomes and DUPLICATES of a shared one; how many counted."""

    async def go() -> int:
        client = redis_client(url)
        book = StatsBook(client)
        ids = [f"w{worker}-{i}" for i in range(DISTINCT)]
        for at in range(0, DISTINCT + DUPLICATES, (DISTINCT + DUPLICATES) // DUPLICATES):
            ids.insert(at, "everyone")
        gate = asyncio.Semaphore(32)

        async def one(oid: str) -> bool:
            async with gate:
                return await book.record("shared", oid, TOGETHER)

        counted = await asyncio.gather(*(one(oid) for oid in ids))
        await client.aclose()
        return sum(counted)

    return asyncio.run(go())


async def test_concurrent_processes_count_each_outcome_exactly_once(
    book: StatsBook, redis_url: str
) -> None:
    def run() -> list[int]:
        with mp.get_context("spawn").Pool(WORKERS) as pool:
            return pool.starmap(_record_many, [(redis_url, w) for w in range(WORKERS)])

    counted = await asyncio.to_thread(run)
    calls = WORKERS * DISTINCT + 1
    assert sum(counted) == calls  # exactly one process counted the shared outcome
    assert sorted(c - DISTINCT for c in counted) == [0] * (WORKERS - 1) + [1]
    stats = await book.read("shared")
    for difficulty in (2, ANY_DIFFICULTY):
        for tag in ("*", "x"):
            cell = stats.cell("cheap", difficulty, tag)
            assert (cell.calls, cell.asked, cell.used, cell.nanos) == (
                calls, 10 * calls, 7 * calls, 3 * calls,
            )  # fmt: skip
        assert sum(stats.cell("cheap", difficulty).hist) == calls


async def test_counts_sent_together_after_the_server_lost_its_scripts_still_count_once(
    book: StatsBook,
) -> None:
    await book.record("t:a", "first", SEEN)  # the script is loaded...
    await book.redis.script_flush()  # ...and lost (a restart)
    ids = [f"o{i}" for i in range(6)]
    # Counts in flight together go as one pipeline of EVALSHA; each one refused with
    # NOSCRIPT is sent again once the script is loaded, and counts exactly once.
    assert await asyncio.gather(*(book.record("t:a", oid, SEEN) for oid in ids)) == [True] * 6
    assert await asyncio.gather(*(book.record("t:a", oid, SEEN) for oid in ids)) == [False] * 6
    assert (await book.read("t:a")).cell("cheap").calls == 7


# -- bad input -----------------------------------------------------------------------


def _bad(**changes: object) -> Observation:
    fields = {
        "endpoint": "cheap",
        "difficulty": 3,
        "tags": ("math",),
        "asked": 10,
        "used": 5,
        "cut_short": False,
        "nanos": 1,
    }
    fields.update(changes)
    return Observation(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("scope", "outcome_id", "seen", "error", "match"),
    [
        ("bad scope", "o2", SEEN, InvalidName, "invalid scope"),
        ("", "o2", SEEN, InvalidName, "invalid scope"),
        ("t/a", "o2", SEEN, InvalidName, "invalid scope"),
        ("t:a", "bad/id", SEEN, InvalidName, "invalid outcome id"),
        ("t:a", "", SEEN, InvalidName, "invalid outcome id"),
        ("t:a", "o2", _bad(difficulty=0), ValueError, "difficulty must be 1-5, got 0"),
        ("t:a", "o2", _bad(difficulty=6), ValueError, "difficulty must be 1-5, got 6"),
        ("t:a", "o2", _bad(asked=-1), ValueError, "asked must not be negative"),
        ("t:a", "o2", _bad(used=-5), ValueError, "used must not be negative"),
        ("t:a", "o2", _bad(nanos=-1), ValueError, "nanos must not be negative"),
        ("t:a", "o2", _bad(endpoint="no|pipes"), InvalidName, "invalid endpoint"),
    ],
)
async def test_bad_record_is_refused_and_changes_nothing(
    book: StatsBook,
    scope: str,
    outcome_id: str,
    seen: Observation,
    error: type[Exception],
    match: str,
) -> None:
    await book.record("t:a", "o1", SEEN)
    await judge(book, "t:a", "o1", ok=True)
    before = await everything(book)
    with pytest.raises(error, match=match):
        await book.record(scope, outcome_id, seen)
    assert await everything(book) == before
    # nothing was marked either: the same id with good input still counts
    assert await book.record("t:a", "o2", SEEN) is True


async def test_bad_verdict_is_refused_and_changes_nothing(book: StatsBook) -> None:
    await book.record("t:a", "o1", SEEN)
    await judge(book, "t:a", "o1", ok=True)
    before = await everything(book)
    with pytest.raises(InvalidName, match="invalid scope"):
        await book.verdict("bad scope", "o1", ok=False)
    with pytest.raises(InvalidName, match="invalid outcome id"):
        await book.verdict("t:a", "o 1", ok=False)
    with pytest.raises(InvalidObservation, match="ok must be a bool"):
        await book.verdict("t:a", "o1", ok=0)  # type: ignore[arg-type]
    with pytest.raises(UnknownOutcome, match="no outcome 'never'"):
        await book.verdict("t:a", "never", ok=False)
    with pytest.raises(UnknownOutcome):  # recorded in another scope only
        await book.verdict("t:b", "o1", ok=False)
    assert await everything(book) == before


# -- an outcome is counted whole or not at all (issue 10, section 5) ---------------

BAD_FIELDS = [
    ("asked", 512.0),
    ("used", 300.5),
    ("used", float("nan")),
    ("nanos", float("inf")),
    ("nanos", -1),
    ("asked", True),
    ("used", "300"),
    ("nanos", 10**16),
    ("difficulty", 3.0),
    ("difficulty", True),
    ("cut_short", 1),
    ("escalated", "yes"),
    ("tags", ("ok", 7)),
]


@pytest.mark.parametrize(("name", "value"), BAD_FIELDS)
async def test_a_bad_observation_is_refused_before_any_write_and_can_be_recorded_later(
    book: StatsBook, name: str, value: object
) -> None:
    await book.record("t:a", "o1", SEEN)
    before = await everything(book)
    bad = _bad(**{name: value})
    with pytest.raises(InvalidObservation, match=f"invalid observation: {name} ") as caught:
        await book.record("t:a", "o2", bad)
    assert caught.value.field == name
    assert isinstance(caught.value, PaymasterError)
    assert await everything(book) == before  # no marker, no count
    good = _bad()
    assert await book.record("t:a", "o2", good) is True  # the same id still counts
    assert (await book.read("t:a")).cell("cheap", 3).calls == 2


async def test_the_record_script_checks_everything_before_its_first_write(
    book: StatsBook,
) -> None:
    """Called past Python's checks, the Lua itself refuses a float and leaves no marker."""
    script = book.redis.register_script(
        resources.files("budgets").joinpath("lua", "stats_record.lua").read_text()
    )
    keys = StatsKeys("t:a")
    where = [
        keys.cells, keys.outcome_seen("o9"), keys.verdict_seen("o9"), keys.features_seen("o9")
    ]  # fmt: skip
    feats = "cheap|q\tbias=1.0"
    args: list[str | int] = [
        60, "cheap|2|*|\ncheap|0|*|", 5, feats, 1, "cheap|2|*|max", "cheap|2|*|n", 1
    ]  # fmt: skip
    for wrong in (["cheap|2|*|u", "5.5"], ["cheap|2|*|u", "-1"], ["cheap|2|*|u"]):
        assert (await script(keys=where, args=[*args, *wrong]))[0] == -1
        assert await everything(book) == {}
    assert await script(keys=where, args=args) == 1
    assert await book.redis.get(keys.outcome_seen("o9")) == "cheap|2|*|\ncheap|0|*|"
    assert await book.redis.get(keys.features_seen("o9")) == feats


# -- a verdict moves counts only in the cells its outcome was recorded in ------------


async def test_a_verdict_on_an_outcome_never_recorded_is_refused(book: StatsBook) -> None:
    with pytest.raises(UnknownOutcome):
        await book.verdict("t:a", "ghost", ok=True)
    assert await everything(book) == {}  # no counts, no verdict marker


async def test_a_verdict_touches_only_the_cells_the_outcome_was_recorded_in(
    book: StatsBook,
) -> None:
    other = _bad(endpoint="strong", difficulty=5, tags=("math", "other"))
    await book.record("t:a", "o1", SEEN)
    await book.record("t:a", "o2", other)
    await judge(book, "t:a", "o2", ok=True)
    untouched = {k: v for k, v in (await cells(book, "t:a")).items() if k.startswith("strong|")}
    for ok in (True, False, True, False):  # whatever a caller believed the cells were
        await judge(book, "t:a", "o1", ok=ok)
    now = await cells(book, "t:a")
    assert {k: v for k, v in now.items() if k.startswith("strong|")} == untouched
    stats = await book.read("t:a")
    judged = {where for where, cell in stats.cells.items() if cell.judged}
    assert judged == CELLS | {w for w in stats.cells if w[0] == "strong"}
    for where in CELLS:
        assert (stats.cells[where].ok, stats.cells[where].bad) == (0, 1)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.tuples(st.sampled_from(["record", "ok", "bad", "clear"]), st.integers(0, 3)),
        max_size=30,
    )
)
async def test_no_sequence_of_records_verdicts_and_clears_makes_a_count_negative(
    book: StatsBook, steps: list[tuple[str, int]]
) -> None:
    await book.redis.flushdb()
    cleared = False
    for step, n in steps:
        oid = f"o{n}"
        if step == "record":
            await book.record("t:a", oid, _bad(difficulty=1 + n, tags=(f"t{n}",)))
        elif step == "clear":
            await book.clear("t:a")
            cleared = True
        else:
            with contextlib.suppress(UnknownOutcome):  # a verdict before its record is refused
                await judge(book, "t:a", oid, ok=step == "ok")
        counts = await cells(book, "t:a")
        assert all(v >= 0 for v in counts.values()), counts
        if not cleared:  # a clear forgets counts but not markers, so verdicts may outnumber calls
            for where, cell in (await book.read("t:a")).cells.items():
                assert cell.judged <= cell.calls, (where, cell)


async def test_bad_scope_on_read_and_clear(book: StatsBook) -> None:
    with pytest.raises(InvalidName, match="invalid scope"):
        await book.read("no spaces")
    with pytest.raises(InvalidName, match="invalid scope"):
        await book.clear("*")


# -- scopes ------------------------------------------------------------------------


async def test_scopes_are_isolated(book: StatsBook) -> None:
    await book.record("t:a", "o1", SEEN)
    await judge(book, "t:a", "o1", ok=True)
    assert (await book.read("t:b")).cells == {}
    assert await cells(book, "t:b") == {}
    # the same outcome id is a different outcome in another scope
    assert await book.record("t:b", "o1", SEEN) is True
    assert await judge(book, "t:b", "o1", ok=False) is True
    a, b = await book.read("t:a"), await book.read("t:b")
    assert (a.cell("cheap").calls, a.cell("cheap").ok, a.cell("cheap").bad) == (1, 1, 0)
    assert (b.cell("cheap").calls, b.cell("cheap").ok, b.cell("cheap").bad) == (1, 0, 1)


async def test_clear_forgets_a_scope(book: StatsBook) -> None:
    await book.record("t:a", "o1", SEEN)
    await book.record("t:b", "o1", SEEN)
    await book.clear("t:a")
    assert (await book.read("t:a")).cells == {}
    assert await book.redis.exists(StatsKeys("t:a").cells) == 0
    assert (await book.read("t:b")).cell("cheap").calls == 1
    # markers outlive a clear: an outcome already counted is not counted again
    assert await book.record("t:a", "o1", SEEN) is False
    assert await book.record("t:a", "o2", SEEN) is True
    assert (await book.read("t:a")).cell("cheap").calls == 1
    await book.clear("never-used")  # clearing an empty scope is fine


# -- what the adaptive policy reads back -----------------------------------------

MID = Option("mid", "remote", 2, Price.of("0.1", "0.4"))


async def test_a_tag_every_call_carries_leaves_each_difficulty_at_its_own_rate(
    book: StatsBook,
) -> None:
    """Easy calls all right, hard ones mostly wrong, all tagged ``x``: ``x`` says nothing."""
    for i in range(20):
        for difficulty, ok in ((1, True), (5, i < 6)):
            oid = f"d{difficulty}-{i}"
            await book.record("t:a", oid, _bad(endpoint="mid", difficulty=difficulty, tags=("x",)))
            await judge(book, "t:a", oid, ok=ok)
    stats, policy = await book.read("t:a"), Adaptive()
    assert stats.model.updates("mid", "q") == 40  # the learner took every verdict
    easy, hard = (policy.chance(MID, d, ["x", "X "], stats) for d in (1, 5))
    assert easy > 0.8
    assert hard < 0.45  # the hard calls' own rate (6 in 20), not everyone's (26 in 40)


async def test_correlated_signals_are_not_counted_twice(book: StatsBook) -> None:
    """Two signals that always come together are one piece of evidence, not two."""
    for i in range(40):
        ok = i % 2 == 0
        signals = () if ok else ("no-final", "few-steps")
        seen = _bad(endpoint="mid", difficulty=3, tags=())
        await book.record("t:a", f"o{i}", replace(seen, signals=signals))
        await judge(book, "t:a", f"o{i}", ok=ok)
    stats, policy = await book.read("t:a"), Adaptive()
    both = policy.chance(MID, 3, [], stats, signals=["no-final", "few-steps"])
    one = policy.chance(MID, 3, [], stats, signals=["no-final"])
    clean = policy.chance(MID, 3, [], stats, signals=[])
    assert both < one < clean
    assert both > 0.05  # the pair's own rate (0 in 20) shrunk, not its square


async def test_a_tag_seen_only_on_wrong_answers_lowers_the_chance(book: StatsBook) -> None:
    for i in range(20):
        ok = i % 2 == 0
        tags = () if ok else ("shaky",)
        await book.record("t:a", f"o{i}", _bad(endpoint="mid", difficulty=4, tags=tags))
        await judge(book, "t:a", f"o{i}", ok=ok)
    stats, policy = await book.read("t:a"), Adaptive()
    assert policy.chance(MID, 4, ["shaky"], stats) < policy.chance(MID, 4, [], stats) - 0.1


async def test_quantiles_above_the_last_bucket_bound_report_the_observed_maximum(
    book: StatsBook,
) -> None:
    top = bucket_bound(31)
    assert top == 741_455
    for i, used in enumerate([800_000] * 9 + [2_000_000]):
        await book.record("t:a", f"o{i}", _bad(asked=used, used=used))
    cell = (await book.read("t:a")).cell("cheap", 3)
    assert cell.peak == 2_000_000
    assert cell.quantile(0.5) == 2_000_000 > top  # an upper bound: never below what was seen
    assert (await book.read("t:a")).cell("cheap", 0).quantile(1.0) == 2_000_000
    # below the last bucket nothing changes, and a smaller call never lowers the peak
    await book.record("t:a", "small", _bad(used=100))
    cell = (await book.read("t:a")).cell("cheap", 3)
    assert (cell.peak, cell.quantile(0.05)) == (2_000_000, bucket_bound(bucket_of(100)))


# -- the learner's step, in the verdict's script ------------------------------------------


async def test_a_verdict_takes_the_learners_step_once_as_learn_does(book: StatsBook) -> None:
    rows = [
        ("o1", replace(_bad(), signals=("calc-bad",), prompt_tokens=300), False),
        ("o2", replace(_bad(tags=("math", "q:percent")), prompt_tokens=80), True),
        ("o3", replace(_bad(endpoint="mid", cut_short=True), before_used=40), False),
    ]
    expected: dict[str, float] = {}
    for oid, seen, ok in rows:
        await book.record("t:a", oid, seen)
        assert await judge(book, "t:a", oid, ok=ok)
        learn(expected, seen.features(), ok=ok)
    model = StatsKeys("t:a").model
    stored = {text(k): float(text(v)) for k, v in (await book.redis.hgetall(model)).items()}
    assert stored.keys() == expected.keys()
    for name, value in expected.items():
        assert stored[name] == pytest.approx(value, rel=1e-12, abs=1e-15), name
    weights = (await book.read("t:a")).model
    assert weights.updates("cheap", "q") == 2
    assert weights.updates("cheap", "r") == 2
    assert weights.updates("mid", "r") == 1
    # a repeated verdict takes no step; a changed one takes one toward the new label
    before = await book.redis.hgetall(model)
    assert not await judge(book, "t:a", "o1", ok=False)
    assert await book.redis.hgetall(model) == before
    low = weights.chance("cheap", "r", {"bias": 1.0, "s:calc-bad": 1.0, "d:3": 1.0})
    assert await judge(book, "t:a", "o1", ok=True)
    after = (await book.read("t:a")).model
    assert after.updates("cheap", "r") == 3
    assert after.chance("cheap", "r", {"bias": 1.0, "s:calc-bad": 1.0, "d:3": 1.0}) > low


async def test_a_verdict_with_a_bad_learning_rate_changes_nothing(book: StatsBook) -> None:
    await book.record("t:a", "o1", _bad())
    before = await everything(book)
    wrong = StatsBook(book.redis, learning_rate=0.3)
    wrong.learning_rate = float("nan")  # past the constructor's check: the script refuses it
    with pytest.raises(InvalidObservation, match="learning_rate"):
        await wrong.verdict("t:a", "o1", ok=True)
    assert await everything(book) == before
    with pytest.raises(ValueError, match="learning_rate"):
        StatsBook(book.redis, learning_rate=-1)


async def test_explored_escalations_keep_their_own_length_line(book: StatsBook) -> None:
    """Escalations chosen at random are an unbiased sample of how long an endpoint answers."""
    for i in range(12):
        before = 50 + 10 * i
        chosen = replace(_bad(endpoint="big", used=2 * before), before_used=before)
        await book.record("t:a", f"c{i}", chosen)  # chosen for their gain: three times longer
        await book.record("t:a", f"e{i}", replace(chosen, used=before + 20, explored=True))
    cell = (await book.read("t:a")).cell("big")
    assert cell.pairs == 24
    assert cell.explored[0] == 12
    assert cell.length_explored(100) == pytest.approx(120)
    assert cell.length_after(100) == pytest.approx((200 + 120) / 2)
    assert Cell().length_explored(100) is None  # too few explored pairs
    with pytest.raises(InvalidObservation, match="explored"):
        await book.record("t:a", "bad", replace(_bad(), explored=1))  # type: ignore[arg-type]

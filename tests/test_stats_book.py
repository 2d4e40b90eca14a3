"""Statistics on a real Redis: counted once, atomically, per scope."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
from collections.abc import AsyncIterator

import pytest

from budgets.connection import redis_client
from budgets.errors import InvalidName, UnknownOutcome
from budgets.stats import Observation, StatsBook

pytestmark = pytest.mark.both_redis

SEEN = Observation(
    endpoint="cheap", difficulty=3, tags=("math", "cut_short"), asked=512, used=300,
    cut_short=True, nanos=1_000,
)  # fmt: skip


@pytest.fixture
async def book(redis_url: str) -> AsyncIterator[StatsBook]:
    client = redis_client(redis_url)
    yield StatsBook(client)
    await client.aclose()


async def test_an_outcome_counts_in_each_of_its_cells_once(book: StatsBook) -> None:
    assert await book.record("t:a", "task1:root:s1.1.1", SEEN) is True
    assert await book.record("t:a", "task1:root:s1.1.1", SEEN) is False
    stats = await book.read("t:a")
    for difficulty in (3, 0):
        for tag in ("*", "math", "cut_short"):
            cell = stats.cell("cheap", difficulty, tag)
            assert (cell.calls, cell.asked, cell.used, cell.cut, cell.nanos) == (
                1, 512, 300, 1, 1_000,
            )  # fmt: skip
    assert sum(stats.cell("cheap", 3).hist) == 1
    assert stats.cell("cheap", 3).quantile(0.9) is not None
    assert stats.cell("cheap", 3, "math").hist == ()  # histograms only on '*' cells
    assert (await book.read("t:b")).cells == {}  # another scope sees nothing


async def test_a_verdict_counts_once_and_a_new_one_moves(book: StatsBook) -> None:
    await book.record("shared", "o1", SEEN)
    assert await book.verdict("shared", "o1", ok=True) is True
    assert await book.verdict("shared", "o1", ok=True) is False
    cell = (await book.read("shared")).cell("cheap", 0, "math")
    assert (cell.ok, cell.bad) == (1, 0)
    assert await book.verdict("shared", "o1", ok=False) is True
    cell = (await book.read("shared")).cell("cheap", 3)
    assert (cell.ok, cell.bad) == (0, 1)


async def test_bad_input_is_refused_and_changes_nothing(book: StatsBook) -> None:
    await book.record("shared", "o1", SEEN)
    before = await book.redis.hgetall("pm:{s:shared}:cells")
    with pytest.raises(InvalidName):
        await book.record("bad scope", "o2", SEEN)
    with pytest.raises(InvalidName):
        await book.record("shared", "bad/id", SEEN)
    with pytest.raises(ValueError, match="difficulty must be 1-5"):
        await book.record("shared", "o3", Observation("cheap", 6, (), 1, 1, False, 1))
    with pytest.raises(ValueError, match="used must not be negative"):
        await book.record("shared", "o4", Observation("cheap", 2, (), 1, -1, False, 1))
    with pytest.raises(UnknownOutcome):
        await book.verdict("shared", "o3", ok=True)
    assert await book.redis.hgetall("pm:{s:shared}:cells") == before
    assert await book.redis.exists("pm:{s:shared}:seen:o:o3") == 0


def _record_many(url: str, worker: int, count: int) -> None:
    async def go() -> None:
        client = redis_client(url)
        book = StatsBook(client)
        seen = Observation("cheap", 2, ("x",), asked=10, used=7, cut_short=False, nanos=3)
        ids = [f"w{worker}-{i}" for i in range(count)] + ["everyone"] * 20
        jobs = [book.record("shared", oid, seen) for oid in ids]
        for start in range(0, len(jobs), 32):  # 32 in flight: the pool's connections
            await asyncio.gather(*jobs[start : start + 32])
        await client.aclose()

    asyncio.run(go())


async def test_concurrent_processes_count_exactly(book: StatsBook, redis_url: str) -> None:
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_record_many, args=(redis_url, w, 150)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        await asyncio.to_thread(p.join, 60)
        assert p.exitcode == 0
    cell = (await book.read("shared")).cell("cheap", 0, "x")
    calls = 4 * 150 + 1  # the shared outcome id counts once, whoever came first
    assert (cell.calls, cell.asked, cell.used, cell.nanos) == (
        calls,
        10 * calls,
        7 * calls,
        3 * calls,
    )
    assert sum((await book.read("shared")).cell("cheap", 2).hist) == calls


async def test_clear_forgets_a_scope(book: StatsBook) -> None:
    await book.record("t:a", "o1", SEEN)
    await book.record("t:b", "o1", SEEN)
    await book.clear("t:a")
    assert (await book.read("t:a")).cells == {}
    assert (await book.read("t:b")).cell("cheap").calls == 1

"""Concurrency from several OS processes: the limit holds exactly."""

from __future__ import annotations

import asyncio
import multiprocessing as mp

import pytest

from budgets import Amount, Budget, BudgetExceeded, Ledger

pytestmark = pytest.mark.both_redis

TASK = "mp"
SIZE_T, SIZE_N = 100, 1_000


async def _attempts(url: str, n: int, used_t: int, wait_s: float) -> int:
    ledger = Ledger.from_url(url)
    granted = 0

    async def one() -> None:
        nonlocal granted
        try:
            res = await ledger.reserve(
                TASK, "root/shared", tokens=SIZE_T, nanos=SIZE_N, wait_s=wait_s
            )
        except BudgetExceeded:
            return
        await ledger.commit(TASK, res.id, used=Amount(tokens=used_t, nanos=used_t * 10))
        granted += 1

    await asyncio.gather(*(one() for _ in range(n)))
    await ledger.aclose()
    return granted


def _worker(args: tuple[str, int, int, float]) -> int:
    return asyncio.run(_attempts(*args))


async def _setup(url: str, fits: int) -> None:
    ledger = Ledger.from_url(url)
    await ledger.open_task(TASK, Budget(tokens=10**9, usd="100"))
    limit = Budget.from_nanos(tokens=fits * SIZE_T, nanos=fits * SIZE_N)
    await ledger.open_account(TASK, "root/shared", limit)
    await ledger.aclose()


def _run(url: str, *, fits: int, used_t: int, wait_s: float = 0.0) -> int:
    asyncio.run(_setup(url, fits))
    with mp.get_context("spawn").Pool(4) as pool:
        return sum(pool.map(_worker, [(url, 100, used_t, wait_s)] * 4))


async def _account(url: str) -> tuple[int, int, int, int, int]:
    ledger = Ledger.from_url(url)
    acct = await ledger.account(TASK, "root/shared")
    await ledger.aclose()
    return (
        acct.spent_tokens,
        acct.spent_nanos,
        acct.reserved_tokens,
        acct.overrun_tokens,
        acct.open_reservations,
    )


def test_400_attempts_from_4_processes_grant_exactly_what_fits(redis_url: str) -> None:
    granted = _run(redis_url, fits=50, used_t=SIZE_T)
    spent_t, spent_n, reserved, overrun, open_res = asyncio.run(_account(redis_url))
    assert granted == 50
    assert (spent_t, spent_n) == (50 * SIZE_T, 50 * SIZE_T * 10)
    assert spent_n <= 50 * SIZE_N
    assert (reserved, overrun, open_res) == (0, 0, 0)


def test_leftovers_from_small_usage_allow_more_and_never_overshoot(redis_url: str) -> None:
    # Asks that only held money stands in the way of wait for it: without the wait, 400
    # asks arriving before any commit would all be answered by the first 50 holds.
    granted = _run(redis_url, fits=50, used_t=40, wait_s=10.0)
    spent_t, spent_n, reserved, overrun, open_res = asyncio.run(_account(redis_url))
    assert granted > 50  # returned leftovers paid for more calls
    assert spent_t == granted * 40
    assert spent_t <= 50 * SIZE_T
    assert spent_n <= 50 * SIZE_N
    assert (reserved, overrun, open_res) == (0, 0, 0)

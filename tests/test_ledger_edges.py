"""The ledger's edges: task incarnations, the funding saga, late money, one record per hold.

Every test runs against the real redis-server fixture and goes through the ledger's public
calls; where a crash has to happen between two steps, the runner is made to fail once at
that point, as a dropped connection would.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Sequence
from importlib import resources
from typing import Any, cast

import pytest
from redis.typing import FieldT, KeyT

from budgets import Amount, Budget, BudgetExceeded, Ledger, LedgerUnavailable
from budgets.errors import (
    InvalidName,
    LedgerError,
    OpenAborted,
    ReservationSettled,
    TaskExists,
    UnknownTask,
)
from budgets.keys import TaskKeys, TenantKeys
from budgets.replies import TABLES
from budgets.scripts import Op
from budgets.tree import ReservationState

pytestmark = pytest.mark.both_redis

T = "task-1"
#: A stream's entries as the ledger's client returns them (replies decoded).
Entries = list[tuple[str, dict[str, str]]]


async def gone(ledger: Ledger, task_id: str, timeout_s: float = 5.0) -> None:
    """Wait until Redis has deleted every key of the task (its retention ran out)."""
    keys = TaskKeys(task_id)
    deadline = time.monotonic() + timeout_s
    while await ledger.redis.exists(*keys.script_keys(), keys.account("root")):
        assert time.monotonic() < deadline, "the task's keys did not expire"
        await asyncio.sleep(0.05)


async def spend(ledger: Ledger, task_id: str, tokens: int, nanos: int = 0) -> None:
    res = await ledger.reserve(task_id, "root", tokens=tokens, nanos=nanos)
    await ledger.commit(task_id, res.id, used=Amount(tokens=tokens, nanos=nanos))


async def tenant_keys_without_ttl(ledger: Ledger, tenant: str) -> list[str]:
    base = TenantKeys(tenant).base
    out = []
    async for key in ledger.redis.scan_iter(match=base + "*"):
        if await ledger.redis.ttl(key) == -1:
            out.append(key.removeprefix(base))
    return sorted(out)


# -- a task's funding belongs to its incarnation ------------------------------------------


@pytest.mark.parametrize("op_id", [None, f"open.{T}"])
async def test_a_reused_task_id_after_expiry_is_refused_when_the_tenant_has_no_room(
    ledger: Ledger, op_id: str | None
) -> None:
    """Measured before: a tenant limited to 1,000 tokens spent 3,000 in three rounds (the
    API's op id was always ``open.<task_id>``, and the tenant's record of it never expired)."""
    await ledger.set_tenant("acme", Budget(tokens=1000), period="none")
    await ledger.open_task(T, Budget(tokens=1000), tenant="acme", op_id=op_id)
    await spend(ledger, T, 1000)
    await ledger.close_task(T)
    await ledger.expire_task(T, retention_s=1)
    await gone(ledger, T)
    for _ in range(2):
        with pytest.raises(BudgetExceeded) as err:
            await ledger.open_task(T, Budget(tokens=1000), tenant="acme", op_id=op_id)
        assert (err.value.requested, err.value.available) == (1000, 0)
        with pytest.raises(UnknownTask):
            await ledger.snapshot(T)
    view = await ledger.tenant("acme")
    assert (view.funded_tokens, view.spent_tokens) == (0, 1000)


@pytest.mark.parametrize("op_id", [None, f"open.{T}"])
async def test_a_reused_task_id_settled_back_is_funded_afresh_and_settled_at_its_close(
    ledger: Ledger, op_id: str | None
) -> None:
    await ledger.set_tenant("acme", Budget(tokens=1000), period="none")
    await ledger.open_task(T, Budget(tokens=1000), tenant="acme", op_id=op_id)
    await ledger.close_task(T)  # spent nothing: the whole funding went back
    await ledger.expire_task(T, retention_s=1)
    await gone(ledger, T)
    await ledger.open_task(T, Budget(tokens=1000), tenant="acme", op_id=op_id)
    assert (await ledger.tenant("acme")).funded_tokens == 1000  # counted again, room checked
    with pytest.raises(BudgetExceeded):
        await ledger.open_task("other", Budget(tokens=1), tenant="acme")
    await spend(ledger, T, 400)
    await ledger.close_task(T)
    view = await ledger.tenant("acme")
    assert (view.funded_tokens, view.spent_tokens) == (0, 400)


async def test_a_task_named_like_a_tenant_keeps_to_its_own_keys(ledger: Ledger) -> None:
    """A task id ``t:acme`` used to share the tenant's ``ops`` and ``events`` keys."""
    await ledger.set_tenant("acme", Budget(tokens=10_000), period="none")
    await ledger.open_task("a-1", Budget(tokens=100), tenant="acme")
    await ledger.open_task("t:acme", Budget(tokens=100))
    await spend(ledger, "t:acme", 10)
    await ledger.close_task("t:acme")
    await ledger.expire_task("t:acme", retention_s=1)
    await gone(ledger, "t:acme")
    rows = cast(Entries, await ledger.redis.xrange(TenantKeys("acme").events))
    assert [fields["op"] for _, fields in rows] == ["fund"]
    await spend(ledger, "a-1", 30)
    await ledger.close_task("a-1")
    await ledger.close_task("a-1")  # a repeated close settles once
    view = await ledger.tenant("acme")
    assert (view.funded_tokens, view.spent_tokens) == (0, 30)


# -- the funding saga ------------------------------------------------------------------------


def fail_once(ledger: Ledger, failing: Op, before: Any = None) -> list[Op]:
    """Make the first ``failing`` op sent to the task script fail as a dropped connection would."""
    real = ledger._runner.task_op
    seen: list[Op] = []

    async def task_op(keys: TaskKeys, op: Op, accounts: Sequence[str], args: Sequence[Any]) -> Any:
        seen.append(op)
        if op is failing and seen.count(failing) == 1:
            if before is not None:
                await before(keys)
            else:
                raise LedgerUnavailable("redis://test", "ConnectionError")
        return await real(keys, op, accounts, args)

    ledger._runner.task_op = task_op  # type: ignore[method-assign]
    return seen


STEPS = ["claim", "fund", "open", "index"]


@pytest.mark.parametrize("step", STEPS)
async def test_each_step_of_a_funded_open_can_fail_and_a_retry_lands_once(
    ledger: Ledger, step: str
) -> None:
    # Every step of the saga on its own slot (claim and open on the task's, funding on
    # the tenant's, the index on its own) cut off as a dropped connection would cut it.
    await ledger.set_tenant("acme", Budget(tokens=1000), period="none")
    dropped: list[str] = []

    def drop(name: str) -> None:
        if step == name and not dropped:
            dropped.append(name)
            raise LedgerUnavailable("redis://test", "ConnectionError")

    real_task_op, real_tenant_op = ledger._runner.task_op, ledger._runner.tenant_op
    real_sadd = ledger.redis.sadd

    async def task_op(keys: TaskKeys, op: Op, accounts: Sequence[str], args: Any) -> Any:
        drop({Op.CLAIM: "claim", Op.OPEN_TASK: "open"}.get(op, ""))
        return await real_task_op(keys, op, accounts, args)

    async def tenant_op(op: Any, keys: Sequence[str], args: Sequence[Any]) -> Any:
        drop("fund" if op.value == "tenant_fund" else "")
        return await real_tenant_op(op, keys, args)

    async def sadd(name: KeyT, *values: FieldT) -> int:
        drop("index")
        return await real_sadd(name, *values)

    ledger._runner.task_op = task_op  # type: ignore[method-assign]
    ledger._runner.tenant_op = tenant_op  # type: ignore[method-assign]
    ledger.redis.sadd = sadd  # type: ignore[method-assign]
    with pytest.raises(LedgerUnavailable):
        await ledger.open_task(T, Budget(tokens=600), tenant="acme", op_id="submit-1")
    assert dropped == [step]
    await ledger.open_task(T, Budget(tokens=600), tenant="acme", op_id="submit-1")  # retry
    await ledger.open_task(T, Budget(tokens=600), tenant="acme", op_id="submit-1")  # again
    assert (await ledger.tenant("acme")).funded_tokens == 600  # funded once
    assert T in await ledger.redis.smembers(ledger.space.open_tasks)
    assert (await ledger.snapshot(T)).root.limit_tokens == 600
    await ledger.close_task(T)
    assert (await ledger.tenant("acme")).funded_tokens == 0  # and given back once


@pytest.mark.parametrize("op_id", [None, "submit-1"])
async def test_open_task_retried_after_funding_funds_once(
    ledger: Ledger, op_id: str | None
) -> None:
    await ledger.set_tenant("acme", Budget(tokens=1000), period="none")
    fail_once(ledger, Op.OPEN_TASK)
    with pytest.raises(LedgerUnavailable):
        await ledger.open_task(T, Budget(tokens=600), tenant="acme", op_id=op_id)
    assert (await ledger.tenant("acme")).funded_tokens == 600  # step 1 done, step 2 not
    await ledger.open_task(T, Budget(tokens=600), tenant="acme", op_id=op_id)  # the retry
    assert (await ledger.tenant("acme")).funded_tokens == 600
    assert (await ledger.snapshot(T)).root.limit_tokens == 600
    await ledger.open_task(T, Budget(tokens=600), tenant="acme", op_id=op_id)  # and again
    assert (await ledger.tenant("acme")).funded_tokens == 600
    await ledger.close_task(T)
    view = await ledger.tenant("acme")
    assert (view.funded_tokens, view.spent_tokens) == (0, 0)


async def test_refused_opens_with_one_op_id_on_two_tasks_take_no_funding(ledger: Ledger) -> None:
    """The undo used to be ``undo:<op_id>``: the second task's undo was skipped as a repeat."""
    await ledger.set_tenant("acme", Budget(tokens=1000), period="none")
    await ledger.open_task("a", Budget(tokens=100), tenant="acme", op_id="first-a")
    await ledger.open_task("b", Budget(tokens=100), tenant="acme", op_id="first-b")
    for task_id in ("a", "b"):
        with pytest.raises(TaskExists) as err:
            await ledger.open_task(task_id, Budget(tokens=300), tenant="acme", op_id="same")
        assert err.value.task_id == task_id
    assert (await ledger.tenant("acme")).funded_tokens == 200


async def test_funding_is_undone_per_task_when_the_open_cannot_complete(ledger: Ledger) -> None:
    """Between funding and opening, the claim is undone (a concurrent refused call): the
    funding goes back, for each task under the same op id."""
    await ledger.set_tenant("acme", Budget(tokens=1000), period="none")

    async def unclaim(keys: TaskKeys) -> None:
        await ledger.redis.delete(keys.meta)

    for task_id in ("a", "b"):
        fail_once(ledger, Op.OPEN_TASK, before=unclaim)
        with pytest.raises(OpenAborted):
            await ledger.open_task(task_id, Budget(tokens=300), tenant="acme", op_id="same")
        ledger._runner.task_op = type(ledger._runner).task_op.__get__(ledger._runner)  # type: ignore[method-assign]
        with pytest.raises(UnknownTask):
            await ledger.snapshot(task_id)
    view = await ledger.tenant("acme")
    assert (view.funded_tokens, view.spent_tokens) == (0, 0)
    await ledger.open_task("c", Budget(tokens=1000), tenant="acme")  # all the room is back


async def test_concurrent_opens_of_one_id_fund_it_once(ledger: Ledger) -> None:
    await ledger.set_tenant("acme", Budget(tokens=1000), period="none")
    calls = [
        ledger.open_task(T, Budget(tokens=300), tenant="acme", op_id=op)
        for op in ["same"] * 8 + [f"other-{n}" for n in range(8)]
    ]
    results = await asyncio.gather(*calls, return_exceptions=True)
    failures = [r for r in results if r is not None]
    assert all(isinstance(r, TaskExists) for r in failures), failures
    assert len(failures) in (8, 15)  # the "same" eight won together, or one "other" alone
    assert (await ledger.tenant("acme")).funded_tokens == 300
    funds = [f for _, f in cast(Entries, await ledger.redis.xrange(TenantKeys("acme").events))]
    assert [f["op"] for f in funds] == ["fund"]


async def test_a_refused_funding_leaves_the_id_free_and_the_ledger_as_it_was(
    ledger: Ledger,
) -> None:
    await ledger.set_tenant("acme", Budget(tokens=100), period="none")
    with pytest.raises(BudgetExceeded):
        await ledger.open_task(T, Budget(tokens=101), tenant="acme")
    assert await ledger.redis.keys(TaskKeys(T).base + "*") == []
    await ledger.open_task(T, Budget(tokens=100), tenant="acme")
    assert (await ledger.tenant("acme")).funded_tokens == 100


# -- late money reaches the tenant -----------------------------------------------------------


async def test_release_after_expiry_then_a_late_commit_is_paid_by_the_tenant(
    ledger: Ledger,
) -> None:
    await ledger.set_tenant("acme", Budget(tokens=1000, usd="1"), period="none")
    await ledger.open_task(T, Budget(tokens=500, usd="0.5"), tenant="acme")
    res = await ledger.reserve(T, "root", tokens=300, nanos=3_000, lease_s=0.05)
    await asyncio.sleep(0.1)
    assert await ledger.release(T, res.id, reason="gave up") is True  # the lease had run out
    done = await ledger.commit(T, res.id, used=Amount(tokens=250, nanos=2_501))
    assert done.late
    assert (await ledger.reservation(T, res.id)).state is ReservationState.COMMITTED
    await ledger.close_task(T)
    view = await ledger.tenant("acme")
    assert (view.funded_tokens, view.funded_nanos) == (0, 0)
    assert (view.spent_tokens, view.spent_nanos) == (250, 2_501)


async def test_a_late_commit_after_close_task_is_paid_by_the_tenant(ledger: Ledger) -> None:
    await ledger.set_tenant("acme", Budget(tokens=1000, usd="1"), period="none")
    await ledger.open_task(T, Budget(tokens=500, usd="0.5"), tenant="acme")
    await ledger.open_account(T, "root/a", Budget(tokens=400, usd="0.4"))
    early = await ledger.reserve(T, "root/a", tokens=100, nanos=1_000)
    await ledger.commit(T, early.id, used=Amount(tokens=90, nanos=901))
    res = await ledger.reserve(T, "root/a", tokens=300, nanos=3_000)
    await ledger.close_task(T, force=True)  # the hold expires; the call is still in flight
    view = await ledger.tenant("acme")
    assert (view.spent_tokens, view.spent_nanos) == (90, 901)
    done = await ledger.commit(T, res.id, used=Amount(tokens=280, nanos=2_803))
    assert done.late
    view = await ledger.tenant("acme")
    assert (view.funded_tokens, view.funded_nanos) == (0, 0)
    assert (view.spent_tokens, view.spent_nanos) == (370, 3_704)
    # Retries of the commit and of the close change nothing.
    assert await ledger.commit(T, res.id, used=Amount(tokens=280, nanos=2_803)) == done
    await ledger.close_task(T, force=True)
    view = await ledger.tenant("acme")
    assert (view.spent_tokens, view.spent_nanos) == (370, 3_704)
    tree = await ledger.snapshot(T)
    assert tree.root.total_spent_tokens == 370


# -- one record per reservation --------------------------------------------------------------


async def test_each_reservation_is_one_record_with_an_explicit_state(ledger: Ledger) -> None:
    await ledger.open_task(T, Budget(tokens=1000, usd="1"))
    a = await ledger.reserve(T, "root", tokens=10, nanos=10)
    b = await ledger.reserve(T, "root", tokens=20, nanos=20)
    c = await ledger.reserve(T, "root", tokens=30, nanos=30)
    d = await ledger.reserve(T, "root", tokens=40, nanos=40, lease_s=0.05)
    held = await ledger.reservation(T, a.id)
    assert (held.state, held.estimated, held.late) == (ReservationState.HELD, False, False)
    await ledger.commit(T, a.id, used=Amount(tokens=7, nanos=7))
    await ledger.commit(T, b.id, used=None)
    await ledger.release(T, c.id)
    await asyncio.sleep(0.1)
    await ledger.reap(T)
    records = {r: await ledger.reservation(T, r) for r in (a.id, b.id, c.id, d.id)}
    assert records[a.id].state is ReservationState.COMMITTED
    assert (records[a.id].used_tokens, records[a.id].estimated) == (7, False)
    assert records[b.id].state is ReservationState.COMMITTED
    assert (records[b.id].used_tokens, records[b.id].estimated) == (20, True)
    assert records[c.id].state is ReservationState.RELEASED
    assert records[d.id].state is ReservationState.EXPIRED
    late = await ledger.commit(T, d.id, used=Amount(tokens=1, nanos=1))
    assert late.late
    after = await ledger.reservation(T, d.id)
    assert (after.state, after.late, after.used_tokens) == (ReservationState.COMMITTED, True, 1)
    # One record each, in one hash; the idempotency hash keeps nothing of reservations.
    keys = TaskKeys(T)
    assert await ledger.redis.hlen(keys.reservations) == 4
    assert await ledger.redis.hkeys(keys.ops) == []
    with pytest.raises(ReservationSettled):
        await ledger.commit(T, c.id, used=Amount(tokens=1, nanos=1))


async def test_a_commit_keeps_the_reply_it_pays_for_in_the_same_step(ledger: Ledger) -> None:
    await ledger.open_task(T, Budget(tokens=1000, usd="1"))
    assert await ledger.kept(T, "s1.1") is None
    a = await ledger.reserve(T, "root", tokens=10, nanos=10)
    paid = await ledger.commit(T, a.id, used=Amount(tokens=7, nanos=7), keep=("s1.1", "first"))
    assert await ledger.kept(T, "s1.1") == "first"
    # A retry of the same commit changes nothing, not even with another text.
    again = await ledger.commit(T, a.id, used=Amount(tokens=7, nanos=7), keep=("s1.1", "other"))
    assert again == paid
    assert await ledger.kept(T, "s1.1") == "first"
    # A refused commit keeps nothing.
    b = await ledger.reserve(T, "root", tokens=10, nanos=10)
    await ledger.release(T, b.id)
    with pytest.raises(ReservationSettled):
        await ledger.commit(T, b.id, used=Amount(tokens=1, nanos=1), keep=("s2.1", "x"))
    assert await ledger.kept(T, "s2.1") is None
    # A bad name is refused before anything runs: the reservation is still held.
    c = await ledger.reserve(T, "root", tokens=10, nanos=10)
    with pytest.raises(InvalidName):
        await ledger.commit(T, c.id, used=Amount(tokens=1, nanos=1), keep=("bad name", "x"))
    assert (await ledger.reservation(T, c.id)).state is ReservationState.HELD
    assert (await ledger.account(T, "root")).spent_tokens == 7
    # Kept with the task: gone when the task's keys go.
    await ledger.close_task(T, force=True)
    await ledger.expire_task(T, retention_s=1)
    await gone(ledger, T)
    assert await ledger.kept(T, "s1.1") is None


def lua_codes(name: str) -> set[str]:
    text = resources.files("budgets").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")
    return set(re.findall(r"\{'err', '([a-z_]+)'", text))


def header_codes(name: str) -> set[str]:
    text = resources.files("budgets").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")
    header = "\n".join(line for line in text.splitlines() if line.startswith("--"))
    return set(re.findall(r"'([a-z_]+)' -> [A-Z]\w+", header))


def test_every_script_has_a_table() -> None:
    scripts = {
        p.name.removesuffix(".lua") for p in resources.files("budgets").joinpath("lua").iterdir()
    }
    # The prelude holds helpers; the statistics scripts (budgets/stats.py) reply with counts.
    helpers = {"_prelude", "stats_record", "stats_verdict"}
    assert set(TABLES) == scripts - helpers
    assert all(lua_codes(name) == set() for name in helpers)


@pytest.mark.parametrize("script", sorted(TABLES, key=str))
def test_each_script_has_one_exception_per_error_code(script: str) -> None:
    table = TABLES[script]
    codes = {str(code) for code in table}
    assert lua_codes(str(script)) == codes, "every code the script returns is in its table"
    assert header_codes(str(script)) == codes, "the contract header names each code's error"
    for code, make in table.items():
        assert issubclass(make, LedgerError), code


# -- names at the edge -----------------------------------------------------------------------


async def test_names_too_long_for_what_is_derived_from_them_are_refused(ledger: Ledger) -> None:
    with pytest.raises(InvalidName):
        await ledger.open_task("x" * 65, Budget(tokens=1))
    with pytest.raises(InvalidName):
        await ledger.set_tenant("y" * 65, Budget(tokens=1))
    with pytest.raises(InvalidName):
        await ledger.open_task(T, Budget(tokens=1), tenant="y" * 65)
    assert await ledger.redis.dbsize() == 0
    await ledger.open_task("x" * 64, Budget(tokens=1))
    await ledger.set_tenant("y" * 64, Budget(tokens=1))
    with pytest.raises(InvalidName):
        await ledger.reserve("x" * 64, "root", tokens=1, nanos=0, reservation_id="r" * 129)
    assert (await ledger.snapshot("x" * 64)).root.open_reservations == 0


# -- what a tenant keeps, and for how long ---------------------------------------------------


async def test_a_tenant_keeps_no_record_of_a_task_for_ever(ledger: Ledger) -> None:
    await ledger.set_tenant("acme", Budget(tokens=10_000), period="month")
    for n in range(5):
        await ledger.open_task(f"t{n}", Budget(tokens=100), tenant="acme")
        await spend(ledger, f"t{n}", 10)
        await ledger.close_task(f"t{n}")
        await ledger.expire_task(f"t{n}", retention_s=60)
    # Left without a TTL: the configuration and one usage hash per period, both small.
    period = (await ledger.tenant("acme")).period_id
    assert await tenant_keys_without_ttl(ledger, "acme") == ["cfg", "events", f"p:{period}"]
    ttls = [
        await ledger.redis.ttl(k)
        async for k in ledger.redis.scan_iter(match=TenantKeys("acme").base + "*")
        if await ledger.redis.ttl(k) > 0
    ]
    assert len(ttls) == 5
    assert all(60 < ttl <= 60 + 86_400 for ttl in ttls)


async def test_the_tenant_event_stream_is_capped(redis_url: str) -> None:
    ledger = Ledger.from_url(redis_url, tenant_events_max=10)
    try:
        await ledger.set_tenant("acme", Budget(tokens=10**9), period="none")
        for n in range(150):
            await ledger.open_task(f"t{n}", Budget(tokens=1), tenant="acme")
            await ledger.close_task(f"t{n}")
        # MAXLEN ~ trims whole stream nodes (100 entries by default), never below the cap.
        length = await ledger.redis.xlen(TenantKeys("acme").events)
        assert 10 <= length <= 10 + 100
        view = await ledger.tenant("acme")
        assert (view.period_id, view.funded_tokens) == ("all", 0)
    finally:
        await ledger.aclose()

"""Who owns a key, an id, a task: key families that cannot collide, and duplicate submits.

The key families are proven disjoint by parsing: every key a builder of ``budgets.keys``
makes, from any valid names, parses back (with a parser written here, not the module's)
to the family, owner, builder and arguments it was made from. A parse is a function, so
two different builders or owners can never make the same key.
"""

from __future__ import annotations

import ast
import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents.endpoints import Endpoint, EndpointsConfig
from budgets import Amount, Budget, BudgetExceeded, PaymasterError
from budgets import keys as K
from budgets.errors import InvalidName, TaskExists
from budgets.keys import StatsKeys, TaskKeys, TenantKeys
from orchestrator.api import Paymaster
from orchestrator.records import Status
from orchestrator.settings import Settings

pytestmark = pytest.mark.both_redis

REPO = Path(__file__).resolve().parents[1]

# -- names -------------------------------------------------------------------------------------

_CHARS = "abcXYZ019_.:-"


def names(max_size: int) -> st.SearchStrategy[str]:
    """Valid names, often shaped like another family's tag (``t:acme``, ``s:x``, ``k:y``)."""
    plain = st.builds(
        lambda head, tail: head + tail,
        st.sampled_from("aZ9"),
        st.text(alphabet=_CHARS, max_size=max_size - 1),
    )
    shaped = st.builds(
        lambda fam, rest: (fam + rest)[:max_size],
        st.sampled_from(["t:", "s:", "k:", "t:t:", "k:}", "acct:"]),
        st.text(alphabet=_CHARS, min_size=1, max_size=max_size),
    )
    return st.one_of(plain, shaped).filter(_valid(max_size))


def _valid(max_size: int) -> Callable[[str], bool]:
    pattern = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:\-]*$")
    return lambda s: 0 < len(s) <= max_size and bool(pattern.match(s))


segments = st.text(alphabet="abcXYZ019_.-", min_size=1, max_size=64).filter(
    lambda s: s[0].isalnum()
)
paths = st.lists(segments, max_size=7).map(lambda parts: "/".join([K.ROOT, *parts]))
periods = st.one_of(
    st.just("all"),
    st.dates().map(lambda d: d.strftime("%Y-%m")),
    st.dates().map(lambda d: d.strftime("%Y-%m-%d")),
)
incarnations = st.builds(K.new_incarnation)
task_ids = names(K.MAX_TASK_ID)
tenants = names(K.MAX_TENANT)
scopes = names(K.MAX_SCOPE)
op_ids = names(K.MAX_OP_ID)


# -- an independent parser of every key -----------------------------------------------------

_TAGGED = re.compile(r"^pm:\{(?P<fam>[a-z]):(?P<owner>[^{}]+)\}:(?P<rest>.+)$")
_SPACE = re.compile(r"^pm:(?P<space>[A-Za-z0-9][A-Za-z0-9_.\-]*):(?P<rest>.+)$")
_GLOBALS = {"tenants", "open-tasks", "queue", "dead-letter", "workers"}


def parse_in_space(key: str) -> tuple[str | None, tuple[Any, ...]]:
    """(the fenced tenant or ``None``, then what :func:`parse` finds) of any key."""
    if key.startswith("pm:{") or key.removeprefix("pm:") in _GLOBALS:
        return None, parse(key)
    m = _SPACE.match(key)
    assert m is not None, key
    return m["space"], parse("pm:" + m["rest"])


def parse(key: str) -> tuple[Any, ...]:
    """(family, owner, builder, arguments) of a key of the shared space."""
    m = _TAGGED.match(key)
    if m is None:
        assert "{" not in key, key
        assert "}" not in key, key
        assert key.removeprefix("pm:") in _GLOBALS, key
        return ("global", key)
    fam, owner, rest = m["fam"], m["owner"], m["rest"]
    if fam == "k":
        if rest.startswith("acct:"):
            return ("task", owner, "account", rest.removeprefix("acct:"))
        if rest.startswith("wait:"):
            return ("task", owner, "wait_queue", rest.removeprefix("wait:"))
        return ("task", owner, rest)
    if fam == "t":
        if rest.startswith("p:"):
            return ("tenant", owner, "period", rest.removeprefix("p:"))
        if rest.startswith("f:"):
            inc, _, task = rest.removeprefix("f:").partition(":")
            return ("tenant", owner, "funding", task, inc)
        return ("tenant", owner, rest)
    if fam == "s":
        if rest.startswith("seen:o:"):
            return ("stats", owner, "outcome_seen", rest.removeprefix("seen:o:"))
        if rest.startswith("seen:v:"):
            return ("stats", owner, "verdict_seen", rest.removeprefix("seen:v:"))
        if rest.startswith("seen:f:"):
            return ("stats", owner, "features_seen", rest.removeprefix("seen:f:"))
        return ("stats", owner, rest)
    raise AssertionError(f"no family {fam!r}: {key}")


# Every key a family can build, and what the parser must find in it. The coverage test
# below fails when keys.py grows a key this table does not list.
TASK_FIXED = {
    "meta": "meta",
    "reservations": "res",
    "leases": "leases",
    "ops": "ops",
    "events": "events",
    "accounts": "accts",
    "record": "task",
    "results": "results",
    "plan": "plan",
    "plans": "plans",
}
TENANT_FIXED = {"config": "cfg", "events": "events"}
STATS_FIXED = {"cells": "cells", "model": "model"}
TASK_OTHER = {
    "prefix",
    "account",
    "base",
    "account_prefix",
    "script_keys",
    "task_id",
    "wait_queue",
    "wait_prefix",
    "script_argv",
}
TENANT_OTHER = {"period", "funding", "base", "period_prefix", "tenant", "prefix"}
STATS_OTHER = {"outcome_seen", "verdict_seen", "features_seen", "base", "scope", "prefix"}
SPACE_GLOBALS = {"tenants", "open_tasks", "queue", "dead_letter", "workers"}
SPACE_OTHER = {"tenant", "prefix", "task", "tenant_keys", "stats", "task_pattern", "task_id_of"}
GLOBALS = ["TENANTS", "OPEN_TASKS", "QUEUE", "DEAD_LETTER", "WORKERS"]


def public(cls: type) -> set[str]:
    return {n for n in dir(cls) if not n.startswith("_")}


def test_the_tables_here_cover_every_key_builder() -> None:
    assert public(TaskKeys) == set(TASK_FIXED) | TASK_OTHER
    assert public(TenantKeys) == set(TENANT_FIXED) | TENANT_OTHER
    assert public(StatsKeys) == set(STATS_FIXED) | STATS_OTHER
    assert public(K.KeySpace) == SPACE_GLOBALS | SPACE_OTHER
    module_keys = {
        name
        for name, value in vars(K).items()
        if name.isupper() and isinstance(value, str) and value.startswith(K.PREFIX + ":")
    } - {"SHARED_PREFIX"}
    assert module_keys == set(GLOBALS)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    task=task_ids,
    tenant=tenants,
    scope=scopes,
    path=paths,
    period=periods,
    inc=incarnations,
    outcome=op_ids,
)
def test_no_valid_names_make_two_families_share_a_key(
    task: str, tenant: str, scope: str, path: str, period: str, inc: str, outcome: str
) -> None:
    tk, nk, sk = TaskKeys(task), TenantKeys(tenant), StatsKeys(scope)
    made: dict[str, tuple[Any, ...]] = {}

    def expect(key: str, parsed: tuple[Any, ...]) -> None:
        assert parse(key) == parsed, key
        made[key] = parsed

    for attr, word in TASK_FIXED.items():
        expect(getattr(tk, attr), ("task", task, word))
    expect(tk.account(path), ("task", task, "account", path))
    expect(tk.wait_queue(path), ("task", task, "wait_queue", path))
    for attr, word in TENANT_FIXED.items():
        expect(getattr(nk, attr), ("tenant", tenant, word))
    expect(nk.period(period), ("tenant", tenant, "period", period))
    expect(nk.funding(task, inc), ("tenant", tenant, "funding", task, inc))
    expect(sk.cells, ("stats", scope, "cells"))
    expect(sk.outcome_seen(outcome), ("stats", scope, "outcome_seen", outcome))
    expect(sk.verdict_seen(outcome), ("stats", scope, "verdict_seen", outcome))
    expect(sk.features_seen(outcome), ("stats", scope, "features_seen", outcome))
    for name in GLOBALS:
        expect(getattr(K, name), ("global", getattr(K, name)))
    # The script keys and prefixes are what the builders above make.
    assert tk.script_keys() == [
        tk.meta,
        tk.reservations,
        tk.leases,
        tk.ops,
        tk.events,
        tk.accounts,
        tk.results,
    ]
    assert tk.account(path) == tk.account_prefix + path
    assert tk.wait_queue(path) == tk.wait_prefix + path
    assert tk.script_argv() == [tk.account_prefix, tk.wait_prefix]
    assert nk.period(period) == nk.period_prefix + period
    # A task named after a tenant's or a scope's tag still stays in the task family.
    named = TaskKeys(f"t:{tenant}"[: K.MAX_TASK_ID])
    assert {named.events, named.meta}.isdisjoint({nk.events, nk.config})
    assert TaskKeys(f"s:{scope}"[: K.MAX_TASK_ID]).base != sk.base


fenced = st.builds(
    lambda head, tail: head + tail,
    st.sampled_from("aZ9"),
    st.text(alphabet=_CHARS.replace(":", ""), max_size=K.MAX_TENANT - 1),
)


def space_keys(space: K.KeySpace, task: str, tenant: str, scope: str, path: str) -> list[str]:
    """A sample of every kind of key a space builds."""
    tk, nk, sk = space.task(task), space.tenant_keys(tenant), space.stats(scope)
    return [
        *(getattr(tk, attr) for attr in TASK_FIXED),
        tk.account(path),
        tk.wait_queue(path),
        *(getattr(nk, attr) for attr in TENANT_FIXED),
        nk.period("2026-12"),
        sk.cells,
        sk.outcome_seen("o1"),
        *(getattr(space, attr) for attr in SPACE_GLOBALS),
    ]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(fence=fenced, other=fenced, task=task_ids, tenant=tenants, scope=scopes, path=paths)
def test_a_fenced_tenants_acl_pattern_matches_its_own_keys_and_no_other(
    fence: str, other: str, task: str, tenant: str, scope: str, path: str
) -> None:
    mine = K.KeySpace(fence)
    pattern = f"pm:{fence}:"  # the ACL's ~pm:<tenant>:*
    for key in space_keys(mine, task, tenant, scope, path):
        assert key.startswith(pattern), key
        space, parsed = parse_in_space(key)
        assert space == fence, key
        assert parse_in_space(key.replace(pattern, "pm:", 1)) == (None, parsed)
    strangers = [K.SHARED_SPACE] + ([K.KeySpace(other)] if other != fence else [])
    for stranger in strangers:
        for key in space_keys(stranger, task, tenant, scope, path):
            assert not key.startswith(pattern), (fence, key)
            assert parse_in_space(key)[0] == stranger.tenant, key
    assert mine.task_id_of(mine.task(task).record) == task
    assert K.SHARED_SPACE.task_id_of(mine.task(task).record) is None


def test_a_fenced_tenant_name_with_a_colon_is_refused() -> None:
    with pytest.raises(InvalidName, match="no ':'"):
        K.KeySpace("acme:x")  # ~pm:acme:* would match its keys


@given(op=op_ids, other=op_ids, path=paths)
def test_markers_in_one_ops_hash_cannot_collide(op: str, other: str, path: str) -> None:
    fields = {
        K.open_marker(op): ("open", op),
        K.transfer_marker(other): ("transfer", other),
        K.close_marker(path): ("close", path),
        K.kept_marker(op): ("kept", op),
    }
    assert len(fields) == 4
    for field, (kind, arg) in fields.items():
        head, _, rest = field.partition(":")
        kinds = {"o": "open", "t": "transfer", "z": "close", "k": "kept"}
        assert (kinds[head], rest) == (kind, arg)


@given(tenant=tenants, task=task_ids, path=paths, inc=incarnations, delivery=st.integers(0, 10**9))
def test_names_at_their_limits_leave_room_for_what_is_derived(
    tenant: str, task: str, path: str, inc: str, delivery: int
) -> None:
    K.check_scope(K.tenant_scope(tenant))
    assert K.tenant_scope(tenant) != K.SHARED_SCOPE
    K.check_name("outcome id", K.outcome_id(task, path))
    K.check_op_id(K.submit_op_id(inc))
    K.check_op_id(K.synthesis_op_id(delivery))
    K.check_op_id(K.plan_leftover_op_id(delivery))


@given(
    ids=st.lists(
        st.from_regex(r"[a-z0-9][a-z0-9_-]{0,31}", fullmatch=True), min_size=1, max_size=3
    ),
    delivery=st.integers(1, 10**9),
    attempt=st.integers(1, 99),
)
def test_work_ids_name_their_level_and_derive_valid_op_ids(
    ids: list[str], delivery: int, attempt: int
) -> None:
    level = ""
    for sid in ids:
        work = K.work_id(level, sid)
        assert K.level_of(work) == level
        assert work.rsplit(K.WORK_SEPARATOR, 1)[-1] == sid
        K.check_op_id(K.work_name(work, attempt))
        K.check_op_id(K.synthesis_op_id(delivery, work))
        assert K.synthesis_op_id(delivery, work) != K.synthesis_op_id(delivery, level)
        assert K.plan_leftover_op_id(delivery, work) != K.plan_leftover_op_id(delivery, level)
        level = work


def test_outcome_ids_stay_distinct_when_shortened() -> None:
    long_a = "root/" + "/".join(["a" * 64] * 7)
    long_b = "root/" + "/".join(["a" * 64] * 6 + ["b" * 64])
    a, b = K.outcome_id("t" * 64, long_a), K.outcome_id("t" * 64, long_b)
    assert a != b
    assert max(len(a), len(b)) <= K.MAX_OP_ID
    assert K.outcome_id("t1", "root/s.1.1") == "t1:root:s.1.1"  # short ones read as before


def _literals(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            out.append((node.lineno, node.value))
    return out


def _built_ids(path: Path) -> list[int]:
    """Lines passing an op or reservation id built in place (an f-string or a + b)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [
        node.value.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.keyword)
        and node.arg in {"op_id", "reservation_id"}
        and isinstance(node.value, ast.JoinedStr | ast.BinOp)
    ]


MINE = [
    *sorted((REPO / "budgets").glob("*.py")),
    REPO / "orchestrator" / "api.py",
    REPO / "orchestrator" / "records.py",
]


@pytest.mark.parametrize("path", [p for p in MINE if p.name != "keys.py"], ids=lambda p: p.name)
def test_only_keys_py_spells_a_key_or_an_op_id(path: Path) -> None:
    spelled = [(n, s) for n, s in _literals(path) if s.startswith("pm:") or ":{" in s]
    assert spelled == []
    assert _built_ids(path) == []


@pytest.mark.parametrize(
    "path", sorted((REPO / "budgets" / "lua").glob("*.lua")), ids=lambda p: p.name
)
def test_no_lua_script_spells_an_op_id_prefix(path: Path) -> None:
    code = [line.split("--", 1)[0] for line in path.read_text(encoding="utf-8").splitlines()]
    prefixes = [(n, m) for n, line in enumerate(code, 1) for m in re.findall(r"'[a-z]+:'", line)]
    assert prefixes == []


# -- the API: duplicate submits and reused ids -----------------------------------------------


def make_pm(redis_url: str, tmp_path: Path, **settings: Any) -> Paymaster:
    config = EndpointsConfig(
        endpoints=[
            Endpoint(
                name="nowhere",
                base_url="http://127.0.0.1:9/v1",
                model="m",
                kind="remote",
                input_usd_per_mtok="1",  # type: ignore[arg-type]
                output_usd_per_mtok="2",  # type: ignore[arg-type]
            )
        ]
    )
    return Paymaster(
        redis_url=redis_url,
        config=config,
        settings=Settings(home=tmp_path, **settings),
        env={},
    )


@pytest.fixture
async def pm(redis_url: str, tmp_path: Path) -> AsyncIterator[Paymaster]:
    paymaster = make_pm(redis_url, tmp_path)
    yield paymaster
    await paymaster.aclose()


@pytest.fixture
async def pm_short(redis_url: str, tmp_path: Path) -> AsyncIterator[Paymaster]:
    """Records and ledgers kept for 1 s after a task ends, so an id can be reused soon."""
    paymaster = make_pm(redis_url, tmp_path, retention_s=1)
    yield paymaster
    await paymaster.aclose()


async def everything(pm: Paymaster, task_id: str) -> dict[str, Any]:
    """What a refused or repeated submit must leave as it was."""
    redis = pm.books.redis
    tree = await pm.books.snapshot(task_id)
    return {
        "record": (await pm.arecord(task_id)).model_dump(),
        "tree": tree.model_dump_json(),
        "events": len(await pm.books.events(task_id)),
        "queue": await redis.xlen(K.QUEUE),
        "tenants": [await pm.books.tenant(t) for t in await pm.books.tenants()],
        "keys": sorted(await redis.keys("*")),
    }


async def test_a_repeated_submit_is_the_same_task(pm: Paymaster) -> None:
    await pm.aset_tenant("acme", Budget(tokens=10_000), period="none")
    first = await pm.asubmit("the task", budget=Budget(tokens=1000), tenant="acme", task_id="t1")
    before = await everything(pm, "t1")
    again = await pm.asubmit("the task", budget=Budget(tokens=1000), tenant="acme", task_id="t1")
    assert again.id == first.id == "t1"
    assert await everything(pm, "t1") == before
    assert before["queue"] == 1  # queued once


async def test_a_repeated_run_of_a_finished_task_returns_it_without_running_again(
    pm: Paymaster,
) -> None:
    await pm.asubmit("the task", budget=Budget(tokens=1000), task_id="t1")
    assert await pm.acancel("t1")
    before = await everything(pm, "t1")
    record = await pm.arun("the task", budget=Budget(tokens=1000), task_id="t1")
    assert (record.id, record.status) == ("t1", Status.CANCELLED)
    assert await everything(pm, "t1") == before


async def test_a_clashing_submit_raises_task_exists_and_leaves_the_task_alone(
    pm: Paymaster,
) -> None:
    await pm.aset_tenant("acme", Budget(tokens=10_000), period="none")
    await pm.aset_tenant("other", Budget(tokens=10_000), period="none")
    await pm.asubmit("the task", budget=Budget(tokens=1000), tenant="acme", task_id="t1")
    # A worker has it: an account open and a call in flight.
    await pm.books.open_account("t1", "root/w", Budget(tokens=500))
    hold = await pm.books.reserve("t1", "root/w", tokens=100, nanos=0)
    before = await everything(pm, "t1")
    clashes = [
        ("another task", Budget(tokens=1000), "acme"),
        ("the task", Budget(tokens=999), "acme"),
        ("the task", Budget(tokens=1000), "other"),
        ("the task", Budget(tokens=1000), None),
    ]
    for text, budget, tenant in clashes:
        for call in (pm.asubmit, pm.arun):
            with pytest.raises(TaskExists) as err:
                await call(text, budget=budget, tenant=tenant, task_id="t1")
            assert err.value.task_id == "t1"
            assert isinstance(err.value, PaymasterError)
            assert await everything(pm, "t1") == before
    # The worker's call settles normally: nothing was closed under it.
    done = await pm.books.commit("t1", hold.id, used=Amount(tokens=80))
    assert not done.late


async def gone(pm: Paymaster, task_id: str, timeout_s: float = 6.0) -> None:
    deadline = time.monotonic() + timeout_s
    keys = TaskKeys(task_id)
    while await pm.books.redis.exists(keys.record, *keys.script_keys(), keys.account(K.ROOT)):
        assert time.monotonic() < deadline, "the task's keys did not expire"
        await asyncio.sleep(0.05)


async def test_a_task_id_reused_after_retention_must_be_paid_for_again(
    pm_short: Paymaster,
) -> None:
    pm = pm_short
    await pm.aset_tenant("acme", Budget(tokens=1000), period="none")
    await pm.asubmit("the task", budget=Budget(tokens=1000), tenant="acme", task_id="t1")
    res = await pm.books.reserve("t1", K.ROOT, tokens=1000, nanos=0)
    await pm.books.commit("t1", res.id, used=Amount(tokens=1000))
    assert await pm.acancel("t1")  # queued: it ends at once, settled, with a retention of 1 s
    await gone(pm, "t1")
    keys_before = sorted(await pm.books.redis.keys("*"))
    with pytest.raises(BudgetExceeded):
        await pm.asubmit("the task", budget=Budget(tokens=1000), tenant="acme", task_id="t1")
    assert sorted(await pm.books.redis.keys("*")) == keys_before
    view = await pm.books.tenant("acme")
    assert (view.funded_tokens, view.spent_tokens) == (0, 1000)


async def test_a_task_id_reused_after_retention_is_a_new_task(pm_short: Paymaster) -> None:
    pm = pm_short
    await pm.aset_tenant("acme", Budget(tokens=1000), period="none")
    await pm.asubmit("the task", budget=Budget(tokens=1000), tenant="acme", task_id="t1")
    assert await pm.acancel("t1")  # nothing spent: the tenant gets it all back
    await gone(pm, "t1")
    task = await pm.asubmit("the task", budget=Budget(tokens=1000), tenant="acme", task_id="t1")
    record = await task.astatus()
    assert record.status is Status.QUEUED
    assert (await pm.books.tenant("acme")).funded_tokens == 1000
    with pytest.raises(BudgetExceeded):
        await pm.asubmit("more", budget=Budget(tokens=1), tenant="acme")
    assert await pm.acancel("t1")
    view = await pm.books.tenant("acme")
    assert (view.funded_tokens, view.spent_tokens) == (0, 0)


async def test_the_api_refuses_names_too_long_for_what_is_derived(pm: Paymaster) -> None:
    before = await pm.books.redis.dbsize()
    with pytest.raises(InvalidName):
        await pm.asubmit("x", budget=Budget(tokens=10), task_id="a" * (K.MAX_TASK_ID + 1))
    with pytest.raises(InvalidName):
        await pm.asubmit("x", budget=Budget(tokens=10), tenant="b" * (K.MAX_TENANT + 1))
    with pytest.raises(InvalidName):
        await pm.aset_tenant("b" * (K.MAX_TENANT + 1), Budget(tokens=10))
    assert await pm.books.redis.dbsize() == before
    await pm.aset_tenant("b" * K.MAX_TENANT, Budget(tokens=10))
    task = await pm.asubmit(
        "x", budget=Budget(tokens=10), tenant="b" * K.MAX_TENANT, task_id="a" * K.MAX_TASK_ID
    )
    assert (await task.astatus()).status is Status.QUEUED
    # The statistics scope of that tenant is a valid name.
    assert await pm.astats("b" * K.MAX_TENANT) is not None

"""Tenants fenced by Redis ACLs: a process fenced to one tenant, authenticated as that
tenant's Redis user (``~pm:<tenant>:*``), runs its tasks and cannot touch another's.

Real ACL users on the real server (and on every node of the cluster).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis

from agents.stub_server import ScriptedModelServer
from budgets import Budget, Ledger, LedgerForbidden
from budgets.keys import KeySpace
from orchestrator.api import Paymaster
from orchestrator.errors import TaskNotFound, WrongTenant
from orchestrator.records import Status
from orchestrator.redis_server import LocalCluster, RedisServer
from orchestrator.settings import Settings
from tests.test_orchestrator import WorkerProc, assert_books_clean, cli, responder, stub_config, sub

pytestmark = pytest.mark.both_redis

#: The recipe of docs/scaling.md, for each tenant.
RECIPE = "on >{password} resetkeys ~pm:{tenant}:* resetchannels +@all -@dangerous"
TENANTS = ("acme", "bolt")


def as_user(url: str, user: str) -> str:
    """``url`` with ``user`` and its password."""
    parts = urlsplit(url)
    netloc = f"{user}:{user}-secret@{parts.hostname}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@pytest.fixture
def users(
    redis_url: str, redis_kind: str, request: pytest.FixtureRequest
) -> Iterator[dict[str, str]]:
    """An ACL user per tenant on every node; each tenant's URL."""
    if redis_kind == "cluster":
        cluster: LocalCluster = request.getfixturevalue("redis_cluster")
        ports = [n.port for n in cluster.nodes]
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        ports = [server.port]
    admins = [redis.Redis(port=p) for p in ports]
    for admin in admins:
        for tenant in TENANTS:
            admin.acl_setuser(tenant, reset=True)
            admin.execute_command(  # type: ignore[no-untyped-call]  # redis leaves it unannotated
                "ACL",
                "SETUSER",
                tenant,
                *RECIPE.format(password=f"{tenant}-secret", tenant=tenant).split(),
            )
    yield {t: as_user(redis_url, t) for t in TENANTS}
    for admin in admins:
        for tenant in TENANTS:
            admin.acl_deluser(tenant)
        admin.close()


def fenced(url: str, tenant: str, stub: ScriptedModelServer, home: Path) -> Paymaster:
    env = {"HOME": str(home), "PAYMASTER_TENANT": tenant}
    return Paymaster(
        redis_url=url, config=stub_config(stub), settings=Settings.from_env(env), env=env
    )


async def all_keys(redis_url: str) -> set[str]:
    ledger = Ledger.from_url(redis_url)  # the default user: sees everything
    found = {str(k) async for k in ledger.redis.scan_iter(match="pm:*", count=1000)}
    await ledger.aclose()
    return found


async def test_a_fenced_process_runs_its_tenants_task_under_its_prefix_only(
    redis_url: str, users: dict[str, str], stub: ScriptedModelServer, tmp_path: Path
) -> None:
    stub.responder = responder([sub("a"), sub("b")])
    pm = fenced(users["acme"], "acme", stub, tmp_path)
    budget = Budget(tokens=20_000)
    try:
        await pm.aset_tenant("acme", Budget(tokens=100_000), period="none")
        record = await pm.arun("do the thing", budget=budget)  # the fence is the tenant
        assert record.status is Status.SUCCEEDED, record.error
        assert record.tenant == "acme"
        assert_books_clean(await pm.aledger(record.id), budget)
        view = await pm.books.tenant("acme")
        assert view.spent_tokens == (await pm.aledger(record.id)).root.total_spent_tokens
    finally:
        await pm.aclose()
    keys = await all_keys(redis_url)
    assert keys
    assert all(k.startswith("pm:acme:") for k in keys), sorted(keys)


async def test_a_tenants_user_cannot_read_or_write_another_tenants_ledger(
    redis_url: str, users: dict[str, str], stub: ScriptedModelServer, tmp_path: Path
) -> None:
    stub.responder = responder([sub("a")])
    acme = fenced(users["acme"], "acme", stub, tmp_path)
    try:
        await acme.aset_tenant("acme", Budget(tokens=100_000), period="none")
        task = await acme.asubmit("acme's task", budget=Budget(tokens=20_000))
    finally:
        await acme.aclose()
    before = await all_keys(redis_url)

    # bolt's user, in a process that says it is acme's: Redis refuses every key.
    intruder = Ledger.from_url(users["bolt"], space=KeySpace("acme"))
    try:
        with pytest.raises(LedgerForbidden, match="PAYMASTER_TENANT"):
            await intruder.snapshot(task.id)
        with pytest.raises(LedgerForbidden, match="PAYMASTER_TENANT"):
            await intruder.reserve(task.id, "root", tokens=10, nanos=10)
        with pytest.raises(LedgerForbidden, match="PAYMASTER_TENANT"):
            await intruder.open_task("stolen", Budget(tokens=10))
        with pytest.raises(LedgerForbidden):
            await intruder.redis.hgetall(KeySpace("acme").task(task.id).record)
    finally:
        await intruder.aclose()
    # bolt's own fenced process does not see acme's task at all.
    bolt = fenced(users["bolt"], "bolt", stub, tmp_path)
    try:
        with pytest.raises(TaskNotFound):
            await bolt.arecord(task.id)
        with pytest.raises(WrongTenant, match="fenced to tenant 'bolt'"):
            await bolt.asubmit("x", budget=Budget(tokens=100), tenant="acme")
    finally:
        await bolt.aclose()
    assert await all_keys(redis_url) == before  # nothing changed


async def test_a_fenced_worker_runs_its_tenants_queue_and_the_cli_says_what_is_wrong(
    redis_url: str,
    users: dict[str, str],
    stub: ScriptedModelServer,
    env: dict[str, str],
    tmp_path: Path,
) -> None:
    stub.responder = responder([sub("a")])
    acme_env = {**env, "REDIS_URL": users["acme"], "PAYMASTER_TENANT": "acme"}
    made = cli(acme_env, "tenants", "--set", "acme", "--tokens", "100000", "--period", "none")
    assert made.returncode == 0, made.stdout + made.stderr
    worker = WorkerProc(acme_env, tmp_path / "acme-worker.log")
    try:
        await worker.ready()
        done = await asyncio.to_thread(
            cli, acme_env, "submit", "acme's task", "--tokens", "20000", "--wait"
        )
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        worker.stop()
    assert "took task" in worker.log.read_text()

    # acme's credentials in a process fenced to bolt: refused, exit 2, and why.
    wrong = await asyncio.to_thread(
        cli, {**acme_env, "PAYMASTER_TENANT": "bolt"}, "submit", "x", "--tokens", "100"
    )
    assert wrong.returncode == 2, wrong.stdout + wrong.stderr
    assert "refused" in wrong.stderr
    assert "PAYMASTER_TENANT" in wrong.stderr
    assert "Traceback" not in wrong.stderr
    keys = await all_keys(redis_url)
    assert keys
    assert all(k.startswith("pm:acme:") for k in keys), sorted(keys)

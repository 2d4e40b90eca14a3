"""Prometheus: a real worker process serves /metrics; a real scrape agrees with the ledger."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agents.stub_server import RecordedRequest, Reply, ScriptedModelServer
from budgets import Budget, Ledger, TaskTree
from orchestrator.api import Paymaster
from orchestrator.records import Status
from orchestrator.redis_server import free_port
from tests.test_orchestrator import (
    REPO,
    WorkerProc,
    assert_books_clean,
    calls_for,
    cli,
    responder,
    sub,
    wait_for,
    worker_text,
    workers,
)
from tests.test_orchestrator import pm as pm

__all__ = ["pm", "workers"]  # fixtures

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> tuple[str, Samples]:
    """The raw text of /metrics and every sample in it, keyed by name and labels."""
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return response.text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every sample of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= lab)


async def started(w: WorkerProc) -> int:
    """The worker's metrics port, once it is ready."""
    await w.ready(timeout=40)  # a loaded 2-core machine boots a worker slowly
    line = next(ln for ln in w.log.read_text().splitlines() if "metrics on http://" in ln)
    return int(line.rsplit(":", 1)[1].split("/", 1)[0])


async def test_a_scrape_of_a_real_worker_agrees_with_the_ledger(
    pm: Paymaster, stub: ScriptedModelServer, workers: Callable[..., WorkerProc]
) -> None:
    def worker(sid: str, req: RecordedRequest) -> Reply:
        return Reply(text=worker_text(sid), delay_s=1.5 if sid == "a" else 0.0)

    stub.responder = responder([sub("a"), sub("b", "a")], worker)
    await pm.aset_tenant("acme", Budget(tokens=1_000_000, usd="5"), period="month")
    w = workers("--metrics-port", str(free_port()))
    port = await started(w)
    budget = Budget(tokens=20_000, usd="0.1")
    first = await pm.asubmit("do the thing", budget=budget, tenant="acme")

    # While a's call is out: its reservation is held, the task runs, its message is held.
    await wait_for(lambda: calls_for(stub, "a"), what="the slow call for a")
    tree = await pm.aledger(first.id)
    held = sum(a.open_reservations for a in tree.walk())
    assert held == 1  # b waits for a
    _, during = await asyncio.to_thread(scrape, port)
    assert value(during, "paymaster_redis_up") == 1
    assert value(during, "paymaster_tasks_running") == 1
    assert value(during, "paymaster_open_tasks") == 1
    assert value(during, "paymaster_open_reservations") == held
    assert value(during, "paymaster_queue_depth_messages") == 1
    assert 0 <= value(during, "paymaster_queue_oldest_age_seconds") < 30
    assert value(during, "paymaster_tenant_reserved_tokens", tenant="acme") == 20_000

    rec = await first.result(timeout=20)
    assert rec.status is Status.SUCCEEDED, rec.error
    stub.responder = responder([sub("c")])
    second = await pm.asubmit("another thing", budget=Budget(tokens=20_000))
    assert (await second.result(timeout=20)).status is Status.SUCCEEDED

    trees: list[TaskTree] = [await pm.aledger(t.id) for t in (first, second)]
    for t in trees:
        assert_books_clean(t, budget)
    commits = [e for t in (first, second) for e in await pm.aevents(t.id) if e.op == "commit"]
    text, after = await asyncio.to_thread(scrape, port)

    # Counted by the worker, equal to what the ledger committed.
    labels = {"endpoint": "stub", "model": "m"}
    assert value(after, "paymaster_model_calls_total", outcome="ok", **labels) == len(commits)
    assert total(after, "paymaster_model_calls_total", outcome="error") == 0
    tokens = total(after, "paymaster_model_tokens_total", **labels)
    assert tokens == sum(t.root.total_spent_tokens for t in trees) == sum(e.tokens for e in commits)
    assert value(after, "paymaster_model_tokens_total", direction="output", **labels) > 0
    spend = value(after, "paymaster_model_spend_usd_total", **labels)
    assert spend == pytest.approx(sum(t.root.total_spent_nanos for t in trees) / 1e9)
    durations = value(after, "paymaster_model_call_duration_seconds_count", **labels)
    assert durations == len(commits)
    assert value(after, "paymaster_model_call_duration_seconds_sum", **labels) >= 1.5
    assert value(after, "paymaster_tasks_finished_total", status="succeeded", tenant="acme") == 1
    assert value(after, "paymaster_tasks_finished_total", status="succeeded", tenant="") == 1
    assert value(after, "paymaster_task_spend_tokens_total", tenant="acme") == (
        trees[0].root.total_spent_tokens
    )
    assert value(after, "paymaster_task_spend_usd_total", tenant="acme") == pytest.approx(
        trees[0].root.total_spent_nanos / 1e9
    )
    assert value(after, "paymaster_tasks_running") == 0
    assert value(after, "paymaster_queue_takeovers_total") == 0
    assert value(after, "paymaster_queue_dead_letters_total") == 0

    # Read from Redis at the scrape, equal to the ledger's state now.
    view = await pm.books.tenant("acme")
    assert view.spent_tokens == trees[0].root.total_spent_tokens
    assert value(after, "paymaster_tenant_remaining_tokens", tenant="acme") == (
        1_000_000 - view.funded_tokens - view.spent_tokens
    )
    assert value(after, "paymaster_tenant_remaining_usd", tenant="acme") == pytest.approx(
        5 - (view.funded_nanos + view.spent_nanos) / 1e9
    )
    assert value(after, "paymaster_tenant_spent_tokens", tenant="acme") == view.spent_tokens
    assert value(after, "paymaster_tenant_reserved_tokens", tenant="acme") == 0
    for name in (
        "paymaster_open_tasks",
        "paymaster_open_reservations",
        "paymaster_queue_depth_messages",
        "paymaster_queue_oldest_age_seconds",
        "paymaster_dead_letter_messages",
    ):
        assert value(after, name) == 0, name

    # Bounded labels: no task id, account, prompt or answer anywhere in the exposition.
    for secret in (first.id, second.id, "root/", "do the thing", worker_text("a")):
        assert secret not in text
    label_names = {k for (_, labs) in after for k, _ in labs}
    assert label_names <= {"endpoint", "model", "outcome", "direction", "status", "tenant", "le"}


async def test_a_busy_or_bad_metrics_port_is_refused_with_exit_2(
    env: dict[str, str], stub: ScriptedModelServer
) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy, bad = await asyncio.gather(
            asyncio.to_thread(cli, env, "worker", "--metrics-port", str(port)),
            asyncio.to_thread(cli, env, "worker", "--metrics-port", "70000"),
        )
    assert busy.returncode == 2, busy.stderr
    assert f"cannot serve metrics on 127.0.0.1:{port}" in busy.stderr
    assert "Traceback" not in busy.stderr
    assert bad.returncode == 2, bad.stderr
    assert "Invalid value for '--metrics-port'" in bad.stderr


def test_a_scrape_with_redis_down_says_so(tmp_path: Path) -> None:
    from orchestrator.metrics import MetricsServer

    server = MetricsServer(redis_url=f"redis://127.0.0.1:{free_port()}/0", host="127.0.0.1", port=0)
    try:
        _, samples = scrape(server.port)
    finally:
        server.close()
    assert value(samples, "paymaster_redis_up") == 0
    assert not any(n.startswith("paymaster_open_") for n, _ in samples)
    assert value(samples, "paymaster_tasks_running") == 0  # the process's own still show


async def test_the_dashboard_and_the_docs_name_only_metrics_a_worker_exports(
    ledger: Ledger, redis_url: str
) -> None:
    from orchestrator.metrics import MetricsServer

    await ledger.set_tenant("acme", Budget(tokens=1_000, usd="1"), period="month")
    server = MetricsServer(redis_url=redis_url, host="127.0.0.1", port=0)
    try:
        families = [
            f for f in server.telemetry.registry.collect() if f.name.startswith("paymaster_")
        ]
    finally:
        server.close()
    exported: set[str] = set()
    for f in families:
        if f.type == "counter":
            exported.add(f"{f.name}_total")
        elif f.type == "histogram":
            exported.update(f"{f.name}{s}" for s in ("", "_bucket", "_sum", "_count"))
        else:
            exported.add(f.name)
    assert "paymaster_tenant_remaining_usd" in exported  # the Redis gauges are in
    dashboard = json.loads((REPO / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"paymaster_[a-z_]+", e)}
    assert used, "the dashboard queries nothing"
    assert used <= exported, used - exported
    docs = (REPO / "docs" / "observability.md").read_text()
    documented = set(re.findall(r"`(paymaster_[a-z_]+)`", docs))
    public = {n for n in exported if not n.endswith(("_bucket", "_sum", "_count"))}
    assert public <= documented, public - documented
    assert documented - {"paymaster_model_call_duration_seconds"} <= public


async def test_takeovers_dead_letters_and_failed_calls_are_counted(
    pm: Paymaster, stub: ScriptedModelServer, workers: Callable[..., WorkerProc]
) -> None:
    first_b = asyncio.Event()

    def worker(sid: str, req: RecordedRequest) -> Reply:
        if sid == "b" and not first_b.is_set():
            first_b.set()
            return Reply(text=worker_text(sid), delay_s=30)  # worker A dies waiting for it
        return Reply(text=worker_text(sid))

    stub.responder = responder([sub("a"), sub("b")], worker)
    a = workers("--name", "worker-a")
    task = await pm.asubmit("do the thing", budget=Budget(tokens=20_000))
    await a.ready(timeout=40)
    await wait_for(lambda: calls_for(stub, "b"), what="worker A calling for b")
    b = workers(
        "--name", "worker-b", "--metrics-port", str(free_port()), PAYMASTER_MAX_DELIVERIES="2"
    )
    a.proc.kill()
    port = await started(b)
    assert (await task.result(timeout=30)).status is Status.SUCCEEDED
    _, after_takeover = await asyncio.to_thread(scrape, port)
    assert value(after_takeover, "paymaster_queue_takeovers_total") == 1

    stub.responder = lambda request: Reply(text="nope", status=400)
    doomed = await pm.asubmit("doomed", budget=Budget(tokens=20_000))
    assert (await doomed.result(timeout=30)).status is Status.FAILED
    _, samples = await asyncio.to_thread(scrape, port)
    assert value(samples, "paymaster_queue_dead_letters_total") == 1
    assert value(samples, "paymaster_dead_letter_messages") == 1
    assert value(samples, "paymaster_tasks_finished_total", status="failed", tenant="") == 1
    errors = value(
        samples, "paymaster_model_calls_total", endpoint="stub", model="m", outcome="error"
    )
    assert errors == 2  # one plan call per delivery, each refused with a 400

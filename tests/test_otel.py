"""OpenTelemetry: the span tree mirrors the account tree; tokens and cost equal the ledger's.

A real task runs on the real Redis and the scripted model server over HTTP; the SDK's
in-memory exporter and metric reader collect what Paymaster sends.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agents.stub_server import ScriptedModelServer
from budgets import Budget
from budgets.keys import ROOT
from orchestrator.api import Paymaster
from orchestrator.otel import OtelTelemetry
from orchestrator.records import Status
from orchestrator.settings import Settings
from orchestrator.telemetry import NO_TELEMETRY
from tests.test_hierarchy import NESTED, responder
from tests.test_orchestrator import REPO, assert_books_clean, cli, stub_config


@pytest.fixture
async def traced(
    redis_url: str, stub: ScriptedModelServer, tmp_path: Path
) -> AsyncIterator[tuple[Paymaster, InMemorySpanExporter, InMemoryMetricReader]]:
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    telemetry = OtelTelemetry(
        tracer_provider=tracer_provider, meter_provider=MeterProvider(metric_readers=[reader])
    )
    pm = Paymaster(
        redis_url=redis_url,
        config=stub_config(stub),
        env={"HOME": str(tmp_path)},
        telemetry=telemetry,
    )
    yield pm, spans, reader
    await pm.aclose()


def _account(span: ReadableSpan) -> str:
    assert span.attributes is not None
    return str(span.attributes["paymaster.account"])


def _attr(span: ReadableSpan, name: str) -> Any:
    assert span.attributes is not None
    return span.attributes.get(name)


def _points(reader: InMemoryMetricReader, name: str) -> list[Any]:
    data = reader.get_metrics_data()
    assert data is not None
    return [
        point
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
        if metric.name == name
        for point in metric.data.data_points
    ]


async def test_spans_mirror_the_account_tree_and_carry_the_ledgers_figures(
    traced: tuple[Paymaster, InMemorySpanExporter, InMemoryMetricReader],
    stub: ScriptedModelServer,
) -> None:
    pm, exporter, reader = traced
    stub.responder = responder(NESTED)
    await pm.aset_tenant("acme", Budget(tokens=1_000_000, usd="5"), period="month")
    budget = Budget(tokens=40_000, usd="1")
    rec = await pm.arun("a big task", budget=budget, tenant="acme")
    assert rec.status is Status.SUCCEEDED, rec.error
    tree = await pm.aledger(rec.id)
    assert_books_clean(tree, budget)
    spans = exporter.get_finished_spans()
    by_id = {s.context.span_id: s for s in spans if s.context is not None}

    (task,) = [s for s in spans if s.name == "invoke_agent paymaster"]
    assert task.parent is None
    assert _attr(task, "paymaster.task_id") == rec.id
    assert _attr(task, "paymaster.tenant") == "acme"
    assert _attr(task, "paymaster.status") == "succeeded"
    assert _attr(task, "paymaster.spent_tokens") == tree.root.total_spent_tokens
    assert _attr(task, "paymaster.spent_nanos") == tree.root.total_spent_nanos
    assert _attr(task, "gen_ai.usage.cost.amount") == pytest.approx(
        tree.root.total_spent_nanos / 1e9
    )

    # Every span but the task's sits under the span of its account's parent account
    # (a call: under the span of the account it was paid from).
    def parent_account(span: ReadableSpan) -> str:
        assert span.parent is not None, span.name
        return _account(by_id[span.parent.span_id])

    calls = [s for s in spans if s.name.startswith("chat ")]
    agents = [s for s in spans if s.name.startswith("invoke_agent ") and s is not task]
    for span in agents:
        account = _account(span)
        assert parent_account(span) == account.rpartition("/")[0], (span.name, account)
    for span in calls:
        assert parent_account(span) == _account(span), span.name

    # One subtask span per subtask account; manager steps on the manager accounts.
    accounts = {a.path for a in tree.walk()} - {ROOT}
    subtask_accounts = {_account(s) for s in agents if _attr(s, "paymaster.work")}
    step_accounts = {_account(s) for s in agents if _attr(s, "paymaster.step")}
    assert subtask_accounts | step_accounts == accounts
    assert step_accounts == {a for a in accounts if a.rsplit("/", 1)[1].startswith("manager.")}
    (composite,) = [s for s in agents if s.name == "invoke_agent sub-manager"]
    assert _account(composite) == f"{ROOT}/s1.1.1"

    # Each account's calls add up to what the ledger says it spent, tokens and dollars.
    for acct in tree.walk():
        paid = [s for s in calls if _account(s) == acct.path]
        tokens = sum(
            _attr(s, "gen_ai.usage.input_tokens") + _attr(s, "gen_ai.usage.output_tokens")
            for s in paid
        )
        assert tokens == acct.spent_tokens, acct.path
        assert sum(_attr(s, "paymaster.cost_nanos") for s in paid) == acct.spent_nanos
    for span in calls:
        assert span.name == "chat m"
        assert _attr(span, "gen_ai.operation.name") == "chat"
        assert _attr(span, "gen_ai.provider.name") == "openai"
        assert _attr(span, "gen_ai.request.model") == "m"
        assert _attr(span, "gen_ai.usage.cost.currency") == "USD"
        assert _attr(span, "gen_ai.usage.cost.source") == "reported"
        assert _attr(span, "gen_ai.usage.cost.amount") == pytest.approx(
            _attr(span, "paymaster.cost_nanos") / 1e9
        )
        assert _attr(span, "paymaster.reserved_tokens") > _attr(span, "gen_ai.usage.input_tokens")
        assert _attr(span, "paymaster.budget.remaining_tokens") >= 0
    # Work spans carry their account's spend (a composite's: its whole sub-level's).
    for span in agents:
        if _attr(span, "paymaster.work"):
            acct = tree.account(_account(span))
            assert _attr(span, "paymaster.spent_tokens") == acct.total_spent_tokens
            assert _attr(span, "paymaster.spent_nanos") == acct.total_spent_nanos
            assert _attr(span, "paymaster.outcome") == "finished"
    # No prompt or answer text is an attribute anywhere.
    for span in spans:
        for value in (span.attributes or {}).values():
            assert "do s1" not in str(value)
            assert "answer of" not in str(value)

    # Metrics: GenAI token usage adds up to the ledger's tokens; spend per tenant to its dollars.
    usage = _points(reader, "gen_ai.client.token.usage")
    assert sum(p.sum for p in usage) == tree.root.total_spent_tokens
    assert sum(p.count for p in _points(reader, "gen_ai.client.operation.duration")) == len(calls)
    (spend,) = _points(reader, "paymaster.tenant.spend.cost")
    assert dict(spend.attributes) == {"paymaster.tenant": "acme"}
    assert spend.value == pytest.approx(tree.root.total_spent_nanos / 1e9)
    view = await pm.books.tenant("acme")
    (left,) = _points(reader, "paymaster.tenant.remaining.tokens")
    assert left.value == 1_000_000 - view.funded_tokens - view.spent_tokens
    (reserved,) = _points(reader, "paymaster.tenant.reserved.tokens")
    assert reserved.value == 0  # every reservation settled


def test_settings_turn_otel_on_only_when_an_endpoint_is_configured(tmp_path: Path) -> None:
    home = {"HOME": str(tmp_path)}
    assert not Settings.from_env(home).otel
    assert Settings.from_env({**home, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"}).otel
    assert Settings.from_env({**home, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://x:1"}).otel
    disabled = {**home, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:1", "OTEL_SDK_DISABLED": "true"}
    assert not Settings.from_env(disabled).otel


def test_an_endpoint_without_the_otel_extra_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from orchestrator.errors import TelemetryUnavailable
    from orchestrator.runtime import telemetry_for

    on = Settings.from_env({"HOME": str(tmp_path), "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:1"})
    monkeypatch.setitem(sys.modules, "orchestrator.otel", None)  # as if the extra were missing
    with pytest.raises(TelemetryUnavailable, match=r"pip install 'paymaster\[otel\]'"):
        telemetry_for(on, None)
    assert telemetry_for(Settings.from_env({"HOME": str(tmp_path)}), None) is NO_TELEMETRY


def test_off_builds_no_wrapper_and_never_imports_the_otel_module(
    redis_url: str, tmp_path: Path
) -> None:
    # A fresh interpreter: the runtime is built and a task runs with telemetry off.
    code = f"""
import sys
from budgets import Budget
from orchestrator.api import Paymaster
from orchestrator.telemetry import NO_TELEMETRY
from tests.test_orchestrator import stub_config
from agents.stub_server import ScriptedModelServer
with ScriptedModelServer() as srv:
    home = {{"HOME": {str(tmp_path)!r}}}
    pm = Paymaster(redis_url={redis_url!r}, config=stub_config(srv), env=home)
    rt = pm.runtime()
    assert rt.telemetry is NO_TELEMETRY
    assert rt.graph is not None
    rec = pm.run("one thing", budget=Budget(tokens=5_000))
    assert rec.status.value in ("succeeded", "partial"), rec
    pm.close()
assert "orchestrator.otel" not in sys.modules
assert "orchestrator.metrics" not in sys.modules
assert "prometheus_client" not in sys.modules
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
    assert NO_TELEMETRY.detailed is False


def test_a_call_that_fails_is_an_error_span_and_still_closes(
    redis_url: str, stub: ScriptedModelServer, tmp_path: Path
) -> None:
    from agents.stub_server import Reply

    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    telemetry = OtelTelemetry(
        tracer_provider=provider,
        meter_provider=MeterProvider(metric_readers=[InMemoryMetricReader()]),
    )
    stub.responder = lambda request: Reply(text="nope", status=400)
    pm = Paymaster(
        redis_url=redis_url,
        config=stub_config(stub),
        env={"HOME": str(tmp_path)},
        telemetry=telemetry,
    )
    try:
        with pytest.raises(Exception):  # noqa: B017, PT011 - the model call's error
            pm.run("doomed", budget=Budget(tokens=5_000))
    finally:
        pm.close()
    finished = spans.get_finished_spans()
    failed = [s for s in finished if s.name.startswith("chat ")]
    assert failed
    assert all(_attr(s, "error.type") for s in failed)
    assert all(s.status.status_code.name == "ERROR" for s in failed)
    (task,) = [s for s in finished if s.name == "invoke_agent paymaster"]
    assert task.status.status_code.name == "ERROR"


def test_an_otlp_endpoint_in_the_environment_receives_the_tasks_spans(
    env: dict[str, str], stub: ScriptedModelServer
) -> None:
    """``paymaster run`` with OTEL_EXPORTER_OTLP_ENDPOINT: spans reach a real HTTP collector."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    received: list[tuple[str, bytes]] = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, body))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    stub.responder = responder({"": [{"id": "a", "instruction": "do a", "difficulty": 2}]})
    otel_env = {
        **env,
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}",
        "OTEL_SERVICE_NAME": "paymaster-test",
    }
    try:
        done = cli(otel_env, "run", "one thing", "--tokens", "5000")
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == 0, done.stderr
    traces = [body for path, body in received if path == "/v1/traces"]
    assert traces, [p for p, _ in received]
    names: set[str] = set()
    for body in traces:
        request = ExportTraceServiceRequest.FromString(body)
        for rs in request.resource_spans:
            service = {a.key: a.value.string_value for a in rs.resource.attributes}
            assert service["service.name"] == "paymaster-test"
            names.update(s.name for ss in rs.scope_spans for s in ss.spans)
    assert {"invoke_agent paymaster", "invoke_agent manager", "chat m"} <= names
    assert any(path == "/v1/metrics" for path, _ in received)  # flushed when the run ended


def test_the_service_is_named_paymaster_unless_the_environment_names_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")
    default = OtelTelemetry.from_environment()
    monkeypatch.setenv("OTEL_SERVICE_NAME", "billing-workers")
    named = OtelTelemetry.from_environment()
    try:
        for telemetry, want in ((default, "paymaster"), (named, "billing-workers")):
            provider = telemetry._tracer_provider
            assert isinstance(provider, TracerProvider)
            assert provider.resource.attributes["service.name"] == want
    finally:
        default.close()
        named.close()

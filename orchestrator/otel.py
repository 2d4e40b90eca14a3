"""OpenTelemetry: spans that mirror a task's account tree, and GenAI metrics (extra ``otel``).

Imported only when telemetry is configured (:func:`orchestrator.runtime.telemetry_for`:
``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` set, and
``OTEL_SDK_DISABLED`` not ``true``). The OTLP/HTTP exporters then read the standard
``OTEL_*`` variables themselves (endpoint, headers, timeout, service name).

Spans (names and attributes in ``docs/observability.md``): one per delivery of a
task (``invoke_agent paymaster``), per manager step (``invoke_agent manager``), per
try of a subtask (``invoke_agent worker``, ``invoke_agent sub-manager`` for a
composite) and per model call (``chat {model}``), each with ``paymaster.account``,
so the span tree is the account tree. A call's tokens and cost are the ones its
commit wrote to the ledger, following the GenAI semantic conventions plus the
cost attributes proposed for them. No prompt, answer or key is ever an attribute.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, TracerProvider

from orchestrator.telemetry import CallFacts, QueueEvent, Step, TaskFacts, Value

NANOS_PER_USD = 1_000_000_000
CURRENCY = "USD"
SCOPE_NAME = "paymaster"

#: The tenant of the task whose scope is current (for per-tenant call metrics).
_TENANT: ContextVar[str] = ContextVar("paymaster_otel_tenant", default="")


def _usd(nanos: int) -> float:
    return nanos / NANOS_PER_USD


class _SpanScope:
    """A span, written to through :meth:`note` (keys become ``paymaster.<key>``)."""

    __slots__ = ("_span",)

    def __init__(self, span: Span) -> None:
        self._span = span

    def note(self, **facts: Value | None) -> None:
        span = self._span
        for key, value in facts.items():
            if value is None:
                continue
            span.set_attribute(f"paymaster.{key}", value)
            if key == "tenant":
                _TENANT.set(str(value))
            elif key == "spent_nanos":
                span.set_attribute("gen_ai.usage.cost.amount", _usd(int(value)))
                span.set_attribute("gen_ai.usage.cost.currency", CURRENCY)


class _CallScope:
    """A model call's span and the metrics recorded when it is done."""

    __slots__ = ("_reserved", "_sink", "_span", "_tenant")

    def __init__(self, sink: OtelTelemetry, span: Span, reserved: int | None) -> None:
        self._sink, self._span, self._reserved = sink, span, reserved
        self._tenant = _TENANT.get()

    def done(self, facts: CallFacts) -> None:
        span, sink = self._span, self._sink
        base: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": facts.provider,
            "gen_ai.request.model": facts.model,
        }
        if self._reserved:
            sink.reserved.add(-self._reserved, {"paymaster.tenant": self._tenant})
        if facts.outcome != "ok":
            span.set_attribute("error.type", facts.error or "error")
            span.set_status(Status(StatusCode.ERROR, facts.error))
            sink.duration.record(facts.duration_s, {**base, "error.type": facts.error or "error"})
            return
        attrs: dict[str, Any] = {
            "gen_ai.response.model": facts.model,
            "gen_ai.usage.input_tokens": facts.input_tokens,
            "gen_ai.usage.output_tokens": facts.output_tokens,
            "gen_ai.usage.cost.amount": _usd(facts.cost_nanos),
            "gen_ai.usage.cost.currency": CURRENCY,
            "gen_ai.usage.cost.source": "estimated" if facts.estimated else "reported",
            "paymaster.cost_nanos": facts.cost_nanos,
            "paymaster.endpoint": facts.endpoint,
        }
        if facts.finish_reason:
            attrs["gen_ai.response.finish_reasons"] = [facts.finish_reason]
        if facts.reserved_tokens is not None:
            attrs["paymaster.reserved_tokens"] = facts.reserved_tokens
        if facts.remaining_tokens is not None:
            attrs["paymaster.budget.remaining_tokens"] = facts.remaining_tokens
        if facts.remaining_nanos is not None:
            attrs["paymaster.budget.remaining_usd"] = _usd(facts.remaining_nanos)
        span.set_attributes(attrs)
        metric = {**base, "gen_ai.response.model": facts.model}
        sink.duration.record(facts.duration_s, metric)
        sink.token_usage.record(facts.input_tokens, {**metric, "gen_ai.token.type": "input"})
        sink.token_usage.record(facts.output_tokens, {**metric, "gen_ai.token.type": "output"})


class OtelTelemetry:
    """Spans and metrics through the given (or the environment's OTLP) providers."""

    detailed = True

    def __init__(self, *, tracer_provider: TracerProvider, meter_provider: MeterProvider) -> None:
        self._tracer_provider = tracer_provider
        self._meter_provider = meter_provider
        self.tracer = tracer_provider.get_tracer(SCOPE_NAME)
        meter = meter_provider.get_meter(SCOPE_NAME)
        self.token_usage = meter.create_histogram(
            "gen_ai.client.token.usage",
            unit="{token}",
            description="Number of input and output tokens used",
        )
        self.duration = meter.create_histogram(
            "gen_ai.client.operation.duration",
            unit="s",
            description="GenAI operation duration",
        )
        self.spend_cost = meter.create_counter(
            "paymaster.tenant.spend.cost",
            unit=CURRENCY,
            description="What finished tasks spent, by their ledgers, per tenant",
        )
        self.spend_tokens = meter.create_counter(
            "paymaster.tenant.spend.tokens",
            unit="{token}",
            description="Tokens finished tasks spent, by their ledgers, per tenant",
        )
        self.reserved = meter.create_up_down_counter(
            "paymaster.tenant.reserved.tokens",
            unit="{token}",
            description="Tokens reserved by model calls in flight, per tenant",
        )
        self.remaining_tokens = meter.create_gauge(
            "paymaster.tenant.remaining.tokens",
            unit="{token}",
            description="Tokens a tenant can still fund in its period, at its last task end",
        )
        self.remaining_cost = meter.create_gauge(
            "paymaster.tenant.remaining.cost",
            unit=CURRENCY,
            description="Dollars a tenant can still fund in its period, at its last task end",
        )

    @classmethod
    def from_environment(cls) -> OtelTelemetry:
        """OTLP/HTTP exporters for spans and metrics, configured by the ``OTEL_*`` variables."""
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.metrics import MeterProvider as SdkMeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        resource = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": "paymaster"}))
        tracer_provider = SdkTracerProvider(resource=resource)
        tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        reader = PeriodicExportingMetricReader(OTLPMetricExporter())
        meter_provider = SdkMeterProvider(resource=resource, metric_readers=[reader])
        return cls(tracer_provider=tracer_provider, meter_provider=meter_provider)

    @contextlib.contextmanager
    def _span(self, name: str, kind: SpanKind, attributes: dict[str, Any]) -> Iterator[Span]:
        with self.tracer.start_as_current_span(name, kind=kind, attributes=attributes) as span:
            yield span

    @contextlib.contextmanager
    def task(self, *, task_id: str, delivery: int) -> Iterator[_SpanScope]:
        """The task's span: the root of its tree (account ``root``)."""
        token = _TENANT.set("")
        try:
            attrs = {
                "gen_ai.operation.name": "invoke_agent",
                "gen_ai.agent.name": "paymaster",
                "paymaster.task_id": task_id,
                "paymaster.account": "root",
                "paymaster.delivery": delivery,
            }
            with self._span("invoke_agent paymaster", SpanKind.INTERNAL, attrs) as span:
                yield _SpanScope(span)
        finally:
            _TENANT.reset(token)

    @contextlib.contextmanager
    def step(self, *, task_id: str, account: str, step: Step, depth: int) -> Iterator[_SpanScope]:
        """A manager's plan or synthesis, paid from its manager account."""
        attrs = {
            "gen_ai.operation.name": "invoke_agent",
            "gen_ai.agent.name": "manager",
            "paymaster.task_id": task_id,
            "paymaster.account": account,
            "paymaster.step": step,
            "paymaster.depth": depth,
        }
        with self._span("invoke_agent manager", SpanKind.INTERNAL, attrs) as span:
            yield _SpanScope(span)

    @contextlib.contextmanager
    def subtask(
        self, *, task_id: str, account: str, work: str, attempt: int, composite: bool
    ) -> Iterator[_SpanScope]:
        """One try of a subtask in its account (a composite's span holds its sub-level)."""
        agent = "sub-manager" if composite else "worker"
        attrs = {
            "gen_ai.operation.name": "invoke_agent",
            "gen_ai.agent.name": agent,
            "paymaster.task_id": task_id,
            "paymaster.account": account,
            "paymaster.work": work,
            "paymaster.attempt": attempt,
        }
        with self._span(f"invoke_agent {agent}", SpanKind.INTERNAL, attrs) as span:
            yield _SpanScope(span)

    @contextlib.contextmanager
    def call(
        self,
        *,
        task_id: str,
        account: str,
        endpoint: str,
        model: str,
        provider: str,
        reserved_tokens: int | None = None,
    ) -> Iterator[_CallScope]:
        """A model call: ``chat {model}``, a client span."""
        attrs = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": provider,
            "gen_ai.request.model": model,
            "paymaster.task_id": task_id,
            "paymaster.account": account,
            "paymaster.endpoint": endpoint,
        }
        with self._span(f"chat {model}", SpanKind.CLIENT, attrs) as span:
            scope = _CallScope(self, span, reserved_tokens)
            if reserved_tokens:
                self.reserved.add(reserved_tokens, {"paymaster.tenant": _TENANT.get()})
            yield scope

    def task_finished(self, facts: TaskFacts) -> None:
        """Per-tenant spend (the ledger's totals) and what the tenant has left."""
        tenant = {"paymaster.tenant": facts.tenant or ""}
        self.spend_cost.add(_usd(facts.spent_nanos), tenant)
        self.spend_tokens.add(facts.spent_tokens, tenant)
        if facts.tenant_remaining_tokens is not None:
            self.remaining_tokens.set(facts.tenant_remaining_tokens, tenant)
        if facts.tenant_remaining_nanos is not None:
            self.remaining_cost.set(_usd(facts.tenant_remaining_nanos), tenant)

    def queue(self, event: QueueEvent, count: int = 1) -> None:
        """Queue events are Prometheus's (``paymaster_queue_*``)."""

    def close(self) -> None:
        """Flush and stop the providers' exporters."""
        for provider in (self._tracer_provider, self._meter_provider):
            shutdown = getattr(provider, "shutdown", None)
            if shutdown is not None:
                shutdown()

"""Prometheus metrics of a worker: ``paymaster worker --metrics-port N`` serves ``/metrics``.

Two kinds (names, labels and meanings in ``docs/observability.md``):

- **counters of this process** — tasks finished by status, model calls and
  tokens by endpoint and model, spend in USD, takeovers and dead letters —
  fed by the telemetry hooks (:class:`PrometheusTelemetry`). Several workers
  each export their own; ``sum()`` over them is the fleet's.
- **gauges of the shared state**, read from Redis at each scrape
  (:class:`LedgerCollector`): open tasks and reservations, each tenant's
  budget remaining in its current period, queue depth and the age of its
  oldest message, dead-lettered messages. Every worker reports the same
  values; take ``max()`` over them.

Labels are bounded by configuration (endpoint, model, tenant, status): no
task id, account, prompt or key is ever a label value.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any, cast

import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from budgets.connection import sync_redis_client
from budgets.keys import SHARED_SPACE, KeySpace
from budgets.money import UNLIMITED
from orchestrator.telemetry import QUIET, CallFacts, Off, QueueEvent, Quiet, TaskFacts

log = logging.getLogger(__name__)

NANOS_PER_USD = 1_000_000_000
#: Seconds a scrape waits for Redis before it reports ``paymaster_redis_up 0``.
SCRAPE_TIMEOUT_S = 2.0
#: Buckets of model call durations (seconds): a local model's fraction of a second up
#: to a remote reasoning model's minutes.
CALL_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class PrometheusTelemetry(Off):
    """Counts what this process's tasks and calls did, in its own registry."""

    detailed = False

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.tasks_finished = Counter(
            "paymaster_tasks_finished",
            "Tasks this process brought to a final status",
            ["status", "tenant"],
            registry=r,
        )
        self.tasks_running = Gauge(
            "paymaster_tasks_running", "Deliveries of tasks this process is running", registry=r
        )
        self.task_spend_usd = Counter(
            "paymaster_task_spend_usd",
            "What the tasks this process finished spent, by their ledgers (USD)",
            ["tenant"],
            registry=r,
        )
        self.task_spend_tokens = Counter(
            "paymaster_task_spend_tokens",
            "Tokens the tasks this process finished spent, by their ledgers",
            ["tenant"],
            registry=r,
        )
        self.calls = Counter(
            "paymaster_model_calls",
            "Model calls this process made (error: the call raised; its payment is in the ledger)",
            ["endpoint", "model", "outcome"],
            registry=r,
        )
        self.tokens = Counter(
            "paymaster_model_tokens",
            "Tokens of answered model calls, as committed to the ledger",
            ["endpoint", "model", "direction"],
            registry=r,
        )
        self.spend_usd = Counter(
            "paymaster_model_spend_usd",
            "What answered model calls cost, as committed to the ledger (USD)",
            ["endpoint", "model"],
            registry=r,
        )
        self.estimated = Counter(
            "paymaster_model_estimated_calls",
            "Answered calls whose server reported no usage: the whole reservation was charged",
            ["endpoint", "model"],
            registry=r,
        )
        self.duration = Histogram(
            "paymaster_model_call_duration_seconds",
            "Wall time of model calls, reservation and settlement included",
            ["endpoint", "model"],
            buckets=CALL_BUCKETS_S,
            registry=r,
        )
        self.takeovers = Counter(
            "paymaster_queue_takeovers",
            "Deliveries this process claimed after they sat unacknowledged past the visibility "
            "timeout (their worker died, or a failed delivery is being retried)",
            registry=r,
        )
        self.dead_letters = Counter(
            "paymaster_queue_dead_letters",
            "Tasks this process moved to the dead letter",
            registry=r,
        )

    @contextlib.contextmanager
    def task(self, *, task_id: str, delivery: int) -> Iterator[Quiet]:
        """Counts the delivery as running while it runs."""
        self.tasks_running.inc()
        try:
            yield QUIET
        finally:
            self.tasks_running.dec()

    def call(
        self,
        *,
        task_id: str,
        account: str,
        endpoint: str,
        model: str,
        provider: str,
        reserved_tokens: int | None = None,
    ) -> AbstractContextManager[_CallCounter]:
        """Counts the call once it is over."""
        return _CallCounter(self)

    def task_finished(self, facts: TaskFacts) -> None:
        """Counts the task and what its ledger says it spent."""
        tenant = facts.tenant or ""
        self.tasks_finished.labels(status=facts.status, tenant=tenant).inc()
        self.task_spend_tokens.labels(tenant=tenant).inc(facts.spent_tokens)
        self.task_spend_usd.labels(tenant=tenant).inc(facts.spent_nanos / NANOS_PER_USD)

    def queue(self, event: QueueEvent, count: int = 1) -> None:
        """Counts takeovers and dead letters."""
        (self.takeovers if event == "takeover" else self.dead_letters).inc(count)

    def close(self) -> None:
        """Nothing buffered."""


class _CallCounter:
    __slots__ = ("_sink",)

    def __init__(self, sink: PrometheusTelemetry) -> None:
        self._sink = sink

    def __enter__(self) -> _CallCounter:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def done(self, facts: CallFacts) -> None:
        s, ep, model = self._sink, facts.endpoint, facts.model
        s.calls.labels(endpoint=ep, model=model, outcome=facts.outcome).inc()
        s.duration.labels(endpoint=ep, model=model).observe(facts.duration_s)
        if facts.outcome != "ok":
            return
        s.tokens.labels(endpoint=ep, model=model, direction="input").inc(facts.input_tokens)
        s.tokens.labels(endpoint=ep, model=model, direction="output").inc(facts.output_tokens)
        s.spend_usd.labels(endpoint=ep, model=model).inc(facts.cost_nanos / NANOS_PER_USD)
        if facts.estimated:
            s.estimated.labels(endpoint=ep, model=model).inc()


def _opt_limit(raw: str | None) -> int | None:
    value = int(raw or UNLIMITED)
    return None if value == UNLIMITED else value


class LedgerCollector(Collector):
    """Gauges read from Redis at each scrape (a synchronous client: scrapes run in a thread)."""

    def __init__(self, redis_url: str, *, space: KeySpace = SHARED_SPACE) -> None:
        self._space = space
        self._redis = sync_redis_client(
            redis_url,
            socket_timeout=SCRAPE_TIMEOUT_S,
            socket_connect_timeout=SCRAPE_TIMEOUT_S,
        )
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the scrape's Redis connection."""
        self._redis.close()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """One consistent read of the shared state per scrape."""
        up = GaugeMetricFamily("paymaster_redis_up", "1 when the last scrape could read Redis")
        try:
            with self._lock:
                families = list(self._read())
        except redis.RedisError as e:
            log.warning("metrics scrape could not read Redis: %s", type(e).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _read(self) -> Iterator[GaugeMetricFamily]:
        r = self._redis
        now_s, _ = r.time()
        tasks = sorted(cast("set[str]", r.smembers(self._space.open_tasks)))
        tenants = sorted(cast("set[str]", r.smembers(self._space.tenants)))
        pipe = r.pipeline(transaction=False)
        for t in tasks:
            pipe.zcard(self._space.task(t).leases)
        for name in tenants:
            pipe.hgetall(self._space.tenant_keys(name).config)
        pipe.xlen(self._space.queue)
        pipe.xrange(self._space.queue, count=1)
        pipe.xlen(self._space.dead_letter)
        replies: list[Any] = pipe.execute()
        held = replies[: len(tasks)]
        configs = cast("list[dict[str, str]]", replies[len(tasks) : len(tasks) + len(tenants)])
        depth, first, dead = replies[len(tasks) + len(tenants) :]

        yield _gauge("paymaster_open_tasks", "Tasks whose ledger is open", len(tasks))
        yield _gauge(
            "paymaster_open_reservations",
            "Reservations held by model calls in flight (or not yet expired), all open tasks",
            sum(int(n) for n in held),
        )
        yield _gauge(
            "paymaster_queue_depth_messages",
            "Messages in the task queue: waiting for a worker or held by one",
            int(depth),
        )
        oldest_ms = int(str(first[0][0]).split("-", 1)[0]) if first else None
        yield _gauge(
            "paymaster_queue_oldest_age_seconds",
            "Age of the oldest message in the task queue (0 when it is empty)",
            0.0 if oldest_ms is None else max(0.0, int(now_s) - oldest_ms / 1000),
        )
        yield _gauge(
            "paymaster_dead_letter_messages", "Tasks in the dead letter (capped)", int(dead)
        )
        yield from self._tenants(tenants, configs)

    def _tenants(
        self, names: list[str], configs: list[dict[str, str]]
    ) -> Iterator[GaugeMetricFamily]:
        periods = [(n, c.get("last")) for n, c in zip(names, configs, strict=True) if c]
        pipe = self._redis.pipeline(transaction=False)
        for name, last in periods:
            pipe.hgetall(self._space.tenant_keys(name).period(last or "all"))
        used = cast("list[dict[str, str]]", pipe.execute()) if periods else []
        families = {
            key: GaugeMetricFamily(name, text, labels=["tenant"])
            for key, name, text in (
                ("rt", "paymaster_tenant_remaining_tokens", "Tokens a tenant can still fund"),
                ("rn", "paymaster_tenant_remaining_usd", "Dollars a tenant can still fund"),
                ("ft", "paymaster_tenant_reserved_tokens", "Tokens held by a tenant's open tasks"),
                ("fn", "paymaster_tenant_reserved_usd", "Dollars held by a tenant's open tasks"),
                ("st", "paymaster_tenant_spent_tokens", "Tokens a tenant's tasks spent"),
                ("sn", "paymaster_tenant_spent_usd", "Dollars a tenant's tasks spent"),
            )
        }
        configured = {n: c for n, c in zip(names, configs, strict=True) if c}
        for (name, _), period in zip(periods, used, strict=True):
            cfg = configured[name]
            ft, fn = int(period.get("ft", 0)), int(period.get("fn", 0))
            st, sn = int(period.get("st", 0)), int(period.get("sn", 0))
            families["ft"].add_metric([name], ft)
            families["fn"].add_metric([name], fn / NANOS_PER_USD)
            families["st"].add_metric([name], st)
            families["sn"].add_metric([name], sn / NANOS_PER_USD)
            limit_t, limit_n = _opt_limit(cfg.get("lt")), _opt_limit(cfg.get("ln"))
            if limit_t is not None:  # an unlimited unit has no remaining
                families["rt"].add_metric([name], max(0, limit_t - ft - st))
            if limit_n is not None:
                families["rn"].add_metric([name], max(0, limit_n - fn - sn) / NANOS_PER_USD)
        yield from families.values()


def _gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, text, value=value)


class MetricsServer:
    """``/metrics`` on ``host:port`` in a daemon thread: this process's counters and the gauges."""

    def __init__(
        self, *, redis_url: str, host: str, port: int, space: KeySpace = SHARED_SPACE
    ) -> None:
        self.telemetry = PrometheusTelemetry()
        self._collector = LedgerCollector(redis_url, space=space)
        self.telemetry.registry.register(self._collector)
        try:
            self._server, self._thread = start_http_server(
                port, addr=host, registry=self.telemetry.registry
            )
        except OSError as e:
            self._collector.close()
            raise MetricsPortUnavailable(host, port, e) from e
        self.port = int(self._server.server_address[1])

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()
        self._collector.close()


class MetricsPortUnavailable(OSError):
    """The metrics port could not be bound (in use, or not ours to take)."""

    def __init__(self, host: str, port: int, cause: OSError) -> None:
        super().__init__(
            f"cannot serve metrics on {host}:{port}: {cause.strerror or cause}; "
            "choose another --metrics-port"
        )

"""A process's working parts (ledger, records, metered client, agents, graph); running a task.

The process's Redis client rides out an outage for up to the visibility
timeout (see :mod:`orchestrator.outage`); a task whose Redis step still fails
is handed back to the queue, never failed for it. A task run for a queue
delivery checks before every paid step, and before it is finished, that the
delivery is still this worker's (see :mod:`orchestrator.queue`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from agents.endpoints import EndpointsConfig
from agents.manager import ManagerAgent
from agents.metered import MeteredClient, RetryPolicy
from agents.worker import WorkerAgent
from budgets import BudgetExceeded, Ledger, nanos_to_usd
from budgets.errors import LedgerError, UnknownTask
from budgets.keys import ROOT
from budgets.money import usd_to_nanos
from budgets.policy import Option, Policy, Pool, make_policy
from budgets.stats import StatsBook
from orchestrator.errors import DeliveryLost, TaskCancelled, TelemetryUnavailable
from orchestrator.flow import Flow, FlowDeps, FlowReport, build_graph, stats_scope
from orchestrator.observed import ObservedClient
from orchestrator.outage import UNREACHABLE, Outage, riding_client
from orchestrator.queue import Delivery, TaskQueue
from orchestrator.records import Records, Spent, Status, TaskRecord
from orchestrator.settings import Settings
from orchestrator.telemetry import NO_TELEMETRY, TaskFacts, Telemetry, combine

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Runtime:
    """Built once per process; runs tasks to a final state."""

    settings: Settings
    ledger: Ledger
    records: Records
    metered: MeteredClient
    stats: StatsBook
    graph: Any
    policy: Policy
    queue: TaskQueue
    outage: Outage
    #: Where scopes and events go (orchestrator/telemetry.py); off by default.
    telemetry: Telemetry = NO_TELEMETRY

    @classmethod
    def build(
        cls,
        *,
        settings: Settings,
        redis_url: str,
        endpoints: EndpointsConfig,
        env: Mapping[str, str],
        policy: Policy | None = None,
        retry: RetryPolicy | None = None,
        telemetry: Telemetry | None = None,
    ) -> Runtime:
        """Wire the parts together on the Redis at ``redis_url``.

        ``telemetry`` (default: what the settings configure, usually off)
        observes every task, step, subtask and model call.
        """
        outage = Outage()
        redis = riding_client(redis_url, outage=outage, window_s=settings.visibility_timeout_s)
        space = settings.space()
        ledger = Ledger(redis, url=redis_url, lease_s=settings.lease_s, space=space)
        records = Records(ledger.redis, space=space)
        queue = TaskQueue(ledger.redis, space=space)
        metered = MeteredClient(
            ledger=ledger, config=endpoints, env=env, retry=retry, lease_s=settings.lease_s
        )
        # An outcome's marker lives as long as its task: a verdict needs the task's
        # record, and a task id reused after its retention is a new task.
        stats = StatsBook(ledger.redis, retention_s=settings.retention_s, space=space)
        chosen = policy or make_policy(
            settings.policy, target=settings.policy_target(), explore=settings.explore
        )
        # Observability hook: with telemetry on, the agents call through a wrapper
        # that observes each call; off, they call the metered client itself.
        observed = telemetry_for(settings, telemetry)
        client = metered if observed is NO_TELEMETRY else ObservedClient(metered, observed)
        deps = FlowDeps(
            ledger=ledger,
            records=records,
            manager=ManagerAgent(client=client),
            worker=WorkerAgent(client=client),
            policy=chosen,
            stats=stats,
            options=options_of(endpoints),
            default_endpoint=endpoints.worker or endpoints.default,
            max_subtasks=settings.max_subtasks,
            ownership=queue,
            max_depth=settings.max_depth,
            review=settings.review,
            telemetry=observed,
        )
        graph = build_graph(Flow(deps))
        return cls(
            settings, ledger, records, metered, stats, graph, chosen, queue, outage, observed
        )

    async def aclose(self) -> None:
        """Close HTTP clients and Redis connections; flush telemetry."""
        await self.metered.aclose()
        await self.ledger.aclose()
        self.telemetry.close()

    async def execute(self, task_id: str, *, claim: Delivery | None = None) -> TaskRecord:
        """Run a task to a final state (or raise to have it delivered again).

        ``claim`` is the worker's delivery of the task: checked before every
        paid step and before the task is finished; :class:`DeliveryLost` when
        another worker took it over (nothing is finished then). An error
        reaching Redis propagates: the task is delivered again, not failed.
        """
        started = await self.records.start(task_id)
        if started is None:
            raise UnknownTask(task_id)
        record, delivery = started
        if delivery is None:  # final already (cancelled while queued, or finished)
            return record
        # Observability hook: one scope per delivery (orchestrator/telemetry.py).
        with self.telemetry.task(task_id=task_id, delivery=delivery) as scope:
            scope.note(tenant=record.tenant)
            final = await self._deliver(task_id, record, delivery, claim)
            spent = final.spent
            scope.note(
                status=final.status.value,
                spent_tokens=spent.tokens if spent else None,
                spent_nanos=usd_to_nanos(spent.usd) if spent else None,
            )
        return final

    async def _deliver(
        self, task_id: str, record: TaskRecord, delivery: int, claim: Delivery | None
    ) -> TaskRecord:
        """One delivery of a task marked running, to its final record."""
        if record.cancel_requested:  # as read when it was marked running
            return await self._finish(task_id, Status.CANCELLED, None, None)
        if delivery > 1:  # only an earlier delivery can have left accounts open
            await self._close_stale_accounts(task_id)
        try:
            state = await self.graph.ainvoke(
                {
                    "task_id": task_id,
                    "task": record.task,
                    "delivery": delivery,
                    "claim": claim,
                    "scope": stats_scope(record.tenant, self.settings.stats_scope),
                }
            )
        except DeliveryLost:
            raise
        except TaskCancelled:
            return await self._finish(task_id, Status.CANCELLED, None, None, claim=claim)
        except (BudgetExceeded, LedgerError) as e:
            answer = await self._best_answer(task_id)
            return await self._finish(task_id, Status.BUDGET_EXHAUSTED, answer, str(e), claim=claim)
        except UNREACHABLE:
            raise  # Redis is down: not the task's fault; delivered again once it is back
        except Exception as e:
            if delivery < self.settings.max_deliveries:
                raise  # left unacknowledged: the queue delivers it again
            log.exception("task %s failed on delivery %d", task_id, delivery)
            error = f"{type(e).__name__}: {e}"
            return await self._finish(task_id, Status.FAILED, None, error, claim=claim)
        status, detail = task_status(state)
        return await self._finish(task_id, status, state["answer"] or None, detail, claim=claim)

    async def fail(self, task_id: str, error: str, *, claim: Delivery | None = None) -> TaskRecord:
        """Give up on a task (too many deliveries): close its ledger and mark it failed."""
        return await self._finish(task_id, Status.FAILED, None, error, claim=claim)

    async def _close_stale_accounts(self, task_id: str) -> None:
        # A delivery after a crash: accounts the dead worker left open go back
        # to the pool (their reservations expire now; a late commit is still
        # charged). Results already saved are not run again.
        tree = await self.ledger.snapshot(task_id)
        stale = [a.path for a in tree.walk() if a.path != ROOT and not a.closed]
        for path in sorted(stale, key=lambda p: -p.count("/")):
            await self.ledger.close_account(task_id, path, force=True)

    async def _best_answer(self, task_id: str) -> str | None:
        results = await self.records.load_results(task_id)
        texts = [str(r.get("text", "")) for r in results.values() if r.get("text")]
        return "\n\n".join(texts) or None

    async def _finish(
        self,
        task_id: str,
        status: Status,
        answer: str | None,
        error: str | None,
        *,
        claim: Delivery | None = None,
    ) -> TaskRecord:
        # A worker that lost the delivery leaves the task to its new holder, and
        # a task someone else already finished keeps the status it has.
        if claim is not None and not await self.queue.owns(claim):
            raise DeliveryLost(task_id, claim.message_id)
        final, written = await finish_task(
            self.ledger,
            self.records,
            task_id,
            status=status,
            answer=answer,
            error=error,
            retention_s=self.settings.retention_s,
            unless_final=True,
        )
        if not written:  # final already: its ledger was closed again, which changes nothing
            return final
        if self.telemetry is not NO_TELEMETRY:  # observability hook
            self.telemetry.task_finished(await self._facts(final))
        return final

    async def _facts(self, record: TaskRecord) -> TaskFacts:
        """A final record as telemetry is told it, with its tenant's remaining if detailed."""
        facts = facts_of(record)
        if not (self.telemetry.detailed and record.tenant):
            return facts
        try:
            view = await self.ledger.tenant(record.tenant)
        except LedgerError:
            return facts
        left = [
            None if limit is None else max(0, limit - funded - spent)
            for limit, funded, spent in (
                (view.limit.tokens, view.funded_tokens, view.spent_tokens),
                (view.limit.nanos, view.funded_nanos, view.spent_nanos),
            )
        ]
        return replace(facts, tenant_remaining_tokens=left[0], tenant_remaining_nanos=left[1])


def facts_of(record: TaskRecord) -> TaskFacts:
    """A final record as telemetry is told it: what its ledger says it spent."""
    spent = record.spent
    return TaskFacts(
        task_id=record.id,
        tenant=record.tenant,
        status=record.status.value,
        spent_tokens=spent.tokens if spent else 0,
        spent_nanos=usd_to_nanos(spent.usd) if spent else 0,
    )


def telemetry_for(settings: Settings, given: Telemetry | None) -> Telemetry:
    """``given`` and, where the environment configures an OTLP endpoint, OpenTelemetry.

    OpenTelemetry's code is imported only then (:mod:`orchestrator.otel`).
    """
    sinks = [given or NO_TELEMETRY]
    if settings.otel:
        try:
            from orchestrator.otel import OtelTelemetry

            sinks.append(OtelTelemetry.from_environment())
        except ImportError as e:
            raise TelemetryUnavailable(e.name or str(e)) from e
    return combine(sinks)


def task_status(report: FlowReport) -> tuple[Status, str | None]:
    """How a run that came to its end is told: the one place outcomes become statuses.

    ``budget_exhausted`` when a subtask of the task's plan was never paid for;
    ``partial`` when every one ran but some (at any level) stayed cut short,
    rejected or without an answer after the last escalation the budget
    allowed, named in the detail; ``succeeded`` when every subtask finished
    and was accepted.
    """
    if report["unpaid"]:
        return Status.BUDGET_EXHAUSTED, f"not paid for: {', '.join(report['unpaid'])}"
    if report["short"]:
        return Status.PARTIAL, f"fell short: {', '.join(report['short'])}"
    return Status.SUCCEEDED, None


async def finish_task(
    ledger: Ledger,
    records: Records,
    task_id: str,
    *,
    status: Status,
    answer: str | None,
    error: str | None,
    retention_s: int,
    unless_final: bool = False,
) -> tuple[TaskRecord, bool]:
    """Close the task's ledger (leftovers back to its tenant), write its final record; both
    then expire after ``retention_s``. Returns the record and whether it was written: with
    ``unless_final``, a task someone else finished keeps the status it has (checked as the
    record is written)."""
    spent: Spent | None = None
    try:
        closed = await ledger.close_task(task_id, force=True, retention_s=retention_s)
        spent = Spent(tokens=closed.spent_tokens, usd=str(nanos_to_usd(closed.spent_nanos)))
    except UnknownTask:
        pass
    return await records.finish(
        task_id,
        status=status,
        answer=answer,
        error=error,
        spent=spent,
        retention_s=retention_s,
        unless_final=unless_final,
    )


#: The task ``smallest_budgets`` sizes: the quick start's.
SAMPLE_TASK = "Name three prime numbers, then add them up"
#: The least worker output counted as a useful answer when sizing the smallest budget.
SAMPLE_ANSWER_TOKENS = 64


def smallest_budgets(
    *, client: MeteredClient, policy: Policy, endpoint: str, task: str = SAMPLE_TASK
) -> tuple[int, int]:
    """``(runs, plans)``: the fewest tokens that run ``task`` on ``endpoint`` at all, and planned.

    ``runs``: one unplanned subtask, after the policy's synthesis reserve, can
    pay its prompt and :data:`SAMPLE_ANSWER_TOKENS`. ``plans``: the planning
    call at its least useful size fits in half the pool (see
    :func:`orchestrator.flow.planning_budget`).
    """
    from agents.plan import single_subtask_plan
    from agents.worker import worker_messages

    (only,) = single_subtask_plan(task).subtasks
    messages = worker_messages(
        subtask=only, context={}, budget_tokens=SAMPLE_ANSWER_TOKENS, task_text=task
    )
    need = client.quote(
        endpoint=endpoint, messages=messages, output_tokens=SAMPLE_ANSWER_TOKENS
    ).tokens
    runs = need
    while runs - (policy.synthesis_reserve(Pool(tokens=runs, nanos=None)).tokens or 0) < need:
        runs += max(1, need // 20)
    _, least = ManagerAgent(client=client).plan_cost(task=task, endpoint=endpoint)
    return runs, max(runs, 2 * least.tokens)


def options_of(endpoints: EndpointsConfig) -> tuple[Option, ...]:
    """The configured endpoints as the policy sees them."""
    return tuple(
        Option(name=e.name, kind=e.kind, tier=e.tier, price=e.price) for e in endpoints.endpoints
    )

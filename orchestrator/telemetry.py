"""Observability hooks: what a running task tells the outside about itself.

:class:`Telemetry` is the seam. The runtime opens a scope per delivery of a
task, the flow one per manager step (plan, synthesis) and one per try of a
subtask, and :class:`~orchestrator.observed.ObservedClient` (a
:class:`~agents.worker.ChatClient` around the metered client) one per model
call. A sink decides what a scope becomes: :mod:`orchestrator.metrics` counts for Prometheus,
:mod:`orchestrator.otel` opens OpenTelemetry spans and records its metrics.

Off is the default and costs nothing worth measuring: :data:`NO_TELEMETRY`
returns one shared do-nothing scope, the metered client is used as it is, and
neither Prometheus nor OpenTelemetry code is imported by Paymaster.

Scopes carry only what the ledger carries (accounts, tokens, nano-dollars,
endpoints, models, statuses): never prompts, answers or keys.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Literal, Protocol

#: A value an attribute may take.
Value = str | int | float | bool
#: The steps a level's manager takes, each a scope.
Step = Literal["plan", "synthesize"]
#: What the queue tells: tasks taken over from a silent worker, tasks dead-lettered.
QueueEvent = Literal["takeover", "dead_letter"]


class Scope(Protocol):
    """One unit of work being observed; :meth:`note` adds facts to it as they become known."""

    def note(self, **facts: Value | None) -> None:
        """Record facts (``None`` values are left out)."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class CallFacts:
    """One model call as the ledger paid it: the sinks' one source for a call's figures."""

    task_id: str
    account: str
    endpoint: str
    model: str
    #: Where the endpoint is served: a GenAI ``gen_ai.provider.name`` value.
    provider: str
    duration_s: float
    #: ``ok``: paid and answered; ``error``: the call raised (its payment is in the ledger).
    outcome: Literal["ok", "error"]
    input_tokens: int = 0
    output_tokens: int = 0
    cost_nanos: int = 0
    #: The server reported no usable usage and the whole reservation was charged.
    estimated: bool = False
    finish_reason: str = ""
    #: The reservation as quoted before the call (prompt counted + ``max_tokens``).
    reserved_tokens: int | None = None
    #: What the account can still spend after the call (``None``: unlimited or not read).
    remaining_tokens: int | None = None
    remaining_nanos: int | None = None
    error: str = ""


class CallScope(Protocol):
    """A model call being observed; :meth:`done` is called once, with what it cost."""

    def done(self, facts: CallFacts) -> None:
        """The call is over (answered or failed)."""
        ...


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskFacts:
    """A task that reached its final status, with what its ledger says it spent."""

    task_id: str
    tenant: str | None
    status: str
    spent_tokens: int
    spent_nanos: int
    #: What the tenant can still fund in its period (``None``: no tenant, unlimited, not read).
    tenant_remaining_tokens: int | None = None
    tenant_remaining_nanos: int | None = None


class Telemetry(Protocol):
    """Where a running task's scopes and events go (see the module docstring)."""

    @property
    def detailed(self) -> bool:
        """Whether call scopes want the reservation and the account's remaining budget.

        Each costs a prompt count and one Redis read per call, so only a sink
        that shows them asks for them.
        """
        ...

    def task(self, *, task_id: str, delivery: int) -> AbstractContextManager[Scope]:
        """A delivery of a task, from its first step to its final record."""
        ...

    def step(
        self, *, task_id: str, account: str, step: Step, depth: int
    ) -> AbstractContextManager[Scope]:
        """A level's manager planning or synthesizing, paid from ``account``."""
        ...

    def subtask(
        self, *, task_id: str, account: str, work: str, attempt: int, composite: bool
    ) -> AbstractContextManager[Scope]:
        """One try of one subtask in its carved ``account`` (a composite: its whole sub-level)."""
        ...

    def call(
        self,
        *,
        task_id: str,
        account: str,
        endpoint: str,
        model: str,
        provider: str,
        reserved_tokens: int | None = None,
    ) -> AbstractContextManager[CallScope]:
        """One model call paid from ``account`` (``reserved_tokens``: as quoted, if detailed)."""
        ...

    def task_finished(self, facts: TaskFacts) -> None:
        """A task reached its final status."""
        ...

    def queue(self, event: QueueEvent, count: int = 1) -> None:
        """Something happened to the queue's deliveries."""
        ...

    def close(self) -> None:
        """Flush what is buffered; called once when the process's runtime closes."""
        ...


class Quiet:
    """The do-nothing scope, shared by every hook of :class:`Off`."""

    __slots__ = ()

    def note(self, **facts: Value | None) -> None:
        """Nothing is recorded."""

    def done(self, facts: CallFacts) -> None:
        """Nothing is recorded."""

    def __enter__(self) -> Quiet:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


QUIET = Quiet()


class Off:
    """Telemetry off: every hook returns the same do-nothing scope."""

    detailed = False

    def task(self, *, task_id: str, delivery: int) -> AbstractContextManager[Scope]:
        """No scope."""
        return QUIET

    def step(
        self, *, task_id: str, account: str, step: Step, depth: int
    ) -> AbstractContextManager[Scope]:
        """No scope."""
        return QUIET

    def subtask(
        self, *, task_id: str, account: str, work: str, attempt: int, composite: bool
    ) -> AbstractContextManager[Scope]:
        """No scope."""
        return QUIET

    def call(
        self,
        *,
        task_id: str,
        account: str,
        endpoint: str,
        model: str,
        provider: str,
        reserved_tokens: int | None = None,
    ) -> AbstractContextManager[CallScope]:
        """No scope."""
        return QUIET

    def task_finished(self, facts: TaskFacts) -> None:
        """Nothing is recorded."""

    def queue(self, event: QueueEvent, count: int = 1) -> None:
        """Nothing is recorded."""

    def close(self) -> None:
        """Nothing to flush."""


#: The default: observability off.
NO_TELEMETRY: Telemetry = Off()


class _Scopes:
    """Several sinks' scopes seen as one."""

    def __init__(self, scopes: Sequence[Any]) -> None:
        self._scopes = scopes

    def note(self, **facts: Value | None) -> None:
        for s in self._scopes:
            s.note(**facts)

    def done(self, facts: CallFacts) -> None:
        for s in self._scopes:
            s.done(facts)


class Fanout:
    """Every hook goes to each of several sinks (Prometheus and OpenTelemetry at once)."""

    def __init__(self, sinks: Sequence[Telemetry]) -> None:
        self.sinks = tuple(sinks)
        self.detailed = any(s.detailed for s in self.sinks)

    @contextmanager
    def _all(self, opened: Sequence[AbstractContextManager[Any]]) -> Iterator[_Scopes]:
        with ExitStack() as stack:
            yield _Scopes([stack.enter_context(cm) for cm in opened])

    def task(self, *, task_id: str, delivery: int) -> AbstractContextManager[Scope]:
        """Each sink's task scope."""
        return self._all([s.task(task_id=task_id, delivery=delivery) for s in self.sinks])

    def step(
        self, *, task_id: str, account: str, step: Step, depth: int
    ) -> AbstractContextManager[Scope]:
        """Each sink's step scope."""
        return self._all(
            [s.step(task_id=task_id, account=account, step=step, depth=depth) for s in self.sinks]
        )

    def subtask(
        self, *, task_id: str, account: str, work: str, attempt: int, composite: bool
    ) -> AbstractContextManager[Scope]:
        """Each sink's subtask scope."""
        return self._all(
            [
                s.subtask(
                    task_id=task_id,
                    account=account,
                    work=work,
                    attempt=attempt,
                    composite=composite,
                )
                for s in self.sinks
            ]
        )

    def call(
        self,
        *,
        task_id: str,
        account: str,
        endpoint: str,
        model: str,
        provider: str,
        reserved_tokens: int | None = None,
    ) -> AbstractContextManager[CallScope]:
        """Each sink's call scope."""
        return self._all(
            [
                s.call(
                    task_id=task_id,
                    account=account,
                    endpoint=endpoint,
                    model=model,
                    provider=provider,
                    reserved_tokens=reserved_tokens,
                )
                for s in self.sinks
            ]
        )

    def task_finished(self, facts: TaskFacts) -> None:
        """Told to each sink."""
        for s in self.sinks:
            s.task_finished(facts)

    def queue(self, event: QueueEvent, count: int = 1) -> None:
        """Told to each sink."""
        for s in self.sinks:
            s.queue(event, count)

    def close(self) -> None:
        """Each sink flushes."""
        for s in self.sinks:
            s.close()


def combine(sinks: Sequence[Telemetry]) -> Telemetry:
    """One telemetry for ``sinks``: :data:`NO_TELEMETRY` for none, the sink itself for one."""
    real = [s for s in sinks if type(s) is not Off]  # a sink built on Off still counts
    if not real:
        return NO_TELEMETRY
    return real[0] if len(real) == 1 else Fanout(real)

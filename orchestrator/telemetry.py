"""Observability hooks: what a running task tells the outside about itself.

:class:`Telemetry` is the seam. The runtime opens a scope per delivery of a
task, the flow one per manager step (plan, synthesis) and one per try of a
subtask, and :class:`ObservedClient` (a :class:`~agents.worker.ChatClient`
around the metered client) one per model call. A sink decides what a scope
becomes: :mod:`orchestrator.metrics` counts for Prometheus,
:mod:`orchestrator.otel` opens OpenTelemetry spans and records its metrics.

Off is the default and costs nothing worth measuring: :data:`NO_TELEMETRY`
returns one shared do-nothing scope, the metered client is used as it is, and
neither Prometheus nor OpenTelemetry code is imported by Paymaster.

Scopes carry only what the ledger carries (accounts, tokens, nano-dollars,
endpoints, models, statuses): never prompts, answers or keys.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

from agents.endpoints import EndpointsConfig
from agents.metered import CallResult, MeteredClient
from agents.metered import Message as Message
from budgets import Amount

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


class _Quiet:
    """The do-nothing scope, shared by every hook of :class:`Off`."""

    __slots__ = ()

    def note(self, **facts: Value | None) -> None:
        """Nothing is recorded."""

    def done(self, facts: CallFacts) -> None:
        """Nothing is recorded."""

    def __enter__(self) -> _Quiet:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


_QUIET = _Quiet()


class Off:
    """Telemetry off: every hook returns the same do-nothing scope."""

    detailed = False

    def task(self, *, task_id: str, delivery: int) -> _Quiet:
        """No scope."""
        return _QUIET

    def step(self, *, task_id: str, account: str, step: Step, depth: int) -> _Quiet:
        """No scope."""
        return _QUIET

    def subtask(
        self, *, task_id: str, account: str, work: str, attempt: int, composite: bool
    ) -> _Quiet:
        """No scope."""
        return _QUIET

    def call(
        self,
        *,
        task_id: str,
        account: str,
        endpoint: str,
        model: str,
        provider: str,
        reserved_tokens: int | None = None,
    ) -> _Quiet:
        """No scope."""
        return _QUIET

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
    real = [s for s in sinks if not isinstance(s, Off)]
    if not real:
        return NO_TELEMETRY
    return real[0] if len(real) == 1 else Fanout(real)


#: Hosts of well-known providers, as the GenAI conventions name them.
_PROVIDERS = {
    "api.openai.com": "openai",
    "api.anthropic.com": "anthropic",
    "api.mistral.ai": "mistral_ai",
    "api.groq.com": "groq",
    "api.deepseek.com": "deepseek",
    "api.x.ai": "x_ai",
    "generativelanguage.googleapis.com": "gcp.gemini",
}


def provider_of(base_url: str) -> str:
    """The ``gen_ai.provider.name`` of an endpoint: a known provider by its host, else ``openai``.

    Every endpoint speaks the OpenAI API; one served elsewhere (llama.cpp,
    vLLM, Ollama) is told apart by ``paymaster.endpoint`` and its model.
    """
    host = base_url.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0].lower()
    return _PROVIDERS.get(host, "openai")


class ObservedClient:
    """The metered client, with a telemetry scope around every ``chat``.

    Fits :class:`agents.worker.ChatClient`: the agents use it exactly as they
    would the metered client, which still reserves, calls and settles.
    """

    def __init__(self, inner: MeteredClient, telemetry: Telemetry) -> None:
        self.inner = inner
        self.telemetry = telemetry

    @property
    def config(self) -> EndpointsConfig:
        """The metered client's endpoints."""
        return self.inner.config

    async def chat(
        self,
        *,
        task_id: str,
        account: str,
        messages: Sequence[Message],
        max_tokens: int,
        endpoint: str | None = None,
        response_format: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
        min_tokens: int | None = None,
        temperature: float | None = None,
        keep_as: str | None = None,
    ) -> CallResult:
        """:meth:`MeteredClient.chat`, observed."""
        config = self.inner.config
        ep = config.get(endpoint) if endpoint else config.default_endpoint
        facts = CallFacts(
            task_id=task_id,
            account=account,
            endpoint=ep.name,
            model=ep.model,
            provider=provider_of(ep.base_url),
            duration_s=0.0,
            outcome="ok",
        )
        if self.telemetry.detailed:
            prompt = self.inner.quote(endpoint=ep.name, messages=messages, output_tokens=0)
            facts = replace(facts, reserved_tokens=prompt.tokens + max_tokens)
        with self.telemetry.call(
            task_id=task_id,
            account=account,
            endpoint=ep.name,
            model=ep.model,
            provider=facts.provider,
            reserved_tokens=facts.reserved_tokens,
        ) as scope:
            started = time.perf_counter()
            try:
                result = await self.inner.chat(
                    task_id=task_id,
                    account=account,
                    messages=messages,
                    max_tokens=max_tokens,
                    endpoint=endpoint,
                    response_format=response_format,
                    tags=tags,
                    min_tokens=min_tokens,
                    temperature=temperature,
                    keep_as=keep_as,
                )
            except BaseException as e:
                scope.done(
                    replace(
                        facts,
                        duration_s=time.perf_counter() - started,
                        outcome="error",
                        error=type(e).__name__,
                    )
                )
                raise
            facts = replace(
                facts,
                duration_s=time.perf_counter() - started,
                endpoint=result.endpoint,  # a fallback may have answered
                model=result.model,
                input_tokens=result.input_tokens,
                output_tokens=result.output_tokens,
                cost_nanos=result.cost_nanos,
                estimated=result.estimated,
                finish_reason=result.finish_reason,
            )
            if self.telemetry.detailed:
                if facts.reserved_tokens is not None:  # the cap the call was really sent with
                    facts = replace(
                        facts,
                        reserved_tokens=facts.reserved_tokens - max_tokens + result.max_tokens,
                    )
                view = await self.inner.ledger.account(task_id, result.account or account)
                facts = replace(
                    facts,
                    remaining_tokens=view.available_tokens,
                    remaining_nanos=view.available_nanos,
                )
            scope.done(facts)
            return result

    async def kept(self, task_id: str, name: str) -> CallResult | None:
        """A reply kept with its payment (no call, so nothing observed)."""
        return await self.inner.kept(task_id, name)

    def quote(
        self, *, endpoint: str | None, messages: Sequence[Message], output_tokens: int
    ) -> Amount:
        """The metered client's quote."""
        return self.inner.quote(endpoint=endpoint, messages=messages, output_tokens=output_tokens)

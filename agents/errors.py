"""Errors of the agents package, all under :class:`budgets.errors.PaymasterError`."""

from __future__ import annotations

from agents.redact import redact
from budgets.errors import PaymasterError


class AgentError(PaymasterError):
    """Root of the agents package's errors."""


class ConfigError(AgentError, ValueError):
    """The endpoint configuration is invalid; the message names the file and the field."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        joined = "; ".join(problems)
        super().__init__(f"invalid endpoint configuration in {source}: {joined}")


class UnknownEndpoint(AgentError, LookupError):
    """No endpoint with this name is configured."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        self.known = known
        super().__init__(
            f"no endpoint named {name!r}; configured endpoints: {', '.join(known) or '(none)'}"
        )


class LocalModelFailed(AgentError):
    """The bundled local model's server did not start or stopped answering.

    ``log_tail`` holds the last lines the server wrote, to show what went wrong.
    """

    def __init__(self, reason: str, *, log_tail: str = "") -> None:
        self.reason = reason
        self.log_tail = log_tail
        tail = f"\n--- last lines of the server's log ---\n{log_tail}" if log_tail else ""
        super().__init__(f"the local model server failed: {reason}{tail}")


class MissingComponent(AgentError):
    """Something Paymaster needs is not installed; the message gives the one command to fix it."""

    def __init__(self, what: str, install: str) -> None:
        self.what = what
        self.install = install
        super().__init__(f"{what} is not installed; install it with: {install}")


class ModelCallFailed(AgentError):
    """A model call failed after the retries it was allowed; what it cost is in the ledger.

    ``transient`` says whether the failure looked temporary (no connection, a
    timeout before any reply, 429, 5xx): it may be retried, and the caller may
    fall back to another endpoint. A reply that arrived wrong-shaped, or a
    stream cut off mid-reply, is not transient: the server did the work, and a
    retry would pay for it again. ``status`` is the HTTP status of an error
    reply, ``retry_after_s`` its ``Retry-After``. ``reason`` is short, and
    anything in it that looks like a credential is redacted.
    """

    def __init__(
        self,
        endpoint: str,
        reason: str,
        *,
        transient: bool,
        status: int | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.reason = redact(reason)
        self.transient = transient
        self.status = status
        self.retry_after_s = retry_after_s
        super().__init__(f"call to endpoint {endpoint!r} failed: {self.reason}")


class InvalidPlan(AgentError, ValueError):
    """A plan (usually a model's output) is unusable; ``reasons`` lists every problem found.

    The manager sends ``reasons`` back to the model once to ask for a repair,
    and falls back to a one-subtask plan if the repair is invalid too.
    """

    def __init__(self, reasons: list[str]) -> None:
        self.reasons = list(reasons)
        joined = "; ".join(self.reasons) or "no reason given"
        super().__init__(f"invalid plan: {joined}")

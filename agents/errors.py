"""Errors of the agents package, all under :class:`budgets.errors.PaymasterError`."""

from __future__ import annotations

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


class MissingComponent(AgentError):
    """Something Paymaster needs is not installed; the message gives the one command to fix it."""

    def __init__(self, what: str, install: str) -> None:
        self.what = what
        self.install = install
        super().__init__(f"{what} is not installed; install it with: {install}")

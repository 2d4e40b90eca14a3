"""Errors of the orchestrator, all under :class:`budgets.errors.PaymasterError`."""

from __future__ import annotations

from budgets.errors import PaymasterError


class OrchestratorError(PaymasterError):
    """Root of the orchestrator's errors."""


class TaskCancelled(OrchestratorError):
    """The task was cancelled; raised inside the flow to stop it at the next step."""

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        super().__init__(f"task {task_id!r} was cancelled")


class TaskNotFound(OrchestratorError, LookupError):
    """No task with this id exists (or its record expired after the retention period)."""

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        super().__init__(f"no task {task_id!r}; it never existed or its record has expired")


class InvalidTask(OrchestratorError, ValueError):
    """A submitted task is not acceptable (empty text, too long, …); nothing was stored."""


class WrongTenant(InvalidTask):
    """A process fenced to one tenant (``PAYMASTER_TENANT``) was asked to act for another."""

    def __init__(self, fence: str, asked: str) -> None:
        self.fence = fence
        self.asked = asked
        super().__init__(
            f"this process is fenced to tenant {fence!r} (PAYMASTER_TENANT); it cannot act "
            f"for {asked!r}: run it with PAYMASTER_TENANT={asked} and that tenant's Redis user"
        )


class TaskTimeout(OrchestratorError, TimeoutError):
    """Waiting for a task took longer than the caller allowed; the task goes on."""

    def __init__(self, task_id: str, timeout_s: float) -> None:
        self.task_id = task_id
        super().__init__(
            f"task {task_id!r} did not finish within {timeout_s:g} s; it is still running"
        )


class MissingRedis(OrchestratorError):
    """No REDIS_URL was given and no redis-server is installed to start a private one."""

    def __init__(self) -> None:
        super().__init__(
            "no Redis: set REDIS_URL, or install redis-server so Paymaster can start a private "
            "one (Debian/Ubuntu: apt-get install -y redis-server)"
        )


class SubtaskNotFound(OrchestratorError, LookupError):
    """The task has no finished result for this subtask, so there is nothing to judge."""

    def __init__(self, task_id: str, subtask_id: str, known: list[str]) -> None:
        self.task_id = task_id
        self.subtask_id = subtask_id
        choices = ", ".join(sorted(known)) or "none yet"
        super().__init__(
            f"task {task_id!r} has no finished subtask {subtask_id!r} (finished: {choices})"
        )


class DeliveryLost(OrchestratorError):
    """Another worker took this worker's delivery of the task over; this one must stop.

    Raised by the ownership check before a paid step. The task is not failed,
    finished or acknowledged here: it belongs to the worker that took it.
    """

    def __init__(self, task_id: str, message_id: str) -> None:
        self.task_id = task_id
        self.message_id = message_id
        super().__init__(
            f"task {task_id!r}: delivery {message_id} was taken over by another worker"
        )


class TelemetryUnavailable(OrchestratorError, RuntimeError):
    """OpenTelemetry is configured (an OTLP endpoint is set) but its packages are missing."""

    def __init__(self, missing: str) -> None:
        self.missing = missing
        super().__init__(
            f"OTEL_EXPORTER_OTLP_ENDPOINT is set but OpenTelemetry is not installed ({missing}): "
            "pip install 'paymaster[otel]', or unset it (or set OTEL_SDK_DISABLED=true)"
        )

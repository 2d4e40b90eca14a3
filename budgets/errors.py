"""Errors of the budgets package, all under :class:`PaymasterError`.

Each error carries the data a caller needs to act on it and says what to do.
"""

from __future__ import annotations


class PaymasterError(Exception):
    """Root of every error Paymaster raises on purpose."""


class InvalidAmount(PaymasterError, ValueError):
    """A token count or amount of money is not acceptable (negative, NaN, too large, …)."""

    def __init__(self, field: str, value: object, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"invalid {field}={value!r}: {reason}")


class InvalidName(PaymasterError, ValueError):
    """A task id, account path, tenant or operation id has characters the ledger refuses."""

    def __init__(self, kind: str, value: object, rule: str) -> None:
        self.kind = kind
        self.value = value
        super().__init__(f"invalid {kind} {value!r}: {rule}")


class InvalidObservation(PaymasterError, ValueError):
    """An outcome for the statistics has a field of the wrong type or range; nothing was counted."""

    def __init__(self, field: str, value: object, rule: str) -> None:
        self.field = field
        self.value = value
        self.rule = rule
        super().__init__(f"invalid observation: {field} {rule}, got {value!r}")


class UnknownOutcome(PaymasterError, LookupError):
    """A verdict names an outcome the statistics never counted (or no longer remember)."""

    def __init__(self, scope: str, outcome_id: str) -> None:
        self.scope = scope
        self.outcome_id = outcome_id
        super().__init__(
            f"no outcome {outcome_id!r} was recorded in statistics scope {scope!r} "
            "(or its marker expired); record the outcome before judging it"
        )


class LedgerError(PaymasterError):
    """The ledger refused an operation."""


class BudgetExceeded(LedgerError):
    """An account cannot cover what was asked of it; nothing was changed.

    ``requested`` and ``available`` are in the unit named by ``unit``
    (``"tokens"`` or ``"nanos"``).
    """

    def __init__(
        self, *, task_id: str, account: str, unit: str, requested: int, available: int
    ) -> None:
        self.task_id = task_id
        self.account = account
        self.unit = unit
        self.requested = requested
        self.available = available
        super().__init__(
            f"account {account!r} of task {task_id!r} cannot cover {requested} {unit}: "
            f"only {available} available. Ask for less, or transfer budget into the account."
        )


class UnknownTask(LedgerError):
    """No task with this id exists in the ledger."""

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        super().__init__(f"no task {task_id!r} in the ledger; open it first")


class UnknownAccount(LedgerError):
    """No account with this path exists in the task."""

    def __init__(self, task_id: str, account: str) -> None:
        self.task_id = task_id
        self.account = account
        super().__init__(f"no account {account!r} in task {task_id!r}")


class UnknownTenant(LedgerError):
    """No tenant with this name has been configured."""

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        super().__init__(f"no tenant {tenant!r}; create it with Ledger.set_tenant() first")


class TaskExists(LedgerError):
    """A task with this id already exists and the call was not a retry of its creation.

    Nothing was changed: not the task, not its tenant's funding.
    """

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        super().__init__(f"task {task_id!r} already exists with other arguments; use a new task id")


class OpenAborted(LedgerError):
    """``open_task`` was undone part way by a concurrent call with the same op id.

    Any funding it had taken from the tenant was given back; call it again.
    """

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        super().__init__(
            f"opening task {task_id!r} was undone by a concurrent call with the same op id; "
            "its funding went back to the tenant. Call open_task again."
        )


class AccountExists(LedgerError):
    """An account with this path already exists (opened under another operation id)."""

    def __init__(self, task_id: str, account: str) -> None:
        self.task_id = task_id
        self.account = account
        super().__init__(f"account {account!r} already exists in task {task_id!r}")


class AccountClosed(LedgerError):
    """The account was closed; it takes no more reservations or transfers."""

    def __init__(self, task_id: str, account: str) -> None:
        self.task_id = task_id
        self.account = account
        super().__init__(f"account {account!r} of task {task_id!r} is closed")


class AccountBusy(LedgerError):
    """The account still has open children or reservations and cannot be closed."""

    def __init__(self, task_id: str, account: str, *, children: int, reservations: int) -> None:
        self.task_id = task_id
        self.account = account
        self.children = children
        self.reservations = reservations
        super().__init__(
            f"account {account!r} of task {task_id!r} has {children} open child account(s) and "
            f"{reservations} open reservation(s); close the children and settle the "
            "reservations first, or close with force=True to release them"
        )


class UnknownReservation(LedgerError):
    """No reservation with this id exists in the task."""

    def __init__(self, task_id: str, reservation_id: str) -> None:
        self.task_id = task_id
        self.reservation_id = reservation_id
        super().__init__(f"no reservation {reservation_id!r} in task {task_id!r}")


class ReservationSettled(LedgerError):
    """The reservation was already settled another way (released, or committed under another id)."""

    def __init__(self, task_id: str, reservation_id: str, how: str) -> None:
        self.task_id = task_id
        self.reservation_id = reservation_id
        self.how = how
        super().__init__(f"reservation {reservation_id!r} of task {task_id!r} was already {how}")


class InvalidTransfer(LedgerError):
    """A transfer between accounts that are not parent and child or siblings."""

    def __init__(self, task_id: str, src: str, dst: str, reason: str) -> None:
        self.task_id = task_id
        self.src = src
        self.dst = dst
        super().__init__(f"cannot transfer {src!r} -> {dst!r} in task {task_id!r}: {reason}")


class UnlimitedChild(LedgerError):
    """A child asked to be unlimited in a unit its parent limits."""

    def __init__(self, task_id: str, account: str, unit: str) -> None:
        self.task_id = task_id
        self.account = account
        self.unit = unit
        super().__init__(
            f"account {account!r} of task {task_id!r} cannot be unlimited in {unit}: "
            "its parent is limited; give it a limit"
        )


class OperationConflict(LedgerError):
    """An operation id was reused for a different operation."""

    def __init__(self, op_id: str) -> None:
        self.op_id = op_id
        super().__init__(f"operation id {op_id!r} was already used for a different operation")


class LedgerForbidden(PaymasterError, PermissionError):
    """Redis refused the command: its user may not touch these keys (an ACL's ``NOPERM``)."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        super().__init__(
            f"the ledger's Redis at {url} refused: {reason}; a process fenced to a tenant "
            "needs PAYMASTER_TENANT=<tenant> and a Redis user allowed ~pm:<tenant>:* "
            "(docs/scaling.md)"
        )


def forbidden(url: str, error: Exception) -> LedgerForbidden:
    """The :class:`LedgerForbidden` for a Redis ``NOPERM`` reply."""
    return LedgerForbidden(url, str(error).removeprefix("NOPERM ").strip() or "NOPERM")


class LedgerUnavailable(PaymasterError):
    """Redis could not be reached. The URL is shown without credentials."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        super().__init__(
            f"the ledger's Redis at {url} is unavailable ({reason}); "
            "check that redis-server is running and REDIS_URL points at it"
        )

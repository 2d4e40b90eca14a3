"""Script refusals as typed errors: one enum of codes per script, one exception per code.

A script replies ``{'ok', ...}`` or ``{'err', code, ...}``. Each script's codes are an
enum below, and its table maps every code to exactly one exception class, the same
mapping its Lua contract header spells (``'insufficient' -> BudgetExceeded``;
``tests/test_ledger_edges.py`` checks that the two agree). What follows the code is
laid out per exception class, not per script:

========================  ==============================================
exception                 reply after the code
========================  ==============================================
BudgetExceeded            account, unit, requested, available
UnknownAccount            path
AccountClosed             path
AccountExists             path
UnlimitedChild            path, unit
AccountBusy               path, open children, open reservations
InvalidTransfer           source, destination
ReservationSettled        nothing: the code itself says how (released,
                          committed)
others                    nothing: the ids come from the call (:class:`Context`)
========================  ==============================================
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from budgets.errors import (
    AccountBusy,
    AccountClosed,
    AccountExists,
    BudgetExceeded,
    InvalidTransfer,
    LedgerError,
    OpenAborted,
    OperationConflict,
    ReservationSettled,
    TaskExists,
    UnknownAccount,
    UnknownReservation,
    UnknownTask,
    UnknownTenant,
    UnlimitedChild,
)
from budgets.scripts import Op, TenantOp


@dataclass(frozen=True, slots=True)
class Context:
    """The ids of the call a reply answers: what an error names besides the reply's data."""

    task_id: str = ""
    op_id: str = ""
    reservation_id: str = ""
    tenant: str = ""


class ClaimError(StrEnum):
    """Refusals of ``claim.lua``."""

    EXISTS = "exists"
    CONFLICT = "conflict"


class OpenTaskError(StrEnum):
    """Refusals of ``open_task.lua``."""

    EXISTS = "exists"
    CONFLICT = "conflict"
    UNCLAIMED = "unclaimed"


class OpenError(StrEnum):
    """Refusals of ``open.lua``."""

    NO_TASK = "no_task"
    NO_ACCOUNT = "no_account"
    CLOSED = "closed"
    EXISTS = "exists"
    UNLIMITED = "unlimited"
    INSUFFICIENT = "insufficient"
    CONFLICT = "conflict"


class ReserveError(StrEnum):
    """Refusals of ``reserve.lua``."""

    NO_TASK = "no_task"
    NO_ACCOUNT = "no_account"
    CLOSED = "closed"
    INSUFFICIENT = "insufficient"
    CONFLICT = "conflict"


class CommitError(StrEnum):
    """Refusals of ``commit.lua``."""

    UNKNOWN = "unknown"
    RELEASED = "released"
    CONFLICT = "conflict"


class ReleaseError(StrEnum):
    """Refusals of ``release.lua``."""

    UNKNOWN = "unknown"
    COMMITTED = "committed"


class TransferError(StrEnum):
    """Refusals of ``transfer.lua``."""

    NO_TASK = "no_task"
    NO_ACCOUNT = "no_account"
    CLOSED = "closed"
    RELATION = "relation"
    UNLIMITED = "unlimited"
    INSUFFICIENT = "insufficient"
    CONFLICT = "conflict"


class CloseError(StrEnum):
    """Refusals of ``close.lua``."""

    NO_TASK = "no_task"
    NO_ACCOUNT = "no_account"
    BUSY = "busy"


class FundError(StrEnum):
    """Refusals of ``tenant_fund.lua``."""

    NO_TENANT = "no_tenant"
    UNLIMITED = "unlimited"
    INSUFFICIENT = "insufficient"
    CONFLICT = "conflict"
    UNDONE = "undone"


class DispatchError(StrEnum):
    """Refusals of ``_dispatch.lua`` (the task script's batch loop)."""

    BAD_OP = "bad_op"


Table = Mapping[StrEnum, type[LedgerError]]

#: Script name -> its table: each refusal code -> the one error it raises.
TABLES: dict[str, Table] = {
    Op.CLAIM.value: {ClaimError.EXISTS: TaskExists, ClaimError.CONFLICT: OperationConflict},
    Op.UNCLAIM.value: {},
    Op.OPEN_TASK.value: {
        OpenTaskError.EXISTS: TaskExists,
        OpenTaskError.CONFLICT: OperationConflict,
        OpenTaskError.UNCLAIMED: OpenAborted,
    },
    Op.OPEN.value: {
        OpenError.NO_TASK: UnknownTask,
        OpenError.NO_ACCOUNT: UnknownAccount,
        OpenError.CLOSED: AccountClosed,
        OpenError.EXISTS: AccountExists,
        OpenError.UNLIMITED: UnlimitedChild,
        OpenError.INSUFFICIENT: BudgetExceeded,
        OpenError.CONFLICT: OperationConflict,
    },
    Op.RESERVE.value: {
        ReserveError.NO_TASK: UnknownTask,
        ReserveError.NO_ACCOUNT: UnknownAccount,
        ReserveError.CLOSED: AccountClosed,
        ReserveError.INSUFFICIENT: BudgetExceeded,
        ReserveError.CONFLICT: OperationConflict,
    },
    Op.COMMIT.value: {
        CommitError.UNKNOWN: UnknownReservation,
        CommitError.RELEASED: ReservationSettled,
        CommitError.CONFLICT: OperationConflict,
    },
    Op.RELEASE.value: {
        ReleaseError.UNKNOWN: UnknownReservation,
        ReleaseError.COMMITTED: ReservationSettled,
    },
    Op.WITHDRAW.value: {},
    Op.TRANSFER.value: {
        TransferError.NO_TASK: UnknownTask,
        TransferError.NO_ACCOUNT: UnknownAccount,
        TransferError.CLOSED: AccountClosed,
        TransferError.RELATION: InvalidTransfer,
        TransferError.UNLIMITED: UnlimitedChild,
        TransferError.INSUFFICIENT: BudgetExceeded,
        TransferError.CONFLICT: OperationConflict,
    },
    Op.CLOSE.value: {
        CloseError.NO_TASK: UnknownTask,
        CloseError.NO_ACCOUNT: UnknownAccount,
        CloseError.BUSY: AccountBusy,
    },
    Op.REAP.value: {},
    Op.EXPIRE.value: {},
    TenantOp.FUND.value: {
        FundError.NO_TENANT: UnknownTenant,
        FundError.UNLIMITED: UnlimitedChild,
        FundError.INSUFFICIENT: BudgetExceeded,
        FundError.CONFLICT: OperationConflict,
        FundError.UNDONE: OpenAborted,
    },
    TenantOp.SETTLE.value: {},
    "_dispatch": {DispatchError.BAD_OP: LedgerError},
}

Build = Callable[[str, list[Any], Context], LedgerError]


def _budget(code: str, r: list[Any], c: Context) -> LedgerError:
    return BudgetExceeded(
        task_id=c.task_id,
        account=str(r[0]),
        unit=str(r[1]),
        requested=int(r[2]),
        available=int(r[3]),
    )


def _busy(code: str, r: list[Any], c: Context) -> LedgerError:
    return AccountBusy(c.task_id, str(r[0]), children=int(r[1]), reservations=int(r[2]))


_BUILD: dict[type[LedgerError], Build] = {
    BudgetExceeded: _budget,
    UnknownTask: lambda code, r, c: UnknownTask(c.task_id),
    UnknownAccount: lambda code, r, c: UnknownAccount(c.task_id, str(r[0])),
    UnknownTenant: lambda code, r, c: UnknownTenant(c.tenant),
    AccountClosed: lambda code, r, c: AccountClosed(c.task_id, str(r[0])),
    AccountExists: lambda code, r, c: AccountExists(c.task_id, str(r[0])),
    UnlimitedChild: lambda code, r, c: UnlimitedChild(c.task_id, str(r[0]), str(r[1])),
    AccountBusy: _busy,
    InvalidTransfer: lambda code, r, c: InvalidTransfer(
        c.task_id, str(r[0]), str(r[1]), "the ledger's tree does not relate them"
    ),
    ReservationSettled: lambda code, r, c: ReservationSettled(c.task_id, c.reservation_id, code),
    UnknownReservation: lambda code, r, c: UnknownReservation(c.task_id, c.reservation_id),
    OperationConflict: lambda code, r, c: OperationConflict(c.op_id or c.reservation_id),
    TaskExists: lambda code, r, c: TaskExists(c.task_id),
    OpenAborted: lambda code, r, c: OpenAborted(c.task_id),
}


def error_of(script: str, reply: list[Any], ctx: Context) -> LedgerError:
    """The error a refusal ``{'err', code, ...}`` of ``script`` stands for."""
    code = str(reply[1])
    cls = next((c for k, c in TABLES[script].items() if k.value == code), None)
    if cls is None:
        return LedgerError(f"unexpected reply {reply!r} from the ledger's {script} script")
    build = _BUILD.get(cls)
    if build is None:
        return cls(f"the ledger's {script} script refused: {code}")
    return build(code, list(reply[2:]), ctx)


def check(script: str, reply: list[Any], ctx: Context) -> list[Any]:
    """``reply`` when it is ``{'ok', ...}``; else raise the error its code stands for."""
    if reply[0] == "ok":
        return reply
    raise error_of(script, reply, ctx)

"""Money, budgets and the Redis ledger that holds them.

``budgets`` imports neither ``agents`` nor ``orchestrator``.
"""

from budgets.errors import (
    BudgetExceeded,
    LedgerError,
    LedgerForbidden,
    LedgerUnavailable,
    PaymasterError,
)
from budgets.keys import KeySpace
from budgets.ledger import Closed, Ledger, Reservation, Settlement, TenantView
from budgets.money import Amount, Budget, Price, nanos_to_usd, usd_to_nanos
from budgets.tree import AccountView, LedgerEvent, TaskTree

__all__ = [
    "AccountView",
    "Amount",
    "Budget",
    "BudgetExceeded",
    "Closed",
    "KeySpace",
    "Ledger",
    "LedgerError",
    "LedgerEvent",
    "LedgerForbidden",
    "LedgerUnavailable",
    "PaymasterError",
    "Price",
    "Reservation",
    "Settlement",
    "TaskTree",
    "TenantView",
    "nanos_to_usd",
    "usd_to_nanos",
]

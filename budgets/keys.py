"""Every Redis key Paymaster uses, built in one place.

All keys of one task share the hash tag ``{<task_id>}`` so they live on one
Redis Cluster slot and the ledger's scripts stay atomic when Redis is sharded.
Tenant keys carry their own tag, ``{t:<tenant>}``; funding a task from a tenant
is therefore two idempotent steps (see ``docs/ledger.md``), never one script
across slots.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from budgets.errors import InvalidName

PREFIX = "pm"
ROOT = "root"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}$")
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
_MAX_DEPTH = 8


def check_name(kind: str, value: object) -> str:
    """Validate a task id, tenant name or operation id: 1-128 of ``[A-Za-z0-9_.:-]``."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise InvalidName(
            kind, value, "use 1-128 letters, digits, '_', '.', ':' or '-', starting alphanumeric"
        )
    return value


def check_path(value: object) -> str:
    """Validate an account path such as ``root/s1/retry``.

    Paths start at ``root``; segments are 1-64 of ``[A-Za-z0-9_.-]``; at most 8 deep.
    """
    if not isinstance(value, str):
        raise InvalidName("account", value, "expected a path string such as 'root/s1'")
    parts = value.split("/")
    if parts[0] != ROOT or len(parts) > _MAX_DEPTH or not all(_SEGMENT.match(p) for p in parts):
        raise InvalidName(
            "account",
            value,
            f"paths start with '{ROOT}', are at most {_MAX_DEPTH} segments deep, and each "
            "segment is 1-64 letters, digits, '_', '.' or '-'",
        )
    return value


def parent_of(path: str) -> str | None:
    """The parent account's path, or ``None`` for the root."""
    head, sep, _ = path.rpartition("/")
    return head if sep else None


def child_path(parent: str, name: str) -> str:
    """The path of ``parent``'s child called ``name`` (validated)."""
    return check_path(f"{parent}/{name}")


@dataclass(frozen=True, slots=True)
class TaskKeys:
    """The keys of one task, all under the hash tag ``{task_id}``."""

    task_id: str

    @property
    def base(self) -> str:
        """Common prefix of every key of this task."""
        return f"{PREFIX}:{{{self.task_id}}}:"

    @property
    def meta(self) -> str:
        """Hash: tenant, funding period, funded amounts, status, timestamps."""
        return self.base + "meta"

    @property
    def reservations(self) -> str:
        """Hash: reservation id -> packed (account, tokens, nanos, deadline, tags)."""
        return self.base + "res"

    @property
    def leases(self) -> str:
        """Sorted set: reservation id scored by its lease deadline (ms, Redis clock)."""
        return self.base + "leases"

    @property
    def ops(self) -> str:
        """Hash: operation id -> first reply, for idempotency."""
        return self.base + "ops"

    @property
    def events(self) -> str:
        """Stream: one entry per ledger operation, the audit trail."""
        return self.base + "events"

    @property
    def accounts(self) -> str:
        """Set: the paths of every account of the task."""
        return self.base + "accts"

    @property
    def record(self) -> str:
        """Hash: the task as the orchestrator tracks it (status, text, answer, times)."""
        return self.base + "task"

    @property
    def results(self) -> str:
        """Hash: subtask id -> its finished result (JSON), so a re-run never pays twice."""
        return self.base + "results"

    @property
    def plan(self) -> str:
        """String: the manager's plan (JSON), kept so a re-run does not plan again."""
        return self.base + "plan"

    @property
    def account_prefix(self) -> str:
        """Prefix of account hashes; the scripts append a path to it."""
        return self.base + "acct:"

    def account(self, path: str) -> str:
        """Hash of one account: limits, reserved, spent, carved, flags."""
        return self.account_prefix + path

    def script_keys(self) -> list[str]:
        """KEYS of the task script, in its order; also every key but the account hashes."""
        return [self.meta, self.reservations, self.leases, self.ops, self.events, self.accounts]


@dataclass(frozen=True, slots=True)
class TenantKeys:
    """The keys of one tenant, under the hash tag ``{t:<tenant>}``."""

    tenant: str

    @property
    def base(self) -> str:
        """Common prefix of every key of this tenant."""
        return f"{PREFIX}:{{t:{self.tenant}}}:"

    @property
    def config(self) -> str:
        """Hash: per-period limits and the period kind."""
        return self.base + "cfg"

    @property
    def ops(self) -> str:
        """Hash: operation id -> first reply."""
        return self.base + "ops"

    @property
    def events(self) -> str:
        """Stream: funding and settlement of tasks."""
        return self.base + "events"

    def period(self, period_id: str) -> str:
        """Hash: what was handed out and spent in one period (e.g. ``2026-11``)."""
        return self.base + "p:" + period_id


#: Set of every tenant name.
TENANTS = f"{PREFIX}:tenants"
#: Set of task ids whose root is open (the reaper walks it).
OPEN_TASKS = f"{PREFIX}:tasks:open"
#: Stream of submitted tasks, read by workers through a consumer group.
QUEUE = f"{PREFIX}:queue"
#: Stream of tasks that failed too many deliveries.
DEAD_LETTER = f"{PREFIX}:queue:dead"
#: Consumer group of the workers on ``QUEUE``.
WORKER_GROUP = "pm-workers"
#: Hash: worker name -> last heartbeat (JSON), for health checks.
WORKERS = f"{PREFIX}:workers"


@dataclass(frozen=True, slots=True)
class StatsKeys:
    """The keys of one statistics scope (a tenant, or the shared scope), tag ``{s:<scope>}``."""

    scope: str

    @property
    def base(self) -> str:
        """Common prefix of every key of this scope."""
        return f"{PREFIX}:{{s:{self.scope}}}:"

    @property
    def cells(self) -> str:
        """Hash: ``<endpoint>|<difficulty>|<tag>|<metric>`` -> count."""
        return self.base + "cells"

    def seen(self, marker: str) -> str:
        """String: set once an outcome (or its verdict) has been counted; expires."""
        return self.base + "seen:" + marker

"""Every Redis key, op id and marker Paymaster uses, built here and nowhere else.

Keys that belong to a name carry it in a hash tag whose first letter says whose it is:
``pm:{k:<task_id>}:…`` for a task, ``pm:{t:<tenant>}:…`` for a tenant and
``pm:{s:<scope>}:…`` for a statistics scope. Names never hold ``{`` or ``}``, so the tag
ends at the first ``}`` and its letter alone decides the family: no valid name of one
family can make a key of another (``tests/test_identity.py`` proves it over random
names). Keys without a name (the queue, the index of open tasks) have no tag at all.

All keys of one task share its tag and so one Redis Cluster slot, and the ledger's
scripts stay atomic when Redis is sharded. A tenant's keys live on the tenant's slot;
funding a task from a tenant is therefore a saga of idempotent steps (see
``docs/ledger.md``), never one script across slots.

A process may be **fenced to one tenant** (:class:`KeySpace`, ``PAYMASTER_TENANT``): then
every key it uses starts ``pm:<tenant>:``, outside the hash tag (``pm:acme:{k:<task>}:…``),
so a Redis ACL user limited to ``~pm:acme:*`` can run it and can touch nothing of another
tenant (``docs/scaling.md``). A process not fenced uses ``pm:`` alone, as before.

Names are validated here too, with limits that leave room for every name derived from
them: a 64-character task id or tenant still makes valid op ids, scopes and outcome ids.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from dataclasses import dataclass

from budgets.errors import InvalidName

PREFIX = "pm"
ROOT = "root"

#: Longest task id and tenant name: names derived from them must stay within MAX_OP_ID.
MAX_TASK_ID = 64
MAX_TENANT = 64
#: Longest op id, reservation id, outcome id or statistics scope.
MAX_OP_ID = 128
MAX_SCOPE = 128

_TAIL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:\-]*$")
_SEGMENT_TEXT = r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}"
_SEGMENT = re.compile(_SEGMENT_TEXT)
_INCARNATION = re.compile(r"^[0-9a-f]{32}$")
_MAX_DEPTH = 8
#: A whole account path in one match: ``root``, then up to 7 more segments.
_PATH = re.compile(rf"{ROOT}(?:/{_SEGMENT_TEXT}){{0,{_MAX_DEPTH - 1}}}")

# Hash-tag letters of the named families.
_TASK, _TENANT, _STATS = "k", "t", "s"


def check_name(kind: str, value: object, *, max_len: int = MAX_OP_ID) -> str:
    """Validate a name: 1 to ``max_len`` of ``[A-Za-z0-9_.:-]``, starting alphanumeric."""
    if not isinstance(value, str) or not 0 < len(value) <= max_len or not _TAIL.fullmatch(value):
        raise InvalidName(
            kind,
            value,
            f"use 1-{max_len} letters, digits, '_', '.', ':' or '-', starting alphanumeric",
        )
    return value


def check_task_id(value: object) -> str:
    """Validate a task id (at most :data:`MAX_TASK_ID` characters)."""
    return check_name("task id", value, max_len=MAX_TASK_ID)


def check_tenant(value: object) -> str:
    """Validate a tenant name (at most :data:`MAX_TENANT` characters)."""
    return check_name("tenant", value, max_len=MAX_TENANT)


def check_op_id(value: object, kind: str = "op id") -> str:
    """Validate an op id or reservation id (at most :data:`MAX_OP_ID` characters)."""
    return check_name(kind, value, max_len=MAX_OP_ID)


def check_scope(value: object) -> str:
    """Validate a statistics scope (at most :data:`MAX_SCOPE` characters)."""
    return check_name("scope", value, max_len=MAX_SCOPE)


def check_path(value: object) -> str:
    """Validate an account path such as ``root/s1/retry``.

    Paths start at ``root``; segments are 1-64 of ``[A-Za-z0-9_.-]``; at most 8 deep.
    """
    if not isinstance(value, str):
        raise InvalidName("account", value, "expected a path string such as 'root/s1'")
    if not _PATH.fullmatch(value):
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


# -- incarnations and derived ids -----------------------------------------------------------


def new_incarnation() -> str:
    """A fresh incarnation id: what tells a task from an earlier one under the same id."""
    return uuid.uuid4().hex


def check_incarnation(value: object) -> str:
    """Validate an incarnation id (32 lowercase hex digits)."""
    if not isinstance(value, str) or not _INCARNATION.fullmatch(value):
        raise InvalidName("incarnation", value, "expected 32 lowercase hex digits")
    return value


def new_op_id() -> str:
    """A fresh op or reservation id, for calls that are not retried by id: 32 hex digits
    of the system's randomness (what ``uuid4().hex`` gives, at half its cost)."""
    return os.urandom(16).hex()


def open_op_id(path: str) -> str:
    """Default op id of opening the account at ``path`` (``open:<path>``)."""
    return f"open:{path}"


def open_task_op_id(*, tokens: int, nanos: int, tenant: str) -> str:
    """Default op id of ``open_task``: the same arguments are a retry, others a new task."""
    return f"{open_op_id(ROOT)}:{tokens}:{nanos}:{tenant}"


def submit_op_id(incarnation: str) -> str:
    """Op id the API opens a submitted task's ledger with: one per task record."""
    return f"submit.{check_incarnation(incarnation)}"


def _level_suffix(level: str) -> str:
    return f".{check_op_id(level, 'level')}" if level else ""


def synthesis_op_id(delivery: int, level: str = "") -> str:
    """Op id of the transfer that hands what is left to a level's synthesis, per delivery.

    ``level`` is the work id of the composite subtask the level plans (``""``: the task).
    """
    return f"synth.{int(delivery)}{_level_suffix(level)}"


def plan_leftover_op_id(delivery: int, level: str = "") -> str:
    """Op id of the transfer that gives back what a level's planning did not use."""
    return f"plan-left.{int(delivery)}{_level_suffix(level)}"


#: Separates the levels of a work id: ``s2:s1`` is subtask s1 of composite subtask s2.
WORK_SEPARATOR = ":"


def work_id(level: str, subtask_id: str) -> str:
    """The task-wide id of ``subtask_id`` planned at ``level`` (``""``: the task's own plan)."""
    return check_op_id(f"{level}{WORK_SEPARATOR}{subtask_id}" if level else subtask_id, "work id")


def level_of(work: str) -> str:
    """The level a work id was planned at: ``"s2"`` for ``"s2:s1"``, ``""`` for ``"s1"``."""
    return work.rpartition(WORK_SEPARATOR)[0]


def outcome_id(task_id: str, account: str) -> str:
    """The id statistics count a subtask's outcome under: ``<task>:<path with ':'>``.

    Longer than :data:`MAX_OP_ID` (deep paths), the path part becomes a digest, so the
    id stays valid and distinct.
    """
    plain = f"{task_id}:{account.replace('/', ':')}"
    if len(plain) <= MAX_OP_ID:
        return plain
    digest = hashlib.sha256(account.encode("utf-8")).hexdigest()[:32]
    return f"{task_id}:h:{digest}"


def name_part(text: str, *, max_len: int = 48) -> str:
    """A name made from any text, valid as an account segment and inside op and outcome ids.

    Text that is already 1-``max_len`` of ``[A-Za-z0-9_.-]`` starting alphanumeric is kept;
    anything else becomes its cleaned start and a digest of the whole, so two different
    texts never share a name (``'MMLUPro_computer science_9075'`` ->
    ``'MMLUPro_computer-science_9075-<16 hex digits>'``).
    """
    if max_len < 24:
        raise ValueError(f"max_len must leave room for a digest (>= 24), got {max_len}")
    if len(text) <= max_len and _SEGMENT.fullmatch(text):
        return text
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    head = re.sub(r"[^A-Za-z0-9_.\-]+", "-", text).strip("-.")[: max_len - len(digest) - 1]
    return f"{head}-{digest}" if head and head[0].isalnum() else f"h{digest}"


_TAG_CLEAN = re.compile(r"[^a-z0-9_.:\-]+")
_TAG_MAX = 64


def clean_tag(tag: str) -> str:
    """A tag as a cell key: lowercase, ``[a-z0-9_.:-]``, at most 64 characters; idempotent."""
    # strip the dashes again after cutting: a cut can end on one, which a second pass would strip
    cleaned = _TAG_CLEAN.sub("-", tag.strip().lower()).strip("-")[:_TAG_MAX].strip("-")
    return cleaned or "-"


#: The scope statistics are kept in when they are shared by every tenant.
SHARED_SCOPE = "shared"


def tenant_scope(tenant: str) -> str:
    """The statistics scope of one tenant's own statistics."""
    return f"t:{check_tenant(tenant)}"


# -- markers in a task's ops hash -------------------------------------------------------------


def open_marker(op_id: str) -> str:
    """Field of an ``open`` op's kept reply in the task's ops hash."""
    return f"o:{op_id}"


def transfer_marker(op_id: str) -> str:
    """Field of a ``transfer`` op's kept reply in the task's ops hash."""
    return f"t:{op_id}"


def close_marker(path: str) -> str:
    """Field of a ``close`` op's kept reply in the task's ops hash (also its event id)."""
    return f"z:{path}"


def kept_marker(name: str) -> str:
    """Field of a call's reply kept by its commit (``k:<name>``) in the task's ops hash."""
    return f"k:{check_op_id(name, 'kept reply name')}"


def work_name(subtask_id: str, attempt: int) -> str:
    """The name a subtask's attempt keeps its paid reply under: ``<subtask>.<attempt>``.

    The same on every delivery, so a delivery after a crash finds the reply the
    dead worker paid for.
    """
    if attempt < 1:
        raise ValueError(f"attempt must be at least 1, got {attempt}")
    return check_op_id(f"{subtask_id}.{int(attempt)}", "work name")


# -- the families ------------------------------------------------------------------------------


#: The prefix of every key of a process that is not fenced to a tenant.
SHARED_PREFIX = f"{PREFIX}:"


def _tagged(prefix: str, family: str, name: str) -> str:
    return f"{prefix}{{{family}:{name}}}:"


@dataclass(frozen=True, slots=True)
class TaskKeys:
    """The keys of one task, all under the hash tag ``{k:<task_id>}``."""

    task_id: str
    #: Where the keys live: ``pm:``, or ``pm:<tenant>:`` in a fenced process (:class:`KeySpace`).
    prefix: str = SHARED_PREFIX

    @property
    def base(self) -> str:
        """Common prefix of every key of this task."""
        return _tagged(self.prefix, _TASK, self.task_id)

    @property
    def meta(self) -> str:
        """Hash: tenant, incarnation, funding period, root limits, status, timestamps."""
        return self.base + "meta"

    @property
    def reservations(self) -> str:
        """Hash: reservation id -> its one record (state, hold, usage, flags, tags)."""
        return self.base + "res"

    @property
    def leases(self) -> str:
        """Sorted set: held reservation ids scored by lease deadline (ms, Redis clock)."""
        return self.base + "leases"

    @property
    def ops(self) -> str:
        """Hash: marker of an open, transfer or close -> its first reply, for idempotency."""
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
        """Hash: work id -> its finished result (JSON), so a re-run never pays twice.

        Written by the close of the try's account (one step) or by the orchestrator.
        """
        return self.base + "results"

    @property
    def plan(self) -> str:
        """String: the manager's plan (JSON), kept so a re-run does not plan again."""
        return self.base + "plan"

    @property
    def plans(self) -> str:
        """Hash: composite subtask's work id -> its sub-manager's plan (JSON)."""
        return self.base + "plans"

    @property
    def account_prefix(self) -> str:
        """Prefix of account hashes; the scripts append a path to it."""
        return self.base + "acct:"

    def account(self, path: str) -> str:
        """Hash of one account: limits, reserved, spent, carved, flags."""
        return self.account_prefix + path

    @property
    def wait_prefix(self) -> str:
        """Prefix of accounts' wait queues; the scripts append a path to it."""
        return self.base + "wait:"

    def wait_queue(self, path: str) -> str:
        """List: ids of reservations waiting on one account for held money, oldest first."""
        return self.wait_prefix + path

    def script_argv(self) -> list[str]:
        """The task script's ARGV before its operations: the account and wait-queue prefixes."""
        return [self.account_prefix, self.wait_prefix]

    def script_keys(self) -> list[str]:
        """KEYS of the task script, in its order; also every key of the ledger but the
        account hashes."""
        return [
            self.meta,
            self.reservations,
            self.leases,
            self.ops,
            self.events,
            self.accounts,
            self.results,
        ]


@dataclass(frozen=True, slots=True)
class TenantKeys:
    """The keys of one tenant, under the hash tag ``{t:<tenant>}``."""

    tenant: str
    prefix: str = SHARED_PREFIX

    @property
    def base(self) -> str:
        """Common prefix of every key of this tenant."""
        return _tagged(self.prefix, _TENANT, self.tenant)

    @property
    def config(self) -> str:
        """Hash: per-period limits, the period kind and the latest funded period."""
        return self.base + "cfg"

    @property
    def events(self) -> str:
        """Stream: funding and settlement of tasks, capped in length."""
        return self.base + "events"

    @property
    def period_prefix(self) -> str:
        """Prefix of period hashes; the funding script appends the period id to it."""
        return self.base + "p:"

    def period(self, period_id: str) -> str:
        """Hash: what was handed out and spent in one period (e.g. ``2026-11``)."""
        return self.period_prefix + period_id

    def funding(self, task_id: str, incarnation: str) -> str:
        """Hash: one task incarnation's funding, settlement and reported spend."""
        return f"{self.base}f:{check_incarnation(incarnation)}:{task_id}"


@dataclass(frozen=True, slots=True)
class StatsKeys:
    """The keys of one statistics scope (a tenant, or the shared scope), tag ``{s:<scope>}``."""

    scope: str
    prefix: str = SHARED_PREFIX

    @property
    def base(self) -> str:
        """Common prefix of every key of this scope."""
        return _tagged(self.prefix, _STATS, self.scope)

    @property
    def cells(self) -> str:
        """Hash: ``<endpoint>|<difficulty>|<tag>|<metric>`` -> count."""
        return self.base + "cells"

    @property
    def model(self) -> str:
        """Hash: the learner's weights, ``w|<endpoint>|<head>|<feature>`` -> float, and counts."""
        return self.base + "model"

    def features_seen(self, outcome: str) -> str:
        """String: an outcome's features for the learner, kept until its verdict can come."""
        return self.base + "seen:f:" + outcome

    def outcome_seen(self, outcome: str) -> str:
        """String: set once an outcome has been counted; expires."""
        return self.base + "seen:o:" + outcome

    def verdict_seen(self, outcome: str) -> str:
        """String: the verdict counted for an outcome; expires."""
        return self.base + "seen:v:" + outcome


@dataclass(frozen=True, slots=True)
class KeySpace:
    """Where one process's keys live: ``pm:``, or ``pm:<tenant>:`` when fenced to a tenant.

    Every component that touches Redis (ledger, statistics, records, queue, worker
    registry) builds its keys from the same space, so a fenced process never names
    a key outside its tenant's prefix. The global keys (queue, indexes) are per space.
    """

    #: The tenant the process is fenced to; ``None``: not fenced.
    tenant: str | None = None

    def __post_init__(self) -> None:
        if self.tenant is not None and ":" in check_tenant(self.tenant):
            # ``~pm:acme:*`` would also match tenant ``acme:x``'s keys.
            raise InvalidName("fenced tenant", self.tenant, "a fenced tenant's name has no ':'")

    @property
    def prefix(self) -> str:
        """``pm:`` or ``pm:<tenant>:``; an ACL user of the tenant gets ``~pm:<tenant>:*``."""
        return SHARED_PREFIX if self.tenant is None else f"{PREFIX}:{self.tenant}:"

    def task(self, task_id: str) -> TaskKeys:
        """The keys of one task."""
        return TaskKeys(task_id, self.prefix)

    def tenant_keys(self, name: str) -> TenantKeys:
        """The keys of one tenant."""
        return TenantKeys(name, self.prefix)

    def stats(self, scope: str) -> StatsKeys:
        """The keys of one statistics scope."""
        return StatsKeys(scope, self.prefix)

    @property
    def tenants(self) -> str:
        """Set of every tenant name."""
        return self.prefix + "tenants"

    # The global keys are one segment each ("open-tasks", not "tasks:open"): no key of
    # the shared space may start with ``pm:<tenant>:``, the fenced tenant's ACL pattern.

    @property
    def open_tasks(self) -> str:
        """Set of task ids whose root is open (the reaper walks it)."""
        return self.prefix + "open-tasks"

    @property
    def queue(self) -> str:
        """Stream of submitted tasks, read by workers through a consumer group."""
        return self.prefix + "queue"

    @property
    def dead_letter(self) -> str:
        """Stream of tasks that failed too many deliveries."""
        return self.prefix + "dead-letter"

    @property
    def workers(self) -> str:
        """Hash: worker name -> last heartbeat (JSON), for health checks."""
        return self.prefix + "workers"

    @property
    def task_pattern(self) -> str:
        """``SCAN`` pattern of every task record of the space."""
        return self.prefix + "{" + _TASK + ":*}:task"

    def task_id_of(self, record_key: str) -> str | None:
        """The task id of a record key matched by :attr:`task_pattern` (``None``: not one)."""
        head, tail = self.prefix + "{" + _TASK + ":", "}:task"
        if record_key.startswith(head) and record_key.endswith(tail):
            return record_key[len(head) : -len(tail)]
        return None


#: The space of a process not fenced to a tenant.
SHARED_SPACE = KeySpace()

# The shared space's global keys, by name (tests and tools read them).
TENANTS = SHARED_SPACE.tenants
OPEN_TASKS = SHARED_SPACE.open_tasks
QUEUE = SHARED_SPACE.queue
DEAD_LETTER = SHARED_SPACE.dead_letter
WORKERS = SHARED_SPACE.workers
#: Consumer group of the workers on a space's queue.
WORKER_GROUP = "pm-workers"

"""The ledger's Lua scripts, loaded once from ``budgets/lua/``.

There are three scripts. The **task script** is ``_prelude.lua`` (shared
helpers: loading an account, the lease sweep, idempotency, the audit event),
then one function per operation from ``<op>.lua`` (each headed by its
contract), then ``_dispatch.lua``, which runs a batch of operations of one task
in order. A batch of one is an ordinary atomic operation; a larger batch
amortises Redis's per-script cost over every operation in flight. The two
**tenant scripts** run on a tenant's keys, which live on another slot.

Scripts are sent with ``EVALSHA``; a ``NOSCRIPT`` reply (a restarted or flushed
server) loads them and retries, which is safe because every operation is
idempotent. What each refusal code of a script raises is in ``budgets/replies.py``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum
from importlib import resources


class Op(StrEnum):
    """The operations of the task script."""

    CLAIM = "claim"
    UNCLAIM = "unclaim"
    OPEN_TASK = "open_task"
    OPEN = "open"
    RESERVE = "reserve"
    COMMIT = "commit"
    RELEASE = "release"
    WITHDRAW = "withdraw"
    TRANSFER = "transfer"
    CLOSE = "close"
    REAP = "reap"
    EXPIRE = "expire"


class TenantOp(StrEnum):
    """The tenant scripts."""

    FUND = "tenant_fund"
    SETTLE = "tenant_settle"


@dataclass(frozen=True, slots=True)
class Script:
    """A script's source and the SHA1 Redis knows it by."""

    name: str
    source: str
    sha: str


def _read(name: str) -> str:
    return resources.files("budgets").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


def _script(name: str, source: str) -> Script:
    sha = hashlib.sha1(source.encode("utf-8"), usedforsecurity=False).hexdigest()
    return Script(name=name, source=source, sha=sha)


@dataclass(frozen=True, slots=True)
class Library:
    """The task script as a Redis Function library: loaded once, called with ``FCALL``.

    Its name and its function's carry the source's SHA1, so ledgers of different
    versions sharing one Redis each find their own.
    """

    name: str
    function: str
    source: str


@dataclass(frozen=True, slots=True)
class Scripts:
    """Every script the ledger sends."""

    task: Script
    tenant: dict[TenantOp, Script]
    library: Library

    def all(self) -> list[Script]:
        """Every script, for loading after ``NOSCRIPT``."""
        return [self.task, *self.tenant.values()]


def load_scripts() -> Scripts:
    """Read every script from the package; called once when a ledger is built."""
    body = "\n".join([_read("_prelude"), *(_read(op.value) for op in Op), _read("_dispatch")])
    task = _script("task", body + "\nreturn run(KEYS, ARGV)\n")
    name = f"paymaster_{task.sha[:16]}"
    function = f"pm_task_{task.sha[:16]}"
    library = Library(
        name=name,
        function=function,
        source=f"#!lua name={name}\n{body}\nredis.register_function('{function}', run)\n",
    )
    return Scripts(
        task=task,
        tenant={op: _script(op.value, _read(op.value)) for op in TenantOp},
        library=library,
    )

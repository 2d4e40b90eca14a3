"""The ledger's Lua scripts, loaded once from ``budgets/lua/``.

Each operation is one script with its contract in its header. Task scripts are
prefixed with ``_prelude.lua`` (shared helpers: loading an account, the lease
sweep, idempotency, the audit event). Scripts are sent with ``EVALSHA``; a
``NOSCRIPT`` reply (a restarted or flushed server) loads them and retries,
which is safe because every operation is idempotent.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import StrEnum
from importlib import resources


class Op(StrEnum):
    """The ledger's operations, one Lua script each."""

    OPEN_TASK = "open_task"
    OPEN = "open"
    RESERVE = "reserve"
    COMMIT = "commit"
    RELEASE = "release"
    TRANSFER = "transfer"
    CLOSE = "close"
    REAP = "reap"
    TENANT_FUND = "tenant_fund"
    TENANT_SETTLE = "tenant_settle"


#: Scripts that run on a task's keys and share the prelude.
_TASK_OPS = frozenset(
    {Op.OPEN_TASK, Op.OPEN, Op.RESERVE, Op.COMMIT, Op.RELEASE, Op.TRANSFER, Op.CLOSE, Op.REAP}
)


@dataclass(frozen=True, slots=True)
class Script:
    """A script's source and the SHA1 Redis knows it by."""

    op: Op
    source: str
    sha: str


def _read(name: str) -> str:
    return resources.files("budgets").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


def load_scripts() -> dict[Op, Script]:
    """Read every script from the package; called once when a ledger is built."""
    prelude = _read("_prelude")
    scripts: dict[Op, Script] = {}
    for op in Op:
        body = _read(op.value)
        source = f"{prelude}\n{body}" if op in _TASK_OPS else body
        sha = hashlib.sha1(source.encode("utf-8"), usedforsecurity=False).hexdigest()
        scripts[op] = Script(op=op, source=source, sha=sha)
    return scripts

"""How the CLI shows ledgers and events: trees that fit 80 columns, one line per event.

Everything here turns ledger values into rich renderables or plain strings;
nothing reads Redis. User-supplied text (task ids, tenant names, answers) is
escaped before it meets rich markup, so ``[b]`` in a task id stays ``[b]``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import typer
from rich.console import Console
from rich.markup import escape
from rich.tree import Tree

from budgets import AccountView, LedgerEvent, TaskTree, nanos_to_usd

UNLIMITED = "∞"
_BAR_WIDTH = 10

# No emoji codes: a task id like "a:b:c" must print as itself.
out = Console(emoji=False)
err = Console(stderr=True, emoji=False)


def fail(message: str, code: int) -> typer.Exit:
    """Print ``error: <message>`` as one line on stderr; the exit to raise with ``code``."""
    err.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    return typer.Exit(code)


def tokens_text(value: int | None) -> str:
    """``1,234``, or ∞ for an unlimited amount (the ledger stores it as -1)."""
    return UNLIMITED if value is None or value < 0 else f"{value:,}"


def usd_text(nanos: int | None) -> str:
    """``$0.0012`` (trailing zeros cut), or ∞ for an unlimited amount."""
    if nanos is None or nanos < 0:
        return UNLIMITED
    text = f"{nanos_to_usd(nanos):f}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return f"${text}"


def bar(used: int, limit: int | None, *, width: int = _BAR_WIDTH) -> str:
    """A bar of ``used`` out of ``limit`` in rich markup; empty for an unlimited limit."""
    if not limit or limit < 0:
        return ""
    filled = min(width, round(width * used / limit))
    colour = "red" if used > limit else "green"
    return f"[{colour}]{'█' * filled}[/{colour}]{'░' * (width - filled)}"


@dataclass(frozen=True, slots=True)
class Moves:
    """Budget moved between accounts by transfers, from the task's events."""

    moved_in: Mapping[str, int] = field(default_factory=dict)
    given_back: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, events: Iterable[LedgerEvent]) -> Moves:
        """Tokens moved into (down) and back out of (up) each account."""
        moved_in: dict[str, int] = {}
        back: dict[str, int] = {}
        for ev in events:
            if ev.op != "transfer":
                continue
            if ev.extra.get("dir") == "down":
                to = ev.extra.get("to", "")
                moved_in[to] = moved_in.get(to, 0) + ev.tokens
            elif ev.extra.get("dir") == "up":
                back[ev.account] = back.get(ev.account, 0) + ev.tokens
        return cls(moved_in, back)


def account_label(acct: AccountView, moves: Moves | None = None) -> str:
    """One account on one line: name, tokens spent/limit with a bar, dollars, flags."""
    name = escape(acct.path.rsplit("/", 1)[-1])
    parts = [
        f"[bold]{name}[/bold]",
        f"{acct.total_spent_tokens:,}/{tokens_text(acct.limit_tokens)} tok",
    ]
    shown = bar(acct.total_spent_tokens, acct.limit_tokens)
    if shown:
        parts.append(shown)
    if acct.limit_nanos is not None or acct.total_spent_nanos:
        parts.append(f"{usd_text(acct.total_spent_nanos)}/{usd_text(acct.limit_nanos)}")
    if acct.total_reserved_tokens:
        parts.append(f"held {acct.total_reserved_tokens:,}")
    if moves is not None and moves.moved_in.get(acct.path):
        parts.append(f"[cyan]+{moves.moved_in[acct.path]:,} for the answer[/cyan]")
    if acct.overrun_tokens or acct.overrun_nanos:
        parts.append("[red]overrun[/red]")
    if acct.closed:
        parts.append("[dim]closed[/dim]")
    return "  ".join(parts)


def ledger_tree(tree: TaskTree, moves: Moves | None = None) -> Tree:
    """The task's account tree; each line fits 80 columns down to depth three."""

    def add(node: Tree, acct: AccountView) -> None:
        for child in acct.children:
            add(node.add(account_label(child, moves)), child)

    head = escape(f"task {tree.task_id} [{tree.status}]") + "  "
    root = Tree(head + account_label(tree.root, moves).split("  ", 1)[1])
    add(root, tree.root)
    return root


def event_line(ev: LedgerEvent, stamp: str) -> str:
    """One audit event as plain text (no markup), unlimited amounts as ∞."""
    tags = " ".join(f"{k}={v}" for k, v in sorted(ev.tags.items()))
    note = ev.extra.get("text", "")
    where = ev.extra.get("to", "")
    body = f"{stamp} {ev.op:8} {ev.account:24} {tokens_text(ev.tokens):>8} tok "
    body += f"{usd_text(ev.nanos):>12}"
    if where:
        body += f" -> {where}"
    if note:
        body += f"  {note}"
    if tags:
        body += f"  {tags}"
    return body

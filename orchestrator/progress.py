"""Live progress of a task, told from its audit stream: plan, subtasks, each paid call.

:class:`Narrator` turns ledger events into one human line each and keeps the
running spend; :class:`ProgressView` prints those lines, with a live budget
bar under them on a terminal and a "left" figure on each paid line when the
output is piped; :func:`follow` polls the stream until the task is done.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from redis.exceptions import RedisError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn

from budgets import LedgerEvent
from budgets.errors import PaymasterError
from orchestrator.display import tokens_text

_STEPS = {
    "plan": "plan call",
    "repair": "plan repair call",
    "review": "review call",
    "synthesize": "final answer call",
}


def who(account: str) -> str:
    """``root/s1.1.2`` -> ``s1 (try 2)``; ``root/manager.1.1`` -> ``manager``."""
    name = account.rsplit("/", 1)[-1]
    if name == "root":
        return "task"
    base, _, rest = name.partition(".")
    attempt = rest.rsplit(".", 1)[-1] if rest else "1"
    return base if attempt in ("", "1") else f"{base} (try {attempt})"


@dataclass(slots=True)
class Narrator:
    """Reads events in order; tells each one and keeps the task's spend so far."""

    limit_tokens: int | None = None
    spent_tokens: int = 0

    def line(self, ev: LedgerEvent) -> str | None:
        """The event told in one line, or ``None`` for one not worth a line (reserve)."""
        actor = f"{who(ev.account):12}"
        if ev.op == "open" and ev.account == "root":
            self.limit_tokens = None if ev.tokens < 0 else ev.tokens
            return f"{actor} budget {tokens_text(ev.tokens)} tokens"
        if ev.op == "open":
            return f"{actor} started with {tokens_text(ev.tokens)} tokens"
        if ev.op == "commit":
            self.spent_tokens += ev.tokens
            step = ev.tags.get("step")
            what = _STEPS.get(step, "call") if step else "call"
            on = ev.tags.get("endpoint", "")
            return f"{actor} {what} paid {ev.tokens:,} tokens" + (f" on {on}" if on else "")
        if ev.op == "note":
            return f"{actor} {ev.extra.get('text', '')}"
        if ev.op == "transfer" and ev.extra.get("dir") == "down":
            return (
                f"{who(ev.extra.get('to', '')):12} +{ev.tokens:,} tokens left over, for the answer"
            )
        if ev.op == "transfer" and ev.extra.get("dir") == "up":
            return f"{actor} gave back {ev.tokens:,} tokens it did not need"
        if ev.op == "close" and ev.account == "root":
            return f"{actor} closed: spent {self.spent_tokens:,} tokens"
        if ev.op == "close":
            return f"{actor} done; {ev.tokens:,} tokens back to the pool"
        if ev.op == "release":
            return f"{actor} call not paid ({ev.extra.get('reason') or 'released'})"
        if ev.op == "overrun":
            return f"{actor} overrun: the server billed {ev.tokens:,} tokens beyond the limit"
        if ev.op == "expire":
            return f"{actor} a hold expired ({ev.tokens:,} tokens)"
        return None

    @property
    def left_text(self) -> str:
        """``left 2,345/4,000 tokens``."""
        if self.limit_tokens is None:
            return f"spent {self.spent_tokens:,} tokens"
        left = max(0, self.limit_tokens - self.spent_tokens)
        return f"left {left:,}/{self.limit_tokens:,} tokens"


class ProgressView:
    """Prints narrated events to ``console``: a live bar on a terminal, plain lines when piped."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.narrator = Narrator()
        self._bar: Progress | None = None
        self._row = TaskID(0)
        if console.is_terminal:
            self._bar = Progress(
                TextColumn("budget"),
                BarColumn(),
                TextColumn("{task.description}"),
                console=console,
                transient=True,
            )
            self._row = self._bar.add_task("", total=None)
            self._bar.start()

    def show(self, events: Sequence[LedgerEvent]) -> None:
        """Tell each event; update the bar (terminal) or add what is left (piped)."""
        narrator = self.narrator
        for ev in events:
            text = narrator.line(ev)
            if text is None:
                continue
            if self._bar is not None:
                self._bar.console.print(escape(text), highlight=False)
            elif ev.op == "commit":
                self.console.print(
                    f"{text}  ({narrator.left_text})", markup=False, highlight=False, soft_wrap=True
                )
            else:
                self.console.print(text, markup=False, highlight=False, soft_wrap=True)
        if self._bar is not None:
            self._bar.update(
                self._row,
                total=narrator.limit_tokens,
                completed=narrator.spent_tokens,
                description=narrator.left_text,
            )

    def close(self) -> None:
        """Stop the live bar (the lines printed stay)."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


Fetch = Callable[[str, str], Awaitable[Sequence[LedgerEvent]]]


async def follow(
    fetch: Fetch, task_id: str, view: ProgressView, done: asyncio.Event, *, poll_s: float = 0.2
) -> None:
    """Show the task's events as they come until ``done`` is set, then the last ones."""
    after = "-"

    async def drain() -> None:
        nonlocal after
        # A failed poll is tried again on the next tick; the task's own errors
        # reach the caller through the task, not through its progress.
        with contextlib.suppress(PaymasterError, RedisError):
            events = await fetch(task_id, after)
            if events:
                after = events[-1].id
                view.show(events)

    while not done.is_set():
        await drain()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), timeout=poll_s)
    await drain()

"""The ``paymaster`` command line.

Exit codes: 0 success; 1 the task ended without success (failed, cancelled,
budget exhausted); 2 bad input or configuration; 3 not found; 4 Redis or a
model server unreachable; 124 a wait timed out.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from decimal import Decimal
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.tree import Tree

from budgets import AccountView, Budget, LedgerUnavailable, TaskTree, nanos_to_usd
from budgets.errors import InvalidAmount, InvalidName, LedgerError, PaymasterError, UnknownTenant
from orchestrator.api import Paymaster
from orchestrator.errors import (
    InvalidTask,
    MissingRedis,
    SubtaskNotFound,
    TaskNotFound,
    TaskTimeout,
)
from orchestrator.records import Status, TaskRecord

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Run LLM tasks under budgets that hold."
)
local_model = typer.Typer(no_args_is_help=True, help="The bundled local model (SmolLM2-135M).")
app.add_typer(local_model, name="local-model")
out = Console()
err = Console(stderr=True)

TokensOpt = Annotated[int | None, typer.Option("--tokens", help="token limit for the task")]
UsdOpt = Annotated[str | None, typer.Option("--usd", help="dollar limit, e.g. 0.20")]
TenantOpt = Annotated[str | None, typer.Option("--tenant", help="tenant that funds the task")]


def _fail(message: str, code: int) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


def _guard(exc: BaseException) -> typer.Exit:
    if isinstance(exc, TaskNotFound | SubtaskNotFound):
        return _fail(str(exc), 3)
    if isinstance(exc, TaskTimeout):
        return _fail(str(exc), 124)
    if isinstance(exc, LedgerUnavailable | MissingRedis | ConnectionError):
        return _fail(str(exc), 4)
    if isinstance(exc, InvalidTask | InvalidAmount | InvalidName | UnknownTenant | LedgerError):
        return _fail(str(exc), 2)
    if isinstance(exc, PaymasterError):
        return _fail(str(exc), 2)
    raise exc


def _pm() -> Paymaster:
    try:
        return Paymaster.from_env()
    except Exception as e:
        raise _guard(e) from e


def _budget(tokens: int | None, usd: str | None) -> Budget:
    if tokens is None and usd is None:
        tokens = 20_000
    try:
        return Budget(tokens=tokens, usd=usd)
    except InvalidAmount as e:
        raise _fail(str(e), 2) from e


def _bar(used: int, limit: int | None, width: int = 16) -> str:
    if not limit:
        return ""
    filled = min(width, round(width * used / limit))
    colour = "red" if used > limit else "green"
    return f"[{colour}]{'█' * filled}[/{colour}]{'░' * (width - filled)}"


def _label(acct: AccountView) -> str:
    spent_usd = nanos_to_usd(acct.total_spent_nanos)
    limit_t = "∞" if acct.limit_tokens is None else f"{acct.limit_tokens:,}"
    limit_usd = "∞" if acct.limit_nanos is None else f"${nanos_to_usd(acct.limit_nanos):f}"
    state = " [dim](closed)[/dim]" if acct.closed else ""
    over = " [red]overrun[/red]" if acct.overrun_tokens or acct.overrun_nanos else ""
    return (
        f"[bold]{acct.path.rsplit('/', 1)[-1]}[/bold]{state}{over}  "
        f"tokens {acct.total_spent_tokens:,}/{limit_t} "
        f"{_bar(acct.total_spent_tokens, acct.limit_tokens)}  "
        f"usd ${spent_usd:f}/{limit_usd}  reserved {acct.total_reserved_tokens:,}"
    )


def _tree(tree: TaskTree) -> Tree:
    def add(node: Tree, acct: AccountView) -> None:
        for child in acct.children:
            add(node.add(_label(child)), child)

    root = Tree(f"task {tree.task_id} [{tree.status}]  " + _label(tree.root))
    add(root, tree.root)
    return root


def _show_record(record: TaskRecord) -> None:
    colour = "green" if record.status is Status.SUCCEEDED else "yellow"
    out.print(f"status: [{colour}]{record.status.value}[/{colour}]")
    if record.spent:
        out.print(f"spent: {record.spent.tokens:,} tokens, ${Decimal(record.spent.usd):f}")
    if record.error:
        out.print(f"error: {record.error}")
    if record.answer:
        out.print("answer:")
        out.print(record.answer, markup=False, highlight=False)


def _exit_for(record: TaskRecord) -> None:
    if record.status is not Status.SUCCEEDED:
        raise typer.Exit(1)


@app.command()
def run(
    task: Annotated[str, typer.Argument(help="what to do")],
    tokens: TokensOpt = None,
    usd: UsdOpt = None,
    tenant: TenantOpt = None,
) -> None:
    """Run a task in this process (no worker needed); print its id, progress, answer and ledger."""
    pm = _pm()
    budget = _budget(tokens, usd)
    try:
        record, tree = asyncio.run(_run(pm, task, budget, tenant))
    except Exception as e:
        raise _guard(e) from e
    _show_record(record)
    out.print(_tree(tree))
    _exit_for(record)


async def _run(
    pm: Paymaster, task: str, budget: Budget, tenant: str | None
) -> tuple[TaskRecord, TaskTree]:
    import uuid

    task_id = uuid.uuid4().hex[:16]
    out.print(f"task id: {task_id}")
    watcher = asyncio.create_task(_progress(pm, task_id))
    try:
        record = await pm.arun(task, budget=budget, tenant=tenant, task_id=task_id)
    finally:
        watcher.cancel()
    tree = await pm.aledger(task_id)
    await pm.aclose()
    return record, tree


async def _progress(pm: Paymaster, task_id: str) -> None:
    after = "-"
    while True:
        await asyncio.sleep(0.2)
        try:
            events = await pm.books.events(task_id, after=after)
        except PaymasterError:
            continue
        for ev in events:
            after = ev.id
            if ev.op in ("commit", "open", "close", "overrun"):
                where = ev.tags.get("endpoint", "")
                err.print(f"[dim]{ev.op:8} {ev.account:28} {ev.tokens:>7} tok {where}[/dim]")


@app.command()
def submit(
    task: Annotated[str, typer.Argument(help="what to do")],
    tokens: TokensOpt = None,
    usd: UsdOpt = None,
    tenant: TenantOpt = None,
    wait: Annotated[bool, typer.Option("--wait", help="wait for the answer")] = False,
    timeout: Annotated[float, typer.Option(help="seconds to wait with --wait")] = 600.0,
) -> None:
    """Queue a task for a worker; print its id (and, with --wait, its answer)."""
    pm = _pm()
    try:
        handle = pm.submit(task, budget=_budget(tokens, usd), tenant=tenant)
        out.print(handle.id)
        if wait:
            record = handle.wait(timeout=timeout)
            _show_record(record)
            _exit_for(record)
    except typer.Exit:
        raise
    except Exception as e:
        raise _guard(e) from e
    finally:
        pm.close()


@app.command()
def status(task_id: str, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Show a task's status and answer."""
    pm = _pm()
    try:
        record = pm.status(task_id)
    except Exception as e:
        raise _guard(e) from e
    finally:
        pm.close()
    if as_json:
        print(record.model_dump_json(indent=2))
    else:
        out.print(f"task {record.id}")
        _show_record(record)


@app.command()
def ledger(task_id: str, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Show a task's account tree: limit, reserved and spent, with a bar each."""
    pm = _pm()
    try:
        tree = pm.ledger(task_id)
    except Exception as e:
        raise _guard(e) from e
    finally:
        pm.close()
    if as_json:
        print(tree.model_dump_json(indent=2))
    else:
        out.print(_tree(tree))


@app.command()
def events(
    task_id: str,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="keep printing new events")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Print a task's audit events (every reserve, commit, release, transfer, close)."""
    pm = _pm()
    after = "-"
    try:
        while True:
            for ev in pm.events(task_id, after=after):
                after = ev.id
                if as_json:
                    print(ev.model_dump_json())
                else:
                    tags = " ".join(f"{k}={v}" for k, v in sorted(ev.tags.items()))
                    stamp = time.strftime("%H:%M:%S", time.localtime(ev.ts_ms / 1000))
                    out.print(
                        f"{stamp} {ev.op:8} {ev.account:28} {ev.tokens:>8} tok "
                        f"{ev.nanos:>12} n$ {tags}",
                        markup=False,
                    )
            if not follow:
                break
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    except Exception as e:
        raise _guard(e) from e
    finally:
        pm.close()


@app.command()
def worker(
    concurrency: Annotated[int, typer.Option("--concurrency", "-c", min=1)] = 4,
    grace: Annotated[float, typer.Option(help="seconds to finish running tasks on SIGTERM")] = 30.0,
    name: Annotated[str | None, typer.Option(help="consumer name (default host-pid)")] = None,
) -> None:
    """Take tasks from the queue and run them until SIGTERM."""
    from orchestrator.worker import Worker, install_signal_handlers

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    pm = _pm()

    async def main() -> None:
        w = Worker(pm.runtime(), concurrency=concurrency, name=name, grace_s=grace)
        install_signal_handlers(w)
        err.print(f"worker {w.name} ready (concurrency {concurrency})")
        await w.run()
        await pm.aclose()

    try:
        asyncio.run(main())
    except Exception as e:
        raise _guard(e) from e


@app.command()
def feedback(
    task_id: str,
    subtask_id: str,
    ok: Annotated[bool, typer.Option("--ok/--bad", help="was the subtask's answer right?")],
) -> None:
    """Record whether a subtask's answer was right; the adaptive policy learns from it."""
    pm = _pm()
    try:
        changed = pm.feedback(task_id, subtask_id, ok=ok)
    except Exception as e:
        raise _guard(e) from e
    finally:
        pm.close()
    verdict = "right" if ok else "wrong"
    out.print(f"{task_id}/{subtask_id}: {verdict}" + ("" if changed else " (already recorded)"))


@app.command()
def stats(
    tenant: Annotated[str | None, typer.Option("--tenant", help="whose statistics")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Show what the policies learn from: per endpoint and difficulty, all tags."""
    pm = _pm()
    try:
        book = pm.stats(tenant)
    except Exception as e:
        raise _guard(e) from e
    finally:
        pm.close()
    rows = sorted((k, c) for k, c in book.cells.items() if k[2] == "*")
    if as_json:
        data = [
            {
                "endpoint": ep,
                "difficulty": d,
                "calls": c.calls,
                "asked": c.asked,
                "used": c.used,
                "cut_short": c.cut,
                "escalated": c.escalated,
                "ok": c.ok,
                "bad": c.bad,
                "nanos": c.nanos,
                "p90_used": c.quantile(0.9),
            }
            for (ep, d, _), c in rows
        ]
        print(json.dumps(data, indent=2))
        return
    table = Table("endpoint", "difficulty", "calls", "used/asked", "cut short", "right", "p90 used")
    for (ep, d, _), c in rows:
        right = f"{c.ok}/{c.judged}" if c.judged else "-"
        table.add_row(
            ep,
            str(d) if d else "all",
            str(c.calls),
            f"{c.used}/{c.asked}",
            str(c.cut),
            right,
            str(c.quantile(0.9) or "-"),
        )
    out.print(table)


@app.command()
def endpoints() -> None:
    """List configured model endpoints, their prices, and whether they answer."""
    import httpx

    pm = _pm()
    table = Table("name", "kind", "model", "in $/M", "out $/M", "tier", "reachable")
    for ep in pm.endpoints.endpoints:
        try:
            ok = httpx.get(f"{ep.base_url}/models", timeout=2).status_code < 500
        except httpx.HTTPError:
            ok = False
        table.add_row(
            ep.name,
            ep.kind,
            ep.model,
            str(ep.input_usd_per_mtok),
            str(ep.output_usd_per_mtok),
            str(ep.tier),
            "yes" if ok else "[red]no[/red]",
        )
    out.print(table)


@app.command()
def tenants(
    set_name: Annotated[
        str | None, typer.Option("--set", help="create or update this tenant")
    ] = None,
    tokens: TokensOpt = None,
    usd: UsdOpt = None,
    period: Annotated[str, typer.Option(help="day, month or none")] = "month",
) -> None:
    """List tenants and their current period; ``--set NAME`` creates or updates one."""
    pm = _pm()

    async def main() -> list[Any]:
        if set_name is not None:
            await pm.aset_tenant(set_name, _budget(tokens, usd), period=period)
        views = [await pm.books.tenant(n) for n in await pm.books.tenants()]
        await pm.aclose()
        return views

    try:
        views = asyncio.run(main())
    except Exception as e:
        raise _guard(e) from e
    table = Table(
        "tenant",
        "period",
        "limit tokens",
        "limit usd",
        "in use tokens",
        "spent tokens",
        "spent usd",
    )
    for v in views:
        table.add_row(
            v.name,
            f"{v.period} {v.period_id}",
            str(v.limit.tokens or "∞"),
            str(v.limit.usd or "∞"),
            f"{v.funded_tokens:,}",
            f"{v.spent_tokens:,}",
            f"{nanos_to_usd(v.spent_nanos):f}",
        )
    out.print(table)


@local_model.command("serve")
def local_model_serve(
    port: Annotated[int, typer.Option(help="port to listen on")] = 8439,
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
) -> None:
    """Serve SmolLM2-135M with llama.cpp's OpenAI-compatible server, in the foreground."""
    import os

    from agents.local_model import serve

    try:
        code = serve(port=port, host=host, env=os.environ)
    except PaymasterError as e:
        raise _fail(str(e), 2) from e
    raise typer.Exit(code)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()

"""The ``paymaster`` command line.

Exit codes: 0 success; 1 the task ended without success (failed, cancelled,
budget exhausted); 2 bad input or configuration; 3 not found; 4 Redis or a
model server unreachable; 124 a wait timed out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Annotated, Any

import redis.exceptions
import typer
from rich.markup import escape
from rich.table import Table

from agents.errors import ConfigError, ModelCallFailed
from budgets import Budget, LedgerEvent, LedgerUnavailable, TaskTree
from budgets.errors import (
    InvalidAmount,
    InvalidName,
    LedgerError,
    LedgerForbidden,
    PaymasterError,
    UnknownOutcome,
    UnknownTenant,
    forbidden,
)
from orchestrator.api import Paymaster
from orchestrator.cli_serve import serve
from orchestrator.cli_services import local_model, services
from orchestrator.display import (
    Moves,
    err,
    event_line,
    fail,
    ledger_tree,
    out,
    tokens_text,
    usd_text,
)
from orchestrator.errors import (
    InvalidTask,
    MissingRedis,
    SubtaskNotFound,
    TaskNotFound,
    TaskTimeout,
)
from orchestrator.progress import ProgressView, follow
from orchestrator.records import Status, TaskRecord
from orchestrator.telemetry import Telemetry

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Run LLM tasks under budgets that hold."
)
app.add_typer(local_model, name="local-model")
app.add_typer(services, name="services")

DEFAULT_TOKENS = 20_000
TokensOpt = Annotated[
    int | None,
    typer.Option(
        "--tokens", help=f"token limit for the task (default {DEFAULT_TOKENS:,} when no --usd)"
    ),
]
UsdOpt = Annotated[str | None, typer.Option("--usd", help="dollar limit, e.g. 0.20")]
TenantOpt = Annotated[str | None, typer.Option("--tenant", help="tenant that funds the task")]


def _guard(exc: BaseException) -> typer.Exit:
    """The exit code and one-line message for an error; anything unknown propagates."""
    if isinstance(exc, TaskNotFound | SubtaskNotFound | UnknownOutcome):
        return fail(str(exc), 3)
    if isinstance(exc, TaskTimeout):
        return fail(str(exc), 124)
    if isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
        return fail(f"Redis is unreachable ({exc}); check REDIS_URL or start redis-server", 4)
    if isinstance(exc, LedgerUnavailable | MissingRedis | ConnectionError):
        return fail(str(exc), 4)
    if isinstance(exc, redis.exceptions.NoPermissionError):
        return fail(str(forbidden("REDIS_URL", exc)), 2)
    if isinstance(exc, LedgerForbidden):
        return fail(str(exc), 2)
    if isinstance(exc, ModelCallFailed) and exc.transient:
        return fail(f"{exc}; is the model server running? (paymaster endpoints)", 4)
    if isinstance(exc, InvalidTask | InvalidAmount | InvalidName | UnknownTenant | LedgerError):
        return fail(str(exc), 2)
    if isinstance(exc, ConfigError | PaymasterError):
        return fail(str(exc), 2)
    raise exc


def _pm(telemetry: Telemetry | None = None) -> Paymaster:
    try:
        return Paymaster.from_env(telemetry=telemetry)
    except Exception as e:
        raise _guard(e) from e


def _budget(tokens: int | None, usd: str | None) -> Budget:
    if tokens is None and usd is None:
        tokens = DEFAULT_TOKENS
    try:
        return Budget(tokens=tokens, usd=usd)
    except InvalidAmount as e:
        raise fail(str(e), 2) from e


def _show_record(record: TaskRecord) -> None:
    colour = "green" if record.status is Status.SUCCEEDED else "yellow"
    out.print(f"status: [{colour}]{record.status.value}[/{colour}]")
    if record.spent:
        out.print(f"spent: {record.spent.tokens:,} tokens, ${Decimal(record.spent.usd):f}")
    if record.error:
        # A partial task's detail says itself what fell short ("fell short: a (cut short)").
        label = "" if record.status is Status.PARTIAL else "error: "
        out.print(f"{label}{record.error}", markup=False, highlight=False)
    if record.answer:
        out.print("answer:")
        out.print(record.answer, markup=False, highlight=False)


#: Exit code of a task that ran every subtask but some fell short (``partial``).
EXIT_PARTIAL = 5


def _exit_for(record: TaskRecord) -> None:
    if record.status is Status.PARTIAL:
        raise typer.Exit(EXIT_PARTIAL)
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
        record, tree, moves = asyncio.run(_run(pm, task, budget, tenant))
    except Exception as e:
        raise _guard(e) from e
    _show_record(record)
    out.print(ledger_tree(tree, moves))
    _exit_for(record)


async def _run(
    pm: Paymaster, task: str, budget: Budget, tenant: str | None
) -> tuple[TaskRecord, TaskTree, Moves]:
    import uuid

    task_id = uuid.uuid4().hex[:16]
    try:
        async with _watching(pm, task_id):
            record = await pm.arun(task, budget=budget, tenant=tenant, task_id=task_id)
        tree = await pm.aledger(task_id)
        moves = Moves.of(await pm.books.events(task_id))
    finally:
        await pm.aclose()
    return record, tree, moves


@contextlib.asynccontextmanager
async def _watching(pm: Paymaster, task_id: str) -> AsyncIterator[None]:
    """Show the task's progress on stderr while the body runs; its id once it exists."""
    view = ProgressView(err)
    done = asyncio.Event()

    async def fetch(tid: str, after: str) -> list[LedgerEvent]:
        events = await pm.books.events(tid, after=after)
        if events and after == "-":
            err.print(f"task id: {tid}", markup=False, highlight=False)
        return events

    watcher = asyncio.create_task(follow(fetch, task_id, view, done))
    try:
        yield
    finally:
        done.set()
        try:
            await asyncio.wait_for(watcher, timeout=5)
        except TimeoutError:
            watcher.cancel()
        view.close()


@app.command()
def submit(
    task: Annotated[str, typer.Argument(help="what to do")],
    tokens: TokensOpt = None,
    usd: UsdOpt = None,
    tenant: TenantOpt = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="wait for the answer, showing progress")
    ] = False,
    timeout: Annotated[float, typer.Option(help="seconds to wait with --wait")] = 600.0,
) -> None:
    """Queue a task for a worker (see `paymaster worker`); print its id (--wait: its answer)."""
    pm = _pm()
    try:
        record = asyncio.run(_submit(pm, task, _budget(tokens, usd), tenant, wait, timeout))
    except Exception as e:
        raise _guard(e) from e
    if record is not None:
        _show_record(record)
        _exit_for(record)


async def _submit(
    pm: Paymaster, task: str, budget: Budget, tenant: str | None, wait: bool, timeout: float
) -> TaskRecord | None:
    try:
        handle = await pm.asubmit(task, budget=budget, tenant=tenant)
        out.print(handle.id, markup=False, highlight=False)
        if not wait:
            return None
        async with _watching(pm, handle.id):
            return await handle.result(timeout=timeout)
    finally:
        await pm.aclose()


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
        moves = Moves.of(pm.events(task_id))
    except Exception as e:
        raise _guard(e) from e
    finally:
        pm.close()
    if as_json:
        print(tree.model_dump_json(indent=2))
    else:
        out.print(ledger_tree(tree, moves))


@app.command()
def events(
    task_id: str,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="keep printing new events until the task ends")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Print a task's audit events (every reserve, commit, release, transfer, close)."""
    pm = _pm()
    after = "-"
    try:
        while True:
            final = not follow or pm.status(task_id).status.final
            for ev in pm.events(task_id, after=after):
                after = ev.id
                if as_json:
                    print(ev.model_dump_json())
                else:
                    stamp = time.strftime("%H:%M:%S", time.localtime(ev.ts_ms / 1000))
                    out.print(event_line(ev, stamp), markup=False, highlight=False)
            if final:
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
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port", min=0, max=65535, help="serve Prometheus /metrics on this port"
        ),
    ] = None,
    metrics_host: Annotated[
        str, typer.Option("--metrics-host", help="address /metrics listens on")
    ] = "127.0.0.1",
) -> None:
    """Take tasks from the queue and run them until SIGTERM; ride out Redis outages."""
    from orchestrator.worker import Worker, configure_logging, install_signal_handlers

    configure_logging()
    metrics = None
    if metrics_port is not None:
        from orchestrator.metrics import MetricsServer

        probe = _pm()
        try:
            metrics = MetricsServer(
                redis_url=probe.redis_url,
                host=metrics_host,
                port=metrics_port,
                space=probe.settings.space(),
            )
        except OSError as e:
            raise fail(str(e), 2) from e
        err.print(f"metrics on http://{metrics_host}:{metrics.port}/metrics")
    pm = _pm(metrics.telemetry if metrics else None)

    async def main() -> None:
        # Unreachable at start is a configuration error (exit 4); once running,
        # the worker rides out outages and says so in its log.
        await pm.books.ping()
        w = Worker(pm.runtime(), concurrency=concurrency, name=name, grace_s=grace)
        install_signal_handlers(w)
        err.print(f"worker {w.name} ready (concurrency {concurrency})")
        try:
            await w.run()
        finally:
            await pm.aclose()

    try:
        asyncio.run(main())
    except Exception as e:
        raise _guard(e) from e
    finally:
        if metrics is not None:
            metrics.close()


app.command(name="serve")(serve)


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

    from orchestrator.runtime import smallest_budgets

    pm = _pm()
    try:
        runtime = pm.runtime()
    except Exception as e:
        raise _guard(e) from e
    table = Table(
        "name", "kind", "model", "in $/M", "out $/M", "tier", "runs from", "plans from", "up"
    )
    for ep in pm.endpoints.endpoints:
        try:
            ok = httpx.get(f"{ep.base_url}/models", timeout=2).status_code < 500
        except httpx.HTTPError:
            ok = False
        runs, plans = smallest_budgets(
            client=runtime.metered, policy=runtime.policy, endpoint=ep.name
        )
        table.add_row(
            escape(ep.name),
            ep.kind,
            escape(ep.model),
            str(ep.input_usd_per_mtok),
            str(ep.output_usd_per_mtok),
            str(ep.tier),
            f"{runs:,}",
            f"{plans:,}",
            "yes" if ok else "[red]no[/red]",
        )
    out.print(table)
    out.print(
        "[dim]runs from / plans from: the fewest --tokens that run the quick start's task "
        "at all (as one subtask) / with a plan[/dim]"
    )


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
            tokens_text(v.limit.tokens),
            "∞" if v.limit.usd is None else f"${v.limit.usd}",
            f"{v.funded_tokens:,}",
            f"{v.spent_tokens:,}",
            usd_text(v.spent_nanos),
        )
    out.print(table)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()

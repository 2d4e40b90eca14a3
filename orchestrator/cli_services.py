"""``paymaster local-model`` and ``paymaster services``: the processes Paymaster runs for you."""

from __future__ import annotations

import json
import os
from typing import Annotated

import typer
from rich.table import Table

from budgets.errors import PaymasterError
from orchestrator.display import fail, out

local_model = typer.Typer(no_args_is_help=True, help="The bundled local model (SmolLM2-135M).")
services = typer.Typer(help="The background services Paymaster starts: list them, or stop them.")


@local_model.command("serve")
def local_model_serve(
    port: Annotated[int, typer.Option(help="port to listen on")] = 8439,
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
) -> None:
    """Serve SmolLM2-135M with llama.cpp's OpenAI-compatible server, in the foreground."""
    from agents.local_model import serve

    try:
        code = serve(port=port, host=host, env=os.environ)
    except PaymasterError as e:
        raise fail(str(e), 2) from e
    raise typer.Exit(code)


# -- paymaster services: the private Redis and the local model server ----------------------------

ServicesJsonOpt = Annotated[bool, typer.Option("--json", help="print JSON")]


@services.callback(invoke_without_command=True)
def services_main(ctx: typer.Context, as_json: ServicesJsonOpt = False) -> None:
    """List (the default) or stop the private Redis and the local model server."""
    if ctx.invoked_subcommand is None:
        services_list(as_json=as_json)


@services.command("list")
def services_list(as_json: ServicesJsonOpt = False) -> None:
    """Show each background service: pid, port, URL and whether it runs."""
    from orchestrator.services import list_services
    from orchestrator.settings import Settings

    try:
        listed = list_services(Settings.from_env(os.environ).home)
    except ValueError as e:
        raise fail(str(e), 2) from e
    if as_json:
        print(json.dumps([s.model_dump(mode="json") for s in listed], indent=2))
        return
    table = Table("service", "pid", "port", "url", "running")
    for s in listed:
        stale = " (stale record)" if s.pid is not None and not s.running else ""
        running = "[green]yes[/green]" if s.running else f"no{stale}"
        table.add_row(s.name, str(s.pid or "-"), str(s.port or "-"), s.url or "-", running)
    out.print(table)


@services.command("stop")
def services_stop(
    grace: Annotated[float, typer.Option(help="seconds after SIGTERM before SIGKILL")] = 10.0,
) -> None:
    """Stop the private Redis and the local model server; fine when neither runs."""
    from orchestrator.services import StopOutcome, stop_services
    from orchestrator.settings import Settings

    try:
        reports = stop_services(Settings.from_env(os.environ).home, grace_s=grace)
    except ValueError as e:
        raise fail(str(e), 2) from e
    for r in reports:
        s = r.service
        if r.outcome is StopOutcome.STOPPED:
            out.print(f"stopped {s.name} (pid {s.pid}, port {s.port})")
        elif r.outcome is StopOutcome.STALE:
            why = f"pid {s.pid} is not ours" if s.pid is not None else "it was unreadable"
            out.print(f"{s.name} was not running; removed its record ({why})")
    if not any(r.outcome is StopOutcome.STOPPED for r in reports):
        out.print("nothing was running")

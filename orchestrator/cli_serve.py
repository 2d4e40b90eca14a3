"""``paymaster serve``: the read-only ledger page (:mod:`orchestrator.serve`), as a command."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from orchestrator.display import err, fail


def serve(
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="0: any free port")] = 8440,
    host: Annotated[str, typer.Option("--host", help="address to listen on")] = "127.0.0.1",
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="PAYMASTER_SERVE_TOKEN",
            help="required on every request (needed to listen beyond loopback)",
        ),
    ] = None,
    show_prompts: Annotated[
        bool, typer.Option("--show-prompts", help="show each task's text on its page")
    ] = False,
) -> None:
    """Serve a read-only web page per task: its account tree and events, live."""
    import socket

    from orchestrator.cli import _guard, _pm  # the command line's one error contract

    try:
        import uvicorn

        from orchestrator.serve import ServeSettings, build_app, needs_token
    except ImportError as e:
        raise fail(
            f"paymaster serve needs starlette and uvicorn: pip install 'paymaster[serve]' ({e})", 2
        ) from e
    if needs_token(host) and not token:
        raise fail(f"listening on {host} needs a token: --token or PAYMASTER_SERVE_TOKEN", 2)
    if token is not None and len(token) < 16:
        raise fail("the token is too short: use at least 16 characters", 2)
    pm = _pm()

    async def reachable() -> None:  # unreachable at start is a configuration error (exit 4)
        try:
            await pm.books.ping()
        finally:
            await pm.aclose()

    try:
        asyncio.run(reachable())
    except Exception as e:
        raise _guard(e) from e
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise fail(
            f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port", 2
        ) from e
    bound = sock.getsockname()[1]
    settings = ServeSettings(
        redis_url=pm.redis_url,
        token=token,
        show_prompts=show_prompts,
        space=pm.settings.space(),
    )
    config = uvicorn.Config(build_app(settings), log_level="warning", lifespan="on")
    err.print(f"serving on http://{host}:{bound}/", markup=False, highlight=False)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()

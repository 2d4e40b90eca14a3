"""A scripted OpenAI-compatible chat server on 127.0.0.1, for tests and benchmarks.

It runs starlette under uvicorn in a thread of its own with its own event loop, so sync tests,
async tests and subprocesses all reach it over real HTTP, and the ``openai`` client's parsing,
retries and timeouts run for real::

    with ScriptedModelServer() as srv:
        srv.push(Reply(text="hello", usage=Usage(prompt_tokens=3, completion_tokens=1)))
        client = openai.OpenAI(base_url=srv.base_url, api_key="sk-test", max_retries=0)
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])

Each ``POST /v1/chat/completions`` takes the next scripted :class:`Reply` from a FIFO queue;
when the queue is empty it asks :attr:`ScriptedModelServer.responder` if one is set, else it
sends the default reply. See :class:`Reply` for what a reply can do (usage with cached and
reasoning details, truncation by ``max_tokens`` or ``max_completion_tokens``, error statuses,
``Retry-After``, malformed bodies) and the faults it can inject (a stall before the first
byte, wrong-shaped JSON, a reply cut off mid-body by a dropped connection or a stall), and
:func:`~agents._stub_replies.shape` for how usage is counted by default.
``POST /extras/tokenize/count`` (llama-cpp-python's route, ``{"input": text}``) counts one
token per whitespace-separated word.

Run ``python -m agents.stub_server --port 8099`` to serve the default reply from a separate
process: it prints ``READY <base_url>`` once listening and serves until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from types import FrameType, TracebackType
from typing import Any, Final, Self

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from agents._stub_replies import (
    DEFAULT_MODEL,
    Cut,
    DroppedOnPurpose,
    RecordedRequest,
    Reply,
    Responder,
    Usage,
    WrongShape,
    error_response,
    json_response,
    respond,
)

__all__ = [
    "DEFAULT_REPLY",
    "Cut",
    "RecordedRequest",
    "Reply",
    "Responder",
    "ScriptedModelServer",
    "Usage",
    "WrongShape",
    "main",
]

DEFAULT_REPLY: Final = Reply(text="This is a scripted reply.")
"""Sent when the queue is empty and no responder is set; its usage is counted ("auto")."""

HOST: Final = "127.0.0.1"
"""Loopback only: the stub is for tests on this machine, never a listening service."""

_ALL_METHODS: Final = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
# Stop waits this long for the server thread; uvicorn cancels stuck requests well before.
_JOIN_TIMEOUT_S: Final = 10.0
_GRACEFUL_SHUTDOWN_S: Final = 2


class _QuietDrops(logging.Filter):
    """Keeps uvicorn from logging a traceback for a connection the script drops on purpose."""

    def filter(self, record: logging.LogRecord) -> bool:
        """False for uvicorn's "Exception in ASGI application" record of a deliberate drop."""
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, DroppedOnPurpose)


def _quiet_drops() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _QuietDrops) for f in logger.filters):
        logger.addFilter(_QuietDrops())


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, telling another thread when it listens, and waking delays on stop."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        # Bound to the server's loop on first use; set from stop() via call_soon_threadsafe.
        self.stopping = asyncio.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """Record the loop, start listening, and release whoever waits in ``start()``."""
        self.loop = asyncio.get_running_loop()
        try:
            await super().startup(sockets=sockets)
        finally:
            self.listening.set()

    async def sleep(self, delay_s: float) -> None:
        """Sleep ``delay_s`` seconds, or until the server is told to stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), timeout=delay_s)

    def run_in_thread(self, sock: socket.socket) -> None:
        """Serve on ``sock`` until told to exit; never leave ``start()`` waiting."""
        try:
            self.run(sockets=[sock])
        finally:
            self.listening.set()


class ScriptedModelServer:
    """An OpenAI-compatible chat server answering from a script; see the module docstring.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`. It can be started
    again after a stop (on a new port if ``port`` is 0). All methods are thread-safe.

    Attributes:
        responder: Builds the reply when the queue is empty; takes precedence over the
            default. Set it (or reset it to ``None``) at any time.
    """

    def __init__(
        self,
        *,
        default: Reply = DEFAULT_REPLY,
        port: int = 0,
        models: Sequence[str] = (DEFAULT_MODEL,),
        startup_timeout_s: float = 10.0,
    ) -> None:
        """Configure the server; nothing listens until :meth:`start`.

        Args:
            default: Sent when the queue is empty and no responder is set.
            port: Port on 127.0.0.1; 0 picks a free one.
            models: Model ids listed by ``GET /v1/models``.
            startup_timeout_s: How long :meth:`start` waits for the server to listen.
        """
        self.responder: Responder | None = None
        self._default = default
        self._requested_port = port
        self._models = tuple(models)
        self._startup_timeout_s = startup_timeout_s
        self._lock = threading.Lock()
        self._queue: deque[Reply] = deque()
        self._requests: list[RecordedRequest] = []
        self._ids = itertools.count(1)
        self._port: int | None = None
        self._server: _Uvicorn | None = None
        self._thread: threading.Thread | None = None
        self._routes: dict[tuple[str, str], Callable[[RecordedRequest], Awaitable[Response]]] = {
            ("POST", "/v1/chat/completions"): self._chat,
            ("GET", "/v1/models"): self._list_models,
            ("GET", "/health"): self._health,
            ("POST", "/extras/tokenize/count"): self._count_tokens,
        }
        # One catch-all route, so that every request, even to an unknown path, is recorded.
        self._app = Starlette(routes=[Route("/{path:path}", self._handle, methods=_ALL_METHODS)])

    @property
    def port(self) -> int:
        """The port the running server listens on."""
        if self._port is None:
            raise RuntimeError("the stub server is not running; call start() first")
        return self._port

    @property
    def base_url(self) -> str:
        """The URL to give an OpenAI client, e.g. ``http://127.0.0.1:PORT/v1``."""
        return f"http://{HOST}:{self.port}/v1"

    @property
    def requests(self) -> list[RecordedRequest]:
        """A copy of every request received so far, oldest first."""
        with self._lock:
            return list(self._requests)

    @property
    def pending(self) -> int:
        """How many scripted replies are still queued."""
        with self._lock:
            return len(self._queue)

    def push(self, reply: Reply) -> None:
        """Queue ``reply`` for the next chat completion request not already answered."""
        with self._lock:
            self._queue.append(reply)

    def push_many(self, replies: Iterable[Reply]) -> None:
        """Queue ``replies`` in order."""
        with self._lock:
            self._queue.extend(replies)

    def clear(self) -> None:
        """Drop the queued replies and the recorded requests (the responder stays)."""
        with self._lock:
            self._queue.clear()
            self._requests.clear()

    def start(self) -> Self:
        """Bind the port and serve in a background thread; return once it accepts connections.

        Raises:
            RuntimeError: It is already running, or did not start within the timeout.
            OSError: The port cannot be bound.
        """
        if self._thread is not None:
            raise RuntimeError("the stub server is already running")
        _quiet_drops()
        # asyncio sets TCP_NODELAY only on sockets whose proto is IPPROTO_TCP; without it,
        # Nagle's algorithm and delayed ACKs add some 40 ms to every request.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        # Lets a fixed port be bound again right after a previous run released it.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, self._requested_port))
        except OSError:
            sock.close()
            raise
        config = uvicorn.Config(
            self._app,
            log_config=None,  # leave the host process's logging configuration alone
            log_level="warning",
            access_log=False,
            lifespan="off",
            server_header=False,
            timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_S,
        )
        server = _Uvicorn(config)
        thread = threading.Thread(
            target=server.run_in_thread, args=(sock,), name="ScriptedModelServer", daemon=True
        )
        self._server, self._thread, self._port = server, thread, sock.getsockname()[1]
        thread.start()
        server.listening.wait(self._startup_timeout_s)
        if not server.started:
            self.stop()
            sock.close()
            raise RuntimeError(f"the stub server did not start within {self._startup_timeout_s}s")
        return self

    def stop(self) -> None:
        """Stop serving and join the thread; replies still in their delay are sent at once.

        Does nothing if the server is not running.

        Raises:
            RuntimeError: The server thread did not end within 10 seconds.
        """
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.should_exit = True
        if server.loop is not None:
            # The loop is closed if the thread already ended; then there is nothing to wake.
            with contextlib.suppress(RuntimeError):
                server.loop.call_soon_threadsafe(server.stopping.set)
        thread.join(_JOIN_TIMEOUT_S)
        if thread.is_alive():
            raise RuntimeError(f"the stub server thread did not stop within {_JOIN_TIMEOUT_S}s")
        self._server = self._thread = self._port = None

    def __enter__(self) -> Self:
        """Start the server (see :meth:`start`)."""
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the server (see :meth:`stop`)."""
        self.stop()

    async def _handle(self, request: Request) -> Response:
        raw = await request.body()
        body: dict[str, Any] | None = None
        if raw:
            with contextlib.suppress(ValueError):
                parsed = json.loads(raw)
                body = parsed if isinstance(parsed, dict) else None
        recorded = RecordedRequest(
            method=request.method,
            path=request.scope["path"],
            headers=dict(request.headers),
            body=body,
        )
        with self._lock:
            self._requests.append(recorded)
        handler = self._routes.get((recorded.method, recorded.path))
        if handler is None:
            message = f"no route {recorded.method} {recorded.path} on the stub server"
            return error_response(status=404, message=message)
        return await handler(recorded)

    async def _health(self, recorded: RecordedRequest) -> Response:
        return json_response({"status": "ok"})

    async def _count_tokens(self, recorded: RecordedRequest) -> Response:
        # llama-cpp-python's route: one token per whitespace-separated word of "input".
        text = (recorded.body or {}).get("input")
        if not isinstance(text, str):
            return error_response(status=400, message="the body must have an 'input' string")
        return json_response({"count": len(text.split())})

    async def _list_models(self, recorded: RecordedRequest) -> Response:
        data = [
            {"id": m, "object": "model", "created": 0, "owned_by": "paymaster-stub"}
            for m in self._models
        ]
        return json_response({"object": "list", "data": data})

    def _next_reply(self, recorded: RecordedRequest) -> Reply:
        with self._lock:
            if self._queue:
                return self._queue.popleft()
        responder = self.responder
        return self._default if responder is None else responder(recorded)

    async def _chat(self, recorded: RecordedRequest) -> Response:
        body = recorded.body
        if body is None or not isinstance(body.get("messages"), list):
            # A bad request does not use up a scripted reply: the script stays as pushed.
            message = "the body must be a JSON object with a 'messages' list"
            return error_response(status=400, message=message)
        reply = self._next_reply(recorded)
        # Read once: stop() may reset self._server while this request sleeps.
        server = self._server
        sleep = asyncio.sleep if server is None else server.sleep
        if reply.delay_s > 0:
            await sleep(reply.delay_s)
        completion_id, created = f"chatcmpl-stub-{next(self._ids)}", int(time.time())
        return respond(
            reply=reply, body=body, completion_id=completion_id, created=created, sleep=sleep
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Serve the default reply on 127.0.0.1 until SIGINT or SIGTERM; print ``READY <url>``."""
    parser = argparse.ArgumentParser(
        prog="python -m agents.stub_server",
        description="A scripted OpenAI-compatible chat server for tests and benchmarks.",
    )
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: a free one)")
    parser.add_argument("--text", default=DEFAULT_REPLY.text, help="text of every reply")
    args = parser.parse_args(argv)
    done = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    # Handled rather than left to kill the process, so the server shuts down cleanly.
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    with ScriptedModelServer(port=args.port, default=Reply(text=args.text)) as server:
        print(f"READY {server.base_url}", flush=True)
        done.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

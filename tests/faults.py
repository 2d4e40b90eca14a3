"""Fault injection on the Redis side: a TCP proxy between Paymaster and a real redis-server.

The proxy listens on a free port of 127.0.0.1 and forwards every connection
to the real server, byte for byte, on an event loop of its own thread (so a
test, sync or async, and worker subprocesses all reach it over real sockets).
It can

- **drop** every open connection at once (both sides are reset; clients
  reconnect at the next command),
- **refuse** for a while: drop every connection and stop listening, so new
  connections are refused (``ECONNREFUSED``, as when redis-server restarts),
  then listen again on the same port,
- do either **on a command**: when a command whose bytes contain given
  patterns has been executed by Redis, its reply is not delivered and the
  fault happens instead (the client cannot know whether it ran: the case
  that idempotent operations are for).

Usage::

    with RedisProxy(upstream_port=server.port) as proxy:
        url = proxy.url                 # give this to the process under test
        proxy.drop()
        proxy.refuse(2.0)               # returns at once; listening again in 2 s
        fired = proxy.on_command(b"commit", fault="refuse", seconds=2.0)
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar

from agents.stub_server import RecordedRequest
from orchestrator.redis_server import free_port
from tests.endpoint_files import write_toml

T = TypeVar("T")
Fault = Literal["drop", "refuse"]

_CHUNK = 65_536


@dataclass(slots=True)
class _Trigger:
    patterns: tuple[bytes, ...]
    fault: Fault
    seconds: float
    nth: int
    fired: threading.Event = field(default_factory=threading.Event)
    seen: int = 0


@dataclass(eq=False, slots=True)
class _Link:
    """One client connection and its upstream twin."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    armed: _Trigger | None = None  # a matching command went up; its reply is not forwarded

    def abort(self) -> None:
        for writer in (self.client, self.upstream):
            with contextlib.suppress(Exception):
                writer.transport.abort()


@dataclass(frozen=True, slots=True)
class FaultRecord:
    """A fault the proxy injected: what, when (monotonic) and for how long."""

    fault: Fault
    at_s: float
    seconds: float


class RedisProxy:
    """A TCP proxy in front of ``127.0.0.1:<upstream_port>`` that can cut Redis off."""

    def __init__(self, *, upstream_port: int, port: int | None = None) -> None:
        self.upstream_port = upstream_port
        self.port = port if port is not None else free_port()
        self.accepted = 0
        self.faults: list[FaultRecord] = []
        self._links: set[_Link] = set()
        self._triggers: list[_Trigger] = []
        self._server: asyncio.AbstractServer | None = None
        self._reopen: asyncio.TimerHandle | None = None
        self._refusing = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="proxy")
        self._listening = threading.Event()

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``: what the code under test connects to."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def listening(self) -> bool:
        """True unless the proxy is refusing connections right now."""
        return self._listening.is_set()

    # -- control, from any thread ---------------------------------------------------------

    def start(self) -> RedisProxy:
        """Start the proxy's thread and listen."""
        self._thread.start()
        self._call(self._listen())
        return self

    def stop(self) -> None:
        """Close every connection and stop the thread."""
        if not self._thread.is_alive():
            return
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def drop(self) -> None:
        """Reset every open connection now; new connections are accepted as before."""
        self._call(self._fault("drop", 0.0))

    def refuse(self, seconds: float) -> None:
        """Drop every connection and refuse new ones for ``seconds`` (returns at once)."""
        self._call(self._fault("refuse", seconds))

    def wait_listening(self, timeout: float = 10.0) -> bool:
        """Block until the proxy listens again after :meth:`refuse`."""
        return self._listening.wait(timeout)

    def on_command(
        self, *patterns: bytes, fault: Fault = "drop", seconds: float = 0.0, nth: int = 1
    ) -> threading.Event:
        """Arm a fault for the ``nth`` command containing every one of ``patterns``.

        The command reaches Redis and runs; its reply is withheld and the fault
        happens instead. Returns an event set once it fired.
        """
        trigger = _Trigger(patterns=patterns, fault=fault, seconds=seconds, nth=nth)
        self._loop.call_soon_threadsafe(self._triggers.append, trigger)
        return trigger.fired

    def __enter__(self) -> RedisProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- on the proxy's loop --------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, "127.0.0.1", self.port, reuse_address=True
        )
        self._refusing = False
        self._listening.set()

    async def _shutdown(self) -> None:
        if self._reopen is not None:
            self._reopen.cancel()
        await self._close_listener()
        for link in list(self._links):
            link.abort()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    async def _close_listener(self) -> None:
        self._listening.clear()
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _fault(self, fault: Fault, seconds: float) -> None:
        self.faults.append(FaultRecord(fault, time.monotonic(), seconds))
        if fault == "refuse":
            self._refusing = True
            if self._reopen is not None:
                self._reopen.cancel()
            await self._close_listener()
            self._reopen = self._loop.call_later(
                seconds, lambda: self._loop.create_task(self._listen())
            )
        for link in list(self._links):
            link.abort()
        self._links.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.transport.abort()
            return
        link = _Link(client=writer, upstream=up_writer)
        if self._refusing:  # a fault began while this one was connecting upstream
            link.abort()
            return
        self._links.add(link)
        try:
            await asyncio.gather(self._up(reader, link), self._down(up_reader, link))
        except (OSError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # dropped, or the proxy is stopping: this connection is over either way
        finally:
            self._links.discard(link)
            link.abort()

    async def _up(self, reader: asyncio.StreamReader, link: _Link) -> None:
        while data := await reader.read(_CHUNK):
            # A command (or a pipeline) is one write of the client, one read here.
            for trigger in self._triggers:
                if all(p in data for p in trigger.patterns):
                    trigger.seen += 1
                    if trigger.seen == trigger.nth:
                        link.armed = trigger
                        self._triggers.remove(trigger)
                    break
            link.upstream.write(data)
            await link.upstream.drain()
        link.abort()

    async def _down(self, reader: asyncio.StreamReader, link: _Link) -> None:
        while data := await reader.read(_CHUNK):
            trigger = link.armed
            if trigger is not None:
                await self._fault(trigger.fault, trigger.seconds)
                trigger.fired.set()
                return
            link.client.write(data)
            await link.client.drain()
        link.abort()


# -- worker processes against the proxy ----------------------------------------------------

REPO = Path(__file__).resolve().parents[1]

#: The environment variable whose value the stub sees as the bearer key: the worker's name.
KEY_ENV = "STUB_KEY"


def keyed_endpoints(path: Path, base_url: str) -> Path:
    """An endpoints file for the stub whose key comes from :data:`KEY_ENV` (who is calling)."""
    return write_toml(path, base_url, api_key_env=KEY_ENV)


def caller(request: RecordedRequest) -> str:
    """The name of the worker that made a request to the stub (its bearer key)."""
    return request.headers.get("authorization", "").removeprefix("Bearer ")


class WorkerProcess:
    """``python -m orchestrator.cli worker --name <name>``; its log goes to a file.

    It sends ``key`` (default: its name) as its API key, so the stub can tell who called.
    """

    def __init__(
        self, env: Mapping[str, str], log: Path, name: str, *, key: str | None = None
    ) -> None:
        self.name = name
        self.log = log
        self._file = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "worker", "--grace", "10", "--name", name],
            env={**env, KEY_ENV: key or name},
            cwd=REPO,
            stdout=self._file,
            stderr=subprocess.STDOUT,
        )

    @property
    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc.poll() is None

    def text(self) -> str:
        """Everything it logged so far."""
        return self.log.read_text(encoding="utf-8", errors="replace")

    def count(self, line: str) -> int:
        """How many times ``line`` appears in its log."""
        return self.text().count(line)

    async def ready(self, timeout: float = 20.0) -> None:
        """Wait for its ``ready`` line."""
        deadline = time.monotonic() + timeout
        while " ready (concurrency" not in self.text():
            assert self.alive, self.text()
            assert time.monotonic() < deadline, f"worker {self.name} did not start"
            await asyncio.sleep(0.05)

    def stop(self) -> None:
        """Kill it (if it still runs) and close its log."""
        if self.alive:
            self.proc.kill()
        self.proc.wait(10)
        self._file.close()

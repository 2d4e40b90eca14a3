"""What a user meets at the command line: exit codes, progress, readable trees, cancel.

Each command runs as a real process against a real redis-server and a
scripted OpenAI-compatible server; Redis "down" is a port nothing listens on,
the model server "down" a stopped server.
"""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from rich.console import Console

from agents.stub_server import ScriptedModelServer
from budgets import Budget, LedgerEvent
from orchestrator.api import Paymaster
from orchestrator.display import event_line, ledger_tree
from orchestrator.progress import Narrator
from orchestrator.records import Status
from orchestrator.redis_server import free_port
from tests.endpoint_files import write_toml
from tests.test_orchestrator import cli, responder, sub


@pytest.fixture
async def pm(redis_url: str, stub: ScriptedModelServer, tmp_path: Path) -> AsyncIterator[Paymaster]:
    """The API on the test Redis and the scripted server, configured as a user would."""
    config = write_toml(tmp_path / "e.toml", stub.base_url)
    paymaster = Paymaster(
        redis_url=redis_url, env={"HOME": str(tmp_path), "PAYMASTER_CONFIG": str(config)}
    )
    yield paymaster
    await paymaster.aclose()


COMMANDS = [
    ("status", "t1"),
    ("ledger", "t1"),
    ("events", "t1"),
    ("feedback", "t1", "s1", "--ok"),
    ("stats",),
    ("tenants",),
    ("submit", "hello", "--tokens", "4000"),
    ("run", "hello", "--tokens", "4000"),
]


def _one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert lines, "no message at all"
    assert lines[-1].startswith("error: "), stderr
    return lines[-1]


@pytest.mark.parametrize("args", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_every_command_exits_4_with_one_line_when_redis_is_unreachable(
    env: dict[str, str], args: tuple[str, ...]
) -> None:
    down = {**env, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    done = cli(down, *args)
    assert done.returncode == 4, (done.stdout, done.stderr)
    line = _one_line_error(done.stderr)
    assert "Redis" in line
    assert "REDIS_URL" in line


def test_run_exits_4_when_the_model_server_is_down_and_returns_the_funding(
    env: dict[str, str], redis_url: str, tmp_path: Path
) -> None:
    gone = ScriptedModelServer().start()
    url = gone.base_url
    gone.stop()
    config = write_toml(tmp_path / "down.toml", url)
    done = cli({**env, "PAYMASTER_CONFIG": str(config)}, "run", "hello", "--tokens", "4000")
    assert done.returncode == 4, (done.stdout, done.stderr)
    line = _one_line_error(done.stderr)
    assert "model server" in line
    assert "trying the next one" not in done.stderr  # there is no other endpoint
    task_id = done.stderr.split("task id:", 1)[1].split()[0]
    shown = cli(env, "status", task_id, "--json")
    record = json.loads(shown.stdout)
    assert record["status"] == "failed"  # not left running for ever
    tree = json.loads(cli(env, "ledger", task_id, "--json").stdout)
    assert tree["root"]["closed"] is True


def test_bad_input_exits_2_and_prints_no_task_id(env: dict[str, str]) -> None:
    for args in (("run", ""), ("run", "hi", "--tokens", "-5"), ("submit", "   ")):
        done = cli(env, *args)
        assert done.returncode == 2, (args, done.stderr)
        assert "task id" not in done.stdout + done.stderr
        _one_line_error(done.stderr)


def test_an_unknown_task_exits_3(env: dict[str, str]) -> None:
    for cmd in ("status", "ledger", "events"):
        done = cli(env, cmd, "no-such-task")
        assert done.returncode == 3, (cmd, done.stderr)
        _one_line_error(done.stderr)


def test_run_shows_progress_then_the_answer_and_a_tree_that_fits_80_columns(
    env: dict[str, str], stub: ScriptedModelServer
) -> None:
    stub.responder = responder([sub("a"), sub("b", "a")])
    done = cli(env, "run", "Two steps, please.", "--tokens", "20000")
    assert done.returncode == 0, done.stderr
    progress = done.stderr
    for expected in (
        "budget 20,000 tokens",
        "plan call paid",
        "2 subtasks: a, b",
        "a            started with",
        "b            done;",
        "tokens left over, for the answer",
        "final answer call paid",
        "closed: spent",
    ):
        assert expected in progress, (expected, progress)
    assert progress.index("a            done;") < progress.index("b            started")
    tree_lines = done.stdout.split("answer:", 1)[1].strip().splitlines()[1:]
    assert all(len(line) <= 80 for line in tree_lines), tree_lines
    assert (
        sum(
            "manager" in line or line.lstrip("│├└─ ").startswith(("a.", "b."))
            for line in tree_lines
        )
        == 3
    )
    assert any("for the answer" in line for line in tree_lines)


def test_events_follow_ends_when_the_task_is_final(
    env: dict[str, str], stub: ScriptedModelServer, tmp_path: Path
) -> None:
    stub.responder = responder([sub("a")])
    run = cli(env, "run", "One step.", "--tokens", "9000")
    task_id = run.stderr.split("task id:", 1)[1].split()[0]
    done = cli(env, "events", task_id, "--follow", timeout=20)
    assert done.returncode == 0, done.stderr
    assert " close " in done.stdout
    assert "root" in done.stdout
    assert " n$" not in done.stdout
    assert "-1" not in done.stdout
    assert "∞" in done.stdout  # the root's unlimited dollars


async def test_a_queued_task_cancelled_with_no_worker_ends_at_once_and_funds_come_back(
    pm: Paymaster, stub: ScriptedModelServer
) -> None:
    await pm.aset_tenant("acme", Budget(tokens=10_000))
    task = await pm.asubmit("Never taken.", budget=Budget(tokens=4_000), tenant="acme")
    assert (await pm.books.tenant("acme")).funded_tokens == 4_000
    assert await pm.acancel(task.id) is True
    record = await task.result(timeout=1)
    assert record.status is Status.CANCELLED
    assert (await pm.books.tenant("acme")).funded_tokens == 0
    assert (await pm.aledger(task.id)).root.closed
    assert await pm.acancel(task.id) is False  # already final
    assert stub.requests == []


async def test_a_worker_never_runs_a_task_cancelled_while_queued(
    pm: Paymaster, stub: ScriptedModelServer
) -> None:
    stub.responder = responder([sub("a")])
    task = await pm.asubmit("Cancelled first.", budget=Budget(tokens=4_000))
    await pm.acancel(task.id)
    record = await pm.runtime().execute(task.id)
    assert record.status is Status.CANCELLED
    assert record.deliveries == 0
    assert stub.requests == []


async def test_the_tree_escapes_markup_and_emoji_codes_in_ids(
    pm: Paymaster, stub: ScriptedModelServer
) -> None:
    stub.responder = responder([sub("a")])
    record = await pm.arun("One.", budget=Budget(tokens=9_000), task_id="x:b:y")
    tree = await pm.aledger(record.id)
    buffer = io.StringIO()
    Console(file=buffer, width=80, emoji=False).print(ledger_tree(tree))
    assert buffer.getvalue().startswith("task x:b:y [closed]")  # no emoji, no markup eaten


def _event(op: str, account: str, tokens: int, **extra: str) -> LedgerEvent:
    return LedgerEvent(
        id="1-0", op=op, account=account, tokens=tokens, nanos=-1, op_id="o", extra=extra
    )


def test_unlimited_amounts_read_as_infinity() -> None:
    line = event_line(_event("open", "root", -1), "12:00:00")
    assert line.count("∞") == 2
    assert "-1" not in line


def test_the_narrator_keeps_the_spend_and_names_tries() -> None:
    narrator = Narrator()
    narrator.line(_event("open", "root", 1_000))
    told = narrator.line(
        LedgerEvent(
            id="2-0",
            op="commit",
            account="root/s1.1.2",
            tokens=300,
            nanos=0,
            op_id="r",
            tags={"endpoint": "big"},
        )
    )
    assert told is not None
    assert told.startswith("s1 (try 2)")
    assert "call paid 300 tokens on big" in told
    assert narrator.left_text == "left 700/1,000 tokens"
    assert narrator.line(_event("reserve", "root/s1.1.2", 10)) is None

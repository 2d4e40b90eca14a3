"""End-to-end tests of the orchestrator: real Redis, a scripted OpenAI server, real workers.

Worker processes are started as a user would (``python -m orchestrator.cli worker``) with
small visibility timeouts, heartbeats and leases, so takeover after a crash happens in about
a second.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from agents.endpoints import Endpoint, EndpointsConfig
from agents.stub_server import RecordedRequest, Reply, Responder, ScriptedModelServer
from budgets import Budget, TaskTree
from budgets.connection import redis_client
from budgets.errors import InvalidName, UnknownTenant
from budgets.keys import ROOT
from budgets.policy import Menu, Need, Pool, Tiered
from orchestrator.api import Paymaster
from orchestrator.errors import InvalidTask, TaskNotFound
from orchestrator.queue import TaskQueue
from orchestrator.records import Records, Status

REPO = Path(__file__).resolve().parents[1]
FINAL = "The final answer, from synthesis."
#: A review that rejects nothing.
ACCEPT_ALL = json.dumps({"reject": []})

Sub = dict[str, Any]


def sub(sid: str, *deps: str, difficulty: int = 2) -> Sub:
    return {"id": sid, "instruction": f"do {sid}", "difficulty": difficulty, "depends_on": [*deps]}


def role_of(req: RecordedRequest) -> str:
    """``plan``, ``synth``, ``review`` or the id of the subtask a worker call is for."""
    assert req.body is not None
    messages = req.body["messages"]
    system = str(messages[0]["content"])
    if "Split the user's task" in system:
        return "plan"
    if "Write the final answer" in system:
        return "synth"
    if "You review workers' answers" in system:
        return "review"
    user = str(messages[-1]["content"])
    return user.split("Your subtask (", 1)[1].split(")", 1)[0]


def worker_text(sid: str) -> str:
    return f"answer of {sid}"


def responder(
    subtasks: list[Sub], worker: Callable[[str, RecordedRequest], Reply] | None = None
) -> Responder:
    """Plans ``subtasks``, answers each worker call (``worker`` may override), synthesizes."""
    plan = json.dumps({"subtasks": subtasks})

    def respond(request: RecordedRequest) -> Reply:
        role = role_of(request)
        if role == "plan":
            return Reply(text=plan)
        if role == "synth":
            return Reply(text=FINAL)
        if role == "review":
            return Reply(text=ACCEPT_ALL)
        if worker is not None:
            return worker(role, request)
        return Reply(text=worker_text(role))

    return respond


def calls_for(srv: ScriptedModelServer, role: str) -> list[RecordedRequest]:
    return [r for r in srv.requests if r.path.endswith("/chat/completions") and role_of(r) == role]


def prompt_of(req: RecordedRequest) -> str:
    assert req.body is not None
    return str(req.body["messages"][-1]["content"])


def assert_books_clean(tree: TaskTree, budget: Budget) -> None:
    """Nothing reserved or open; spent within the limit; the root's totals add up."""
    accounts = list(tree.walk())
    assert all(a.closed for a in accounts), [a.path for a in accounts if not a.closed]
    assert all(a.open_reservations == 0 and not a.reservations for a in accounts)
    root = tree.root
    assert root.total_reserved_tokens == 0
    assert root.total_reserved_nanos == 0
    assert root.total_spent_tokens == sum(a.spent_tokens for a in accounts)
    assert root.total_spent_nanos == sum(a.spent_nanos for a in accounts)
    assert root.spent_tokens + root.closed_children_spent_tokens == root.total_spent_tokens
    assert root.spent_nanos + root.closed_children_spent_nanos == root.total_spent_nanos
    if budget.tokens is not None:
        assert root.total_spent_tokens <= budget.tokens
    if budget.usd is not None:
        assert root.total_spent_usd <= budget.usd


def stub_config(srv: ScriptedModelServer) -> EndpointsConfig:
    return EndpointsConfig(
        endpoints=[
            Endpoint(
                name="stub",
                base_url=srv.base_url,
                model="m",
                kind="remote",
                input_usd_per_mtok="1",  # type: ignore[arg-type]
                output_usd_per_mtok="2",  # type: ignore[arg-type]
                max_retries=0,
                max_concurrency=16,
            )
        ]
    )


@pytest.fixture
async def pm(redis_url: str, stub: ScriptedModelServer, tmp_path: Path) -> AsyncIterator[Paymaster]:
    paymaster = Paymaster(
        redis_url=redis_url, config=stub_config(stub), env={"HOME": str(tmp_path)}
    )
    yield paymaster
    await paymaster.aclose()


class WorkerProc:
    """``python -m orchestrator.cli worker`` in a subprocess; its stderr goes to a file."""

    def __init__(self, env: Mapping[str, str], log: Path, *args: str) -> None:
        self.log = log
        self._file = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "worker", "--grace", "10", *args],
            # A worker that does not exit in time is sent SIGABRT: the log then
            # holds every thread's stack (see exit_code).
            env={**env, "PYTHONFAULTHANDLER": "1"},
            cwd=REPO,
            stdout=self._file,
            stderr=subprocess.STDOUT,
        )

    async def ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while b" ready (concurrency" not in self.log.read_bytes():
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "the worker did not start"
            await asyncio.sleep(0.05)

    async def exit_code(self, timeout: float) -> int:
        """Its exit code; if it is still running after ``timeout``, its stacks fail the test."""
        try:
            return await asyncio.to_thread(self.proc.wait, timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGABRT)
            self.proc.wait(10)
            raise AssertionError(
                f"the worker was still running {timeout:.0f}s later:\n{self.log.read_text()}"
            ) from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._file.close()


@pytest.fixture
def workers(env: dict[str, str], tmp_path: Path) -> Iterator[Callable[..., WorkerProc]]:
    started: list[WorkerProc] = []

    def start(*args: str, **extra_env: str) -> WorkerProc:
        w = WorkerProc({**env, **extra_env}, tmp_path / f"worker{len(started)}.log", *args)
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()


async def wait_for(check: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what or check}"
        await asyncio.sleep(0.02)


# -- in-process runs --------------------------------------------------------------------------


@pytest.mark.both_redis
async def test_run_succeeds_within_budget_with_balanced_books(
    pm: Paymaster, stub: ScriptedModelServer
) -> None:
    stub.responder = responder([sub("a"), sub("b"), sub("c", "a", "b")])
    budget = Budget(tokens=20_000, usd="0.1")
    rec = await pm.arun("do the thing", budget=budget)
    assert rec.status is Status.SUCCEEDED
    assert rec.answer == FINAL
    assert rec.deliveries == 1
    tree = await pm.aledger(rec.id)
    assert_books_clean(tree, budget)
    assert rec.spent is not None
    assert rec.spent.tokens == tree.root.total_spent_tokens > 0
    paths = {a.path for a in tree.walk()}
    assert paths == {ROOT, *(f"{ROOT}/{s}.1.1" for s in ("a", "b", "c", "manager"))}
    assert len(calls_for(stub, "plan")) == len(calls_for(stub, "synth")) == 1
    # Synthesis saw every worker answer.
    synth = prompt_of(calls_for(stub, "synth")[0])
    assert all(worker_text(s) in synth for s in "abc")


async def test_a_task_someone_else_finished_keeps_its_status(pm: Paymaster) -> None:
    records = Records(pm.books.redis)
    await records.create("t1", task="x", budget=Budget(tokens=10), tenant=None)
    first, written = await records.finish(
        "t1", status=Status.CANCELLED, answer=None, error=None, spent=None, retention_s=60
    )
    assert written
    assert first.status is Status.CANCELLED
    again, written = await records.finish(
        "t1", status=Status.SUCCEEDED, answer="late", error=None, spent=None, retention_s=60,
        unless_final=True,
    )  # fmt: skip
    assert not written
    assert again == first == await records.get("t1")


async def test_dependencies_come_first_and_their_answers_reach_the_prompt(
    pm: Paymaster, stub: ScriptedModelServer
) -> None:
    stub.responder = responder([sub("a"), sub("b"), sub("c", "a", "b")])
    rec = await pm.arun("do the thing", budget=Budget(tokens=20_000))
    assert rec.status is Status.SUCCEEDED
    roles = [role_of(r) for r in stub.requests]
    assert roles.index("c") > roles.index("a")
    assert roles.index("c") > roles.index("b")
    (c_call,) = calls_for(stub, "c")
    assert worker_text("a") in prompt_of(c_call)
    assert worker_text("b") in prompt_of(c_call)
    (a_call,) = calls_for(stub, "a")
    assert worker_text("b") not in prompt_of(a_call)


async def test_leftovers_of_a_wave_go_to_the_pending_subtasks(
    pm: Paymaster, stub: ScriptedModelServer
) -> None:
    stub.responder = responder([sub("a"), sub("b"), sub("c", "a", "b")])
    rec = await pm.arun("do the thing", budget=Budget(tokens=20_000))
    tree = await pm.aledger(rec.id)
    manager = tree.account(f"{ROOT}/manager.1.1")
    a, c = tree.account(f"{ROOT}/a.1.1"), tree.account(f"{ROOT}/c.1.1")
    # The pool after the manager's synthesis reserve, split over wave 1 (a, b) with c counted
    # as still to come: what c would have got had it been split with the first wave.
    policy = Tiered()
    reserve = policy.synthesis_reserve(Pool(tokens=20_000, nanos=None)).tokens
    assert reserve is not None
    pool = Pool(tokens=20_000 - reserve, nanos=None)
    grants = policy.split(pool, [Need("a", 2), Need("b", 2)], pending_after=1, menu=Menu())
    share = grants[0].tokens
    assert share is not None
    assert a.limit_tokens == share
    assert a.spent_tokens < share // 10  # wave 1 spent little...
    assert c.limit_tokens is not None
    assert c.limit_tokens > 2 * share  # ...so c gets what a and b left, not its first share
    assert manager.spent_tokens > 0


def _long_reply_for(target: str) -> Callable[[str, RecordedRequest], Reply]:
    def worker(sid: str, req: RecordedRequest) -> Reply:
        if sid == target:
            return Reply(text="word " * 5000)  # cut at max_tokens: finish_reason "length"
        return Reply(text=worker_text(sid))

    return worker


async def test_cut_short_answer_is_escalated_when_the_pool_can_pay(
    pm: Paymaster, stub: ScriptedModelServer
) -> None:
    stub.responder = responder([sub("a"), sub("b")], _long_reply_for("a"))
    budget = Budget(tokens=20_000)
    rec = await pm.arun("do the thing", budget=budget)
    tree = await pm.aledger(rec.id)
    paths = {acct.path for acct in tree.walk()}
    assert f"{ROOT}/a.1.2" in paths
    assert f"{ROOT}/b.1.2" not in paths
    a1, a2 = tree.account(f"{ROOT}/a.1.1"), tree.account(f"{ROOT}/a.1.2")
    a_calls = calls_for(stub, "a")
    assert len(a_calls) == 2
    assert a_calls[0].body is not None
    assert a_calls[1].body is not None
    assert a_calls[1].body["max_tokens"] > a_calls[0].body["max_tokens"]
    assert a2.spent_tokens > a1.spent_tokens
    assert_books_clean(tree, budget)


async def test_no_escalation_when_the_pool_cannot_pay(
    pm: Paymaster, stub: ScriptedModelServer
) -> None:
    stub.responder = responder([sub("a", difficulty=5)], _long_reply_for("a"))
    # Enough to plan and run a once (about 1,360 tokens, cut short), not to pay twice that.
    budget = Budget(tokens=4_400)
    rec = await pm.arun("do the thing", budget=budget)
    tree = await pm.aledger(rec.id)
    paths = {acct.path for acct in tree.walk()}
    assert f"{ROOT}/a.1.1" in paths
    assert f"{ROOT}/a.1.2" not in paths
    assert len(calls_for(stub, "a")) == 1
    assert tree.account(f"{ROOT}/a.1.1").spent_tokens > 1_000  # it was cut short, not refused
    assert rec.status.final
    assert rec.answer  # the cut-short text is still the best answer there is
    assert_books_clean(tree, budget)


@pytest.mark.both_redis
async def test_cancel_stops_a_running_task_and_closes_its_books(
    pm: Paymaster, stub: ScriptedModelServer
) -> None:
    def slow(sid: str, req: RecordedRequest) -> Reply:
        return Reply(text=worker_text(sid), delay_s=1.0)

    stub.responder = responder([sub("a"), sub("b"), sub("c", "a", "b")], slow)
    budget = Budget(tokens=20_000)
    run = asyncio.create_task(pm.arun("do the thing", budget=budget, task_id="cancelme"))
    await wait_for(lambda: calls_for(stub, "a"), what="the first worker call")
    assert await pm.acancel("cancelme") is True
    rec = await asyncio.wait_for(run, 10)
    assert rec.status is Status.CANCELLED
    assert not calls_for(stub, "c")
    assert not calls_for(stub, "synth")
    assert_books_clean(await pm.aledger("cancelme"), budget)
    assert await pm.acancel("cancelme") is False  # already final


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.both_redis
async def test_bad_input_is_refused_and_stores_nothing(pm: Paymaster, redis_url: str) -> None:
    client = redis_client(redis_url)
    try:
        before = await client.dbsize()
        bad: list[tuple[Callable[[], Any], type[Exception]]] = [
            (lambda: pm.arun("", budget=Budget(tokens=100)), InvalidTask),
            (lambda: pm.arun("   \n", budget=Budget(tokens=100)), InvalidTask),
            (lambda: pm.asubmit("x" * 20_001, budget=Budget(tokens=100)), InvalidTask),
            (lambda: pm.arun("task", budget=Budget()), InvalidTask),
            (lambda: pm.asubmit("task", budget=Budget()), InvalidTask),
            (lambda: pm.arun("task", budget={"tokens": 5}), InvalidTask),  # type: ignore[arg-type]
            (lambda: pm.arun("task", budget=Budget(tokens=100), tenant="nobody"), UnknownTenant),
            (lambda: pm.asubmit("task", budget=Budget(tokens=100), tenant="no/pe"), InvalidName),
            (lambda: pm.arun("task", budget=Budget(tokens=100), task_id="bad id!"), InvalidName),
            (lambda: pm.asubmit("task", budget=Budget(tokens=100), task_id="a/b"), InvalidName),
            (lambda: pm.arecord("bad id!"), InvalidName),
            (lambda: pm.arecord("nosuchtask"), TaskNotFound),
            (lambda: pm.aledger("nosuchtask"), TaskNotFound),
            (lambda: pm.aevents("nosuchtask"), TaskNotFound),
            (lambda: pm.acancel("nosuchtask"), TaskNotFound),
        ]
        for call, error in bad:
            with pytest.raises(error):
                await call()
            assert await client.dbsize() == before
    finally:
        await client.aclose()


@pytest.mark.both_redis
async def test_a_used_task_id_is_refused_and_the_task_left_alone(
    pm: Paymaster, stub: ScriptedModelServer
) -> None:
    stub.responder = responder([sub("a")])
    rec = await pm.arun("first", budget=Budget(tokens=5_000), task_id="dup")
    with pytest.raises(Exception):  # noqa: B017, PT011 - TaskExists or ValueError
        await pm.asubmit("second", budget=Budget(tokens=5_000), task_id="dup")
    again = await pm.arecord("dup")
    assert again.task == "first"
    assert again.status is Status.SUCCEEDED
    assert again.spent == rec.spent


# -- worker processes -----------------------------------------------------------------------


@pytest.mark.both_redis
async def test_submit_is_run_by_a_worker_process(
    pm: Paymaster, stub: ScriptedModelServer, workers: Callable[..., WorkerProc]
) -> None:
    stub.responder = responder([sub("a"), sub("b", "a")])
    w = workers()
    budget = Budget(tokens=20_000, usd="0.1")
    task = await pm.asubmit("do the thing", budget=budget)
    assert (await task.astatus()).status is Status.QUEUED
    await w.ready()
    rec = await task.result(timeout=15)
    assert rec.status is Status.SUCCEEDED, rec.error
    assert rec.answer == FINAL
    assert_books_clean(await pm.aledger(task.id), budget)


@pytest.mark.both_redis
async def test_tasks_submitted_from_several_processes_are_run_by_two_workers(
    pm: Paymaster,
    stub: ScriptedModelServer,
    workers: Callable[..., WorkerProc],
    env: dict[str, str],
) -> None:
    stub.responder = responder([sub("a"), sub("b"), sub("c", "a")])
    await pm.aset_tenant("acme", Budget(tokens=200_000), period="none")
    a, b = workers(), workers()
    await a.ready()
    await b.ready()

    def submit(n: int) -> str:
        done = cli(env, "submit", f"task {n}", "--tokens", "20000", "--tenant", "acme")
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout.strip()

    ids: list[str] = []
    for _round in range(2):  # three submitting processes at once, twice
        ids += await asyncio.gather(*(asyncio.to_thread(submit, n) for n in range(3)))
    assert len(set(ids)) == 6
    records = [await pm.await_final(task_id, timeout=60) for task_id in ids]
    assert all(r.status is Status.SUCCEEDED for r in records), [r.error for r in records]
    spent = 0
    for task_id in ids:
        tree = await pm.aledger(task_id)
        assert_books_clean(tree, Budget(tokens=20_000))
        spent += tree.root.total_spent_tokens
    view = await pm.books.tenant("acme")
    assert view.funded_tokens == 0  # every task's funding came back
    assert view.spent_tokens == spent  # and what they spent reached the tenant once
    logs = a.log.read_text() + b.log.read_text()
    assert all(logs.count(f"took task {task_id}") == 1 for task_id in ids)


@pytest.mark.both_redis
async def test_kill_9_mid_task_another_worker_finishes_without_paying_twice(
    pm: Paymaster,
    stub: ScriptedModelServer,
    workers: Callable[..., WorkerProc],
    redis_url: str,
) -> None:
    lock = threading.Lock()
    b_calls = [0]

    def worker(sid: str, req: RecordedRequest) -> Reply:
        if sid == "b":
            with lock:
                b_calls[0] += 1
                first = b_calls[0] == 1
            if first:  # the first worker dies while waiting for this one
                return Reply(text=worker_text(sid), delay_s=30)
        return Reply(text=worker_text(sid))

    stub.responder = responder([sub("a"), sub("b"), sub("c", "a", "b")], worker)
    a = workers("--name", "worker-a")
    budget = Budget(tokens=20_000, usd="0.1")
    task = await pm.asubmit("do the thing", budget=budget)
    await a.ready()
    await wait_for(lambda: calls_for(stub, "b"), what="worker A calling for b")
    b = workers("--name", "worker-b")  # boots while A works; takes over once A is silent
    records = Records(pm.books.redis)

    async def a_saved() -> bool:
        return "a" in await records.load_results(task.id)

    await wait_for(a_saved, what="a's result saved")
    a.proc.send_signal(signal.SIGKILL)
    assert a.proc.wait(5) == -signal.SIGKILL
    await b.ready()
    rec = await task.result(timeout=20)
    assert rec.status is Status.SUCCEEDED, rec.error
    assert rec.deliveries == 2
    assert len(calls_for(stub, "plan")) == 1  # the saved plan was reused
    assert len(calls_for(stub, "a")) == 1  # a was paid for once
    assert len(calls_for(stub, "b")) == 2
    tree = await pm.aledger(task.id)
    assert_books_clean(tree, budget)
    paths = {acct.path for acct in tree.walk()}
    assert {f"{ROOT}/b.1.1", f"{ROOT}/b.2.1", f"{ROOT}/c.2.1"} <= paths
    assert f"{ROOT}/a.2.1" not in paths
    assert await TaskQueue(pm.books.redis).dead() == []


async def test_sigterm_lets_the_running_task_finish_then_exits_0(
    pm: Paymaster, stub: ScriptedModelServer, workers: Callable[..., WorkerProc]
) -> None:
    def slow(sid: str, req: RecordedRequest) -> Reply:
        return Reply(text=worker_text(sid), delay_s=1.0)

    stub.responder = responder([sub("a")], slow)
    w = workers()
    task = await pm.asubmit("do the thing", budget=Budget(tokens=20_000))
    await w.ready()
    await wait_for(lambda: calls_for(stub, "a"), what="the slow worker call")
    w.proc.send_signal(signal.SIGTERM)
    # The call ends a second later and the task with it; the grace (10 s) and
    # the hand-back after it (up to 5 s) bound the exit on a loaded machine.
    code = await w.exit_code(timeout=30)
    assert code == 0, w.log.read_text()
    rec = await pm.arecord(task.id)
    assert rec.status is Status.SUCCEEDED
    assert rec.answer == worker_text("a")  # one subtask: its answer is the task's
    log = w.log.read_text()
    assert f"took task {task.id}" in log
    assert f"finished task {task.id}: succeeded" in log
    assert "HTTP Request" not in log  # httpx's per-request lines are off


@pytest.mark.both_redis
async def test_a_task_that_always_fails_is_dead_lettered(
    pm: Paymaster,
    stub: ScriptedModelServer,
    workers: Callable[..., WorkerProc],
) -> None:
    stub.responder = lambda request: Reply(text="nope", status=400)
    w = workers(PAYMASTER_MAX_DELIVERIES="2")
    budget = Budget(tokens=20_000)
    task = await pm.asubmit("doomed", budget=budget)
    await w.ready()
    rec = await task.result(timeout=15)
    assert rec.status is Status.FAILED
    assert rec.error
    assert rec.deliveries == 2
    dead = await TaskQueue(pm.books.redis).dead()
    assert [d["task_id"] for d in dead] == [task.id]
    assert_books_clean(await pm.aledger(task.id), budget)


# -- the command line -----------------------------------------------------------------------


def cli(
    env: Mapping[str, str], *args: str, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        env=dict(env),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


async def test_cli_run_prints_the_answer_and_ledger_json_parses(
    env: dict[str, str], stub: ScriptedModelServer
) -> None:
    stub.responder = responder([sub("a"), sub("b")])
    done = await asyncio.to_thread(cli, env, "run", "do the thing", "--tokens", "20000")
    assert done.returncode == 0, done.stderr
    assert FINAL in done.stdout
    # The id is printed with the progress, on stderr, once the task exists.
    task_id = done.stderr.split("task id:", 1)[1].split()[0]
    shown = await asyncio.to_thread(cli, env, "ledger", task_id, "--json")
    assert shown.returncode == 0, shown.stderr
    tree = json.loads(shown.stdout)
    assert tree["task_id"] == task_id
    assert tree["root"]["path"] == ROOT
    assert tree["root"]["limit_tokens"] == 20_000


@pytest.mark.both_redis
async def test_cli_submit_wait_with_a_worker(
    env: dict[str, str], stub: ScriptedModelServer, workers: Callable[..., WorkerProc]
) -> None:
    stub.responder = responder([sub("a")])
    workers()
    done = await asyncio.to_thread(
        cli, env, "submit", "do the thing", "--tokens", "20000", "--wait", "--timeout", "20"
    )
    assert done.returncode == 0, done.stderr
    # One subtask's finished answer is the task's answer: no synthesis call restates it.
    assert worker_text("a") in done.stdout
    assert "succeeded" in done.stdout
    assert "started with" in done.stderr
    assert "call paid" in done.stderr


async def test_cli_errors_have_their_exit_codes(env: dict[str, str], redis_url: str) -> None:
    client = redis_client(redis_url)
    before = await client.dbsize()
    unknown, empty = await asyncio.gather(
        asyncio.to_thread(cli, env, "status", "nosuchtask"),
        asyncio.to_thread(cli, env, "run", ""),
    )
    assert unknown.returncode == 3, unknown.stderr
    assert "nosuchtask" in unknown.stderr
    assert empty.returncode == 2, empty.stderr
    assert "empty" in empty.stderr
    assert await client.dbsize() == before
    await client.aclose()

"""The hierarchy: dataflow scheduling, nested managers, reviews and honest final statuses.

Every test runs a real task over HTTP (the scripted model server) and Redis (the real
redis-server fixture), and checks the books at every level of the account tree.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from agents.stub_server import RecordedRequest, Reply, Responder, ScriptedModelServer
from budgets import Budget
from budgets.keys import ROOT
from budgets.policy import Pool
from budgets.tree import AccountView, TaskTree
from orchestrator.api import Paymaster
from orchestrator.flow import Flow, TaskRun
from orchestrator.records import Records, Status
from tests.test_orchestrator import (
    ACCEPT_ALL,
    FINAL,
    WorkerProc,
    assert_books_clean,
    cli,
    stub_config,
    wait_for,
    worker_text,
    workers,
)

__all__ = ["workers"]  # the fixture, imported for the kill -9 test

Sub = dict[str, Any]
Worker = Callable[[str, RecordedRequest], Reply]


def sub(sid: str, *deps: str, difficulty: int = 2, composite: bool = False) -> Sub:
    return {
        "id": sid,
        "instruction": f"do {sid}",
        "difficulty": difficulty,
        "depends_on": [*deps],
        "composite": composite,
    }


def role_of(req: RecordedRequest) -> str:
    """``plan:<level>``, ``synth:<level>``, ``review`` or the work id of a worker call.

    A level is ``""`` for the task, else the composite subtask whose sub-manager calls.
    """
    assert req.body is not None
    messages = req.body["messages"]
    system, user = str(messages[0]["content"]), str(messages[-1]["content"])
    if "Split the user's task" in system:
        return f"plan:{_level_of(user)}"
    if "Write the final answer" in system:
        return f"synth:{_level_of(user.removeprefix('Task:').strip())}"
    if "You review workers' answers" in system:
        return "review"
    return user.split("Your subtask (", 1)[1].split(")", 1)[0]


def _level_of(text: str) -> str:
    # A sub-manager's text starts with the composite's instruction, "do <id>".
    first = text.strip().splitlines()[0]
    return first.removeprefix("do ") if first.startswith("do ") else ""


def responder(
    plans: dict[str, list[Sub]],
    worker: Worker | None = None,
    review: Callable[[RecordedRequest], Reply] | None = None,
) -> Responder:
    """Plans each level from ``plans`` (by level), answers workers, reviews, synthesizes."""

    def respond(request: RecordedRequest) -> Reply:
        role = role_of(request)
        if role.startswith("plan:"):
            return Reply(text=json.dumps({"subtasks": plans[role.removeprefix("plan:")]}))
        if role.startswith("synth:"):
            level = role.removeprefix("synth:")
            return Reply(text=f"synthesis of {level}" if level else FINAL)
        if role == "review":
            return review(request) if review is not None else Reply(text=ACCEPT_ALL)
        if worker is not None:
            return worker(role, request)
        return Reply(text=worker_text(role))

    return respond


def roles(srv: ScriptedModelServer) -> list[str]:
    return [role_of(r) for r in srv.requests if r.path.endswith("/chat/completions")]


def assert_level_balanced(acct: AccountView) -> None:
    """Below every account: closed, within its limit, and its children's spend accounted."""
    assert acct.closed, acct.path
    for child in acct.children:
        assert_level_balanced(child)
    spent = acct.total_spent_tokens
    assert spent == acct.spent_tokens + sum(c.total_spent_tokens for c in acct.children)
    if acct.limit_tokens is not None:
        assert spent <= acct.limit_tokens, acct.path


def paths(tree: TaskTree) -> set[str]:
    return {a.path for a in tree.walk()}


@pytest.fixture
async def make_pm(
    redis_url: str, stub: ScriptedModelServer, tmp_path: Path
) -> AsyncIterator[Callable[..., Paymaster]]:
    """Paymasters on the test Redis and the stub; keyword arguments are their environment."""
    made: list[Paymaster] = []

    def make(**env: str) -> Paymaster:
        pm = Paymaster(
            redis_url=redis_url, config=stub_config(stub), env={"HOME": str(tmp_path), **env}
        )
        made.append(pm)
        return pm

    yield make
    for pm in made:
        await pm.aclose()


# -- dataflow ----------------------------------------------------------------------------------


async def test_a_subtask_starts_as_soon_as_its_own_dependencies_are_done(
    make_pm: Callable[..., Paymaster], stub: ScriptedModelServer
) -> None:
    def worker(sid: str, req: RecordedRequest) -> Reply:
        return Reply(text=worker_text(sid), delay_s=1.5 if sid == "s2" else 0.0)

    stub.responder = responder({"": [sub("s1"), sub("s2"), sub("s3", "s1")]}, worker)
    pm = make_pm()
    rec = await pm.arun("three parts", budget=Budget(tokens=20_000))
    assert rec.status is Status.SUCCEEDED, rec.error
    events = await pm.aevents(rec.id)
    s3_opened = next(e.id for e in events if e.op == "open" and e.account.startswith("root/s3."))
    s2_paid = next(e.id for e in events if e.op == "commit" and e.account.startswith("root/s2."))
    # In waves s3 would wait for s2, the slowest of the first wave; here it does not.
    assert s3_opened < s2_paid
    assert roles(stub).index("s3") < len(roles(stub)) - 1
    assert_books_clean(await pm.aledger(rec.id), Budget(tokens=20_000))


# -- nested managers ---------------------------------------------------------------------------

NESTED = {
    "": [sub("s1", composite=True), sub("s2", "s1")],
    "s1": [sub("s1"), sub("s2", "s1")],
}


async def test_a_composite_subtask_is_planned_again_inside_its_own_account(
    make_pm: Callable[..., Paymaster], stub: ScriptedModelServer
) -> None:
    stub.responder = responder(NESTED)
    pm = make_pm()
    budget = Budget(tokens=40_000, usd="1")
    rec = await pm.arun("a big task", budget=budget)
    assert rec.status is Status.SUCCEEDED, rec.error
    assert rec.answer == FINAL
    # tenant -> task -> manager -> sub-manager -> workers -> calls
    assert sorted(roles(stub)) == sorted(
        ["plan:", "plan:s1", "s1:s1", "s1:s2", "synth:s1", "s2", "synth:"]
    )
    tree = await pm.aledger(rec.id)
    composite = f"{ROOT}/s1.1.1"
    assert {
        f"{composite}/manager.1.1",
        f"{composite}/s1.1.1",
        f"{composite}/s2.1.1",
        f"{ROOT}/s2.1.1",
    } <= paths(tree)
    assert_books_clean(tree, budget)
    assert_level_balanced(tree.root)
    # Leftovers flow back level by level: s2 started after the composite closed and got
    # more than the pool held beside the composite's carve.
    manager, s1, s2 = (
        tree.account(p) for p in (f"{ROOT}/manager.1.1", composite, f"{ROOT}/s2.1.1")
    )
    assert s1.limit_tokens is not None
    assert manager.limit_tokens is not None
    assert s2.limit_tokens is not None
    assert s2.limit_tokens > 40_000 - manager.limit_tokens - s1.limit_tokens
    # The sub-level's answer is s1's result and reaches its dependant's prompt.
    results = await Records(pm.books.redis).load_results(rec.id)
    assert results["s1"]["text"] == "synthesis of s1"
    assert results["s1"]["composite"] is True
    assert results["s1:s1"]["text"] == worker_text("s1:s1")
    s2_call = next(r for r in stub.requests if r.body and role_of(r) == "s2")
    assert "synthesis of s1" in str(s2_call.body["messages"][-1]["content"])  # type: ignore[index]
    # Each level's worker results are counted once in the statistics; a composite is not.
    stats = await pm.astats(None)
    assert stats.cell("stub").calls == 3


async def test_a_level_reads_its_pool_once_and_keeps_it_from_its_own_steps(
    make_pm: Callable[..., Paymaster], stub: ScriptedModelServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    stub.responder = responder(NESTED)  # s2 waits for the composite s1: a decision after it
    pm = make_pm()
    runtime = pm.runtime()
    ledger, records = runtime.ledger, runtime.records
    real_account, real_checked_read = ledger.account, records.cancel_requested_and_read
    reads: list[str] = []

    async def account(task_id: str, path: str) -> AccountView:
        reads.append(path)
        return await real_account(task_id, path)

    async def checked_read(task_id: str, key: str) -> tuple[bool, dict[str, str]]:
        reads.append(key.split(":acct:", 1)[1])
        return await real_checked_read(task_id, key)

    real_pool = Flow._pool
    seen: list[tuple[Pool, AccountView]] = []

    async def pool(self: Flow, run: TaskRun, path: str) -> Pool:
        got = await real_pool(self, run, path)
        seen.append((got, await real_account(run.task_id, path)))
        return got

    monkeypatch.setattr(ledger, "account", account)
    monkeypatch.setattr(records, "cancel_requested_and_read", checked_read)
    monkeypatch.setattr(Flow, "_pool", pool)
    rec = await pm.arun("a big task", budget=Budget(tokens=40_000, usd="1"))
    assert rec.status is Status.SUCCEEDED, rec.error
    # Each level (the task's and s1's) reads its pool once, when it plans (with the cancel
    # check before that paid step); its synthesis takes what is left in one step...
    composite = f"{ROOT}/s1.1.1"
    assert sorted(reads) == sorted([ROOT, composite])
    # ...and every decision in between is answered from what its own steps moved, which is
    # what a read would have said.
    assert len(seen) >= 4
    for got, view in seen:
        assert (got.tokens, got.nanos) == (view.available_tokens, view.available_nanos)


async def test_the_depth_limit_clamps_a_plan_asking_for_more_nesting(
    make_pm: Callable[..., Paymaster], stub: ScriptedModelServer
) -> None:
    deep = {**NESTED, "s1": [sub("s1", composite=True), sub("s2", "s1")]}
    stub.responder = responder(deep)
    pm = make_pm()  # depth 2: the sub-manager's own composite is run by a worker
    rec = await pm.arun("a big task", budget=Budget(tokens=40_000))
    assert rec.status is Status.SUCCEEDED, rec.error
    assert [r for r in roles(stub) if r.startswith("plan:")] == ["plan:", "plan:s1"]
    assert "s1:s1" in roles(stub)
    plan_requests = [r for r in stub.requests if r.body and role_of(r).startswith("plan:")]
    asked = [str(r.body["messages"][0]["content"]) for r in plan_requests]  # type: ignore[index]
    assert "composite: true" in asked[0]  # the task's manager may nest...
    assert "composite" not in asked[1]  # ...the last level may not
    before = len(roles(stub))
    flat = make_pm(PAYMASTER_MAX_DEPTH="1")
    rec = await flat.arun("a big task", budget=Budget(tokens=40_000))
    assert rec.status is Status.SUCCEEDED, rec.error
    assert sorted(roles(stub)[before:]) == sorted(["plan:", "s1", "s2", "synth:"])
    assert_level_balanced((await flat.aledger(rec.id)).root)


async def test_a_composite_whose_share_cannot_pay_a_plan_runs_on_a_worker(
    make_pm: Callable[..., Paymaster], stub: ScriptedModelServer
) -> None:
    stub.responder = responder(NESTED)
    pm = make_pm()
    budget = Budget(tokens=5_000)
    rec = await pm.arun("a big task", budget=budget)
    assert "plan:s1" not in roles(stub)
    assert "s1" in roles(stub)
    assert rec.status.final
    assert_books_clean(await pm.aledger(rec.id), budget)


def test_bad_max_depth_is_refused_with_the_variable_named(tmp_path: Path) -> None:
    from orchestrator.settings import Settings

    with pytest.raises(ValueError, match="max_depth"):
        Settings.from_env({"HOME": str(tmp_path), "PAYMASTER_MAX_DEPTH": "0"})
    with pytest.raises(ValueError, match="review"):
        Settings.from_env({"HOME": str(tmp_path), "PAYMASTER_REVIEW": "sometimes"})


async def test_a_sub_plan_naming_ids_of_another_level_is_mended_and_carves_nothing_more(
    make_pm: Callable[..., Paymaster], stub: ScriptedModelServer
) -> None:
    # The sub-plan depends on "s2" (a subtask of the level above, unknown here) and on
    # itself in a cycle: both dependencies are dropped for free, and the level runs.
    bad = {**NESTED, "s1": [sub("s1", "s2"), sub("s2", "s2", "s1")]}
    stub.responder = responder(bad)
    pm = make_pm()
    budget = Budget(tokens=40_000)
    rec = await pm.arun("a big task", budget=budget)
    assert rec.status is Status.SUCCEEDED, rec.error
    assert roles(stub).count("plan:s1") == 1  # no repair call was needed
    tree = await pm.aledger(rec.id)
    composite = tree.account(f"{ROOT}/s1.1.1")
    assert composite.limit_tokens is not None
    assert all((c.limit_tokens or 0) <= composite.limit_tokens for c in composite.children)
    assert_level_balanced(tree.root)


# -- reviews and honest statuses ---------------------------------------------------------------


def _reject_first(sid: str) -> Callable[[RecordedRequest], Reply]:
    """Rejects ``sid`` the first time it is reviewed (whichever review comes first)."""
    lock, seen = threading.Lock(), [0]

    def review(req: RecordedRequest) -> Reply:
        assert req.body is not None
        if f"### {sid}" not in str(req.body["messages"][-1]["content"]):
            return Reply(text=json.dumps({"reject": []}))
        with lock:
            seen[0] += 1
            first = seen[0] == 1
        return Reply(text=json.dumps({"reject": [sid] if first else []}))

    return review


async def test_a_rejected_result_is_escalated_when_the_pool_can_pay(
    make_pm: Callable[..., Paymaster], stub: ScriptedModelServer
) -> None:
    stub.responder = responder({"": [sub("a"), sub("b")]}, review=_reject_first("a"))
    pm = make_pm(PAYMASTER_REVIEW="on")
    budget = Budget(tokens=30_000)
    rec = await pm.arun("two parts", budget=budget)
    assert rec.status is Status.SUCCEEDED, rec.error
    assert roles(stub).count("a") == 2
    assert roles(stub).count("b") == 1
    assert roles(stub).count("review") == 3  # a, b, and a's second try
    tree = await pm.aledger(rec.id)
    assert {f"{ROOT}/a.1.1", f"{ROOT}/a.1.2"} <= paths(tree)
    review_spend = sum(
        e.tokens
        for e in await pm.aevents(rec.id)
        if e.op == "commit" and e.tags.get("step") == "review"
    )
    assert review_spend > 0
    assert tree.account(f"{ROOT}/manager.1.1").spent_tokens >= review_spend
    # The verdicts are feedback in the statistics: one rejected try, two accepted.
    cell = (await pm.astats(None)).cell("stub")
    assert (cell.bad, cell.ok) == (1, 2)
    assert_books_clean(tree, budget)


async def test_a_rejected_result_the_pool_cannot_redo_ends_partial(
    make_pm: Callable[..., Paymaster], stub: ScriptedModelServer
) -> None:
    always = lambda req: Reply(text=json.dumps({"reject": ["a"]}))  # noqa: E731
    stub.responder = responder({"": [sub("a", difficulty=5)]}, review=always)
    pm = make_pm(PAYMASTER_REVIEW="on")  # reviewed even where the review is a large share
    budget = Budget(tokens=5_200)
    rec = await pm.arun("one hard part", budget=budget)
    assert rec.status is Status.PARTIAL, rec.error
    assert rec.error == "fell short: a (rejected)"
    assert rec.answer  # the rejected answer is still the best there is
    assert roles(stub).count("a") == 1
    assert roles(stub).count("review") == 1
    assert_books_clean(await pm.aledger(rec.id), budget)


async def test_reviews_follow_the_switch(
    make_pm: Callable[..., Paymaster], stub: ScriptedModelServer
) -> None:
    plan = {"": [sub("easy", difficulty=1), sub("hard", difficulty=4)]}
    stub.responder = responder(plan)
    for mode, reviewed in (("off", 0), ("auto", 1), ("on", 2)):
        before = len(roles(stub))
        pm = make_pm(PAYMASTER_REVIEW=mode)
        rec = await pm.arun("two parts", budget=Budget(tokens=30_000))
        assert rec.status is Status.SUCCEEDED, (mode, rec.error)
        assert roles(stub)[before:].count("review") == reviewed, mode


async def test_a_subtask_cut_short_after_its_last_escalation_ends_partial(
    make_pm: Callable[..., Paymaster], stub: ScriptedModelServer
) -> None:
    def worker(sid: str, req: RecordedRequest) -> Reply:
        return Reply(text="word " * 5000 if sid == "b" else worker_text(sid))

    stub.responder = responder({"": [sub("a"), sub("b")]}, worker)
    pm = make_pm()
    budget = Budget(tokens=60_000)
    rec = await pm.arun("two parts", budget=budget)
    assert roles(stub).count("b") == 2  # escalated once (the tiered policy's last try)
    assert rec.status is Status.PARTIAL
    assert rec.error == "fell short: b (cut short)"
    assert_books_clean(await pm.aledger(rec.id), budget)
    stats = await pm.astats(None)
    assert sum(c.calls for (ep, d, tag), c in stats.cells.items() if tag == "*" and d == 2) == 3


# -- a crash in the middle of a nested task ----------------------------------------------------


async def test_kill_9_inside_a_sub_level_is_taken_over_with_nothing_paid_twice(
    make_pm: Callable[..., Paymaster],
    stub: ScriptedModelServer,
    workers: Callable[..., WorkerProc],
) -> None:
    lock, calls = threading.Lock(), {"n": 0}

    def worker(sid: str, req: RecordedRequest) -> Reply:
        if sid == "s1:s2":
            with lock:
                calls["n"] += 1
                first = calls["n"] == 1
            if first:  # the first worker dies while waiting for this one
                return Reply(text=worker_text(sid), delay_s=30)
        return Reply(text=worker_text(sid))

    stub.responder = responder(NESTED, worker)
    pm = make_pm()
    a = workers("--name", "worker-a")
    budget = Budget(tokens=40_000, usd="1")
    task = await pm.asubmit("a big task", budget=budget)
    await a.ready()
    records = Records(pm.books.redis)

    async def s1_s1_saved() -> bool:
        return "s1:s1" in await records.load_results(task.id)

    await wait_for(s1_s1_saved, timeout=20, what="s1:s1's result saved")
    await wait_for(lambda: "s1:s2" in roles(stub), timeout=20, what="the call for s1:s2")
    b = workers("--name", "worker-b")
    a.proc.send_signal(signal.SIGKILL)
    assert a.proc.wait(5) == -signal.SIGKILL
    await b.ready()
    rec = await task.result(timeout=30)
    assert rec.status is Status.SUCCEEDED, rec.error
    assert rec.deliveries == 2
    seen = roles(stub)
    # Both plans were reused, s1:s1 was saved: only the call cut off by the kill is made again.
    assert [seen.count(r) for r in ("plan:", "plan:s1", "s1:s1", "s1:s2", "s2")] == [1, 1, 1, 2, 1]
    tree = await pm.aledger(rec.id)
    assert {f"{ROOT}/s1.1.1/s2.1.1", f"{ROOT}/s1.2.1/s2.2.1"} <= paths(tree)
    assert not any(p.startswith(f"{ROOT}/s1.2.1/s1.") for p in paths(tree))
    assert_books_clean(tree, budget)
    assert_level_balanced(tree.root)
    assert (await pm.astats(None)).cell("stub").calls == 3  # each paid worker result once


# -- the command line --------------------------------------------------------------------------


async def test_the_cli_shows_the_levels_and_exits_5_on_a_partial_task(
    env: dict[str, str], stub: ScriptedModelServer
) -> None:
    stub.responder = responder(NESTED)
    done = await asyncio.to_thread(cli, env, "run", "a big task", "--tokens", "40000")
    assert done.returncode == 0, done.stderr
    task_id = done.stderr.split("task id:", 1)[1].split()[0]
    shown = await asyncio.to_thread(cli, env, "ledger", task_id, "--json")
    assert shown.returncode == 0, shown.stderr
    tree = json.loads(shown.stdout)
    (composite,) = [c for c in tree["root"]["children"] if c["path"] == f"{ROOT}/s1.1.1"]
    assert {c["path"].rsplit("/", 1)[1] for c in composite["children"]} == {
        "manager.1.1",
        "s1.1.1",
        "s2.1.1",
    }
    drawn = await asyncio.to_thread(cli, env, "ledger", task_id)
    assert drawn.returncode == 0, drawn.stderr
    assert "s1.1.1" in drawn.stdout
    assert "manager.1.1" in drawn.stdout

    def long_b(sid: str, req: RecordedRequest) -> Reply:
        return Reply(text="word " * 5000 if sid == "b" else worker_text(sid))

    stub.responder = responder({"": [sub("a"), sub("b")]}, long_b)
    done = await asyncio.to_thread(cli, env, "run", "two parts", "--tokens", "60000")
    assert done.returncode == 5, done.stderr
    assert "partial" in done.stdout
    assert "fell short: b (cut short)" in done.stdout

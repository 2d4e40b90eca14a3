"""Budgets that fit the work: the manager's account is sized for its planning call.

Against a real redis-server and a scripted OpenAI-compatible server: a budget
too small to plan runs the task as one subtask (no plan call, a note in the
audit stream); a budget that can plan only a little shrinks the call's
``max_tokens`` instead of refusing it; grammar-constrained endpoints get
llama.cpp's ``json_object`` form at temperature 0; plans with an obvious fix
are mended for free.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agents.endpoints import Endpoint, EndpointsConfig
from agents.errors import InvalidPlan
from agents.manager import ManagerAgent, ManagerSettings
from agents.plan import Plan, Subtask, mend_plan, plan_schema, validate_plan
from agents.stub_server import RecordedRequest, Reply, ScriptedModelServer
from budgets import Amount, Budget
from budgets.policy import Pool
from orchestrator.api import Paymaster
from orchestrator.flow import planning_budget
from orchestrator.records import Status
from tests.test_orchestrator import assert_books_clean, responder, role_of, sub


def config(srv: ScriptedModelServer, *, structured: str = "none") -> EndpointsConfig:
    endpoint = Endpoint(
        name="stub",
        base_url=srv.base_url,
        model="m",
        kind="local",
        max_retries=0,
        max_concurrency=8,
        structured_output=structured,  # type: ignore[arg-type]
    )
    return EndpointsConfig(endpoints=[endpoint])


@pytest.fixture
async def pm(
    redis_url: str, server: ScriptedModelServer, tmp_path: Path
) -> AsyncIterator[Paymaster]:
    paymaster = Paymaster(redis_url=redis_url, config=config(server), env={"HOME": str(tmp_path)})
    yield paymaster
    await paymaster.aclose()


def roles(srv: ScriptedModelServer) -> list[str]:
    return [role_of(r) for r in srv.requests if r.path.endswith("/chat/completions")]


# -- the sizing rule itself ----------------------------------------------------------


def test_planning_takes_what_the_call_reserves_up_to_half_the_pool() -> None:
    pool, reserve = Pool(tokens=10_000, nanos=None), Pool(tokens=1_500, nanos=None)
    full, least = Amount(tokens=1_700, nanos=0), Amount(tokens=900, nanos=0)
    assert planning_budget(pool, reserve=reserve, full=full, least=least) == Pool(1_700, None)
    small = Pool(tokens=2_000, nanos=None)
    assert planning_budget(small, reserve=Pool(300, None), full=full, least=least) == Pool(
        1_000, None
    )


def test_planning_never_takes_less_than_the_synthesis_reserve() -> None:
    got = planning_budget(
        Pool(tokens=10_000, nanos=8_000),
        reserve=Pool(tokens=1_500, nanos=1_200),
        full=Amount(tokens=1_000, nanos=500),
        least=Amount(tokens=400, nanos=100),
    )
    assert got == Pool(tokens=1_500, nanos=1_200)


@pytest.mark.parametrize(
    ("pool", "least"),
    [
        (Pool(tokens=1_500, nanos=None), Amount(tokens=900, nanos=0)),
        (Pool(tokens=None, nanos=1_000), Amount(tokens=10, nanos=600)),
    ],
)
def test_planning_that_does_not_fit_half_the_pool_is_refused(pool: Pool, least: Amount) -> None:
    full = Amount(tokens=least.tokens * 2, nanos=least.nanos * 2)
    assert planning_budget(pool, reserve=Pool(0, 0), full=full, least=least) is None


# -- the flow on a real ledger ---------------------------------------------------------


async def test_a_budget_too_small_to_plan_runs_one_subtask_without_a_plan_call(
    pm: Paymaster, server: ScriptedModelServer
) -> None:
    server.responder = responder([sub("a"), sub("b")])
    budget = Budget(tokens=1_500)
    record = await pm.arun("Name three prime numbers.", budget=budget)
    assert record.status is Status.SUCCEEDED
    assert roles(server) == ["task"]  # one worker call: no plan, no synthesis
    assert record.answer == "answer of task"
    notes = [e for e in await pm.aevents(record.id) if e.op == "note"]
    assert len(notes) == 1
    assert "cannot pay for planning" in notes[0].extra["text"]
    tree = await pm.aledger(record.id)
    assert_books_clean(tree, budget)
    assert all(a.open_reservations == 0 for a in tree.walk())


async def test_a_tight_budget_plans_with_a_shrunk_call_instead_of_refusing(
    pm: Paymaster, server: ScriptedModelServer
) -> None:
    server.responder = responder([sub("a"), sub("b")])
    manager = ManagerAgent(client=pm.runtime().metered)
    full, least = manager.plan_cost(task="Two steps.")
    # Room for the short plan in half the pool, not for the full one.
    tokens = 2 * (least.tokens + (full.tokens - least.tokens) // 2)
    budget = Budget(tokens=tokens)
    record = await pm.arun("Two steps.", budget=budget)
    plan_calls = [r for r in server.requests if r.body and role_of(r) == "plan"]
    assert len(plan_calls) == 1
    asked = plan_calls[0].body["max_tokens"] if plan_calls[0].body else 0
    settings = ManagerSettings()
    assert settings.plan_min_tokens <= asked < settings.plan_max_tokens
    # So small a pool pays for one subtask only: the manager was told so.
    assert plan_calls[0].body is not None
    assert "at most 1 self-contained" in plan_calls[0].body["messages"][0]["content"]
    assert roles(server)[0] == "plan"
    assert len(roles(server)) >= 2  # and the work ran
    tree = await pm.aledger(record.id)
    assert_books_clean(tree, budget)


async def test_the_manager_gives_back_what_planning_did_not_need(
    pm: Paymaster, server: ScriptedModelServer
) -> None:
    server.responder = responder([sub("a"), sub("b")])
    record = await pm.arun("Two steps.", budget=Budget(tokens=10_000))
    events = await pm.aevents(record.id)
    back = [e for e in events if e.op == "transfer" and e.extra.get("dir") == "up"]
    assert len(back) == 1
    assert back[0].account.startswith("root/manager.")
    assert back[0].tokens > 0
    opened = next(e for e in events if e.op == "open" and e.account == back[0].account)
    # What stays for synthesis is the policy's reserve (15% of the pool).
    assert opened.tokens - back[0].tokens - _spent(events, back[0].account, before=back[0].id) == (
        10_000 * 150 // 1000
    )


def _spent(events: list, account: str, *, before: str) -> int:  # type: ignore[type-arg]
    return sum(
        e.tokens for e in events if e.op == "commit" and e.account == account and e.id < before
    )


# -- structured output and mending --------------------------------------------------------


async def test_a_json_object_endpoint_gets_a_grammar_schema_at_temperature_zero(
    redis_url: str, server: ScriptedModelServer, tmp_path: Path
) -> None:
    pm = Paymaster(
        redis_url=redis_url,
        config=config(server, structured="json_object"),
        env={"HOME": str(tmp_path)},
    )
    server.responder = responder([sub("s1"), sub("s2", "s1")])
    try:
        await pm.arun("Two steps.", budget=Budget(tokens=20_000))
    finally:
        await pm.aclose()
    plan_call = next(r for r in server.requests if r.body and role_of(r) == "plan")
    assert plan_call.body is not None
    fmt = plan_call.body["response_format"]
    assert fmt["type"] == "json_object"
    item = fmt["schema"]["$defs"]["Subtask"]["properties"]
    assert item["id"]["enum"][:2] == ["s1", "s2"]
    assert item["instruction"]["maxLength"] > 0
    assert plan_call.body["temperature"] == 0
    worker_call = next(r for r in server.requests if r.body and role_of(r) == "s1")
    assert worker_call.body is not None
    assert "temperature" not in worker_call.body
    assert "response_format" not in worker_call.body


def test_grammar_bounds_are_left_out_for_openai_strict_mode() -> None:
    strict = json.dumps(plan_schema(max_subtasks=3))
    assert "maxLength" not in strict
    assert "minLength" not in strict
    assert "maxLength" in json.dumps(plan_schema(max_subtasks=3, grammar=True))


def _plan(*subs: tuple[str, list[str]]) -> Plan:
    return Plan(
        subtasks=[
            Subtask(id=i, instruction=f"do {i}", difficulty=2, depends_on=deps) for i, deps in subs
        ]
    )


def test_mend_renames_repeated_ids_and_drops_dependencies_that_cannot_be_kept() -> None:
    plan = _plan(("s2", ["s1"]), ("s2", ["s2", "s9"]), ("s3", ["s3", "s2", "s2"]))
    mended = mend_plan(plan)
    assert [s.id for s in mended.subtasks] == ["s2", "s4", "s3"]
    # The renamed one depends on the first "s2" now, which is not itself.
    assert [s.depends_on for s in mended.subtasks] == [[], ["s2"], ["s2"]]
    validate_plan(mended, max_subtasks=8)
    with pytest.raises(InvalidPlan):
        validate_plan(plan, max_subtasks=8)


def test_mend_breaks_a_cycle_and_keeps_the_rest() -> None:
    mended = mend_plan(_plan(("a", ["b"]), ("b", ["a"]), ("c", ["a", "b"])))
    deps = {s.id: s.depends_on for s in mended.subtasks}
    assert deps == {"a": ["b"], "b": [], "c": ["a", "b"]}
    validate_plan(mended, max_subtasks=8)


def test_a_plan_that_needs_no_mending_is_unchanged() -> None:
    plan = _plan(("facts", []), ("essay", ["facts"]))
    assert mend_plan(plan) == plan


async def test_a_self_dependency_costs_no_repair_call(
    pm: Paymaster, server: ScriptedModelServer
) -> None:
    def plan_then_answer(request: RecordedRequest) -> Reply:
        if role_of(request) == "plan":
            bad = {"subtasks": [sub("a", "a"), sub("b", "a")]}
            return Reply(text=json.dumps(bad))
        return responder([])(request)

    server.responder = plan_then_answer
    record = await pm.arun("Two steps.", budget=Budget(tokens=20_000))
    assert record.status is Status.SUCCEEDED
    assert roles(server).count("plan") == 1
    assert sorted(r for r in roles(server) if r in ("a", "b")) == ["a", "b"]


async def test_the_plan_asks_for_no_more_subtasks_than_the_budget_pays(
    pm: Paymaster, server: ScriptedModelServer
) -> None:
    server.responder = responder([sub("a"), sub("b")])
    await pm.arun("Two steps.", budget=Budget(tokens=4_000))
    small = next(r for r in server.requests if r.body and role_of(r) == "plan")
    server.clear()
    await pm.arun("Two steps.", budget=Budget(tokens=200_000))
    large = next(r for r in server.requests if r.body and role_of(r) == "plan")
    assert small.body is not None
    assert large.body is not None
    few = int(small.body["messages"][0]["content"].split("at most ", 1)[1].split()[0])
    many = int(large.body["messages"][0]["content"].split("at most ", 1)[1].split()[0])
    assert 1 <= few < many == 8


async def test_subtasks_whose_share_cannot_pay_a_call_wait_for_returned_money(
    pm: Paymaster, server: ScriptedModelServer
) -> None:
    # In the second wave "easy" carries "long"'s long answer in its prompt, but
    # tiers weight its share 512 : 2560 against "hard": the share cannot pay
    # that prompt, so it waits until "hard" gives its leftover back.
    plan = [
        sub("long", difficulty=5),
        sub("short", difficulty=1),
        sub("easy", "long", difficulty=1),
        sub("hard", "short", difficulty=5),
    ]

    def answers(sid: str, request: RecordedRequest) -> Reply:
        return Reply(text="y " * 2500 if sid == "long" else f"answer of {sid}")

    server.responder = responder(plan, answers)
    budget = Budget(tokens=20_000)
    record = await pm.arun("Four steps.", budget=budget)
    assert record.status is Status.SUCCEEDED
    events = await pm.aevents(record.id)
    opened = {e.account.split("/")[-1].split(".")[0]: e.id for e in events if e.op == "open"}
    hard_closed = next(e.id for e in events if e.op == "close" and "/hard." in e.account)
    assert opened["easy"] > hard_closed
    assert "easy" in roles(server)
    assert_books_clean(await pm.aledger(record.id), budget)


async def test_a_crash_between_saving_and_counting_is_counted_once_on_redelivery(
    pm: Paymaster, server: ScriptedModelServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    server.responder = responder([sub("a"), sub("b", "a")])
    runtime = pm.runtime()
    task = await pm.asubmit("Two steps.", budget=Budget(tokens=20_000))
    real = runtime.stats.record
    calls = {"n": 0}

    async def dies_once(*args: object, **kwargs: object) -> bool:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("the process died here")
        return await real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(runtime.stats, "record", dies_once)
    with pytest.raises(ConnectionError):
        await runtime.execute(task.id)  # "a" saved, its count lost
    record = await runtime.execute(task.id)  # the next delivery
    assert record.status is Status.SUCCEEDED
    assert roles(server).count("a") == 1  # saved, so not paid again
    stats = await pm.astats(None)
    cells = [c for (ep, d, tag), c in stats.cells.items() if tag == "*" and d == 2]
    assert sum(c.calls for c in cells) == 2  # "a" and "b", each counted once

"""The flow feeds the statistics and the adaptive policy learns from them (real Redis, HTTP)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from agents.endpoints import Endpoint, EndpointsConfig
from agents.stub_server import RecordedRequest, Reply, ScriptedModelServer
from budgets import Budget
from budgets.policy import Adaptive, Target
from orchestrator.api import Paymaster
from orchestrator.errors import SubtaskNotFound, TaskNotFound
from orchestrator.settings import Settings

PLAN = {
    "subtasks": [
        {"id": "a", "instruction": "do a", "difficulty": 2, "tags": ["math"]},
        {"id": "b", "instruction": "do b", "difficulty": 2},
    ]
}


def respond(request: RecordedRequest) -> Reply:
    assert request.body is not None
    system = str(request.body["messages"][0]["content"])
    if "Split the user's task" in system:
        return Reply(text=json.dumps(PLAN))
    if "Write the final answer" in system:
        return Reply(text="final")
    return Reply(text=f"answer from {request.body['model']}")


def endpoint(srv: ScriptedModelServer, name: str, **kw: object) -> Endpoint:
    return Endpoint.model_validate(
        {"name": name, "base_url": srv.base_url, "model": f"{name}-m", "max_retries": 0, **kw}
    )


@pytest.fixture
def stub() -> Iterator[ScriptedModelServer]:
    with ScriptedModelServer() as srv:
        srv.responder = respond
        yield srv


def make_pm(redis_url: str, config: EndpointsConfig, tmp: Path, **settings: object) -> Paymaster:
    return Paymaster(
        redis_url=redis_url,
        config=config,
        settings=Settings.model_validate({"home": tmp, **settings}),
        env={"HOME": str(tmp)},
    )


@pytest.fixture
async def pm(redis_url: str, stub: ScriptedModelServer, tmp_path: Path) -> AsyncIterator[Paymaster]:
    config = EndpointsConfig(
        endpoints=[
            endpoint(stub, "stub", kind="remote", input_usd_per_mtok="1", output_usd_per_mtok="2")
        ]
    )
    paymaster = make_pm(redis_url, config, tmp_path)
    yield paymaster
    await paymaster.aclose()


def worker_models(srv: ScriptedModelServer, since: int = 0) -> list[str]:
    out = []
    for req in srv.requests[since:]:
        if req.body is None or not req.path.endswith("/chat/completions"):
            continue
        system = str(req.body["messages"][0]["content"])
        if "Split the user's task" not in system and "Write the final answer" not in system:
            out.append(str(req.body["model"]))
    return out


async def test_every_subtask_call_is_counted_in_its_cells(pm: Paymaster) -> None:
    rec = await pm.arun("two things", budget=Budget(tokens=20_000))
    stats = await pm.astats()
    every = stats.cell("stub", 0)
    assert every.calls == 2
    assert stats.cell("stub", 2).calls == 2
    assert stats.cell("stub", 0, "math").calls == 1  # only subtask a is tagged
    tree = await pm.aledger(rec.id)
    subtask_spend = sum(a.spent_nanos for a in tree.walk() if a.path.rsplit("/", 1)[-1][0] in "ab")
    assert every.nanos == subtask_spend
    assert every.used > 0
    assert every.asked >= every.used
    assert sum(every.hist) == 2


async def test_feedback_is_counted_once_and_a_new_verdict_moves_it(pm: Paymaster) -> None:
    rec = await pm.arun("two things", budget=Budget(tokens=20_000))
    assert await pm.afeedback(rec.id, "a", ok=True) is True
    cell = (await pm.astats()).cell("stub", 2, "math")
    assert (cell.ok, cell.bad) == (1, 0)
    assert await pm.afeedback(rec.id, "a", ok=True) is False
    assert await pm.afeedback(rec.id, "a", ok=False) is True
    after = await pm.astats()
    assert (after.cell("stub", 2, "math").ok, after.cell("stub", 2, "math").bad) == (0, 1)
    assert (after.cell("stub", 0).ok, after.cell("stub", 0).bad) == (0, 1)


async def test_feedback_on_unknown_things_is_refused_and_changes_nothing(pm: Paymaster) -> None:
    rec = await pm.arun("two things", budget=Budget(tokens=20_000))
    before = await pm.astats()
    with pytest.raises(SubtaskNotFound, match=r"no finished subtask 'zz'.*finished: a, b"):
        await pm.afeedback(rec.id, "zz", ok=True)
    with pytest.raises(TaskNotFound):
        await pm.afeedback("no-such-task", "a", ok=True)
    assert await pm.astats() == before


async def test_tenants_statistics_stay_apart_unless_shared(
    redis_url: str, stub: ScriptedModelServer, tmp_path: Path
) -> None:
    config = EndpointsConfig(endpoints=[endpoint(stub, "stub", kind="local")])
    own = make_pm(redis_url, config, tmp_path)
    shared = make_pm(redis_url, config, tmp_path, stats_scope="shared")
    try:
        for name in ("acme", "globex"):
            await own.aset_tenant(name, Budget(tokens=1_000_000))
        rec = await own.arun("two things", budget=Budget(tokens=20_000), tenant="acme")
        await own.afeedback(rec.id, "b", ok=True)
        assert (await own.astats("acme")).cell("stub", 0).calls == 2
        assert (await own.astats("acme")).cell("stub", 0).ok == 1
        assert (await own.astats("globex")).cells == {}
        assert (await own.astats()).cells == {}  # nor in the shared scope
        await shared.arun("two things", budget=Budget(tokens=20_000), tenant="globex")
        assert (await shared.astats("acme")).cell("stub", 0).calls == 2  # one scope for all
        assert (await own.astats("globex")).cells == {}
    finally:
        await own.aclose()
        await shared.aclose()


async def test_adaptive_probes_the_cheap_endpoint_then_leaves_it_when_history_says_it_fails(
    redis_url: str, stub: ScriptedModelServer, tmp_path: Path
) -> None:
    config = EndpointsConfig(
        endpoints=[
            endpoint(stub, "cheap", kind="local", tier=1),
            endpoint(
                stub,
                "strong",
                kind="remote",
                tier=4,
                input_usd_per_mtok="1",
                output_usd_per_mtok="4",
            ),
        ],
        default="cheap",
    )
    # a target that never binds: the pool and the gains decide (the default is ratio:0.4)
    pm = make_pm(redis_url, config, tmp_path, policy="adaptive", target="ratio:10")
    budget = Budget(tokens=50_000, usd="1")
    try:
        first = await pm.arun("two things", budget=budget)
        models = worker_models(stub)
        assert models[:2] == ["cheap-m", "cheap-m"]  # the free endpoint answers first
        # With a pool that can pay, both get a second opinion from the stronger endpoint.
        assert sorted(models[2:]) == ["strong-m", "strong-m"]
        saved = await pm.runtime().records.load_results(first.id)
        assert {r["endpoint"] for r in saved.values()} == {"strong"}
        # The cheap endpoint's answers are judged wrong, task after task.
        for i in range(6):
            rec = await pm.arun("two things", budget=budget, task_id=f"hist-{i}")
            for outcome in await cheap_outcomes(pm, rec.id):
                await pm.runtime().stats.verdict("shared", outcome, ok=False)
        history = await pm.astats()
        assert history.cell("cheap", 0).bad >= 6
        assert history.cell("strong", 0).bad == 0  # verdicts land where the outcome was counted
        seen = len(stub.requests)
        await pm.arun("two things", budget=budget, task_id="after")
        assert worker_models(stub, seen) == ["strong-m", "strong-m"]  # no more probing
    finally:
        await pm.aclose()


async def cheap_outcomes(pm: Paymaster, task_id: str) -> list[str]:
    """Outcome ids of the cheap endpoint's tries: first attempts that spent tokens but no money.

    The cheap endpoint is free; a verdict lands in the cells its outcome was counted in, so
    naming a strong endpoint's try here would judge the strong endpoint instead.
    """
    tree = await pm.aledger(task_id)
    ids = []
    for acct in tree.walk():
        name = acct.path.rsplit("/", 1)[-1]
        free = acct.spent_tokens > 0 and acct.spent_nanos == 0
        if name[0] in "ab" and name.endswith(".1") and free:
            ids.append(f"{task_id}:{acct.path.replace('/', ':')}")
    return ids


async def test_the_target_setting_reaches_the_policy_and_bad_ones_are_refused(
    redis_url: str, stub: ScriptedModelServer, tmp_path: Path
) -> None:
    config = EndpointsConfig(endpoints=[endpoint(stub, "stub", kind="local")])
    pm = make_pm(redis_url, config, tmp_path, policy="adaptive", target="usd_per_point:0.001")
    try:
        chosen = pm.runtime().policy
        assert isinstance(chosen, Adaptive)
        assert chosen.target == Target(cost_ratio=None, usd_per_point=Decimal("0.001"))
    finally:
        await pm.aclose()
    env = {"HOME": str(tmp_path), "PAYMASTER_TARGET": "ratio:0.2", "PAYMASTER_EXPLORE": "0.1"}
    settings = Settings.from_env(env)
    assert (settings.policy_target(), settings.explore) == (Target(cost_ratio=0.2), 0.1)
    for bad in ("ratio:0", "cheap", "usd_per_point:-1", "speed:3"):
        with pytest.raises(ValueError, match=r"target|ratio|point"):
            Settings.from_env({**env, "PAYMASTER_TARGET": bad})
    with pytest.raises(ValueError, match="explore"):
        Settings.from_env({**env, "PAYMASTER_EXPLORE": "2"})

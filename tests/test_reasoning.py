"""A reasoning model's thinking is bounded from the call's tier, inside what was reserved."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from agents.endpoints import Endpoint, EndpointsConfig, ReasoningControl
from agents.errors import ConfigError
from agents.metered import MeteredClient, RetryPolicy
from agents.plan import Subtask
from agents.stub_server import Reply, ScriptedModelServer
from agents.worker import WorkerAgent
from budgets import Budget, Ledger

T = "task-reasoning"
SUB = Subtask(id="think", instruction="Think hard, then answer.", difficulty=5)


def endpoint(server: ScriptedModelServer, reasoning: ReasoningControl, **extra: str) -> Endpoint:
    return Endpoint(
        name="thinker",
        base_url=server.base_url,
        model="o-model",
        kind="remote",
        max_tokens_param="max_completion_tokens",
        reasoning=reasoning,
        input_usd_per_mtok=Decimal(1),
        output_usd_per_mtok=Decimal(1),
        **extra,  # type: ignore[arg-type]
    )


async def solve(
    ledger: Ledger, server: ScriptedModelServer, ep: Endpoint, *, tokens: int
) -> dict[str, Any]:
    client = MeteredClient(
        ledger=ledger, config=EndpointsConfig(endpoints=[ep]), env={}, retry=RetryPolicy(attempts=1)
    )
    try:
        server.push(Reply(text="42"))
        await WorkerAgent(client=client).solve(
            task_id=T, account="root", subtask=SUB, context={}, budget_tokens=tokens,
            endpoint=None, task_text="A hard question.",
        )  # fmt: skip
    finally:
        await client.aclose()
    body = server.requests[-1].body
    assert body is not None
    assert body["max_completion_tokens"] <= tokens
    return body


@pytest.mark.parametrize(("tokens", "effort"), [(256, "low"), (2560, "medium"), (8192, "high")])
async def test_the_effort_follows_the_granted_tier(
    ledger: Ledger, server: ScriptedModelServer, tokens: int, effort: str
) -> None:
    await ledger.open_task(T, Budget(tokens=1_000_000))
    body = await solve(ledger, server, endpoint(server, "effort"), tokens=tokens)
    assert body["reasoning_effort"] == effort
    assert "thinking_budget" not in body
    assert "Answer in about" in str(body["messages"][-1]["content"])  # the prompt still says it


async def test_a_thinking_budget_stays_inside_the_reserved_cap_when_the_account_shrinks_it(
    ledger: Ledger, server: ScriptedModelServer
) -> None:
    ep = endpoint(server, "budget", reasoning_budget_field="reasoning_budget")
    await ledger.open_task(T, Budget(tokens=100_000))
    body = await solve(ledger, server, ep, tokens=4000)
    assert body["max_completion_tokens"] == 4000
    assert body["reasoning_budget"] == 3000
    # An account that holds less: max_tokens shrinks to what it pays, and the budget with it.
    await ledger.open_account(T, "root/small", Budget(tokens=1500))
    client = MeteredClient(
        ledger=ledger, config=EndpointsConfig(endpoints=[ep]), env={}, retry=RetryPolicy(attempts=1)
    )
    try:
        server.push(Reply(text="42"))
        await WorkerAgent(client=client).solve(
            task_id=T, account="root/small", subtask=SUB, context={}, budget_tokens=4000,
            endpoint=None, task_text="A hard question.",
        )  # fmt: skip
    finally:
        await client.aclose()
    shrunk = server.requests[-1].body
    assert shrunk is not None
    assert shrunk["max_completion_tokens"] < 1500
    assert shrunk["reasoning_budget"] == shrunk["max_completion_tokens"] * 3 // 4


async def test_no_reasoning_control_sends_nothing_extra(
    ledger: Ledger, server: ScriptedModelServer
) -> None:
    await ledger.open_task(T, Budget(tokens=100_000))
    body = await solve(ledger, server, endpoint(server, "none"), tokens=500)
    assert "reasoning_effort" not in body
    assert "thinking_budget" not in body


def test_an_unknown_reasoning_control_is_refused_by_name() -> None:
    data = {
        "endpoints": [
            {
                "name": "x",
                "base_url": "http://127.0.0.1:1/v1",
                "model": "m",
                "input_usd_per_mtok": "1",
                "output_usd_per_mtok": "1",
                "reasoning": "fast",
            }
        ]
    }
    with pytest.raises(ConfigError, match=r"endpoints\[0\]\.reasoning"):
        EndpointsConfig.parse(data, source="test.toml")

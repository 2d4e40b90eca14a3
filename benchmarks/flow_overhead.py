"""What Paymaster's bookkeeping costs per task, against a bare LangGraph fan-out.

Run: ``python -m benchmarks.flow_overhead [--quick] [--tasks N] [--concurrency C]``.
Starts its own redis-server and a zero-delay scripted OpenAI server. Each task
plans 8 independent subtasks, so both sides make the same 10 calls: one plan,
8 workers fanned out with ``Send``, one synthesis.

- ``paymaster``: ``Paymaster.arun`` in process (ledger, records, accounts,
  reservations and commits in Redis), one task at a time.
- ``bare_langgraph``: a ``StateGraph`` with the same shape making the same calls
  with ``AsyncOpenAI``, and no ledger, one task at a time.
- ``tasks_per_s``: Paymaster tasks per second with ``C`` tasks running at once
  in one process (``asyncio.gather`` of ``arun``), as one worker would.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import operator
import statistics
import tempfile
import time
from typing import Annotated, Any, TypedDict

from langgraph.graph import END, START, StateGraph
from langgraph.types import Send
from openai import AsyncOpenAI

from agents.endpoints import Endpoint, EndpointsConfig
from agents.stub_server import RecordedRequest, Reply, ScriptedModelServer
from budgets import Budget
from orchestrator.api import Paymaster
from orchestrator.redis_server import RedisServer

SUBTASKS = 8
PLAN = json.dumps(
    {
        "subtasks": [
            {"id": f"s{i}", "instruction": f"part {i}", "difficulty": 2, "depends_on": []}
            for i in range(SUBTASKS)
        ]
    }
)
BUDGET = Budget(tokens=50_000, usd="1")


def respond(request: RecordedRequest) -> Reply:
    """Plan 8 subtasks, answer each worker, write a final answer; no delay."""
    body = request.body or {}
    system = str(body.get("messages", [{}])[0].get("content", ""))
    if "Split the user's task" in system:
        return Reply(text=PLAN)
    if "Write the final answer" in system:
        return Reply(text="The final answer.")
    return Reply(text="A worker's answer to its part.")


# -- the bare graph ------------------------------------------------------------------------------


class BareState(TypedDict, total=False):
    task: str
    plan: list[dict[str, Any]]
    results: Annotated[list[str], operator.add]
    answer: str


def bare_graph(client: AsyncOpenAI) -> Any:
    """plan -> 8 x worker (Send) -> synthesize, one OpenAI call each, no ledger."""

    async def call(system: str, user: str, max_tokens: int) -> str:
        reply = await client.chat.completions.create(
            model="m",
            messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
            max_tokens=max_tokens,
        )
        return reply.choices[0].message.content or ""

    async def plan(state: BareState) -> dict[str, Any]:
        text = await call("Split the user's task into subtasks.", state["task"], 1024)
        return {"plan": json.loads(text)["subtasks"]}

    def fan_out(state: BareState) -> list[Send]:
        return [Send("worker", {"task": state["task"], "sub": s}) for s in state["plan"]]

    async def worker(item: dict[str, Any]) -> dict[str, Any]:
        text = await call("You are a worker agent.", item["sub"]["instruction"], 512)
        return {"results": [text]}

    async def synthesize(state: BareState) -> dict[str, Any]:
        listing = "\n\n".join(state.get("results", []))
        return {"answer": await call("Write the final answer.", listing, 1024)}

    graph = StateGraph(BareState)
    graph.add_node("plan", plan)
    graph.add_node("worker", worker)  # type: ignore[arg-type]
    graph.add_node("synthesize", synthesize)
    graph.add_edge(START, "plan")
    graph.add_conditional_edges("plan", fan_out, ["worker"])
    graph.add_edge("worker", "synthesize")
    graph.add_edge("synthesize", END)
    return graph.compile()


# -- measuring -------------------------------------------------------------------------------


async def time_each(run: Any, n: int) -> list[float]:
    """Milliseconds of each of ``n`` sequential runs (after one warm-up run)."""
    await run()
    out = []
    for _ in range(n):
        start = time.perf_counter()
        await run()
        out.append((time.perf_counter() - start) * 1000)
    return out


async def measure(base_url: str, redis_url: str, *, tasks: int, concurrency: int) -> dict[str, Any]:
    config = EndpointsConfig(
        endpoints=[
            Endpoint(
                name="stub",
                base_url=base_url,
                model="m",
                kind="remote",
                input_usd_per_mtok="1",  # type: ignore[arg-type]
                output_usd_per_mtok="2",  # type: ignore[arg-type]
                max_concurrency=64,
                max_retries=0,
            )
        ]
    )
    home = tempfile.mkdtemp(prefix="pm-bench-")
    pm = Paymaster(redis_url=redis_url, config=config, env={"HOME": home})
    client = AsyncOpenAI(base_url=base_url, api_key="sk-bench", max_retries=0)
    graph = bare_graph(client)
    try:

        async def pm_run() -> None:
            rec = await pm.arun("Write a report in parts.", budget=BUDGET)
            if rec.status.value != "succeeded":
                raise SystemExit(f"a Paymaster task ended {rec.status.value}: {rec.error}")

        async def bare_run() -> None:
            state = await graph.ainvoke({"task": "Write a report in parts."})
            if not state.get("answer") or len(state["results"]) != SUBTASKS:
                raise SystemExit("the bare graph did not finish")

        # Interleaved rounds, so drift on the machine hits both sides alike.
        pm_ms: list[float] = []
        bare_ms: list[float] = []
        rounds = 4
        for _ in range(rounds):
            pm_ms += await time_each(pm_run, max(1, tasks // rounds))
            bare_ms += await time_each(bare_run, max(1, tasks // rounds))

        batch = concurrency * max(1, tasks // concurrency)
        start = time.perf_counter()
        for _ in range(batch // concurrency):
            await asyncio.gather(*(pm_run() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    finally:
        await client.close()
        await pm.aclose()
    return {
        "pm_ms": pm_ms,
        "bare_ms": bare_ms,
        "tasks_per_s": batch / elapsed,
        "concurrent_tasks": batch,
    }


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="finish within a minute")
    parser.add_argument("--tasks", type=int, default=None, help="tasks timed on each side")
    parser.add_argument("--concurrency", type=int, default=8, help="tasks at once for tasks/s")
    args = parser.parse_args()
    tasks = args.tasks or (20 if args.quick else 100)

    with RedisServer() as redis_server, ScriptedModelServer() as srv:
        srv.responder = respond
        fig = asyncio.run(
            measure(srv.base_url, redis_server.url, tasks=tasks, concurrency=args.concurrency)
        )

    pm_ms, bare_ms = fig["pm_ms"], fig["bare_ms"]
    pm_mean, bare_mean = statistics.fmean(pm_ms), statistics.fmean(bare_ms)
    ratio = pm_mean / bare_mean
    header = f"{'side':<16} {'tasks':>6} {'mean ms':>9} {'p50 ms':>8} {'p95 ms':>8}"
    print(f"{SUBTASKS} independent subtasks per task (10 model calls), zero-delay stub server")
    print(header)
    print("-" * len(header))
    for name, values in (("paymaster", pm_ms), ("bare_langgraph", bare_ms)):
        print(
            f"{name:<16} {len(values):>6} {statistics.fmean(values):>9.1f} "
            f"{pct(values, 0.5):>8.1f} {pct(values, 0.95):>8.1f}"
        )
    print(
        f"paymaster, {args.concurrency} at once: {fig['concurrent_tasks']} tasks, "
        f"{fig['tasks_per_s']:.1f} tasks/s"
    )
    print(
        f"RESULT paymaster_ms_per_task={pm_mean:.1f} bare_langgraph_ms_per_task={bare_mean:.1f} "
        f"ratio={ratio:.2f} tasks_per_s={fig['tasks_per_s']:.1f}"
    )


if __name__ == "__main__":
    main()

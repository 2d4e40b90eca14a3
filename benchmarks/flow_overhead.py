"""What Paymaster's flow costs per task, against bare LangGraph making the same calls.

Run: ``python -m benchmarks.flow_overhead [--quick] [--tasks N] [--concurrency C]``.
Starts its own redis-server and a scripted OpenAI server; three cases:

- **flat** (the overhead, zero-delay server): 8 independent subtasks, so both
  sides make the same 10 calls — one plan, 8 workers fanned out, one synthesis.
  ``paymaster`` is ``Paymaster.arun`` in process (ledger, records, accounts,
  reservations, commits and statistics in Redis), one task at a time;
  ``bare_langgraph`` a ``StateGraph`` with the same shape making the same calls
  with ``AsyncOpenAI`` and no ledger. ``tasks_per_s``: Paymaster tasks per
  second with ``C`` running at once in one process, as one worker would.
- **nested** (zero delay): depth 2, 3 composite subtasks of 3 subtasks each —
  17 calls (a plan, 3 sub-plans, 9 workers, 3 sub-syntheses, a synthesis) —
  against a bare graph whose composite node makes the same calls.
- **dag** (critical path): s1 answers at once, s2 and s3 take 0.3 s, s3 needs
  s1. Paymaster starts s3 when s1 is done (about 0.3 s in all); a bare
  LangGraph graph in waves (s1 and s2, then s3) waits for s2 first (0.6 s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import operator
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
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
FLAT_TASK = "Write a report in parts."
NESTED_TASK = "Write a book in chapters."
DAG_TASK = "Do three steps."
SLOW_S = 0.3
BUDGET = Budget(tokens=60_000, usd="1")


def _sub(sid: str, instruction: str, *deps: str, composite: bool = False) -> dict[str, Any]:
    return {
        "id": sid,
        "instruction": instruction,
        "difficulty": 2,
        "depends_on": list(deps),
        "composite": composite,
    }


PLANS = {
    FLAT_TASK: [_sub(f"s{i}", f"part {i}") for i in range(SUBTASKS)],
    NESTED_TASK: [_sub(f"c{i}", f"chapter {i}", composite=True) for i in range(3)],
    DAG_TASK: [
        _sub("s1", "quick step"),
        _sub("s2", "slow step two"),
        _sub("s3", "slow step three", "s1"),
    ],
}
for _i in range(3):
    PLANS[f"chapter {_i}"] = [_sub(f"s{j}", f"section {_i}.{j}") for j in range(3)]


def respond(request: RecordedRequest) -> Reply:
    """Plan each task (and each chapter), answer each worker, write final answers."""
    body = request.body or {}
    messages = body.get("messages", [{}])
    system, user = str(messages[0].get("content", "")), str(messages[-1].get("content", ""))
    if "Split the user's task" in system:
        key = next((k for k in PLANS if user.startswith(k)), FLAT_TASK)
        return Reply(text=json.dumps({"subtasks": PLANS[key]}))
    if "Write the final answer" in system:
        return Reply(text="The final answer.")
    return Reply(
        text="A worker's answer to its part.", delay_s=SLOW_S if "slow step" in user else 0
    )


# -- the bare graphs -----------------------------------------------------------------------------

Call = Callable[[str, str, int], Awaitable[str]]


def caller(client: AsyncOpenAI) -> Call:
    async def call(system: str, user: str, max_tokens: int) -> str:
        reply = await client.chat.completions.create(
            model="m",
            messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
            max_tokens=max_tokens,
        )
        return reply.choices[0].message.content or ""

    return call


class BareState(TypedDict, total=False):
    task: str
    plan: list[dict[str, Any]]
    results: Annotated[list[str], operator.add]
    done: Annotated[list[str], operator.add]
    answer: str


async def _plan(call: Call, text: str) -> list[dict[str, Any]]:
    subtasks: list[dict[str, Any]] = json.loads(
        await call("Split the user's task into subtasks.", text, 1024)
    )["subtasks"]
    return subtasks


def _planned_graph(call: Call, nodes: dict[str, Any]) -> StateGraph[BareState]:
    """A graph with the plan and synthesis nodes every bare side shares, plus ``nodes``."""

    async def plan(state: BareState) -> dict[str, Any]:
        return {"plan": await _plan(call, state["task"])}

    async def synthesize(state: BareState) -> dict[str, Any]:
        listing = "\n\n".join(state.get("results", []))
        return {"answer": await call("Write the final answer.", listing, 1024)}

    graph = StateGraph(BareState)
    graph.add_node("plan", plan)
    for name, node in nodes.items():
        graph.add_node(name, node)
    graph.add_node("synthesize", synthesize)
    graph.add_edge(START, "plan")
    graph.add_edge("synthesize", END)
    return graph


def bare_graph(call: Call, *, nested: bool = False) -> Any:
    """plan -> N x worker (Send) -> synthesize; with ``nested``, each worker is a composite
    that plans, runs its 3 workers at once and synthesizes. No ledger."""

    def fan_out(state: BareState) -> list[Send]:
        return [Send("worker", {"task": state["task"], "sub": s}) for s in state["plan"]]

    async def worker(item: dict[str, Any]) -> dict[str, Any]:
        instruction = item["sub"]["instruction"]
        if not nested:
            return {"results": [await call("You are a worker agent.", instruction, 512)]}
        parts = await _plan(call, instruction)
        texts = await asyncio.gather(
            *(call("You are a worker agent.", p["instruction"], 512) for p in parts)
        )
        return {"results": [await call("Write the final answer.", "\n\n".join(texts), 1024)]}

    graph = _planned_graph(call, {"worker": worker})
    graph.add_conditional_edges("plan", fan_out, ["worker"])
    graph.add_edge("worker", "synthesize")
    return graph.compile()


def wave_graph(call: Call) -> Any:
    """The DAG in waves (LangGraph supersteps): every ready subtask, then the next wave."""

    def next_wave(state: BareState) -> list[Send] | str:
        done = set(state.get("done", []))
        ready = [
            s
            for s in state["plan"]
            if s["id"] not in done and all(d in done for d in s["depends_on"])
        ]
        return [Send("worker", {"sub": s}) for s in ready] if ready else "synthesize"

    async def worker(item: dict[str, Any]) -> dict[str, Any]:
        text = await call("You are a worker agent.", item["sub"]["instruction"], 512)
        return {"results": [text], "done": [item["sub"]["id"]]}

    async def schedule(state: BareState) -> dict[str, Any]:
        return {}

    graph = _planned_graph(call, {"worker": worker, "schedule": schedule})
    graph.add_conditional_edges("plan", next_wave, ["worker", "synthesize"])
    graph.add_edge("worker", "schedule")
    graph.add_conditional_edges("schedule", next_wave, ["worker", "synthesize"])
    return graph.compile()


# -- measuring -------------------------------------------------------------------------------


async def time_each(run: Callable[[], Awaitable[None]], n: int) -> list[float]:
    """Milliseconds of each of ``n`` sequential runs (after one warm-up run)."""
    await run()
    out = []
    for _ in range(n):
        start = time.perf_counter()
        await run()
        out.append((time.perf_counter() - start) * 1000)
    return out


async def interleaved(
    a: Callable[[], Awaitable[None]], b: Callable[[], Awaitable[None]], n: int, rounds: int = 4
) -> tuple[list[float], list[float]]:
    """Both sides timed in alternating rounds, so drift on the machine hits both alike."""
    a_ms: list[float] = []
    b_ms: list[float] = []
    for _ in range(rounds):
        a_ms += await time_each(a, max(1, n // rounds))
        b_ms += await time_each(b, max(1, n // rounds))
    return a_ms, b_ms


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
    call = caller(client)
    flat, nested, waves = bare_graph(call), bare_graph(call, nested=True), wave_graph(call)
    try:

        def pm_run(text: str, results: int) -> Callable[[], Awaitable[None]]:
            checked: list[bool] = []

            async def run() -> None:
                rec = await pm.arun(text, budget=BUDGET)
                if rec.status.value != "succeeded":
                    raise SystemExit(f"a Paymaster task ended {rec.status.value}: {rec.error}")
                if not checked:  # the warm-up run: its shape, outside the timed runs
                    done = await pm.asubtasks(rec.id)
                    if len(done) != results:
                        raise SystemExit(f"{len(done)} subtasks finished, not {results}")
                    checked.append(True)

            return run

        def bare_run(graph: Any, text: str, results: int) -> Callable[[], Awaitable[None]]:
            async def run() -> None:
                state = await graph.ainvoke({"task": text})
                if not state.get("answer") or len(state["results"]) != results:
                    raise SystemExit("the bare graph did not finish")

            return run

        pm_ms, bare_ms = await interleaved(
            pm_run(FLAT_TASK, SUBTASKS), bare_run(flat, FLAT_TASK, SUBTASKS), tasks
        )
        nested_pm, nested_bare = await interleaved(
            pm_run(NESTED_TASK, 9), bare_run(nested, NESTED_TASK, 3), max(4, tasks // 4)
        )
        dag_pm, dag_waves = await interleaved(
            pm_run(DAG_TASK, 3), bare_run(waves, DAG_TASK, 3), max(4, tasks // 10), rounds=2
        )
        batch = concurrency * max(1, tasks // concurrency)
        one = pm_run(FLAT_TASK, SUBTASKS)
        start = time.perf_counter()
        for _ in range(batch // concurrency):
            await asyncio.gather(*(one() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    finally:
        await client.close()
        await pm.aclose()
    return {
        "flat": (pm_ms, bare_ms),
        "nested": (nested_pm, nested_bare),
        "dag": (dag_pm, dag_waves),
        "tasks_per_s": batch / elapsed,
        "concurrent_tasks": batch,
    }


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="finish within a minute")
    parser.add_argument("--tasks", type=int, default=None, help="flat tasks timed on each side")
    parser.add_argument("--concurrency", type=int, default=8, help="tasks at once for tasks/s")
    args = parser.parse_args()
    tasks = args.tasks or (20 if args.quick else 100)

    with RedisServer() as redis_server, ScriptedModelServer() as srv:
        srv.responder = respond
        fig = asyncio.run(
            measure(srv.base_url, redis_server.url, tasks=tasks, concurrency=args.concurrency)
        )

    header = f"{'case':<8} {'side':<16} {'tasks':>6} {'mean ms':>9} {'p50 ms':>8} {'p95 ms':>8}"
    print(header)
    print("-" * len(header))
    means: dict[str, tuple[float, float]] = {}
    sides = {
        "flat": ("paymaster", "bare_langgraph"),
        "nested": ("paymaster", "bare_langgraph"),
        "dag": ("dataflow", "langgraph_waves"),
    }
    for case, (ours, theirs) in sides.items():
        a, b = fig[case]
        means[case] = (statistics.fmean(a), statistics.fmean(b))
        for name, values in ((ours, a), (theirs, b)):
            print(
                f"{case:<8} {name:<16} {len(values):>6} {statistics.fmean(values):>9.1f} "
                f"{pct(values, 0.5):>8.1f} {pct(values, 0.95):>8.1f}"
            )
    print(
        "flat: 8 subtasks, 10 calls; nested: 3 x 3 subtasks, 17 calls; "
        f"dag: s3 after s1, s2 and s3 take {SLOW_S:.1f} s (critical path)"
    )
    print(
        f"paymaster, {args.concurrency} flat tasks at once: {fig['concurrent_tasks']} tasks, "
        f"{fig['tasks_per_s']:.1f} tasks/s"
    )
    (pm_mean, bare_mean), (n_pm, n_bare), (dag, waves) = (means[c] for c in sides)
    print(
        f"RESULT paymaster_ms_per_task={pm_mean:.1f} bare_langgraph_ms_per_task={bare_mean:.1f} "
        f"ratio={pm_mean / bare_mean:.2f} tasks_per_s={fig['tasks_per_s']:.1f} "
        f"nested_ratio={n_pm / n_bare:.2f} dag_ms={dag:.0f} waves_ms={waves:.0f}"
    )


if __name__ == "__main__":
    main()

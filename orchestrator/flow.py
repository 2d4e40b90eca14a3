"""The task flow as a LangGraph ``StateGraph``.

plan -> schedule -> (subtask x N, in parallel with ``Send``) -> schedule -> ... -> synthesize

``schedule`` picks what runs next: first a bigger retry of any subtask that was
cut short (when the policy says the pool can pay), else the next wave of
subtasks whose dependencies are done. Each subtask gets its own account,
carved from the task's pool when it starts and closed when it ends, so its
leftover flows straight back to the work still waiting. Finished results are
kept in Redis: a task delivered again after a crash neither plans nor runs —
nor pays for — them twice.
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Protocol, TypedDict

from agents.manager import ManagerAgent
from langgraph.graph import END, START, StateGraph
from langgraph.types import Send

from agents.plan import Plan, Subtask
from agents.worker import WorkerAgent, WorkerResult
from budgets import Amount, Budget, BudgetExceeded, Ledger
from budgets.errors import AccountClosed
from budgets.keys import ROOT
from budgets.policy import Grant, Need, Policy, Pool
from orchestrator.errors import TaskCancelled
from orchestrator.records import Records

log = logging.getLogger(__name__)


def _merge(left: dict[str, Any], right: dict[str, Any]) -> dict[str, Any]:
    return {**left, **right}


class FlowState(TypedDict, total=False):
    """What the graph carries between nodes; results merge as subtasks finish."""

    task_id: str
    task: str
    delivery: int
    plan: list[dict[str, Any]]
    results: Annotated[dict[str, dict[str, Any]], _merge]
    attempts: Annotated[dict[str, int], _merge]
    work: list[dict[str, Any]]
    answer: str
    calls: Annotated[int, operator.add]


class CancelCheck(Protocol):
    """Answers whether the task was cancelled (checked before every subtask)."""

    async def __call__(self, task_id: str) -> bool: ...


@dataclass(frozen=True, slots=True)
class FlowDeps:
    """Everything the nodes use; built once per worker process."""

    ledger: Ledger
    records: Records
    manager: ManagerAgent
    worker: WorkerAgent
    policy: Policy
    max_subtasks: int = 8


def _account(name: str, delivery: int, attempt: int = 1) -> str:
    return f"{ROOT}/{name}.{delivery}.{attempt}"


def _result_dict(result: WorkerResult, *, attempt: int, exhausted: bool = False) -> dict[str, Any]:
    return {
        "subtask_id": result.subtask_id,
        "text": result.text,
        "finished": result.finished,
        "cut_short": result.cut_short,
        "tokens": result.input_tokens + result.output_tokens,
        "cost_nanos": result.cost_nanos,
        "endpoint": result.endpoint,
        "attempt": attempt,
        "exhausted": exhausted,
    }


def _exhausted(subtask_id: str, attempt: int) -> dict[str, Any]:
    return {
        "subtask_id": subtask_id,
        "text": "",
        "finished": False,
        "cut_short": False,
        "tokens": 0,
        "cost_nanos": 0,
        "endpoint": "",
        "attempt": attempt,
        "exhausted": True,
    }


class Flow:
    """The nodes of the graph, bound to their dependencies."""

    def __init__(self, deps: FlowDeps) -> None:
        self.deps = deps

    async def _pool(self, task_id: str) -> Pool:
        root = await self.deps.ledger.account(task_id, ROOT)
        return Pool(tokens=root.available_tokens, nanos=root.available_nanos)

    async def plan(self, state: FlowState) -> dict[str, Any]:
        """Plan once (or reuse the saved plan) and open the manager's account."""
        deps, task_id, delivery = self.deps, state["task_id"], state["delivery"]
        reserve = deps.policy.synthesis_reserve(await self._pool(task_id))
        manager_acct = _account("manager", delivery)
        await deps.ledger.open_account(
            task_id, manager_acct, Budget.from_nanos(tokens=reserve.tokens, nanos=reserve.nanos)
        )
        saved = await deps.records.load_plan(task_id)
        if saved is not None:
            plan = Plan.model_validate_json(saved)
        else:
            outcome = await deps.manager.plan(
                task_id=task_id,
                account=manager_acct,
                task=state["task"],
                max_subtasks=deps.max_subtasks,
            )
            plan = outcome.plan
            await deps.records.save_plan(task_id, plan.model_dump_json())
        done = await deps.records.load_results(task_id)
        return {
            "plan": [s.model_dump() for s in plan.subtasks],
            "results": done,
            "attempts": {sid: int(r.get("attempt", 1)) for sid, r in done.items()},
        }

    async def schedule(self, state: FlowState) -> dict[str, Any]:
        """Choose the next batch of work: escalations first, then the next wave."""
        deps, task_id = self.deps, state["task_id"]
        if await deps.records.cancel_requested(task_id):
            raise TaskCancelled(task_id)
        results, attempts = state.get("results", {}), state.get("attempts", {})
        subtasks = [Subtask.model_validate(s) for s in state["plan"]]
        pool = await self._pool(task_id)
        work: list[dict[str, Any]] = []
        for sub in subtasks:
            res = results.get(sub.id)
            if res is None or not res.get("cut_short"):
                continue
            need = Need(sub.id, sub.difficulty, attempt=attempts.get(sub.id, 1) + 1)
            grant = deps.policy.escalate(pool, need, spent_tokens=int(res.get("tokens", 0)))
            if grant is not None:
                work.append(self._item(state, sub, grant, need.attempt))
                pool = _less(pool, grant)
        if not work:
            ready = [
                s
                for s in subtasks
                if s.id not in results and all(d in results for d in s.depends_on)
            ]
            later = len(subtasks) - len(results) - len(ready)
            needs = [Need(s.id, s.difficulty) for s in ready]
            grants = deps.policy.split(pool, needs, pending_after=later)
            by_id = {s.id: s for s in ready}
            work = [self._item(state, by_id[g.subtask_id], g, 1) for g in grants]
        return {"work": work}

    def _item(self, state: FlowState, sub: Subtask, grant: Grant, attempt: int) -> dict[str, Any]:
        results = state.get("results", {})
        context = {d: str(results[d].get("text", "")) for d in sub.depends_on if d in results}
        return {
            "task_id": state["task_id"],
            "task": state["task"],
            "delivery": state["delivery"],
            "subtask": sub.model_dump(),
            "context": context,
            "attempt": attempt,
            "tokens": grant.tokens,
            "nanos": grant.nanos,
            "max_output": grant.max_output_tokens,
        }

    def route(self, state: FlowState) -> list[Send] | str:
        """Fan the chosen work out with ``Send``, or go to synthesis when none is left."""
        work = state.get("work", [])
        if not work:
            return "synthesize"
        return [Send("subtask", item) for item in work]

    async def subtask(self, item: dict[str, Any]) -> dict[str, Any]:
        """Run one subtask in its own account, then close it so the leftover returns."""
        deps, task_id = self.deps, item["task_id"]
        if await deps.records.cancel_requested(task_id):
            raise TaskCancelled(task_id)
        sub = Subtask.model_validate(item["subtask"])
        attempt = int(item["attempt"])
        account = _account(sub.id, int(item["delivery"]), attempt)
        budget = Budget.from_nanos(tokens=item["tokens"], nanos=item["nanos"])
        try:
            await deps.ledger.open_account(task_id, account, budget)
        except (BudgetExceeded, AccountClosed):
            return {"results": {sub.id: _exhausted(sub.id, attempt)}, "attempts": {sub.id: attempt}}
        try:
            result = await deps.worker.solve(
                task_id=task_id,
                account=account,
                subtask=sub,
                context=item["context"],
                budget_tokens=max(1, int(item["max_output"])),
                endpoint=None,
                task_text=item["task"],
            )
            out = _result_dict(result, attempt=attempt)
        except BudgetExceeded:
            out = _exhausted(sub.id, attempt)
        finally:
            await deps.ledger.close_account(task_id, account, force=True)
        if out["exhausted"] and attempt > 1:
            return {"attempts": {sub.id: attempt}}  # keep the earlier, cut-short answer
        if not out["exhausted"]:
            await deps.records.save_result(task_id, sub.id, out)
        return {"results": {sub.id: out}, "attempts": {sub.id: attempt}, "calls": 1}

    async def synthesize(self, state: FlowState) -> dict[str, Any]:
        """Hand everything left to the manager's account and write the final answer."""
        deps, task_id = self.deps, state["task_id"]
        manager_acct = _account("manager", state["delivery"])
        pool = await self._pool(task_id)
        if (pool.tokens or 0) > 0 or (pool.nanos or 0) > 0:
            await deps.ledger.transfer(
                task_id,
                src=ROOT,
                dst=manager_acct,
                amount=Amount(tokens=pool.tokens or 0, nanos=pool.nanos or 0),
                op_id=f"synth.{state['delivery']}",
            )
        results = _ordered_results(state)
        answer = await deps.manager.synthesize(
            task_id=task_id, account=manager_acct, task=state["task"], results=results
        )
        return {"answer": answer}


def _less(pool: Pool, grant: Grant) -> Pool:
    def minus(have: int | None, take: int | None) -> int | None:
        return None if have is None else max(0, have - (take or 0))

    return Pool(tokens=minus(pool.tokens, grant.tokens), nanos=minus(pool.nanos, grant.nanos))


def _ordered_results(state: FlowState) -> list[WorkerResult]:
    results = state.get("results", {})
    ordered = []
    for sub in state["plan"]:
        res = results.get(sub["id"])
        if res is None:
            continue
        ordered.append(
            WorkerResult(
                subtask_id=sub["id"],
                text=str(res.get("text", "")),
                finished=bool(res.get("finished")),
                cut_short=bool(res.get("cut_short")),
                input_tokens=0,
                output_tokens=int(res.get("tokens", 0)),
                cost_nanos=int(res.get("cost_nanos", 0)),
                endpoint=str(res.get("endpoint", "")),
                estimated=False,
            )
        )
    return ordered


def build_graph(flow: Flow) -> Any:
    """Wire the nodes: the whole graph in one place."""
    graph = StateGraph(FlowState)
    graph.add_node("plan", flow.plan)
    graph.add_node("schedule", flow.schedule)
    graph.add_node("subtask", flow.subtask)  # type: ignore[arg-type]
    graph.add_node("synthesize", flow.synthesize)
    graph.add_edge(START, "plan")
    graph.add_edge("plan", "schedule")
    graph.add_conditional_edges("schedule", flow.route, ["subtask", "synthesize"])
    graph.add_edge("subtask", "schedule")
    graph.add_edge("synthesize", END)
    return graph.compile()


def summarize(results: Mapping[str, Mapping[str, Any]], plan: Sequence[Mapping[str, Any]]) -> bool:
    """True when every planned subtask finished with a result (no budget cut it off)."""
    return all(
        sid in results and not results[sid].get("exhausted") for sid in (s["id"] for s in plan)
    )

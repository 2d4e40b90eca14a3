"""The task flow as a LangGraph ``StateGraph``.

plan -> schedule -> (subtask x N, in parallel with ``Send``) -> schedule -> ... -> synthesize

``schedule`` asks the policy what runs next: first another, better paid try of
finished subtasks the policy chooses to escalate (a reply cut short, a signal
of failure, or — for ``adaptive`` — a low chance of being right that a
stronger endpoint would raise), else the next wave of subtasks whose
dependencies are done, each on the endpoint and token tier the policy picks
with the statistics of earlier calls in hand. Each subtask gets its own account,
carved from the task's pool when it starts and closed when it ends, so its
leftover flows straight back to the work still waiting. Finished results are
kept in Redis: a task delivered again after a crash neither plans nor runs —
nor pays for — them twice. Every finished try is counted once in the
statistics of the task's scope, which feed the next decisions.
"""

from __future__ import annotations

import asyncio
import logging
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Protocol, TypedDict

from langgraph.graph import END, START, StateGraph
from langgraph.types import Send

from agents.manager import ManagerAgent, PlanOutcome
from agents.plan import Plan, Subtask, single_subtask_plan
from agents.worker import WorkerAgent, WorkerResult
from budgets import Amount, Budget, BudgetExceeded, Ledger, nanos_to_usd
from budgets.errors import AccountClosed
from budgets.keys import (
    ROOT,
    SHARED_SCOPE,
    outcome_id,
    plan_leftover_op_id,
    synthesis_op_id,
    tenant_scope,
)
from budgets.policy import Grant, Menu, Need, Option, Outcome, Policy, Pool
from budgets.stats import Observation, StatsBook
from orchestrator.errors import DeliveryLost, TaskCancelled
from orchestrator.queue import Delivery
from orchestrator.records import Records

log = logging.getLogger(__name__)


def _merge(left: dict[str, Any], right: dict[str, Any]) -> dict[str, Any]:
    return {**left, **right}


class FlowState(TypedDict, total=False):
    """What the graph carries between nodes; results merge as subtasks finish."""

    task_id: str
    task: str
    delivery: int
    #: The worker's hold on the task's queue message; ``None`` for a run in process.
    claim: Delivery | None
    scope: str
    plan: list[dict[str, Any]]
    results: Annotated[dict[str, dict[str, Any]], _merge]
    attempts: Annotated[dict[str, int], _merge]
    work: list[dict[str, Any]]
    answer: str
    calls: Annotated[int, operator.add]


class CancelCheck(Protocol):
    """Answers whether the task was cancelled (checked before every subtask)."""

    async def __call__(self, task_id: str) -> bool: ...


class Ownership(Protocol):
    """Answers whether a worker still holds its delivery (checked before every paid step)."""

    async def owns(self, delivery: Delivery) -> bool: ...


@dataclass(frozen=True, slots=True)
class FlowDeps:
    """Everything the nodes use; built once per worker process."""

    ledger: Ledger
    records: Records
    manager: ManagerAgent
    worker: WorkerAgent
    policy: Policy
    stats: StatsBook
    options: tuple[Option, ...] = ()
    default_endpoint: str | None = None
    max_subtasks: int = 8
    #: The queue's ownership check; without one, deliveries are not checked.
    ownership: Ownership | None = None


def stats_scope(tenant: str | None, mode: str) -> str:
    """The statistics scope of a task: its tenant's own, unless statistics are shared."""
    return tenant_scope(tenant) if tenant and mode == "tenant" else SHARED_SCOPE


def _account(name: str, delivery: int, attempt: int = 1) -> str:
    return f"{ROOT}/{name}.{delivery}.{attempt}"


def _signals(result: WorkerResult) -> list[str]:
    return ["empty"] if not result.text.strip() else []


def _result_dict(
    result: WorkerResult, *, sub: Subtask, attempt: int, asked: int, outcome: str
) -> dict[str, Any]:
    return {
        "subtask_id": result.subtask_id,
        "text": result.text,
        "finished": result.finished,
        "cut_short": result.cut_short,
        "tokens": result.input_tokens + result.output_tokens,
        "output_tokens": result.output_tokens,
        "asked": asked,
        "cost_nanos": result.cost_nanos,
        "endpoint": result.endpoint,
        "difficulty": sub.difficulty,
        "tags": list(sub.tags),
        "signals": _signals(result),
        "outcome": outcome,
        "attempt": attempt,
        "exhausted": False,
    }


def outcome_of(sub: Subtask, res: Mapping[str, Any], attempts: int) -> Outcome:
    """A saved result as the policy sees it."""
    need = Need(sub.id, sub.difficulty, tuple(sub.tags), attempt=attempts)
    return Outcome(
        need=need,
        endpoint=str(res.get("endpoint", "")),
        asked=int(res.get("asked", 0)),
        used=int(res.get("output_tokens", res.get("tokens", 0))),
        cut_short=bool(res.get("cut_short")),
        signals=frozenset(str(x) for x in res.get("signals", [])),
    )


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

    async def _may_pay(self, task_id: str, claim: Delivery | None) -> None:
        """Before a paid step: stop if the task was cancelled or this worker lost its delivery.

        Both questions go to Redis at once (an ``HGET`` of the record and one
        ``XPENDING``): a round trip per step, not per token.
        """
        ownership = self.deps.ownership
        cancelled = self.deps.records.cancel_requested(task_id)
        if claim is None or ownership is None:
            if await cancelled:
                raise TaskCancelled(task_id)
            return
        asked, owned = await asyncio.gather(cancelled, ownership.owns(claim))
        if not owned:
            raise DeliveryLost(task_id, claim.message_id)
        if asked:
            raise TaskCancelled(task_id)

    async def _pool(self, task_id: str) -> Pool:
        root = await self.deps.ledger.account(task_id, ROOT)
        return Pool(tokens=root.available_tokens, nanos=root.available_nanos)

    async def plan(self, state: FlowState) -> dict[str, Any]:
        """Plan once (or reuse the saved plan) in a manager account sized for the call.

        The manager's account is the policy's synthesis reserve, grown for the
        planning call to what that call reserves (at most half the pool), and
        given back down to the reserve once the plan is made. A budget that
        cannot pay even a short planning call runs the task as one subtask,
        noted in the audit stream.
        """
        deps, task_id, delivery = self.deps, state["task_id"], state["delivery"]
        pool = await self._pool(task_id)
        reserve = deps.policy.synthesis_reserve(pool)
        manager_acct = _account("manager", delivery)
        saved = await deps.records.load_plan(task_id)
        if saved is not None:
            await deps.ledger.open_account(task_id, manager_acct, _budget_of(reserve))
            plan = Plan.model_validate_json(saved)
        else:
            most = self._subtasks_affordable(pool, reserve, state["task"])
            full, least = deps.manager.plan_cost(task=state["task"], max_subtasks=most)
            size = planning_budget(pool, reserve=reserve, full=full, least=least)
            if size is None:
                why = (
                    f"the budget cannot pay for planning (a plan needs {least.tokens:,} tokens, "
                    f"${nanos_to_usd(least.nanos):f})"
                )
                await deps.ledger.open_account(task_id, manager_acct, _budget_of(reserve))
                outcome = deps.manager.unplanned(state["task"], why)
            else:
                await self._may_pay(task_id, state.get("claim"))
                await deps.ledger.open_account(task_id, manager_acct, _budget_of(size))
                outcome = await deps.manager.plan(
                    task_id=task_id,
                    account=manager_acct,
                    task=state["task"],
                    max_subtasks=most,
                )
                await self._give_back(task_id, manager_acct, keep=reserve, delivery=delivery)
            plan = outcome.plan
            await deps.records.save_plan(task_id, plan.model_dump_json())
            await deps.ledger.note(
                task_id, manager_acct, _plan_note(outcome), tags={"step": "plan"}
            )
        done = await deps.records.load_results(task_id)
        for res in done.values():
            if res.get("outcome"):  # counted once whatever happened before
                await self._count(state["scope"], str(res["outcome"]), res)
        return {
            "plan": [s.model_dump() for s in plan.subtasks],
            "results": done,
            "attempts": {sid: int(r.get("attempt", 1)) for sid, r in done.items()},
        }

    def _subtasks_affordable(self, pool: Pool, reserve: Pool, task: str) -> int:
        """How many subtasks the pool can pay one useful call each for (at least one).

        The plan asks for no more than that, so a small budget is not spread
        over more subtasks than can each say something.
        """
        if pool.tokens is None:
            return self.deps.max_subtasks
        (whole,) = single_subtask_plan(task).subtasks
        each = USEFUL_OUTPUT_TOKENS + self.deps.worker.prompt_tokens(
            subtask=whole, context={}, endpoint=self.deps.default_endpoint, task_text=task
        )
        left = pool.tokens - (reserve.tokens or 0) - pool.tokens // 2
        return max(1, min(self.deps.max_subtasks, left // max(1, each)))

    async def _give_back(self, task_id: str, account: str, *, keep: Pool, delivery: int) -> None:
        """Return what ``account`` holds beyond ``keep`` to the pool (the root)."""
        view = await self.deps.ledger.account(task_id, account)
        extra_tokens = max(0, (view.available_tokens or 0) - (keep.tokens or 0))
        extra_nanos = max(0, (view.available_nanos or 0) - (keep.nanos or 0))
        if view.available_tokens is None or keep.tokens is None:
            extra_tokens = 0
        if view.available_nanos is None or keep.nanos is None:
            extra_nanos = 0
        if extra_tokens or extra_nanos:
            await self.deps.ledger.transfer(
                task_id,
                src=account,
                dst=ROOT,
                amount=Amount(tokens=extra_tokens, nanos=extra_nanos),
                op_id=plan_leftover_op_id(delivery),
            )

    async def schedule(self, state: FlowState) -> dict[str, Any]:
        """Choose the next batch of work: escalations first, then the next wave."""
        deps, task_id = self.deps, state["task_id"]
        await self._may_pay(task_id, state.get("claim"))
        results, attempts = state.get("results", {}), state.get("attempts", {})
        subtasks = [Subtask.model_validate(s) for s in state["plan"]]
        pool = await self._pool(task_id)
        menu = Menu(deps.options, await deps.stats.read(state["scope"]), deps.default_endpoint)
        by_id = {s.id: s for s in subtasks}
        outcomes = [
            outcome_of(sub, res, attempts.get(sub.id, 1))
            for sub in subtasks
            if (res := results.get(sub.id)) is not None and not res.get("exhausted")
        ]
        grants = deps.policy.escalate(pool, outcomes, menu=menu)
        work = [
            self._item(state, by_id[g.subtask_id], g, attempts.get(g.subtask_id, 1) + 1)
            for g in grants
            if g.subtask_id in by_id
        ]
        if not work:
            ready = [
                s
                for s in subtasks
                if s.id not in results and all(d in results for d in s.depends_on)
            ]
            later = len(subtasks) - len(results) - len(ready)
            needs = [
                Need(
                    s.id,
                    s.difficulty,
                    tuple(s.tags),
                    prompt_tokens=deps.worker.prompt_tokens(
                        subtask=s,
                        context=self._context(state, s),
                        endpoint=deps.default_endpoint,
                        task_text=state["task"],
                    ),
                )
                for s in ready
            ]
            grants = deps.policy.split(pool, needs, pending_after=later, menu=menu)
            ready_ids = {s.id for s in ready}
            prompts = {n.subtask_id: n.prompt_tokens for n in needs}
            paid = [g for g in grants if g.subtask_id in ready_ids and _useful(g, prompts)]
            if not paid and needs:
                # No share pays a useful call: run the first subtask alone on
                # the whole pool; the others wait for the money it gives back.
                alone = deps.policy.split(pool, needs[:1], pending_after=0, menu=menu)
                paid = [g for g in alone if _useful(g, prompts)]
            # A subtask whose share cannot pay a useful call waits for a later
            # wave, when finished subtasks have given their leftovers back.
            work = [self._item(state, by_id[g.subtask_id], g, 1) for g in paid]
        return {"work": work}

    @staticmethod
    def _context(state: FlowState, sub: Subtask) -> dict[str, str]:
        results = state.get("results", {})
        return {d: str(results[d].get("text", "")) for d in sub.depends_on if d in results}

    def _item(self, state: FlowState, sub: Subtask, grant: Grant, attempt: int) -> dict[str, Any]:
        return {
            "task_id": state["task_id"],
            "task": state["task"],
            "delivery": state["delivery"],
            "claim": state.get("claim"),
            "scope": state["scope"],
            "subtask": sub.model_dump(),
            "context": self._context(state, sub),
            "attempt": attempt,
            "tokens": grant.tokens,
            "nanos": grant.nanos,
            "max_output": grant.max_output_tokens,
            "endpoint": grant.endpoint,
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
        await self._may_pay(task_id, item.get("claim"))
        sub = Subtask.model_validate(item["subtask"])
        attempt = int(item["attempt"])
        asked = max(1, int(item["max_output"]))
        paid = await deps.worker.paid_for(task_id=task_id, subtask_id=sub.id, attempt=attempt)
        if paid is not None:
            # A delivery before this one paid for the attempt and died before
            # saving it: the reply was kept with the payment; no second call.
            out = _result_dict(
                paid,
                sub=sub,
                attempt=attempt,
                asked=asked,
                outcome=outcome_id(task_id, paid.account),
            )
            return await self._finished(item, sub, out)
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
                budget_tokens=asked,
                endpoint=item.get("endpoint"),
                task_text=item["task"],
                attempt=attempt,
            )
            outcome = outcome_id(task_id, account)
            out = _result_dict(result, sub=sub, attempt=attempt, asked=asked, outcome=outcome)
        except BudgetExceeded:
            out = _exhausted(sub.id, attempt)
        finally:
            await deps.ledger.close_account(task_id, account, force=True)
        return await self._finished(item, sub, out)

    async def _finished(
        self, item: Mapping[str, Any], sub: Subtask, out: dict[str, Any]
    ) -> dict[str, Any]:
        attempt = int(out["attempt"])
        if out["exhausted"] and attempt > 1:
            return {"attempts": {sub.id: attempt}}  # keep the earlier, cut-short answer
        if not out["exhausted"]:
            # Saved first, counted second: a crash between the two is mended by
            # the next delivery, which counts every saved result again (once,
            # by the outcome's marker).
            await self.deps.records.save_result(item["task_id"], sub.id, out)
            await self._count(item["scope"], out["outcome"], out)
        return {"results": {sub.id: out}, "attempts": {sub.id: attempt}, "calls": 1}

    async def _count(self, scope: str, outcome: str, out: Mapping[str, Any]) -> None:
        if not out["endpoint"]:
            return
        sub_tags = [*out["tags"], *out["signals"], *(["cut_short"] if out["cut_short"] else [])]
        seen = Observation(
            endpoint=out["endpoint"],
            difficulty=int(out["difficulty"]),
            tags=tuple(sub_tags),
            asked=int(out["asked"]),
            used=int(out["output_tokens"]),
            cut_short=bool(out["cut_short"]),
            nanos=int(out["cost_nanos"]),
            escalated=int(out["attempt"]) > 1,
        )
        await self.deps.stats.record(scope, outcome, seen)

    async def synthesize(self, state: FlowState) -> dict[str, Any]:
        """Hand everything left to the manager's account and write the final answer."""
        deps, task_id = self.deps, state["task_id"]
        results = _ordered_results(state)
        if len(state["plan"]) == 1 and len(results) == 1 and results[0].finished:
            # One finished subtask is the answer: a synthesis call would only restate it.
            return {"answer": results[0].text.strip()}
        await self._may_pay(task_id, state.get("claim"))
        manager_acct = _account("manager", state["delivery"])
        pool = await self._pool(task_id)
        if (pool.tokens or 0) > 0 or (pool.nanos or 0) > 0:
            await deps.ledger.transfer(
                task_id,
                src=ROOT,
                dst=manager_acct,
                amount=Amount(tokens=pool.tokens or 0, nanos=pool.nanos or 0),
                op_id=synthesis_op_id(state["delivery"]),
            )
        answer = await deps.manager.synthesize(
            task_id=task_id, account=manager_acct, task=state["task"], results=results
        )
        return {"answer": answer}


#: The least output a subtask's share must pay for besides its prompt to be worth starting.
USEFUL_OUTPUT_TOKENS = 64


def _useful(grant: Grant, prompts: Mapping[str, int]) -> bool:
    if grant.tokens is None:
        return True
    return grant.tokens >= prompts.get(grant.subtask_id, 0) + USEFUL_OUTPUT_TOKENS


def _budget_of(pool: Pool) -> Budget:
    return Budget.from_nanos(tokens=pool.tokens, nanos=pool.nanos)


def planning_budget(pool: Pool, *, reserve: Pool, full: Amount, least: Amount) -> Pool | None:
    """The manager's account while it plans, or ``None`` when planning is not affordable.

    Per unit: what the planning call reserves at full size (``full``), capped
    at half the pool so the workers keep the rest, and never less than the
    synthesis ``reserve``. ``None`` when the call at its least useful size
    (``least``) does not fit under that cap. An unlimited unit stays unlimited.
    """
    sizes: list[int | None] = []
    for have, keep, most, fewest in (
        (pool.tokens, reserve.tokens, full.tokens, least.tokens),
        (pool.nanos, reserve.nanos, full.nanos, least.nanos),
    ):
        if have is None:
            sizes.append(None)
            continue
        cap = have // 2
        if fewest > cap:
            return None
        sizes.append(max(keep or 0, min(most, cap)))
    return Pool(tokens=sizes[0], nanos=sizes[1])


def _plan_note(outcome: PlanOutcome) -> str:
    ids = ", ".join(s.id for s in outcome.plan.subtasks)
    n = len(outcome.plan.subtasks)
    if outcome.fell_back and outcome.calls == 0:
        return f"one subtask ({ids}): {outcome.reasons[-1]}"
    if outcome.fell_back:
        return f"one subtask ({ids}): no usable plan after {outcome.calls} call(s)"
    how = " after one repair" if outcome.repaired else ""
    return f"{n} subtask{'s' if n != 1 else ''}{how}: {ids}"


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

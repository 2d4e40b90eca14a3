"""The task flow: the manager's plan run as a dataflow of LangGraph tasks, level by level.

A *level* is one manager's plan and the work under it: the task's own plan,
and — for a subtask the plan marks ``composite`` — a sub-manager's plan inside
that subtask's carved account, down to ``max_depth`` levels. Each level

1. **plans** once (or reuses the plan saved by an earlier delivery) in a
   manager account sized for the call, then gives back all but the synthesis
   reserve (and the reviews' reserve) to the level's pool;
2. **runs its subtasks as a dataflow**: each starts, as a LangGraph task
   (``langgraph.func.task``; its future is awaited with the others), as soon
   as its own dependencies are done and the policy grants it a budget — not at
   the end of a wave. A decision is taken whenever a subtask finishes: first
   another, better paid try of finished subtasks the policy chooses to
   escalate, then every subtask that became ready, each on the endpoint and
   token tier the policy picks with the statistics of earlier calls in hand;
3. **finishes each subtask in a fixed order** (:meth:`Flow.subtask`): the call
   (its reply kept by the commit that pays for it), the account closed so its
   leftover flows back to the level's pool, the manager's review where it is
   on, the result saved (by the close itself, in the same step, when there is
   no review), the outcome counted in the statistics;
4. **synthesizes** its children's results with what is left of its pool (a
   single finished subtask is the answer as it is).

Finished results are kept in Redis by work id (``s2:s1`` is s1 of composite
s2): a task delivered again after a crash neither plans nor runs — nor pays
for — them twice, at any level.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol, TypedDict, TypeVar

from langgraph.func import entrypoint, task

from agents.manager import ManagerAgent, PlanOutcome
from agents.plan import Plan, Subtask, single_subtask_plan
from agents.verifier import reply_signals
from agents.worker import WorkerAgent, WorkerResult
from budgets import Amount, BudgetExceeded, Ledger, nanos_to_usd
from budgets.errors import AccountBusy, AccountClosed, UnknownAccount
from budgets.keys import (
    ROOT,
    SHARED_SCOPE,
    WORK_SEPARATOR,
    child_path,
    level_of,
    outcome_id,
    plan_leftover_op_id,
    synthesis_op_id,
    tenant_scope,
    work_id,
)
from budgets.ledger import Closed
from budgets.policy import Grant, Menu, Need, Option, Outcome, Policy, Pool
from budgets.stats import Observation, Stats, StatsBook
from budgets.tree import AccountView, account_from_hash
from orchestrator.errors import DeliveryLost, TaskCancelled
from orchestrator.queue import Delivery
from orchestrator.records import Records, result_text
from orchestrator.telemetry import NO_TELEMETRY, Telemetry

log = logging.getLogger(__name__)

_Read = TypeVar("_Read")

#: The least output a subtask's share must pay for besides its prompt to be worth starting.
USEFUL_OUTPUT_TOKENS = 64
#: The prompt size assumed for a result saved without one (by an older version).
DEFAULT_PROMPT_TOKENS = 256
#: With reviews on ``auto``, the least planned difficulty a result is reviewed at...
REVIEW_AUTO_DIFFICULTY = 4
#: ...and only when the reviews reserve at most 1/10 of the level's pool.
AUTO_REVIEW_SHARE_DIVISOR = 10

ReviewMode = Literal["off", "on", "auto"]


class Ownership(Protocol):
    """Answers whether a worker still holds its delivery (checked before every paid step)."""

    async def owns(self, delivery: Delivery) -> bool: ...


@dataclass(frozen=True, slots=True)
class FlowDeps:
    """Everything the flow uses; built once per worker process."""

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
    #: Levels of managers: 1 plans only the task; 2 lets its subtasks be planned again.
    max_depth: int = 2
    review: ReviewMode = "auto"
    #: Observability hooks (orchestrator/telemetry.py); off by default.
    telemetry: Telemetry = NO_TELEMETRY


def stats_scope(tenant: str | None, mode: str) -> str:
    """The statistics scope of a task: its tenant's own, unless statistics are shared."""
    return tenant_scope(tenant) if tenant and mode == "tenant" else SHARED_SCOPE


# -- the typed records the flow passes and keeps -----------------------------------------------


class SubtaskResult(TypedDict):
    """A finished (or unpaid) try of one subtask, as kept in the task's results hash (JSON)."""

    subtask_id: str
    text: str
    #: The model stopped on its own with a non-empty answer (a composite: every child did).
    finished: bool
    cut_short: bool
    #: Not rejected by the manager's review (``True`` when not reviewed).
    accepted: bool
    reviewed: bool
    #: Never paid for: its share could not be carved.
    exhausted: bool
    composite: bool
    tokens: int
    output_tokens: int
    asked: int
    cost_nanos: int
    endpoint: str
    difficulty: int
    tags: list[str]
    #: The reply's own signals (:func:`agents.verifier.reply_signals`, ``rejected``).
    signals: list[str]
    input_tokens: int
    #: The prompt as the metered call counted it when the try was granted (what another
    #: try is priced with; ``input_tokens`` is what the server billed).
    counted_prompt: int
    #: Output tokens of the try this one escalated from (0 for a first try).
    before_used: int
    #: The policy chose this try to learn (``Grant.explore``).
    explored: bool
    #: The id statistics count it under ("" when not counted).
    outcome: str
    attempt: int
    #: Work ids under a composite that fell short, each with why.
    short: list[str]


def _result(
    sub: Subtask,
    attempt: int,
    *,
    text: str = "",
    finished: bool = False,
    exhausted: bool = False,
    **fields: Any,
) -> SubtaskResult:
    out: SubtaskResult = {
        "subtask_id": sub.id,
        "text": text,
        "finished": finished,
        "cut_short": False,
        "accepted": True,
        "reviewed": False,
        "exhausted": exhausted,
        "composite": False,
        "tokens": 0,
        "output_tokens": 0,
        "asked": 0,
        "cost_nanos": 0,
        "endpoint": "",
        "difficulty": sub.difficulty,
        "tags": list(sub.tags),
        "signals": [],
        "input_tokens": 0,
        "counted_prompt": 0,
        "before_used": 0,
        "explored": False,
        "outcome": "",
        "attempt": attempt,
        "short": [],
    }
    out.update(fields)  # type: ignore[typeddict-item]
    return out


def _from_worker(res: WorkerResult, item: WorkItem, *, outcome: str) -> SubtaskResult:
    sub = item.subtask
    return _result(
        sub,
        item.attempt,
        text=res.text,
        finished=res.finished,
        cut_short=res.cut_short,
        tokens=res.input_tokens + res.output_tokens,
        input_tokens=res.input_tokens,
        counted_prompt=item.prompt_tokens,
        output_tokens=res.output_tokens,
        asked=item.max_output,
        cost_nanos=res.cost_nanos,
        endpoint=res.endpoint,
        signals=reply_signals(res.text, question=sub.instruction, output_tokens=res.output_tokens),
        before_used=item.before_used,
        explored=item.explore,
        outcome=outcome,
    )


def loaded_result(raw: Mapping[str, Any]) -> SubtaskResult:
    """A saved result read back; fields a result saved by an older version lacks get defaults."""
    sub = Subtask(
        id=str(raw.get("subtask_id") or "s"),
        instruction="-",
        difficulty=int(raw.get("difficulty", 1) or 1),
    )
    out = _result(sub, int(raw.get("attempt", 1)))
    out.update({k: v for k, v in raw.items() if k in out})  # type: ignore[typeddict-item]
    return out


def shortfall(work: str, res: SubtaskResult) -> list[str]:
    """Why a result is not a full answer (``[]`` when it is), each as ``<work id> (<why>)``."""
    if res["exhausted"]:
        return [f"{work} (not paid for)"]
    if res["composite"] and res["short"]:
        return list(res["short"])
    if res["cut_short"]:
        return [f"{work} (cut short)"]
    if not res["accepted"]:
        return [f"{work} (rejected)"]
    if not res["finished"]:
        return [f"{work} (no answer)"]
    return []


@dataclass(slots=True)
class PoolBook:
    """A level's pool as the ledger holds it, read once and then kept here.

    Nothing but the level's own steps moves money in or out of a pool account
    (it holds no reservations of its own): carving a child takes its limit,
    closing one gives back its limit less what it spent, a transfer moves its
    amount. Kept from those deltas, the pool is what a read would return, and a
    decision need not read it back. ``tokens`` and ``nanos`` are the raw room
    (negative after an overrun, as the ledger counts it); ``None`` is unlimited.
    """

    tokens: int | None
    nanos: int | None

    def pool(self) -> Pool:
        """The pool as the policy sees it: the room, never below zero."""
        return Pool(
            tokens=None if self.tokens is None else max(0, self.tokens),
            nanos=None if self.nanos is None else max(0, self.nanos),
        )

    def add(self, tokens: int | None, nanos: int | None) -> None:
        """Move the room by a signed amount (``None``: that unit of the child is unlimited)."""
        if self.tokens is not None and tokens is not None:
            self.tokens += tokens
        if self.nanos is not None and nanos is not None:
            self.nanos += nanos


@dataclass(frozen=True, slots=True)
class TaskRun:
    """One delivery of one task, as every step of it sees it."""

    task_id: str
    task: str
    delivery: int
    claim: Delivery | None
    scope: str
    #: Every result saved by earlier deliveries, by work id.
    saved: Mapping[str, SubtaskResult] = field(default_factory=dict)
    #: Each level's pool, by account path, kept from this delivery's own steps (see
    #: :class:`PoolBook`); a level reads its pool when it plans.
    pools: dict[str, PoolBook] = field(default_factory=dict)

    def moved(self, path: str, tokens: int | None, nanos: int | None) -> None:
        """Note that one of this delivery's steps moved ``path``'s room by this much."""
        book = self.pools.get(path)
        if book is not None:
            book.add(tokens, nanos)


def manager_account(level_path: str, delivery: int) -> str:
    """The manager's account of the level whose pool is ``level_path``, for one delivery."""
    return child_path(level_path, f"manager.{delivery}.1")


@dataclass(frozen=True, slots=True)
class Level:
    """One manager's plan and the work under it."""

    #: The account whose pool the level's subtasks are carved from.
    path: str
    #: The work id of the composite subtask planned here ("" for the task itself).
    work: str
    #: 1 for the task's own manager, 2 for a sub-manager, ...
    depth: int
    #: What the level's manager plans and its workers work toward.
    text: str

    def manager_account(self, delivery: int) -> str:
        """The level's manager account (planning, reviews, synthesis) for one delivery."""
        return manager_account(self.path, delivery)

    def account(self, subtask_id: str, delivery: int, attempt: int) -> str:
        """The account one try of a subtask of this level is paid from."""
        return child_path(self.path, f"{subtask_id}.{delivery}.{attempt}")

    def work_of(self, subtask_id: str) -> str:
        """The task-wide work id of a subtask of this level."""
        return work_id(self.work, subtask_id)


@dataclass(frozen=True, slots=True)
class WorkItem:
    """One try of one subtask, with the budget the policy granted it."""

    level: Level
    subtask: Subtask
    attempt: int
    tokens: int | None
    nanos: int | None
    max_output: int
    endpoint: str | None
    context: Mapping[str, str]
    #: Planned again by a sub-manager inside its account.
    composite: bool = False
    #: The reply an earlier delivery paid for (see :meth:`Flow.carve`).
    paid: WorkerResult | None = None
    #: Its account could not be carved.
    unpaid: bool = False
    #: Its result is reviewed by the level's manager.
    review: bool = False
    #: The policy chose it to learn (``Grant.explore``).
    explore: bool = False
    #: Output tokens of the try it escalates (0 for a first try).
    before_used: int = 0
    #: Its prompt as the metered call counts it (an upper bound of the bill), for the policy.
    prompt_tokens: int = 0


@dataclass(frozen=True, slots=True)
class LevelReport:
    """What one level produced: its plan, its results by subtask id, its answer."""

    plan: Plan
    results: Mapping[str, SubtaskResult]
    answer: str

    def short(self, level: str) -> list[str]:
        """Every subtask of the level that fell short (or was never paid for), with why."""
        out: list[str] = []
        for sub in self.plan.subtasks:
            res = self.results.get(sub.id)
            work = work_id(level, sub.id)
            out.extend([f"{work} (not paid for)"] if res is None else shortfall(work, res))
        return out


class FlowReport(TypedDict):
    """What the graph returns to the runtime."""

    answer: str
    plan: list[dict[str, Any]]
    results: dict[str, SubtaskResult]
    #: Subtasks of the task's own plan never paid for.
    unpaid: list[str]
    #: Subtasks (at any level) that ran but fell short, each with why.
    short: list[str]


# -- the flow ----------------------------------------------------------------------------------


class Flow:
    """The steps of a task, bound to their dependencies; :func:`build_graph` runs them."""

    def __init__(self, deps: FlowDeps) -> None:
        if deps.max_depth < 1:
            raise ValueError(f"max_depth must be at least 1, got {deps.max_depth}")
        self.deps = deps
        # Each try of a subtask is a LangGraph task: started at once, awaited as a future.
        self._start: Callable[[Flow, TaskRun, WorkItem], asyncio.Future[SubtaskResult | None]]
        self._start = _SUBTASK

    async def run(self, inputs: Mapping[str, Any]) -> FlowReport:
        """Run one delivery of a task: the task's own level, and every level under it."""
        deps, task_id = self.deps, str(inputs["task_id"])
        delivery = int(inputs["delivery"])
        saved: dict[str, SubtaskResult] = {}
        if delivery > 1:  # only an earlier delivery can have saved results
            raw = await deps.records.load_results(task_id)
            saved = {k: loaded_result(v) for k, v in raw.items()}
        run = TaskRun(
            task_id=task_id,
            task=str(inputs["task"]),
            delivery=delivery,
            claim=inputs.get("claim"),
            scope=str(inputs["scope"]),
            saved=saved,
        )
        for res in saved.values():  # counted once whatever happened before
            await self._count(run.scope, res)
        top = Level(path=ROOT, work="", depth=1, text=run.task)
        report = await self._level(run, top)
        unpaid = [
            s.id
            for s in report.plan.subtasks
            if (r := report.results.get(s.id)) is None or r["exhausted"]
        ]
        short = [w for w in report.short("") if w.split(" ", 1)[0] not in unpaid]
        return {
            "answer": report.answer,
            "plan": [s.model_dump() for s in report.plan.subtasks],
            "results": dict(report.results),
            "unpaid": unpaid,
            "short": short,
        }

    # -- steps shared by every level -----------------------------------------------------------

    async def _may_pay(self, run: TaskRun) -> None:
        """Before a paid step: stop if the task was cancelled or this worker lost its delivery.

        Both questions go to Redis at once (an ``HGET`` of the record and one
        ``XPENDING``): a round trip per step, not per token.
        """
        await self._checked(run, self._cancel_asked(run))

    async def _cancel_asked(self, run: TaskRun) -> tuple[bool, None]:
        return await self.deps.records.cancel_requested(run.task_id), None

    async def _may_pay_from(self, run: TaskRun, path: str) -> Pool:
        """:meth:`_may_pay`, and the pool of the level at ``path`` read in the same round trip
        (and kept from then on: see :class:`PoolBook`)."""
        key = self.deps.ledger.space.task(run.task_id).account(path)
        fields = await self._checked(
            run, self.deps.records.cancel_requested_and_read(run.task_id, key)
        )
        if not fields:
            raise UnknownAccount(run.task_id, path)
        return self._keep_pool(run, account_from_hash(path, fields, []))

    async def _checked(self, run: TaskRun, asking: Awaitable[tuple[bool, _Read]]) -> _Read:
        """``asking`` (whether a cancel was asked, and what was read with it) and the
        ownership check, at once; what was read, unless the task must stop."""
        ownership = self.deps.ownership
        if run.claim is None or ownership is None:
            asked, read = await asking
        else:
            (asked, read), owned = await asyncio.gather(asking, ownership.owns(run.claim))
            if not owned:
                raise DeliveryLost(run.task_id, run.claim.message_id)
        if asked:
            raise TaskCancelled(run.task_id)
        return read

    async def _pool(self, run: TaskRun, path: str) -> Pool:
        """What a level's pool holds: read from the ledger once, then kept."""
        book = run.pools.get(path)
        if book is None:
            return self._keep_pool(run, await self.deps.ledger.account(run.task_id, path))
        return book.pool()

    def _keep_pool(self, run: TaskRun, view: AccountView) -> Pool:
        """A pool as read: kept from now on (unless its account is closed), and returned."""
        if view.closed:  # nothing can be carved from it any more
            run.pools.pop(view.path, None)
            return Pool(tokens=view.available_tokens, nanos=view.available_nanos)
        book = run.pools[view.path] = PoolBook(tokens=view.room_tokens, nanos=view.room_nanos)
        return book.pool()

    def _reviews(self, lv: Level, plan: Plan, pool: Pool) -> tuple[frozenset[str], Pool]:
        """Which subtasks the level's manager reviews, and what their reviews reserve.

        ``on``: every one. ``auto``: those of difficulty 4 and up, and only when
        their reviews reserve at most a tenth of the level's pool (a small budget
        goes to the work). ``off``: none.
        """
        mode = self.deps.review
        chosen = [
            s.id
            for s in plan.subtasks
            if mode == "on" or (mode == "auto" and s.difficulty >= REVIEW_AUTO_DIFFICULTY)
        ]
        if not chosen:
            return frozenset(), Pool(tokens=0, nanos=0)
        each = self.deps.manager.review_cost(task=lv.text, subtask_id=chosen[0])
        tokens, nanos = len(chosen) * each.tokens, len(chosen) * each.nanos
        need = Pool(tokens=tokens, nanos=nanos)
        if mode == "auto" and any(
            have is not None and cost * AUTO_REVIEW_SHARE_DIVISOR > have
            for have, cost in ((pool.tokens, tokens), (pool.nanos, nanos))
        ):
            return frozenset(), Pool(tokens=0, nanos=0)
        return frozenset(chosen), need

    # -- one level -----------------------------------------------------------------------------

    async def _level(self, run: TaskRun, lv: Level) -> LevelReport:
        # Observability hooks: the manager's two steps are scopes (orchestrator/telemetry.py).
        tel, acct = self.deps.telemetry, lv.manager_account(run.delivery)
        # The level's statistics (for its decisions) are read while it plans.
        stats = asyncio.ensure_future(self.deps.stats.read(run.scope))
        stats.add_done_callback(_retrieved)
        try:
            with tel.step(task_id=run.task_id, account=acct, step="plan", depth=lv.depth):
                plan, reviewed = await self._plan(run, lv)
            results = await self._dataflow(run, lv, plan, reviewed, stats)
        finally:
            stats.cancel()  # nothing if it was read
        with tel.step(task_id=run.task_id, account=acct, step="synthesize", depth=lv.depth):
            answer = await self._synthesize(run, lv, plan, results)
        return LevelReport(plan=plan, results=results, answer=answer)

    async def _plan(self, run: TaskRun, lv: Level) -> tuple[Plan, frozenset[str]]:
        """Plan once (or reuse the saved plan) in a manager account sized for the call.

        Returns the plan and the ids of the subtasks the manager will review.

        The manager's account is the policy's synthesis reserve, grown for the
        planning call to what that call reserves (at most half the pool), and
        given back down to the reserve (plus the reviews') once the plan is
        made. A pool that cannot pay even a short planning call runs the level
        as one subtask, noted in the audit stream.
        """
        deps = self.deps
        # The level's read of its pool, with the check before planning's paid call.
        pool = await self._may_pay_from(run, lv.path)
        reserve = deps.policy.synthesis_reserve(pool)
        manager_acct = lv.manager_account(run.delivery)
        nested = lv.depth < deps.max_depth
        saved = None
        if run.delivery > 1:  # only an earlier delivery can have saved the plan
            saved = await deps.records.load_plan(run.task_id, level=lv.work)
        if saved is not None:
            plan = Plan.model_validate_json(saved)
            reviewed, reviews = self._reviews(lv, plan, pool)
            keep = _plus(reserve, reviews)
            await self._open(run, lv.path, manager_acct, keep)
            return plan, reviewed
        most = self._subtasks_affordable(pool, reserve, lv.text)
        full, least = deps.manager.plan_cost(task=lv.text, max_subtasks=most, nested=nested)
        size = planning_budget(pool, reserve=reserve, full=full, least=least)
        if size is None:
            why = (
                f"the budget cannot pay for planning (a plan needs {least.tokens:,} tokens, "
                f"${nanos_to_usd(least.nanos):f})"
            )
            await self._open(run, lv.path, manager_acct, reserve)
            outcome = deps.manager.unplanned(lv.text, why)
            reviewed = frozenset[str]()
        else:
            await self._open(run, lv.path, manager_acct, size)
            outcome = await deps.manager.plan(
                task_id=run.task_id,
                account=manager_acct,
                task=lv.text,
                max_subtasks=most,
                nested=nested,
            )
            reviewed, reviews = self._reviews(lv, outcome.plan, pool)
            keep = _plus(reserve, reviews)
            left = Pool(
                tokens=None if size.tokens is None else size.tokens - outcome.tokens,
                nanos=None if size.nanos is None else size.nanos - outcome.cost_nanos,
            )
            await self._give_back(run, lv, manager_acct, left=left, keep=keep)
        plan = outcome.plan
        await asyncio.gather(
            deps.records.save_plan(run.task_id, plan.model_dump_json(), level=lv.work),
            deps.ledger.note(
                run.task_id, manager_acct, _plan_note(outcome, lv.depth), tags={"step": "plan"}
            ),
        )
        return plan, reviewed

    def _subtasks_affordable(self, pool: Pool, reserve: Pool, text: str) -> int:
        """How many subtasks the pool can pay one useful call each for (at least one).

        The plan asks for no more than that, so a small budget is not spread
        over more subtasks than can each say something.
        """
        if pool.tokens is None:
            return self.deps.max_subtasks
        (whole,) = single_subtask_plan(text).subtasks
        each = USEFUL_OUTPUT_TOKENS + self.deps.worker.prompt_tokens(
            subtask=whole, context={}, endpoint=self.deps.default_endpoint, task_text=text
        )
        left = pool.tokens - (reserve.tokens or 0) - pool.tokens // 2
        return max(1, min(self.deps.max_subtasks, left // max(1, each)))

    async def _give_back(
        self, run: TaskRun, lv: Level, account: str, *, left: Pool, keep: Pool
    ) -> None:
        """Return what ``account`` holds (``left``: its limit less the calls paid) beyond
        ``keep`` to the level's pool."""
        extra = [
            0 if have is None or kept is None else max(0, have - kept)
            for have, kept in ((left.tokens, keep.tokens), (left.nanos, keep.nanos))
        ]
        if any(extra):
            await self.deps.ledger.transfer(
                run.task_id,
                src=account,
                dst=lv.path,
                amount=Amount(tokens=extra[0], nanos=extra[1]),
                op_id=plan_leftover_op_id(run.delivery, lv.work),
            )
            run.moved(lv.path, extra[0], extra[1])

    async def _open(self, run: TaskRun, pool_path: str, account: str, limit: Pool) -> None:
        """Carve ``account`` out of a level's pool, and note what it took."""
        await self.deps.ledger.carve(run.task_id, account, tokens=limit.tokens, nanos=limit.nanos)
        run.moved(pool_path, _minus(limit.tokens), _minus(limit.nanos))

    async def _dataflow(
        self,
        run: TaskRun,
        lv: Level,
        plan: Plan,
        reviewed: frozenset[str],
        stats: Awaitable[Stats],
    ) -> dict[str, SubtaskResult]:
        """Start each subtask as soon as its dependencies are done and it is granted a budget.

        ``reviewed``: the subtasks whose results the level's manager reviews; ``stats``:
        the statistics the level decides with.
        """
        by_id = {s.id: s for s in plan.subtasks}
        prefix = f"{lv.work}{WORK_SEPARATOR}" if lv.work else ""
        results: dict[str, SubtaskResult] = {
            w[len(prefix) :]: r
            for w, r in run.saved.items()
            if level_of(w) == lv.work and w[len(prefix) :] in by_id
        }
        attempts = {sid: r["attempt"] for sid, r in results.items()}
        running: dict[asyncio.Future[SubtaskResult | None], WorkItem] = {}
        menu: Menu | None = None
        try:
            while True:
                decided, menu = await self._decide(
                    run, lv, plan, results, attempts, running, menu, stats
                )
                chosen = [replace(item, review=item.subtask.id in reviewed) for item in decided]
                if chosen:  # once for every try this decision starts
                    await self._may_pay(run)
                for item in await asyncio.gather(*(self.carve(run, i) for i in chosen)):
                    running[self._start(self, run, item)] = item
                if not running:
                    break
                await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                await asyncio.sleep(0)  # tries finishing at the same moment: one decision
                for fut in [f for f in running if f.done()]:
                    item = running.pop(fut)
                    sid = item.subtask.id
                    attempts[sid] = item.attempt
                    out = fut.result()
                    if out is not None:  # None: an unpaid retry keeps the earlier answer
                        results[sid] = out
        finally:
            for fut in running:
                fut.cancel()
        return results

    async def _decide(
        self,
        run: TaskRun,
        lv: Level,
        plan: Plan,
        results: Mapping[str, SubtaskResult],
        attempts: Mapping[str, int],
        running: Mapping[asyncio.Future[SubtaskResult | None], WorkItem],
        menu: Menu | None,
        stats: Awaitable[Stats],
    ) -> tuple[list[WorkItem], Menu | None]:
        """What starts now: escalations of finished subtasks first, then every ready subtask.

        Returns the tries to start and the menu they were chosen from (``menu``,
        or one built from ``stats`` when it is ``None``), for the next decision.
        """
        deps = self.deps
        busy = {item.subtask.id for item in running.values()}
        by_id = {s.id: s for s in plan.subtasks}
        ready = [
            s
            for s in plan.subtasks
            if s.id not in results
            and s.id not in busy
            and all(d in results and d not in busy for d in s.depends_on)
        ]
        finished = [
            outcome_of(by_id[sid], res, attempts.get(sid, 1))
            for sid, res in results.items()
            if sid not in busy and not res["exhausted"] and not res["composite"]
        ]
        if not ready and not finished:
            return [], menu
        if menu is None:  # the statistics are read once per level
            menu = Menu(deps.options, await stats, deps.default_endpoint)
        pool = await self._pool(run, lv.path)  # kept, not read again (see PoolBook)
        work: list[WorkItem] = []
        for g in deps.policy.escalate(pool, finished, menu=menu):
            if g.subtask_id in by_id and g.subtask_id not in busy:
                sub = by_id[g.subtask_id]
                prompt = results[sub.id]["counted_prompt"] or DEFAULT_PROMPT_TOKENS
                attempt = attempts.get(sub.id, 1) + 1
                work.append(self._item(lv, sub, g, attempt, results, prompt))
                pool = pool.less(g)
        if not ready:
            return work, menu
        later = len(plan.subtasks) - len(results) - len(ready) - len(busy - set(results))
        needs = [
            Need(
                s.id,
                s.difficulty,
                tuple(s.tags),
                prompt_tokens=deps.worker.prompt_tokens(
                    subtask=s,
                    context=_context(s, results),
                    endpoint=deps.default_endpoint,
                    task_text=lv.text,
                ),
            )
            for s in ready
        ]
        prompts = {n.subtask_id: n.prompt_tokens for n in needs}
        grants = deps.policy.split(pool, needs, pending_after=max(0, later), menu=menu)
        paid = [g for g in grants if g.subtask_id in prompts and _useful(g, prompts)]
        if not paid and not running and not work:
            # No share pays a useful call and nothing will give money back: run
            # the first ready subtask alone on the whole pool.
            alone = deps.policy.split(pool, needs[:1], pending_after=0, menu=menu)
            paid = [g for g in alone if _useful(g, prompts)]
        # A subtask whose share cannot pay a useful call waits until a running
        # one gives its leftover back.
        work.extend(
            self._item(lv, by_id[g.subtask_id], g, 1, results, prompts[g.subtask_id]) for g in paid
        )
        return work, menu

    def _item(
        self,
        lv: Level,
        sub: Subtask,
        grant: Grant,
        attempt: int,
        results: Mapping[str, SubtaskResult],
        prompt_tokens: int,
    ) -> WorkItem:
        context = _context(sub, results)
        composite = sub.composite and attempt == 1 and self._can_nest(lv, sub, grant, context)
        return WorkItem(
            level=lv,
            subtask=sub,
            attempt=attempt,
            tokens=grant.tokens,
            nanos=grant.nanos,
            max_output=max(1, grant.max_output_tokens),
            endpoint=grant.endpoint,
            context=context,
            composite=composite,
            explore=grant.explore,
            prompt_tokens=prompt_tokens,
            before_used=results[sub.id]["output_tokens"]
            if attempt > 1 and sub.id in results
            else 0,
        )

    def _can_nest(self, lv: Level, sub: Subtask, grant: Grant, context: Mapping[str, str]) -> bool:
        """Planned again only under the depth limit, and when its share pays for a plan."""
        if lv.depth >= self.deps.max_depth:
            return False
        pool = Pool(tokens=grant.tokens, nanos=grant.nanos)
        text = part_text(lv.text, sub, context)
        nested = lv.depth + 1 < self.deps.max_depth
        full, least = self.deps.manager.plan_cost(task=text, max_subtasks=2, nested=nested)
        reserve = self.deps.policy.synthesis_reserve(pool)
        return planning_budget(pool, reserve=reserve, full=full, least=least) is not None

    # -- one try of one subtask, finished in a fixed order -------------------------------------

    async def carve(self, run: TaskRun, item: WorkItem) -> WorkItem:
        """Before a try starts: find the reply an earlier delivery paid for, else open its account.

        Done in the decision step, not in the try, so the next decision sees
        the pool without what this one granted.
        """
        work = item.level.work_of(item.subtask.id)
        if run.delivery > 1:  # only an earlier delivery can have paid for it
            paid = await self.deps.worker.paid_for(
                task_id=run.task_id, subtask_id=work, attempt=item.attempt
            )
            if paid is not None:
                return replace(item, paid=paid)
        account = item.level.account(item.subtask.id, run.delivery, item.attempt)
        try:
            await self._open(run, item.level.path, account, Pool(item.tokens, item.nanos))
        except (BudgetExceeded, AccountClosed):
            return replace(item, unpaid=True)
        return item

    async def _observed_subtask(self, run: TaskRun, item: WorkItem) -> SubtaskResult | None:
        """Observability hook: :meth:`subtask` in a telemetry scope (orchestrator/telemetry.py)."""
        lv, sub = item.level, item.subtask
        with self.deps.telemetry.subtask(
            task_id=run.task_id,
            account=lv.account(sub.id, run.delivery, item.attempt),
            work=lv.work_of(sub.id),
            attempt=item.attempt,
            composite=item.composite,
        ) as scope:
            out = await self.subtask(run, item)
            if out is not None:
                scope.note(
                    spent_tokens=out["tokens"],
                    spent_nanos=out["cost_nanos"],
                    endpoint=out["endpoint"] or None,
                    outcome=_outcome_word(out),
                )
            return out

    async def subtask(self, run: TaskRun, item: WorkItem) -> SubtaskResult | None:
        """Run one try of a subtask in its carved account; ``None`` when a retry went unpaid.

        The order is fixed: the call (its reply kept with its payment), the
        account closed (its leftover back to the level's pool), the review,
        the result saved, the outcome counted. Without a review, the close
        saves the result in the same atomic step.
        """
        deps, lv, sub, attempt = self.deps, item.level, item.subtask, item.attempt
        work = lv.work_of(sub.id)
        if item.paid is not None:
            # A delivery before this one paid for this try and died before
            # saving it: the reply was kept with the payment; no second call.
            outcome = outcome_id(run.task_id, item.paid.account)
            out = _from_worker(item.paid, item, outcome=outcome)
            return await self._finish(run, item, out)
        if item.unpaid:
            return None if attempt > 1 else _result(sub, attempt, exhausted=True)
        account = lv.account(sub.id, run.delivery, attempt)
        try:
            if item.composite:
                out = await self._composite(run, item, account)
            else:
                result = await deps.worker.solve(
                    task_id=run.task_id,
                    account=account,
                    subtask=sub.model_copy(update={"id": work}),
                    context=item.context,
                    budget_tokens=item.max_output,
                    endpoint=item.endpoint,
                    task_text=lv.text,
                    attempt=attempt,
                )
                outcome = outcome_id(run.task_id, account)
                out = _from_worker(result, item, outcome=outcome)
        except BudgetExceeded:
            out = _result(sub, attempt, exhausted=True)
        except BaseException:
            run.pools.pop(lv.path, None)  # the level ends here; its pool is not kept
            await self._close(run, account, nested=item.composite)
            raise
        if out["exhausted"]:
            await self._close_item(run, item, account)
            return None if attempt > 1 else out  # an unpaid retry keeps the earlier answer
        if out["composite"]:  # what the whole sub-level spent, as its account closed
            closed = await self._close_item(run, item, account)
            out = {**out, "tokens": closed.spent_tokens, "cost_nanos": closed.spent_nanos}
            return await self._finish(run, item, out)
        # The reply is kept with its payment, so closing, saving and counting may go
        # together: a crash between them is mended by the next delivery either way.
        if _needs_review(item, out):
            _, done = await asyncio.gather(
                self._close_item(run, item, account), self._finish(run, item, out)
            )
            return done
        # Not reviewed: the close saves the result in the same step, counted beside it.
        await asyncio.gather(
            self._close_item(run, item, account, result=out), self._count(run.scope, out)
        )
        return out

    async def _composite(self, run: TaskRun, item: WorkItem, account: str) -> SubtaskResult:
        """A sub-manager plans the subtask inside its account; its answer is the result."""
        lv, sub = item.level, item.subtask
        child = Level(
            path=account,
            work=lv.work_of(sub.id),
            depth=lv.depth + 1,
            text=part_text(lv.text, sub, item.context),
        )
        report = await self._level(run, child)
        short = report.short(child.work)
        return _result(
            sub,
            item.attempt,
            text=report.answer,
            finished=not short and bool(report.answer.strip()),
            composite=True,
            short=short,
        )

    async def _close_item(
        self, run: TaskRun, item: WorkItem, account: str, *, result: SubtaskResult | None = None
    ) -> Closed:
        """Close a try's account; its limit less what it spent goes back to the level's pool.

        With ``result`` (a leaf's), the close saves it too, in the same atomic step.
        """
        saved = None
        if result is not None:
            saved = (item.level.work_of(item.subtask.id), result_text(result))
        closed = await self._close(run, account, nested=item.composite, result=saved)
        run.moved(
            item.level.path,
            None if item.tokens is None else item.tokens - closed.spent_tokens,
            None if item.nanos is None else item.nanos - closed.spent_nanos,
        )
        return closed

    async def _close(
        self,
        run: TaskRun,
        account: str,
        *,
        nested: bool,
        result: tuple[str, str] | None = None,
    ) -> Closed:
        """Close a subtask's account; a composite's open descendants first, deepest first.

        ``result`` (work id, JSON) is saved by the close of ``account`` itself.
        """
        ledger = self.deps.ledger
        if nested:
            # A finished sub-level leaves only its manager's account open: close it, then
            # the composite. Anything else still open (a sub-level cut off part way) is
            # found in a snapshot.
            manager = manager_account(account, run.delivery)
            try:  # both in one call, the manager's first
                closes = await ledger.close_accounts(run.task_id, [manager, account], force=True)
                return closes[-1]
            except (AccountBusy, UnknownAccount):
                pass
            tree = await ledger.snapshot(run.task_id)
            inside = [
                a.path for a in tree.walk() if a.path.startswith(f"{account}/") and not a.closed
            ]
            for path in sorted(inside, key=lambda p: -p.count("/")):
                await ledger.close_account(run.task_id, path, force=True)
        return await ledger.close_account(run.task_id, account, force=True, result=result)

    async def _finish(self, run: TaskRun, item: WorkItem, out: SubtaskResult) -> SubtaskResult:
        lv, sub = item.level, item.subtask
        if _needs_review(item, out):
            out = await self._review(run, lv, sub, out)
        # Saved and counted together: a crash between the two is mended by the next
        # delivery, which counts every saved result again and rebuilds an unsaved one
        # from its kept reply (counted once either way, by the outcome's marker).
        await asyncio.gather(
            self.deps.records.save_result(run.task_id, lv.work_of(sub.id), out),
            self._count(run.scope, out),
        )
        return out

    async def _review(
        self, run: TaskRun, lv: Level, sub: Subtask, out: SubtaskResult
    ) -> SubtaskResult:
        """The level's manager accepts the result or rejects it (paid from its own account)."""
        judged = WorkerResult(
            subtask_id=sub.id,
            text=out["text"],
            finished=True,
            cut_short=False,
            input_tokens=0,
            output_tokens=out["output_tokens"],
            cost_nanos=out["cost_nanos"],
            endpoint=out["endpoint"],
            estimated=False,
        )
        await self._may_pay(run)
        verdict = await self.deps.manager.review(
            task_id=run.task_id,
            account=lv.manager_account(run.delivery),
            task=lv.text,
            results=[judged],
        )
        rejected = any(e.subtask_id == sub.id for e in verdict)
        signals = [*out["signals"], "rejected"] if rejected else out["signals"]
        return {**out, "reviewed": True, "accepted": not rejected, "signals": signals}

    async def _count(self, scope: str, out: SubtaskResult) -> None:
        if not out["endpoint"] or not out["outcome"]:
            return
        seen = Observation(
            endpoint=out["endpoint"],
            difficulty=int(out["difficulty"]),
            tags=tuple(out["tags"]),
            asked=int(out["asked"]),
            used=int(out["output_tokens"]),
            cut_short=bool(out["cut_short"]),
            nanos=int(out["cost_nanos"]),
            escalated=int(out["attempt"]) > 1,
            prompt_tokens=int(out["input_tokens"]),
            signals=tuple(out["signals"]),
            before_used=int(out["before_used"]),
            explored=bool(out["explored"]),
        )
        await self.deps.stats.record(scope, out["outcome"], seen)
        if out["reviewed"]:  # the review's verdict is feedback; repeating it changes nothing
            await self.deps.stats.verdict(scope, out["outcome"], ok=out["accepted"])

    # -- the level's answer --------------------------------------------------------------------

    async def _synthesize(
        self, run: TaskRun, lv: Level, plan: Plan, results: Mapping[str, SubtaskResult]
    ) -> str:
        """Hand what is left of the level's pool to its manager and write the level's answer."""
        deps = self.deps
        ordered = _ordered_results(plan, results)
        if len(plan.subtasks) == 1 and len(ordered) == 1 and ordered[0].finished:
            # One finished subtask is the answer: a synthesis call would only restate it.
            return ordered[0].text.strip()
        manager_acct = lv.manager_account(run.delivery)
        # All the pool holds goes to the manager, as the ledger counts it in that step
        # (what a step outside this delivery's own moved included), at once with the
        # check before the synthesis call: moving money is not paying.
        handing = deps.ledger.transfer(
            run.task_id,
            src=lv.path,
            dst=manager_acct,
            amount=None,
            op_id=synthesis_op_id(run.delivery, lv.work),
        )
        await asyncio.gather(self._may_pay(run), handing)
        run.pools.pop(lv.path, None)  # the level decides nothing more
        return await deps.manager.synthesize(
            task_id=run.task_id, account=manager_acct, task=lv.text, results=ordered
        )


def _needs_review(item: WorkItem, out: SubtaskResult) -> bool:
    """A finished leaf result the level's manager reviews, not reviewed yet."""
    return not out["composite"] and out["finished"] and item.review and not out["reviewed"]


def _retrieved(fut: asyncio.Future[Any]) -> None:
    """Marks a background read's error as seen when nobody came to await it."""
    if not fut.cancelled():
        fut.exception()


def _outcome_word(res: SubtaskResult) -> str:
    """How a try ended, in one word (for telemetry)."""
    if res["exhausted"]:
        return "unpaid"
    if res["cut_short"]:
        return "cut_short"
    if not res["accepted"]:
        return "rejected"
    return "finished" if res["finished"] else "no_answer"


def outcome_of(sub: Subtask, res: SubtaskResult, attempts: int) -> Outcome:
    """A saved result as the policy sees it."""
    # As counted when it was granted; a result saved by an older version has a guess.
    prompt = res["counted_prompt"] or DEFAULT_PROMPT_TOKENS
    need = Need(sub.id, sub.difficulty, tuple(sub.tags), attempt=attempts, prompt_tokens=prompt)
    return Outcome(
        need=need,
        endpoint=res["endpoint"],
        asked=res["asked"],
        used=res["output_tokens"],
        cut_short=res["cut_short"],
        signals=frozenset(res["signals"]),
    )


def part_text(task_text: str, sub: Subtask, context: Mapping[str, str]) -> str:
    """What a sub-manager plans: the composite subtask, with the task and its inputs as context."""
    parts = [sub.instruction.strip(), f"(This is one part of a larger task: {task_text.strip()})"]
    if context:
        inputs = "\n\n".join(f"### {sid}\n{text.strip()}" for sid, text in context.items())
        parts.append(f"Results it builds on:\n\n{inputs}")
    return "\n\n".join(parts)


def _context(sub: Subtask, results: Mapping[str, SubtaskResult]) -> dict[str, str]:
    return {d: results[d]["text"] for d in sub.depends_on if d in results}


def _useful(grant: Grant, prompts: Mapping[str, int]) -> bool:
    if grant.tokens is None:
        return True
    return grant.tokens >= prompts.get(grant.subtask_id, 0) + USEFUL_OUTPUT_TOKENS


def _plus(a: Pool, b: Pool) -> Pool:
    """Both pools' amounts added; unlimited (``None``) stays unlimited."""
    return Pool(
        tokens=None if a.tokens is None else a.tokens + (b.tokens or 0),
        nanos=None if a.nanos is None else a.nanos + (b.nanos or 0),
    )


def _minus(limit: int | None) -> int | None:
    return None if limit is None else -limit


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


def _plan_note(outcome: PlanOutcome, depth: int) -> str:
    ids = ", ".join(s.id for s in outcome.plan.subtasks)
    n = len(outcome.plan.subtasks)
    who = "" if depth == 1 else f"level {depth}: "
    if outcome.fell_back and outcome.calls == 0:
        return f"{who}one subtask ({ids}): {outcome.reasons[-1]}"
    if outcome.fell_back:
        return f"{who}one subtask ({ids}): no usable plan after {outcome.calls} call(s)"
    how = " after one repair" if outcome.repaired else ""
    marked = [s.id for s in outcome.plan.subtasks if s.composite]
    nest = f" ({', '.join(marked)} composite)" if marked else ""
    return f"{who}{n} subtask{'s' if n != 1 else ''}{how}: {ids}{nest}"


def _ordered_results(plan: Plan, results: Mapping[str, SubtaskResult]) -> list[WorkerResult]:
    ordered = []
    for sub in plan.subtasks:
        res = results.get(sub.id)
        if res is None or res["exhausted"]:
            continue
        ordered.append(
            WorkerResult(
                subtask_id=sub.id,
                text=res["text"],
                finished=res["finished"],
                cut_short=res["cut_short"],
                input_tokens=0,
                output_tokens=res["tokens"],
                cost_nanos=res["cost_nanos"],
                endpoint=res["endpoint"],
                estimated=False,
            )
        )
    return ordered


async def _run_subtask(flow: Flow, run: TaskRun, item: WorkItem) -> SubtaskResult | None:
    """One try of a subtask, as the LangGraph task ``subtask`` runs it."""
    return await flow._observed_subtask(run, item)


# A module-level function, found under its own name: LangGraph then builds its runnable
# once, not again for every try (as it does for a bound method).
_as_task: Any = task(name="subtask")
_SUBTASK: Any = _as_task(_run_subtask)


def build_graph(flow: Flow) -> Any:
    """The flow as a LangGraph entrypoint: ``ainvoke(inputs)`` returns a :class:`FlowReport`."""

    @entrypoint()
    async def paymaster_task(inputs: dict[str, Any]) -> FlowReport:
        return await flow.run(inputs)

    return paymaster_task

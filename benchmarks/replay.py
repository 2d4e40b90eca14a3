"""Replay recorded answers of real models through the real policies and the real ledger.

Run: ``python -m benchmarks.replay [--dataset gsm8k|routerarena] [--quick]``.

Questions arrive as a stream, ``--task-size`` at a time; each group is one
task on the ledger (a private redis-server on a free port, or ``--redis-url``)
with a budget of ``--budget`` dollars per question. For each task the policy
sees a :class:`~budgets.policy.Menu` of two endpoints (the dataset's cheap and
strong model, at their list prices) and the statistics read from Redis, and
decides which endpoint answers each question with how many output tokens;
then, as tries finish, whom to escalate. A *replay endpoint* answers with the
recorded reply of the chosen model and the ledger charges it: prompt and reply
counted with tiktoken (cl100k) at the dataset's list prices, or the recorded
cost for RouterArena. A reply longer than the tokens granted is cut short —
charged in full up to the limit and counted wrong.

What a decision may see (nothing else is passed to the policy):

* the question text: its difficulty (1-5, from how many numbers it holds) and
  keyword tags (``q:percent``, ``q:average``, …);
* run-time signals of the replies already received for *this* question
  (:func:`signals`): the reply has no final answer, a non-integer or
  negative final answer, an arithmetic step that does not check out
  (``calc-bad`` for ``<<a*b=c>>`` annotations, ``eq-bad`` for ``a op b = c``
  in the text), the final answer is not the last number computed
  (``final-not-last``), hedging words, few steps, numbers of the question the
  reply never uses, its length bucket, and ``cut_short``;
* statistics of **earlier** tasks: every try is counted when it finishes, and
  whether it was right is revealed (``StatsBook.verdict``) only after its task
  has closed. The label of a question is read in exactly two places: that
  reveal, and the final score.

Baselines in the same run: always-strong, always-weak, a random mix of the two
at the adaptive policy's cost, and the oracle (the cheapest model that is
right, or the cheapest when none is) as the ceiling. The last line is
``RESULT dataset=… strong_acc=… policy_acc=… quality_ratio=… cost_ratio=…``
for ``adaptive`` at ``--budget``. Data are read where they are
(``--data`` or ``PAYMASTER_DATASETS``; default ``../shared/datasets``).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import itertools
import json
import os
import random
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal
from pathlib import Path

import tiktoken

from agents.tokens import load_encoding
from budgets import Amount, Budget, BudgetExceeded, Ledger, Price, usd_to_nanos
from budgets.keys import ROOT
from budgets.policy import (
    Adaptive,
    Grant,
    LocalFirst,
    Menu,
    Need,
    Option,
    Outcome,
    Policy,
    Pool,
    Tiered,
    Uniform,
)
from budgets.stats import Observation, StatsBook
from orchestrator.redis_server import RedisServer

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "datasets"


def data_dir(given: str | None = None) -> Path:
    """Where the recorded answers are: ``given``, else ``$PAYMASTER_DATASETS``, else the default."""
    return Path(given or os.environ.get("PAYMASTER_DATASETS") or DEFAULT_DATA)


GSM8K_STRONG, GSM8K_WEAK = "gpt-4-1106-preview", "mistralai/Mixtral-8x7B-Instruct-v0.1"
#: List prices from the dataset README, USD per million tokens (input, output).
GSM8K_PRICES = {GSM8K_STRONG: ("10", "30"), GSM8K_WEAK: ("0.6", "0.6")}
#: Rule-based failure signals ``local-first`` escalates on.
_RUNS = itertools.count(1)
VERIFIER_FAILURES = frozenset({"no-final", "calc-bad", "eq-bad", "fraction", "final-not-last"})


# -- data ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    """One model's recorded reply to a question."""

    text: str
    correct: bool
    output_tokens: int
    cost_nanos: int | None = None  # the recorded cost, when the dataset has one


@dataclass(frozen=True, slots=True)
class Question:
    """A question, what can be read from its text, and every model's recorded answer."""

    qid: str
    text: str
    prompt_tokens: int
    difficulty: int
    tags: tuple[str, ...]
    answers: dict[str, Answer]


@dataclass(frozen=True, slots=True)
class Model:
    """A dataset model as an endpoint of the replay."""

    key: str  # the model's name in the dataset
    option: Option


_NUMBER = re.compile(r"-?\d[\d,]*\.?\d*")
_KEYWORDS = {
    "%": "percent", "percent": "percent", "average": "average", "half": "half",
    "twice": "twice", "times": "times", "each": "each", "every": "every", "per ": "per",
    "hour": "time", "minute": "time", "week": "time", "remaining": "remaining",
    "more than": "compare", "less than": "compare", "profit": "money", "discount": "money",
}  # fmt: skip


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").rstrip("."))
    except ValueError:
        return None


def question_tags(text: str) -> tuple[int, tuple[str, ...]]:
    """Difficulty 1-5 from how many numbers the question holds, and keyword tags."""
    numbers = len(_NUMBER.findall(text))
    difficulty = max(1, min(5, 1 + numbers // 2))
    low = text.lower()
    return difficulty, tuple(sorted({"q:" + tag for key, tag in _KEYWORDS.items() if key in low}))


def _count(encoding: tiktoken.Encoding | None, text: str) -> int:
    if encoding is None:
        return len(text.encode()) // 3
    return len(encoding.encode(text, disallowed_special=()))


def load_gsm8k(data: Path) -> tuple[list[Question], list[Model]]:
    """RouteLLM's GSM8K answers of GPT-4-1106 (strong) and Mixtral-8x7B (weak)."""
    path = data / "routellm" / "gsm8k_responses.csv"
    if not path.is_file():
        raise SystemExit(f"no dataset at {path}; pass --data or set PAYMASTER_DATASETS")
    encoding = load_encoding()
    csv.field_size_limit(sys.maxsize)
    questions = []
    with path.open(newline="", encoding="utf-8") as f:
        for i, row in enumerate(csv.DictReader(f)):
            text = row["prompt"]
            difficulty, tags = question_tags(text)
            answers = {
                m: Answer(
                    text=row[f"{m}_response"],
                    correct=row[m] == "True",
                    output_tokens=_count(encoding, row[f"{m}_response"]),
                )
                for m in (GSM8K_STRONG, GSM8K_WEAK)
            }
            questions.append(
                Question(f"q{i}", text, _count(encoding, text) + 7, difficulty, tags, answers)
            )
    models = [
        Model(GSM8K_WEAK, Option("mixtral", "remote", 2, Price.of(*GSM8K_PRICES[GSM8K_WEAK]))),
        Model(GSM8K_STRONG, Option("gpt-4", "remote", 5, Price.of(*GSM8K_PRICES[GSM8K_STRONG]))),
    ]
    return questions, models


def load_routerarena(data: Path) -> tuple[list[Question], list[Model]]:
    """RouterArena's answers of its two cached models; the more accurate one is 'strong'."""
    folder = data / "routerarena"
    files = sorted(folder.glob("*.jsonl"))
    if len(files) < 2:
        raise SystemExit(
            f"no RouterArena answers in {folder}; pass --data or set PAYMASTER_DATASETS"
        )
    prices = json.loads((folder / "cost.json").read_text(encoding="utf-8"))
    by_model: dict[str, dict[str, dict[str, object]]] = {}
    for path in files[:2]:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
        by_model[path.stem] = {str(r["global_index"]): r for r in rows}
    names = list(by_model)
    shared = sorted(set(by_model[names[0]]) & set(by_model[names[1]]))
    questions = []
    for qid in shared:
        first = by_model[names[0]][qid]
        text = str(first["question"])
        difficulty, tags = question_tags(text)
        answers = {}
        prompt_tokens = 0
        for name in names:
            row = by_model[name][qid]
            usage = row["token_usage"]
            result = row["evaluation_result"]
            assert isinstance(usage, dict)
            assert isinstance(result, dict)
            prompt_tokens = max(prompt_tokens, int(usage.get("input_tokens", 0)))
            answers[name] = Answer(
                text=str(row.get("generated_answer") or ""),
                correct=float(result.get("score", 0)) >= 1,
                output_tokens=int(usage.get("output_tokens", 0)),
                cost_nanos=usd_to_nanos(Decimal(str(result.get("inference_cost", 0)))),
            )
        cat = "cat:" + re.sub(r"[^a-z0-9]+", "-", qid.rsplit("_", 1)[0].lower())
        questions.append(Question(qid, text, prompt_tokens, difficulty, (*tags, cat), answers))
    accuracy = {n: sum(q.answers[n].correct for q in questions) for n in names}
    weak, strong = sorted(names, key=lambda n: accuracy[n])

    def price(name: str) -> Price:
        entry = prices.get(name, {})
        return Price.of(
            str(entry.get("input_token_price_per_million", 0)),
            str(entry.get("output_token_price_per_million", 0)),
        )

    models = [
        Model(weak, Option(_endpoint_name(weak), "remote", 2, price(weak))),
        Model(strong, Option(_endpoint_name(strong), "remote", 5, price(strong))),
    ]
    return questions, models


def _endpoint_name(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]+", "-", model)[:64]


# -- run-time signals ----------------------------------------------------------

_CALC = re.compile(r"<<([^=<>]+)=([^<>]+)>>")
_EQUATION = re.compile(
    r"(\d[\d,.]*\s*[-+*/x\u00d7]\s*[\d,.]+(?:\s*[-+*/x\u00d7]\s*[\d,.]+)*)\s*=\s*\$?(-?\d[\d,]*\.?\d*)"
)
_FINAL = re.compile(r"(?:####|answer is|\\boxed\{)\s*\$?(-?[\d,]*\.?\d+)", re.IGNORECASE)
_ARITH = re.compile(r"^[\d\s.+\-*/()]+$")
_HEDGES = ("assum", "however", "not possible", "cannot", "approximately", "round")


def _checks(expression: str, value: str) -> bool | None:
    """Whether ``expression`` evaluates to ``value``; ``None`` when it is not plain arithmetic."""
    expr = expression.replace(",", "").replace("x", "*").replace("\u00d7", "*").strip()
    target = _number(value)
    if target is None or not _ARITH.match(expr) or "**" in expr or len(expr) > 80:
        return None
    try:
        got = eval(expr, {"__builtins__": {}}, {})  # digits and + - * / ( ) only
    except (SyntaxError, ZeroDivisionError, TypeError, ValueError):
        return None
    return abs(float(got) - target) <= 1e-2 * max(1.0, abs(target))


def signals(question: str, reply: str, output_tokens: int) -> frozenset[str]:
    """What a reply shows about itself, read without knowing the right answer."""
    out: set[str] = {f"len:{min(4, output_tokens // 100)}"}
    found = _FINAL.search(reply)
    final = _number(found.group(1)) if found else None
    if final is None:
        out.add("no-final")
    else:
        if final != round(final):
            out.add("fraction")
        if final < 0:
            out.add("negative")
        body = _CALC.sub("", reply[: found.start()] if found else reply)
        computed = [n for n in (_number(x) for x in _NUMBER.findall(body)) if n is not None]
        if not computed or computed[-1] != final:
            out.add("final-not-last")
    calcs = _CALC.findall(reply)
    if any(_checks(e, v) is False for e, v in calcs):
        out.add("calc-bad")
    equations = _EQUATION.findall(_CALC.sub("", reply))
    if any(_checks(e, v) is False for e, v in equations):
        out.add("eq-bad")
    if len(calcs) + len(equations) < 2:
        out.add("few-steps")
    low = reply.lower()
    if any(h in low for h in _HEDGES):
        out.add("hedge")
    asked = {n for n in (_number(x) for x in _NUMBER.findall(question)) if n is not None}
    used = {n for n in (_number(x) for x in _NUMBER.findall(reply)) if n is not None}
    if len(asked - used) >= 2:
        out.add("unused-numbers")
    return frozenset(out)


# -- baselines that are policies -----------------------------------------------


@dataclass(frozen=True, slots=True)
class RandomMix:
    """Each question to ``strong`` with probability ``share`` (seeded), else ``weak``."""

    weak: str
    strong: str
    share: float
    seed: int = 7
    name: str = "random"
    output_tokens: int = 1024

    def synthesis_reserve(self, pool: Pool) -> Pool:
        """Nothing: the replay has no manager."""
        return Pool(tokens=0, nanos=0)

    def split(
        self, pool: Pool, needs: Sequence[Need], *, pending_after: int, menu: Menu
    ) -> list[Grant]:
        """Equal shares; the endpoint drawn per question from its id, so runs repeat."""
        grants = Uniform(output_tokens=self.output_tokens).split(
            pool, needs, pending_after=pending_after, menu=menu
        )
        return [
            replace(
                g,
                endpoint=self.strong
                if random.Random(f"{self.seed}:{g.subtask_id}").random() < self.share
                else self.weak,
            )
            for g in grants
        ]

    def escalate(self, pool: Pool, outcomes: Sequence[Outcome], *, menu: Menu) -> list[Grant]:
        """Never."""
        return []


# -- the replay ----------------------------------------------------------------


@dataclass(slots=True)
class Run:
    """What one policy did over the stream."""

    name: str
    budget_usd: Decimal
    decisions: dict[str, tuple[str, ...]] = field(default_factory=dict)  # qid -> endpoints tried
    task_ids: list[str] = field(default_factory=list)
    correct: int = 0
    questions: int = 0
    nanos: int = 0
    cut_short: int = 0
    seconds: float = 0.0

    @property
    def accuracy(self) -> float:
        """Share of questions whose final answer was right."""
        return self.correct / self.questions if self.questions else 0.0

    def escalated(self) -> float:
        """Share of questions that got more than one try."""
        return sum(len(d) > 1 for d in self.decisions.values()) / max(1, self.questions)


@dataclass(frozen=True, slots=True)
class Try:
    """One call of the replay endpoint."""

    qid: str
    endpoint: str
    attempt: int
    asked: int
    used: int
    cut_short: bool
    nanos: int
    reply_signals: frozenset[str]


class Replay:
    """Drives one policy over the question stream on a real ledger and real statistics."""

    def __init__(
        self,
        ledger: Ledger,
        book: StatsBook,
        models: Sequence[Model],
        *,
        task_size: int,
        default: str | None = None,
    ) -> None:
        self.ledger = ledger
        self.book = book
        self.models = {m.option.name: m for m in models}
        self.options = tuple(m.option for m in models)
        self.task_size = task_size
        self.default = default

    async def run(
        self,
        policy: Policy,
        questions: Sequence[Question],
        *,
        budget_usd: Decimal,
        scope: str,
        name: str | None = None,
    ) -> Run:
        """Every question through ``policy``; statistics kept in ``scope`` (cleared first)."""
        await self.book.clear(scope)
        run = Run(name or policy.name, budget_usd)
        run_no = next(_RUNS)
        started = time.perf_counter()
        for start in range(0, len(questions), self.task_size):
            group = questions[start : start + self.task_size]
            task_id = f"{scope}.{os.getpid()}.{run_no}.{start}"
            tries = await self._task(policy, group, budget_usd, scope, task_id)
            run.task_ids.append(task_id)
            await self._reveal(group, tries, scope, task_id)  # labels only after it closed
            self._score(run, group, tries)
        run.seconds = time.perf_counter() - started
        return run

    async def _task(
        self,
        policy: Policy,
        group: Sequence[Question],
        budget_usd: Decimal,
        scope: str,
        task_id: str,
    ) -> dict[str, list[Try]]:
        budget = Budget(usd=budget_usd * len(group))
        await self.ledger.open_task(task_id, budget)
        menu = Menu(self.options, await self.book.read(scope), self.default)
        by_id = {q.qid: q for q in group}
        needs = [Need(q.qid, q.difficulty, q.tags, prompt_tokens=q.prompt_tokens) for q in group]
        tries: dict[str, list[Try]] = {q.qid: [] for q in group}
        grants = policy.split(await self._pool(task_id), needs, pending_after=0, menu=menu)
        while grants:
            done = await asyncio.gather(
                *(self._call(task_id, by_id[g.subtask_id], g, tries, scope) for g in grants)
            )
            for t in done:
                if t is not None:
                    tries[t.qid].append(t)
            outcomes = [
                Outcome(
                    need=replace(n, attempt=len(tries[n.subtask_id])),
                    endpoint=tries[n.subtask_id][-1].endpoint,
                    asked=tries[n.subtask_id][-1].asked,
                    used=tries[n.subtask_id][-1].used,
                    cut_short=tries[n.subtask_id][-1].cut_short,
                    signals=tries[n.subtask_id][-1].reply_signals,
                )
                for n in needs
                if tries[n.subtask_id]
            ]
            grants = policy.escalate(await self._pool(task_id), outcomes, menu=menu)
            grants = [g for g in grants if len(tries[g.subtask_id]) < 4]
        await self.ledger.close_task(task_id, force=True)
        return tries

    async def _pool(self, task_id: str) -> Pool:
        root = await self.ledger.account(task_id, ROOT)
        return Pool(tokens=root.available_tokens, nanos=root.available_nanos)

    async def _call(
        self, task_id: str, q: Question, grant: Grant, tries: dict[str, list[Try]], scope: str
    ) -> Try | None:
        """The replay endpoint: reserve, answer with the recorded reply, commit what it cost."""
        endpoint = grant.endpoint or self.default or self.options[0].name
        model = self.models[endpoint]
        attempt = len(tries[q.qid]) + 1
        account = f"{ROOT}/{q.qid}.{attempt}"
        try:
            await self.ledger.open_account(
                task_id, account, Budget.from_nanos(tokens=grant.tokens, nanos=grant.nanos)
            )
        except BudgetExceeded:
            return None
        option, answer = model.option, q.answers[model.key]
        asked = grant.max_output_tokens
        try:
            view = await self.ledger.account(task_id, account)
            if view.available_nanos is not None:  # shrink to what the account can pay, as
                in_cost = option.cost(input_tokens=q.prompt_tokens, output_tokens=0)
                per_out = option.cost(input_tokens=0, output_tokens=1_000_000) / 1_000_000
                if per_out > 0:  # the metered client does
                    asked = min(asked, int((view.available_nanos - in_cost) / per_out))
            if asked < 1:
                return None
            reserve = option.cost(input_tokens=q.prompt_tokens, output_tokens=asked)
            held = await self.ledger.reserve(
                task_id, account, tokens=q.prompt_tokens + asked, nanos=reserve
            )
            used = min(asked, answer.output_tokens)
            cut = answer.output_tokens > asked
            cost = option.cost(input_tokens=q.prompt_tokens, output_tokens=used)
            if answer.cost_nanos is not None:  # the recorded cost, pro rata when cut short
                cost = answer.cost_nanos * used // max(1, answer.output_tokens)
            cost = min(cost, reserve)
            await self.ledger.commit(
                task_id, held.id, used=Amount(tokens=q.prompt_tokens + used, nanos=cost)
            )
        except BudgetExceeded:
            return None
        finally:
            await self.ledger.close_account(task_id, account, force=True)
        reply = answer.text if not cut else ""
        seen = signals(q.text, reply, used) | ({"cut_short"} if cut else set())
        t = Try(q.qid, endpoint, attempt, asked, used, cut, cost, frozenset(seen))
        await self.book.record(
            scope,
            f"{task_id}:{q.qid}:{attempt}",
            Observation(
                endpoint=endpoint,
                difficulty=q.difficulty,
                tags=(*q.tags, *seen),
                asked=asked,
                used=used,
                cut_short=cut,
                nanos=cost,
                escalated=attempt > 1,
            ),
        )
        return t

    async def _reveal(
        self, group: Sequence[Question], tries: dict[str, list[Try]], scope: str, task_id: str
    ) -> None:
        """After the task closed: tell the statistics which tries were right."""
        for q in group:
            for t in tries[q.qid]:
                await self.book.verdict(
                    scope,
                    f"{task_id}:{q.qid}:{t.attempt}",
                    ok=_right(q, t, self.models),
                )

    def _score(self, run: Run, group: Sequence[Question], tries: dict[str, list[Try]]) -> None:
        for q in group:
            mine = tries[q.qid]
            run.questions += 1
            run.decisions[q.qid] = tuple(t.endpoint for t in mine)
            run.nanos += sum(t.nanos for t in mine)
            run.cut_short += sum(t.cut_short for t in mine)
            run.correct += bool(mine) and _right(q, mine[-1], self.models)


def _right(q: Question, t: Try, models: dict[str, Model]) -> bool:
    return not t.cut_short and q.answers[models[t.endpoint].key].correct


def oracle(questions: Sequence[Question], models: Sequence[Model]) -> tuple[float, int]:
    """Accuracy and cost (nanos) of always picking the cheapest model that is right."""
    correct, nanos = 0, 0
    ladder = sorted(models, key=lambda m: m.option.rank)
    for q in questions:
        costs = [(m, _full_cost(q, m)) for m in ladder]
        right = [(m, c) for m, c in costs if q.answers[m.key].correct]
        pick = min(right or costs, key=lambda mc: mc[1])
        correct += bool(right)
        nanos += pick[1]
    return correct / len(questions), nanos


def _full_cost(q: Question, m: Model) -> int:
    answer = q.answers[m.key]
    if answer.cost_nanos is not None:
        return answer.cost_nanos
    return m.option.cost(input_tokens=q.prompt_tokens, output_tokens=answer.output_tokens)


# -- the command ---------------------------------------------------------------


def _table(rows: list[tuple[str, str, float, float, float, float, str]]) -> str:
    head = (
        f"{'policy':<14} {'budget $/q':>10} {'accuracy':>8} {'quality':>8} {'cost':>8} "
        f"{'escal.':>7} {'time':>7}"
    )
    lines = [head, "-" * len(head)]
    for name, budget, acc, quality, cost, esc, secs in rows:
        lines.append(
            f"{name:<14} {budget:>10} {acc:>8.3f} {quality:>8.3f} {cost:>8.3f} "
            f"{esc:>7.3f} {secs:>7}"
        )
    return "\n".join(lines)


def _plot(path: Path, dataset: str, points: dict[str, list[tuple[float, float]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, xy in points.items():
        xs, ys = zip(*sorted(xy), strict=True)
        style = "o-" if len(xy) > 1 else "o"
        ax.plot(xs, ys, style, label=name)
    ax.axhline(0.95, color="grey", linestyle=":", linewidth=1)
    ax.axvline(0.40, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("cost / always-strong cost")
    ax.set_ylabel("accuracy / always-strong accuracy")
    ax.set_title(f"Replay of {dataset}: quality against cost")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


async def replay(args: argparse.Namespace) -> int:
    """Run every policy and baseline, print the table, plot, and the RESULT line."""
    data = data_dir(args.data)
    loader = load_gsm8k if args.dataset == "gsm8k" else load_routerarena
    questions, models = loader(data)
    if args.quick:
        questions = questions[: args.quick_questions]
    weak, strong = (m.option.name for m in models)
    budgets = [Decimal(b) for b in args.sweep.split(",")] if args.sweep else []
    budget = Decimal(args.budget)
    ample = Decimal("1")
    server = None if args.redis_url else RedisServer().start()
    url = args.redis_url or (server.url if server else "")
    ledger = Ledger.from_url(url)
    book = StatsBook(ledger.redis)
    try:
        replay_strong = Replay(ledger, book, models, task_size=args.task_size, default=strong)
        replay_weak = Replay(ledger, book, models, task_size=args.task_size, default=weak)
        runs: list[Run] = []
        runs.append(
            await replay_strong.run(
                Uniform(), questions, budget_usd=ample, scope="r.strong", name="always-strong"
            )
        )
        runs.append(
            await replay_weak.run(
                Uniform(), questions, budget_usd=ample, scope="r.weak", name="always-weak"
            )
        )
        runs.append(
            await replay_strong.run(Tiered(), questions, budget_usd=ample, scope="r.tiered")
        )
        lf = LocalFirst(failure_signals=VERIFIER_FAILURES)
        runs.append(await replay_weak.run(lf, questions, budget_usd=budget, scope="r.local"))
        adaptive: list[Run] = []
        for b in sorted({*budgets, budget}):
            r = await replay_weak.run(Adaptive(), questions, budget_usd=b, scope=f"r.adaptive.{b}")
            adaptive.append(r)
        runs.extend(adaptive)
        always_strong, always_weak = runs[0], runs[1]
        point = next(r for r in adaptive if r.budget_usd == budget)
        span = always_strong.nanos - always_weak.nanos
        share = min(1.0, max(0.0, (point.nanos - always_weak.nanos) / span)) if span else 0.0
        mix = RandomMix(weak=weak, strong=strong, share=share)
        runs.append(
            await replay_weak.run(
                mix, questions, budget_usd=ample, scope="r.random", name="random-mix"
            )
        )
        best_acc, best_nanos = oracle(questions, models)
    finally:
        await ledger.aclose()
        if server is not None:
            server.stop()
    s_acc, s_cost = always_strong.accuracy, always_strong.nanos
    rows = []
    points: dict[str, list[tuple[float, float]]] = {}
    for r in runs:
        quality, cost = r.accuracy / s_acc, r.nanos / s_cost
        label = "adaptive" if r.name == "adaptive" else r.name
        points.setdefault(label, []).append((cost, quality))
        shown = str(r.budget_usd) if r.budget_usd != ample else "ample"
        rows.append((r.name, shown, r.accuracy, quality, cost, r.escalated(), f"{r.seconds:.1f}s"))
    rows.append(("oracle", "-", best_acc, best_acc / s_acc, best_nanos / s_cost, 0.0, "-"))
    points["oracle"] = [(best_nanos / s_cost, best_acc / s_acc)]
    print(
        f"dataset {args.dataset}: {len(questions)} questions, {args.task_size} per task; "
        f"weak {weak}, strong {strong}"
    )
    print(_table(rows))
    if args.plot:
        _plot(Path(args.plot), args.dataset, points)
        print(f"plot: {args.plot}")
    print(
        f"RESULT dataset={args.dataset} strong_acc={s_acc:.4f} policy_acc={point.accuracy:.4f} "
        f"quality_ratio={point.accuracy / s_acc:.4f} cost_ratio={point.nanos / s_cost:.4f}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments and run the replay."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--dataset", choices=["gsm8k", "routerarena"], default="gsm8k")
    parser.add_argument(
        "--data", help="folder of the datasets (default: $PAYMASTER_DATASETS or ../shared/datasets)"
    )
    parser.add_argument("--quick", action="store_true", help="a slice of the questions, one budget")
    parser.add_argument("--quick-questions", type=int, default=400)
    parser.add_argument("--task-size", type=int, default=20, help="questions per task")
    parser.add_argument(
        "--budget", default="0.0018", help="adaptive's operating point, USD per question"
    )
    parser.add_argument(
        "--sweep",
        default="0.0008,0.0012,0.0015,0.0022,0.003,0.005",
        help="more budgets for adaptive's curve (comma-separated USD per question)",
    )
    parser.add_argument(
        "--plot", default=None, help="PNG to write (default docs/replay_<dataset>.png)"
    )
    parser.add_argument("--redis-url", default=None, help="use this Redis instead of a private one")
    args = parser.parse_args(argv)
    if args.quick:
        args.sweep = ""
    if args.plot is None:
        args.plot = str(REPO / "docs" / f"replay_{args.dataset}.png") if not args.quick else ""
    return asyncio.run(replay(args))


if __name__ == "__main__":
    raise SystemExit(main())

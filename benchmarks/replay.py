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
from agents.verifier import reply_signals
from budgets import Amount, Budget, BudgetExceeded, Ledger, Price, usd_to_nanos
from budgets.keys import ROOT, name_part
from budgets.learner import Weights, reply_features
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
    Target,
    Uniform,
)
from budgets.stats import Observation, StatsBook, clean_tag
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

    text: str | None  # None: the dataset has no reply texts
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


class DatasetError(ValueError):
    """A dataset the replay cannot read; the message names the file and what is wrong."""


@dataclass(frozen=True, slots=True)
class Dataset:
    """Questions with every model's recorded answer, and the two models as endpoints."""

    name: str
    questions: list[Question]
    models: list[Model]  # weak first, strong second
    reply_texts: bool = True  # False: no response columns, so no reply signals


#: Short endpoint names of the GSM8K models (the statistics and tests use them).
_ALIASES = {GSM8K_STRONG: "gpt-4", GSM8K_WEAK: "mixtral"}
_TRUE, _FALSE = frozenset({"true", "1"}), frozenset({"false", "0"})


def _label(value: str | None, *, where: str, column: str) -> bool:
    low = (value or "").strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise DatasetError(f"{where}: column {column!r} holds {value!r}; expected True or False")


def _csv_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(path.glob("*.csv"))
        if not files:
            raise DatasetError(f"{path}: a folder without any .csv file")
        return files
    raise DatasetError(f"{path}: no such file or folder")


def load_csv(
    path: Path,
    *,
    strong: str,
    weak: str,
    prices: dict[str, Price],
    output_tokens: dict[str, int] | None = None,
    name: str | None = None,
) -> Dataset:
    """A CSV file, or a folder of them, in RouteLLM's layout.

    Columns: ``prompt``, one ``True``/``False`` column per model (was its answer
    right), and optional ``<model>_response`` texts. Without a model's response
    column its output tokens come from ``output_tokens[model]`` and its replies
    show no signals. In a folder, each file's name becomes a ``cat:<name>`` tag.
    Raises :class:`DatasetError` for a missing column, a label that is not a
    boolean, an empty file, or a model without a price.
    """
    files = _csv_files(path)
    for model in (strong, weak):
        if model not in prices:
            raise DatasetError(f"no price for model {model!r}; pass --price {model}=IN:OUT")
    encoding = load_encoding()
    csv.field_size_limit(sys.maxsize)
    output_tokens = output_tokens or {}
    questions: list[Question] = []
    texts = True
    for file in files:
        category = f"cat:{clean_tag(file.stem)}" if len(files) > 1 or path.is_dir() else None
        with file.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            missing = [c for c in ("prompt", strong, weak) if c not in columns]
            if missing:
                raise DatasetError(
                    f"{file}: no column {', '.join(map(repr, missing))}; "
                    f"the columns are {', '.join(map(repr, columns)) or 'none'}"
                )
            for model in (strong, weak):
                if f"{model}_response" not in columns and model not in output_tokens:
                    raise DatasetError(
                        f"{file}: no {model + '_response'!r} column to count {model}'s output "
                        f"tokens; pass --output-tokens {model}=N"
                    )
            texts = texts and all(f"{m}_response" in columns for m in (strong, weak))
            rows = 0
            for i, row in enumerate(reader):
                rows += 1
                where = f"{file}:{i + 2}"
                text = row["prompt"] or ""
                difficulty, tags = question_tags(text)
                answers = {}
                for model in (strong, weak):
                    reply = row.get(f"{model}_response")
                    answers[model] = Answer(
                        text=reply,
                        correct=_label(row[model], where=where, column=model),
                        output_tokens=_count(encoding, reply)
                        if reply is not None
                        else output_tokens[model],
                    )
                qid = f"q{len(questions)}" if category is None else f"{file.stem}.{i}"
                questions.append(
                    Question(
                        name_part(qid),
                        text,
                        _count(encoding, text) + 7,
                        difficulty,
                        (*tags, category) if category else tags,
                        answers,
                    )
                )
            if rows == 0:
                raise DatasetError(f"{file}: no rows (an empty file, or a header only)")
    models = [
        Model(weak, Option(_endpoint_name(weak), "remote", 2, prices[weak])),
        Model(strong, Option(_endpoint_name(strong), "remote", 5, prices[strong])),
    ]
    return Dataset(name or path.stem, questions, models, reply_texts=texts)


def load_gsm8k(data: Path) -> tuple[list[Question], list[Model]]:
    """RouteLLM's GSM8K answers of GPT-4-1106 (strong) and Mixtral-8x7B (weak)."""
    dataset = gsm8k_dataset(data)
    return dataset.questions, dataset.models


def gsm8k_dataset(data: Path) -> Dataset:
    """The ``gsm8k`` shortcut: RouteLLM's file at its list prices."""
    path = data / "routellm" / "gsm8k_responses.csv"
    if not path.is_file():
        raise DatasetError(f"no dataset at {path}; pass --data or set PAYMASTER_DATASETS")
    prices = {m: Price.of(*p) for m, p in GSM8K_PRICES.items()}
    return load_csv(path, strong=GSM8K_STRONG, weak=GSM8K_WEAK, prices=prices, name="gsm8k")


def load_routerarena(data: Path) -> tuple[list[Question], list[Model]]:
    """RouterArena's answers of its two cached models; the more accurate one is 'strong'."""
    dataset = routerarena_dataset(data)
    return dataset.questions, dataset.models


def routerarena_dataset(data: Path) -> Dataset:
    """The ``routerarena`` shortcut: its two cached models, recorded costs charged."""
    folder = data / "routerarena"
    files = sorted(folder.glob("*.jsonl"))
    if len(files) < 2:
        raise DatasetError(
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
    for raw_id in shared:
        first = by_model[names[0]][raw_id]
        text = str(first["question"])
        difficulty, tags = question_tags(text)
        answers = {}
        prompt_tokens = 0
        for name in names:
            row = by_model[name][raw_id]
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
        cat = "cat:" + clean_tag(raw_id.rsplit("_", 1)[0])
        # the id holds spaces ('MMLUPro_computer science_9075'): a valid name is made of it
        questions.append(
            Question(name_part(raw_id), text, prompt_tokens, difficulty, (*tags, cat), answers)
        )
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
    return Dataset("routerarena", questions, models)


def _endpoint_name(model: str) -> str:
    return _ALIASES.get(model) or re.sub(r"[^A-Za-z0-9_.\-]+", "-", model).strip("-.")[:64]


# -- run-time signals ----------------------------------------------------------


def signals(question: str, reply: str | None, output_tokens: int) -> frozenset[str]:
    """What a reply shows about itself (:func:`agents.verifier.reply_signals`), as in production.

    ``None`` (a dataset without reply texts) shows nothing.
    """
    if reply is None:
        return frozenset()
    return frozenset(reply_signals(reply, question=question, output_tokens=output_tokens))


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
    budget_usd: Decimal | None  # None: the automatic cap (see Replay.run)
    decisions: dict[str, tuple[str, ...]] = field(default_factory=dict)  # qid -> endpoints tried
    per_question: dict[str, tuple[int, bool]] = field(default_factory=dict)  # qid -> nanos, right
    learned: list[Weights] = field(default_factory=list)  # the learner as each task read it
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
        budget_usd: Decimal | None,
        scope: str,
        name: str | None = None,
    ) -> Run:
        """Every question through ``policy``; statistics kept in ``scope`` (cleared first).

        Each task's budget, a hard cap, is ``budget_usd`` per question, or with
        ``None`` what one call of the priciest endpoint with the question's prompt
        and 1,024 output tokens costs (list prices, known before any reply).
        """
        await self.book.clear(scope)
        run = Run(name or policy.name, budget_usd)
        run_no = next(_RUNS)
        started = time.perf_counter()
        for start in range(0, len(questions), self.task_size):
            group = questions[start : start + self.task_size]
            task_id = f"{scope}.{os.getpid()}.{run_no}.{start}"
            tries = await self._task(policy, group, budget_usd, scope, task_id, run)
            run.task_ids.append(task_id)
            await self._reveal(group, tries, scope, task_id)  # labels only after it closed
            self._score(run, group, tries)
        run.seconds = time.perf_counter() - started
        return run

    async def _task(
        self,
        policy: Policy,
        group: Sequence[Question],
        budget_usd: Decimal | None,
        scope: str,
        task_id: str,
        run: Run,
    ) -> dict[str, list[Try]]:
        if budget_usd is None:
            cap = sum(
                max(o.cost(input_tokens=q.prompt_tokens, output_tokens=1024) for o in self.options)
                for q in group
            )
            budget = Budget.from_nanos(tokens=None, nanos=cap)
        else:
            budget = Budget(usd=budget_usd * len(group))
        await self.ledger.open_task(task_id, budget)
        menu = Menu(self.options, await self.book.read(scope), self.default)
        run.learned.append(menu.stats.model)
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
        reply = None if answer.text is None else answer.text if not cut else ""
        seen = signals(q.text, reply, used) | ({"cut_short"} if cut else set())
        t = Try(q.qid, endpoint, attempt, asked, used, cut, cost, frozenset(seen))
        await self.book.record(
            scope,
            f"{task_id}:{q.qid}:{attempt}",
            Observation(
                endpoint=endpoint,
                difficulty=q.difficulty,
                tags=q.tags,
                asked=asked,
                used=used,
                cut_short=cut,
                nanos=cost,
                escalated=attempt > 1,
                prompt_tokens=q.prompt_tokens,
                signals=tuple(sorted(seen)),
                before_used=tries[q.qid][-1].used if tries[q.qid] else 0,
                explored=grant.explore,
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
            nanos = sum(t.nanos for t in mine)
            right = bool(mine) and _right(q, mine[-1], self.models)
            run.per_question[q.qid] = (nanos, right)
            run.nanos += nanos
            run.cut_short += sum(t.cut_short for t in mine)
            run.correct += right


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


def _table(rows: list[tuple[str, str, float, float, float, float, float]]) -> str:
    head = (
        f"{'policy':<14} {'target':>10} {'accuracy':>8} {'quality':>8} {'cost':>8} "
        f"{'random@cost':>11} {'escal.':>7}"
    )
    lines = [head, "-" * len(head)]
    for name, target, acc, quality, cost, rand, esc in rows:
        shown = "-" if rand != rand else f"{rand:.3f}"  # NaN: not a point on the cost axis
        lines.append(
            f"{name:<14} {target:>10} {acc:>8.3f} {quality:>8.3f} {cost:>8.3f} "
            f"{shown:>11} {esc:>7.3f}"
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


def curve_at(points: Sequence[tuple[float, float]], cost: float) -> float:
    """A curve's quality at ``cost``: linear between its (cost, quality) points, flat beyond."""
    xy = sorted(points)
    if cost <= xy[0][0]:
        return xy[0][1]
    for (x0, y0), (x1, y1) in itertools.pairwise(xy):
        if x0 <= cost <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (cost - x0) / (x1 - x0)
    return xy[-1][1]


@dataclass(frozen=True, slots=True)
class Line:
    """The random mix of the two models: every cost between theirs, at the mixed quality."""

    weak: tuple[float, float]  # (cost, quality) of always-weak
    strong: tuple[float, float]  # of always-strong

    def share(self, cost: float) -> float:
        """Share of questions the mix must send to the strong model to cost ``cost``."""
        span = self.strong[0] - self.weak[0]
        return min(1.0, max(0.0, (cost - self.weak[0]) / span)) if span else 1.0

    def quality(self, cost: float) -> float:
        """The random mix's expected quality at ``cost``."""
        return self.weak[1] + (self.strong[1] - self.weak[1]) * self.share(cost)

    def apgr(self, points: Sequence[tuple[float, float]]) -> float:
        """RouteLLM's APGR: the mean over the mix's share of the policy's gap recovered.

        The policy's curve runs from always-weak through its points to always-strong
        (points past either end are clipped to it); the random mix scores 0.5.
        """
        gap = self.strong[1] - self.weak[1]
        if not gap:
            return 0.5
        shaped = sorted({(0.0, 0.0), (1.0, 1.0)} | {
            (self.share(c), (q - self.weak[1]) / gap) for c, q in points
        })  # fmt: skip
        area = 0.0
        for (x0, y0), (x1, y1) in itertools.pairwise(shaped):
            area += (x1 - x0) * (y0 + y1) / 2
        return area


def logistic_reference(
    questions: Sequence[Question], models: Sequence[Model]
) -> tuple[list[str], list[tuple[float, float]]]:
    """An honest offline router: a logistic model of the cheaper model's reply being right.

    Fitted on the first half of the questions (prompt features and that reply's
    signals, as the policy sees them), it escalates the second half's questions
    least likely right first to the other model. Returns the second half's ids and its
    curve: (cost, quality) against always-strong on the same questions, every 5%.
    """
    import numpy as np

    strong = models[1]
    half = len(questions) // 2
    # the router starts on the cheaper model (by its cost on the first half) and escalates
    # to the other; its curve is against always-strong, the more accurate model
    first, other = sorted(models, key=lambda m: sum(_full_cost(q, m) for q in questions[:half]))
    rows = []
    for q in questions:
        a = q.answers[first.key]
        shown = signals(q.text, a.text, a.output_tokens)
        rows.append(reply_features(q.difficulty, q.tags, q.prompt_tokens, shown))
    names = sorted({f for r in rows for f in r})
    x = np.array([[r.get(f, 0.0) for f in names] for r in rows])
    y = np.array([float(q.answers[first.key].correct) for q in questions])
    w = np.zeros(len(names))
    for _ in range(2000):  # gradient descent on the L2-regularized log loss, first half only
        p = 1 / (1 + np.exp(-x[:half] @ w))
        w -= 1.0 * (x[:half].T @ (p - y[:half]) / half + 1e-3 * w)
    test = list(questions[half:])
    chance = 1 / (1 + np.exp(-x[half:] @ w))
    order = [test[i] for i in np.argsort(chance, kind="stable")]
    base_cost = {q.qid: _full_cost(q, first) for q in test}
    up_cost = {q.qid: _full_cost(q, other) for q in test}
    all_strong = sum(_full_cost(q, strong) for q in test)
    strong_right = sum(q.answers[strong.key].correct for q in test)
    curve = []
    for step in range(21):
        k = round(len(test) * step / 20)
        up = {q.qid for q in order[:k]}
        cost = sum(base_cost[q.qid] + (up_cost[q.qid] if q.qid in up else 0) for q in test)
        right = sum(q.answers[(other if q.qid in up else first).key].correct for q in test)
        curve.append((cost / all_strong, right / strong_right))
    return [q.qid for q in test], curve


def _on(run: Run, qids: Sequence[str], strong: Run) -> tuple[float, float]:
    """A run's (cost, quality) on some questions, against always-strong on the same ones."""
    nanos = sum(run.per_question[q][0] for q in qids)
    right = sum(run.per_question[q][1] for q in qids)
    s_nanos = sum(strong.per_question[q][0] for q in qids)
    s_right = sum(strong.per_question[q][1] for q in qids)
    return nanos / max(1, s_nanos), right / max(1, s_right)


async def replay(args: argparse.Namespace, dataset: Dataset) -> int:
    """Run every policy and baseline, print the table, plot, and the RESULT line."""
    questions, models = dataset.questions, dataset.models
    if args.quick:
        questions = questions[: args.quick_questions]
    weak, strong = (m.option.name for m in models)
    target = Target.parse(args.target)
    targets = [Target.parse(t) for t in args.targets.split(",")] if args.targets else []
    budget = None if args.budget == "auto" else Decimal(args.budget)
    ample = Decimal("1")
    server = None if args.redis_url else RedisServer().start()
    url = args.redis_url or (server.url if server else "")
    ledger = Ledger.from_url(url)
    book = StatsBook(ledger.redis)
    try:
        replay_strong = Replay(ledger, book, models, task_size=args.task_size, default=strong)
        replay_weak = Replay(ledger, book, models, task_size=args.task_size, default=weak)
        always_strong = await replay_strong.run(
            Uniform(), questions, budget_usd=ample, scope="r.strong", name="always-strong"
        )
        always_weak = await replay_weak.run(
            Uniform(), questions, budget_usd=ample, scope="r.weak", name="always-weak"
        )
        lf = LocalFirst(failure_signals=VERIFIER_FAILURES)
        local = await replay_weak.run(lf, questions, budget_usd=budget, scope="r.local")
        adaptive: list[tuple[Target, Run]] = []
        for i, t in enumerate(sorted({*targets, target}, key=_target_key)):
            policy = Adaptive(target=t)
            r = await replay_weak.run(policy, questions, budget_usd=budget, scope=f"r.ad.{i}")
            adaptive.append((t, r))
        point = next(r for t, r in adaptive if t == target)
        line = Line(
            (
                always_weak.nanos / always_strong.nanos,
                always_weak.accuracy / always_strong.accuracy,
            ),
            (1.0, 1.0),
        )
        mix = RandomMix(
            weak=weak, strong=strong, share=line.share(point.nanos / always_strong.nanos)
        )
        random_run = await replay_weak.run(
            mix, questions, budget_usd=ample, scope="r.random", name="random-mix"
        )
        best_acc, best_nanos = oracle(questions, models)
    finally:
        await ledger.aclose()
        if server is not None:
            server.stop()
    s_acc, s_cost = always_strong.accuracy, always_strong.nanos
    curve = [(r.nanos / s_cost, r.accuracy / s_acc) for _, r in adaptive]
    rows = []
    for r, shown in (
        (always_strong, "-"), (always_weak, "-"), (local, "-"),
        *((r, _target_text(t)) for t, r in adaptive), (random_run, "-"),
    ):  # fmt: skip
        quality, cost = r.accuracy / s_acc, r.nanos / s_cost
        rows.append((r.name, shown, r.accuracy, quality, cost, line.quality(cost), r.escalated()))
    rows.append(("oracle", "-", best_acc, best_acc / s_acc, best_nanos / s_cost, float("nan"), 0.0))
    cap = "auto (one 1,024-token call of the priciest model)" if budget is None else f"${budget}"
    print(
        f"dataset {dataset.name}: {len(questions)} questions, {args.task_size} per task; "
        f"weak {weak}, strong {strong}; per-question cap {cap}"
    )
    if not dataset.reply_texts:
        print("reply signals: unavailable (no <model>_response columns): only cut_short is seen")
    print(_table(rows))
    p_cost, p_quality = point.nanos / s_cost, point.accuracy / s_acc
    apgr = line.apgr(curve)
    print(f"APGR (RouteLLM's, random mix = 0.500): {apgr:.3f} over {len(curve)} targets")
    ref_text = ""
    reference: list[tuple[float, float]] = []
    if len(questions) >= 40:
        qids, reference = logistic_reference(questions, models)
        half = [_on(r, qids, always_strong) for _, r in adaptive]
        beats = [q - curve_at(reference, c) for c, q in half]
        h_cost, h_quality = _on(point, qids, always_strong)
        ref_q = curve_at(reference, h_cost)
        print(
            f"logistic reference (fitted on the first half, scored on the second): "
            f"{ref_q:.3f} at the policy's second-half cost {h_cost:.3f}; the policy: "
            f"{h_quality:.3f}; policy minus reference over the targets: "
            + ", ".join(f"{b:+.3f}" for b in beats)
        )
        ref_text = f" reference_quality_at_cost={ref_q:.4f}"
    if args.plot:
        points = {
            "adaptive (target sweep)": curve,
            "local-first (verifier rules)": [(local.nanos / s_cost, local.accuracy / s_acc)],
            "random mix": [line.weak, line.strong],
            **({"logistic reference (second half)": reference} if reference else {}),
            "oracle": [(best_nanos / s_cost, best_acc / s_acc)],
        }
        _plot(Path(args.plot), dataset.name, points)
        print(f"plot: {args.plot}")
    print(
        f"RESULT dataset={dataset.name} strong_acc={s_acc:.4f} policy_acc={point.accuracy:.4f} "
        f"quality_ratio={p_quality:.4f} cost_ratio={p_cost:.4f} "
        f"random_quality_at_cost={line.quality(p_cost):.4f} apgr={apgr:.4f}"
        f" target={_target_text(target)}{ref_text}"
    )
    return 0


def _target_key(t: Target) -> tuple[float, float]:
    return (t.cost_ratio or 0.0, float(t.usd_per_point or 0))


def _target_text(t: Target) -> str:
    return (
        f"ratio:{t.cost_ratio:g}"
        if t.cost_ratio is not None
        else f"usd_per_point:{t.usd_per_point}"
    )


def _pairs(values: Sequence[str], flag: str) -> dict[str, str]:
    out = {}
    for value in values:
        model, sep, rest = value.rpartition("=")
        if not sep or not model or not rest:
            raise DatasetError(f"{flag} {value!r}: expected MODEL=VALUE")
        out[model] = rest
    return out


def open_dataset(args: argparse.Namespace, data: Path) -> Dataset:
    """The dataset ``--dataset`` names: a shortcut, or a CSV file or folder with its flags."""
    if args.dataset == "gsm8k":
        return gsm8k_dataset(data)
    if args.dataset == "routerarena":
        return routerarena_dataset(data)
    if not args.strong or not args.weak:
        raise DatasetError(f"--dataset {args.dataset}: name its models with --strong and --weak")
    prices = {m: Price.of(*p) for m, p in GSM8K_PRICES.items()}
    for model, value in _pairs(args.price, "--price").items():
        given, sep, out = value.partition(":")
        try:
            prices[model] = Price.of(given, out if sep else given)
        except Exception as e:  # Price says what is wrong with the number
            raise DatasetError(f"--price {model}={value}: {e}") from e
    tokens = {}
    for model, value in _pairs(args.output_tokens, "--output-tokens").items():
        if not value.isdigit() or int(value) < 1:
            raise DatasetError(f"--output-tokens {model}={value}: expected a positive integer")
        tokens[model] = int(value)
    path = Path(args.dataset)
    return load_csv(path, strong=args.strong, weak=args.weak, prices=prices, output_tokens=tokens)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments and run the replay; a dataset it cannot read is one clear line, code 2."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--dataset",
        default="gsm8k",
        help="gsm8k, routerarena, or a CSV file or folder of CSV files in RouteLLM's layout",
    )
    parser.add_argument("--strong", help="the strong model's column (CSV datasets)")
    parser.add_argument("--weak", help="the weak model's column (CSV datasets)")
    parser.add_argument(
        "--price", action="append", default=[], metavar="MODEL=IN:OUT",
        help="USD per million input and output tokens of a model (CSV datasets)",
    )  # fmt: skip
    parser.add_argument(
        "--output-tokens", action="append", default=[], metavar="MODEL=N",
        help="output tokens of every reply of a model without a response column",
    )  # fmt: skip
    parser.add_argument(
        "--data", help="folder of the datasets (default: $PAYMASTER_DATASETS or ../shared/datasets)"
    )
    parser.add_argument("--quick", action="store_true", help="a slice of the questions, one target")
    parser.add_argument("--quick-questions", type=int, default=400)
    parser.add_argument("--task-size", type=int, default=20, help="questions per task")
    parser.add_argument(
        "--budget",
        default="auto",
        help="each task's hard cap, USD per question; 'auto': one 1,024-token call of the "
        "priciest model per question",
    )
    parser.add_argument(
        "--target",
        default=os.environ.get("PAYMASTER_TARGET") or _target_text(Target()),
        help="adaptive's operating point (PAYMASTER_TARGET syntax: ratio:0.35, usd_per_point:X)",
    )
    parser.add_argument(
        "--targets",
        default="ratio:0.1,ratio:0.2,ratio:0.3,ratio:0.45,ratio:0.6,ratio:0.8",
        help="more targets for adaptive's curve (comma-separated)",
    )
    parser.add_argument(
        "--plot", default=None, help="PNG to write (default docs/replay_<dataset>.png)"
    )
    parser.add_argument("--redis-url", default=None, help="use this Redis instead of a private one")
    args = parser.parse_args(argv)
    if args.quick:
        args.targets = ""
    try:
        data = data_dir(args.data)
        dataset = open_dataset(args, data)
    except DatasetError as e:
        print(f"replay: {e}", file=sys.stderr)
        return 2
    if args.plot is None:
        stem = clean_tag(dataset.name)
        args.plot = str(REPO / "docs" / f"replay_{stem}.png") if not args.quick else ""
    return asyncio.run(replay(args, dataset))


if __name__ == "__main__":
    raise SystemExit(main())

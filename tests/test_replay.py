"""The offline replay: real policy, real ledger and statistics on a real Redis, recorded answers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

import pytest

from benchmarks.replay import (
    Model,
    Question,
    Replay,
    Run,
    data_dir,
    load_gsm8k,
    main,
    oracle,
    signals,
)
from budgets import Ledger
from budgets.policy import Adaptive, LocalFirst, Uniform
from budgets.stats import StatsBook

DATA = data_dir()
pytestmark = pytest.mark.skipif(
    not (DATA / "routellm" / "gsm8k_responses.csv").is_file(),
    reason=f"the recorded answers are not at {DATA}; set PAYMASTER_DATASETS to their folder",
)

TASK = 10


@pytest.fixture(scope="module")
def gsm8k() -> tuple[list[Question], list[Model]]:
    questions, models = load_gsm8k(DATA)
    return questions[:60], models


@pytest.fixture
async def harness(
    redis_url: str, gsm8k: tuple[list[Question], list[Model]]
) -> AsyncIterator[Replay]:
    ledger = Ledger.from_url(redis_url)
    _, models = gsm8k
    yield Replay(ledger, StatsBook(ledger.redis), models, task_size=TASK, default="mixtral")
    await ledger.aclose()


def invert_labels(questions: list[Question], start: int) -> list[Question]:
    """The same questions, every model's label flipped from ``start`` on."""
    out = list(questions[:start])
    for q in questions[start:]:
        answers = {k: replace(a, correct=not a.correct) for k, a in q.answers.items()}
        out.append(replace(q, answers=answers))
    return out


async def test_a_decision_never_sees_its_own_label_or_a_later_one(
    harness: Replay, gsm8k: tuple[list[Question], list[Model]]
) -> None:
    questions, _ = gsm8k
    budget = Decimal("0.003")
    honest = await harness.run(Adaptive(), questions, budget_usd=budget, scope="leak.a")
    cut = 3 * TASK  # labels of task 3 onward flipped: tasks 0-3 must decide the same
    flipped = await harness.run(
        Adaptive(), invert_labels(questions, cut), budget_usd=budget, scope="leak.b"
    )
    upto = [q.qid for q in questions[: cut + TASK]]
    assert [honest.decisions[q] for q in upto] == [flipped.decisions[q] for q in upto]
    # The learner each task read: the same up to task 3 (it learned from tasks 0-2 only),
    # and it had learned something by then; task 4 read the flipped verdicts of task 3.
    assert honest.learned[:4] == flipped.learned[:4]
    assert honest.learned[3].updates("mixtral", "r") > 0
    assert honest.learned[4] != flipped.learned[4]
    # ...while what was learned from the flipped labels does change later decisions.
    later = [q.qid for q in questions[cut + TASK :]]
    assert [honest.decisions[q] for q in later] != [flipped.decisions[q] for q in later]


async def test_spend_stays_within_each_task_budget_and_matches_the_ledger(
    harness: Replay, gsm8k: tuple[list[Question], list[Model]]
) -> None:
    questions, _ = gsm8k
    budget = Decimal("0.0015")
    run = await harness.run(Adaptive(), questions, budget_usd=budget, scope="spend")
    assert run.questions == len(questions)
    assert 0 < run.nanos <= int(budget * 10**9) * len(questions)
    spent = 0
    assert len(run.task_ids) == len(questions) // TASK
    for task_id in run.task_ids:
        tree = await harness.ledger.snapshot(task_id)
        assert tree.root.total_spent_nanos <= int(budget * 10**9) * TASK
        spent += tree.root.total_spent_nanos
    assert spent == run.nanos
    # The statistics counted every try, once.
    stats = await harness.book.read("spend")
    tries = sum(len(d) for d in run.decisions.values())
    assert sum(stats.cell(e, 0).calls for e in ("mixtral", "gpt-4")) == tries
    assert sum(stats.cell(e, 0).judged for e in ("mixtral", "gpt-4")) == tries


async def test_always_weak_and_rules_behave_as_their_names_say(
    harness: Replay, gsm8k: tuple[list[Question], list[Model]]
) -> None:
    questions, models = gsm8k
    weak = await harness.run(Uniform(), questions, budget_usd=Decimal(1), scope="weak")
    assert all(d == ("mixtral",) for d in weak.decisions.values())
    assert weak.correct == sum(q.answers[models[0].key].correct for q in questions)
    rules = LocalFirst(failure_signals=frozenset({"no-final", "calc-bad"}))
    lf = await harness.run(rules, questions, budget_usd=Decimal(1), scope="lf")
    for q in questions:
        first = q.answers[models[0].key]
        shows = signals(q.text, first.text, first.output_tokens) & {"no-final", "calc-bad"}
        assert (len(lf.decisions[q.qid]) > 1) == bool(shows), q.qid
    acc, nanos = oracle(questions, models)
    assert acc >= lf.accuracy
    assert acc >= weak.accuracy
    assert nanos > 0


def test_signals_read_the_reply_not_the_answer() -> None:
    q = "Tom has 3 boxes of 4 apples. How many apples?"
    good = "3 boxes of 4 is 3 * 4 = <<3*4=12>>12 apples.\n#### 12"
    wrong_step = "3 boxes of 4 is 3 * 4 = <<3*4=13>>13 apples.\n#### 13"
    no_answer = "Tom has many apples."
    assert signals(q, good, 30) & {"calc-bad", "no-final", "final-not-last"} == frozenset()
    assert "calc-bad" in signals(q, wrong_step, 30)
    assert "no-final" in signals(q, no_answer, 5)
    assert "len:2" in signals(q, good, 250)


def test_the_command_prints_a_table_a_plot_and_the_result_line_last(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], redis_url: str
) -> None:
    plot = tmp_path / "replay.png"
    code = main(
        [
            "--quick", "--quick-questions", "40", "--task-size", "10",
            "--plot", str(plot), "--redis-url", redis_url,
        ]
    )  # fmt: skip
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("RESULT dataset=gsm8k strong_acc=")
    fields = dict(part.split("=") for part in lines[-1].split()[1:])
    assert 0 < float(fields["cost_ratio"]) < 1
    assert float(fields["quality_ratio"]) > 0
    assert any(line.startswith("always-strong") for line in lines)
    assert any(line.startswith("oracle") for line in lines)
    assert plot.stat().st_size > 10_000
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_accuracy_is_the_share_right() -> None:
    run = Run("x", Decimal(1), correct=3, questions=4)
    assert run.accuracy == 0.75

"""The replay's datasets: RouteLLM-layout CSV files and folders, bad ones refused; the cost knob
on a synthetic dataset whose structure is known (real ledger and statistics on a real Redis)."""

from __future__ import annotations

import csv
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from benchmarks.replay import (
    Answer,
    DatasetError,
    Line,
    Model,
    Question,
    Replay,
    curve_at,
    load_csv,
    main,
)
from budgets import Ledger, Price
from budgets.keys import check_path, name_part
from budgets.policy import Adaptive, Option, Target
from budgets.stats import StatsBook

PRICES = {"big": Price.of("10", "30"), "small": Price.of("0.5", "0.5")}


def write(path: Path, rows: list[dict[str, str]], columns: list[str] | None = None) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns or list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def rows(n: int = 3, *, responses: bool = True) -> list[dict[str, str]]:
    out = []
    for i in range(n):
        row = {"prompt": f"What is {i} + 2?", "big": "True", "small": str(i % 2 == 0)}
        if responses:
            row["big_response"] = f"{i} + 2 = {i + 2}\n#### {i + 2}"
            row["small_response"] = f"{i} + 2 = {i + 3}\n#### {i + 3}"
        out.append(row)
    return out


def test_a_csv_file_with_responses(tmp_path: Path) -> None:
    data = load_csv(write(tmp_path / "t.csv", rows()), strong="big", weak="small", prices=PRICES)
    assert data.reply_texts
    assert [q.qid for q in data.questions] == ["q0", "q1", "q2"]
    assert [q.answers["small"].correct for q in data.questions] == [True, False, True]
    assert all(q.answers["big"].correct for q in data.questions)
    first = data.questions[0].answers["small"]
    assert first.text == "0 + 2 = 3\n#### 3"
    assert first.output_tokens > 0  # counted from the reply's text
    weak, strong = data.models
    assert (weak.key, strong.key) == ("small", "big")
    assert (weak.option.tier, strong.option.tier) == (2, 5)
    assert strong.option.price == PRICES["big"]


def test_a_csv_file_without_responses_needs_output_tokens(tmp_path: Path) -> None:
    path = write(tmp_path / "t.csv", rows(responses=False))
    with pytest.raises(DatasetError, match=r"no 'big_response' column.*--output-tokens big=N"):
        load_csv(path, strong="big", weak="small", prices=PRICES)
    data = load_csv(
        path, strong="big", weak="small", prices=PRICES, output_tokens={"big": 90, "small": 40}
    )
    assert not data.reply_texts
    assert {q.answers["big"].output_tokens for q in data.questions} == {90}
    assert {q.answers["small"].text for q in data.questions} == {None}


def test_a_folder_of_csv_files_tags_each_question_with_its_file(tmp_path: Path) -> None:
    write(tmp_path / "Algebra.csv", rows(2))
    write(tmp_path / "word problems.csv", rows(3))
    data = load_csv(tmp_path, strong="big", weak="small", prices=PRICES)
    cats = [next(t for t in q.tags if t.startswith("cat:")) for q in data.questions]
    assert cats == ["cat:algebra"] * 2 + ["cat:word-problems"] * 3
    ids = [q.qid for q in data.questions]
    assert len(set(ids)) == 5
    for qid in ids:  # a file name with a space still makes valid accounts
        check_path(f"root/{qid}.1")


def test_question_ids_with_spaces_become_valid_distinct_account_names() -> None:
    raw = ["MMLUPro_computer science_9075", "MMLUPro_computer-science_9075", "a" * 90, "q1"]
    names = [name_part(r) for r in raw]
    assert names[3] == "q1"  # a valid name is kept
    assert len(set(names)) == len(raw)
    for name in names:
        check_path(f"root/{name}.3")


@pytest.mark.parametrize(
    ("content", "error"),
    [
        ("prompt,big\nq,True\n", r"no column 'small'; the columns are 'prompt', 'big'"),
        ("question,big,small\nq,True,False\n", r"no column 'prompt'"),
        ("prompt,big,small,big_response,small_response\nq,yes,False,a,b\n", r"'big' holds 'yes'"),
        ("prompt,big,small,big_response,small_response\n", r"no rows"),
        ("", r"no column 'prompt'.*columns are none"),
    ],
)
def test_bad_datasets_are_refused_with_a_clear_error(
    tmp_path: Path, content: str, error: str
) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DatasetError, match=error):
        load_csv(path, strong="big", weak="small", prices=PRICES)


def test_a_model_without_a_price_or_a_missing_path_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "t.csv", rows())
    with pytest.raises(DatasetError, match=r"no price for model 'big'; pass --price big=IN:OUT"):
        load_csv(path, strong="big", weak="small", prices={"small": PRICES["small"]})
    with pytest.raises(DatasetError, match="no such file or folder"):
        load_csv(tmp_path / "none.csv", strong="big", weak="small", prices=PRICES)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"without any \.csv file"):
        load_csv(tmp_path / "empty", strong="big", weak="small", prices=PRICES)


def test_the_command_says_what_is_wrong_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path / "t.csv", rows())
    assert main(["--dataset", str(path)]) == 2
    assert "name its models with --strong and --weak" in capsys.readouterr().err
    code = main(["--dataset", str(path), "--strong", "big", "--weak", "small"])
    assert code == 2
    assert "no price for model 'big'" in capsys.readouterr().err
    bad = ["--dataset", str(path), "--strong", "big", "--weak", "small", "--price", "big"]
    assert main(bad) == 2
    assert "--price 'big': expected MODEL=VALUE" in capsys.readouterr().err


def test_the_command_runs_a_csv_dataset_without_responses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], redis_url: str
) -> None:
    many = [
        {"prompt": f"Add {i} and {i + 1} then double it.", "big": "True", "small": str(i % 3 > 0)}
        for i in range(40)
    ]
    path = write(tmp_path / "t.csv", many)
    code = main(
        [
            "--dataset", str(path), "--strong", "big", "--weak", "small",
            "--price", "big=10:30", "--price", "small=0.5:0.5",
            "--output-tokens", "big=120", "--output-tokens", "small=100",
            "--quick", "--task-size", "10", "--redis-url", redis_url,
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "reply signals: unavailable" in out
    last = out.strip().splitlines()[-1]
    fields = dict(part.split("=", 1) for part in last.split()[1:])
    assert fields["dataset"] == "t"
    for key in ("strong_acc", "quality_ratio", "cost_ratio", "random_quality_at_cost", "apgr"):
        assert 0 <= float(fields[key]) <= 2, key


def test_the_random_mix_line_and_apgr() -> None:
    line = Line(weak=(0.1, 0.6), strong=(1.0, 1.0))
    assert line.quality(0.1) == pytest.approx(0.6)
    assert line.quality(0.55) == pytest.approx(0.8)
    assert line.quality(5.0) == pytest.approx(1.0)
    assert line.apgr([(0.55, 0.8)]) == pytest.approx(0.5)  # on the line: random
    assert line.apgr([(0.1, 1.0)]) == pytest.approx(1.0)  # all the gap at the weak's cost
    assert 0.5 < line.apgr([(0.3, 0.9), (0.6, 0.95)]) < 1.0
    assert curve_at([(0.2, 0.5), (0.4, 0.7)], 0.3) == pytest.approx(0.6)
    assert curve_at([(0.2, 0.5), (0.4, 0.7)], 0.9) == pytest.approx(0.7)


# -- the cost knob on a dataset of known structure -------------------------------------------


def synthetic(n: int) -> tuple[list[Question], list[Model]]:
    """Every question alike in size; the weak model is right 60% of the time and its wrong
    replies mostly show a step that does not compute; the strong model is always right."""
    questions = []
    for i in range(n):
        right = i % 5 < 3
        shows = not right and i % 10 != 4  # 80% of its wrong replies give themselves away
        weak_text = "2 * 3 = 7\n#### 7" if shows else "2 * 3 = 6\n#### 6"
        answers = {
            "weak": Answer(weak_text, right, 80),
            "strong": Answer("2 * 3 = 6\n#### 6", True, 120),
        }
        questions.append(Question(f"s{i}", "What is 2 * 3?", 60, 2, ("q:times",), answers))
    models = [
        Model("weak", Option("weak", "remote", 2, Price.of("0.5", "0.5"))),
        Model("strong", Option("strong", "remote", 5, Price.of("10", "30"))),
    ]
    return questions, models


@pytest.fixture
async def synthetic_replay(redis_url: str) -> AsyncIterator[tuple[Replay, list[Question]]]:
    ledger = Ledger.from_url(redis_url)
    questions, models = synthetic(200)
    yield Replay(ledger, StatsBook(ledger.redis), models, task_size=20, default="weak"), questions
    await ledger.aclose()


async def test_the_cost_knob_tracks_its_target_and_quality_rises_with_it(
    synthetic_replay: tuple[Replay, list[Question]],
) -> None:
    replay, questions = synthetic_replay
    strong_nanos = sum(
        replay.models["strong"].option.cost(input_tokens=60, output_tokens=120) for _ in questions
    )
    results = []
    for ratio in (0.15, 0.3, 0.5):
        run = await replay.run(
            Adaptive(target=Target(cost_ratio=ratio), explore=0.0),
            questions,
            budget_usd=None,
            scope=f"syn.{ratio}",
        )
        cost = run.nanos / strong_nanos
        results.append((ratio, cost, run.accuracy))
        assert cost == pytest.approx(ratio, rel=0.10), (ratio, cost)
    accuracies = [acc for _, _, acc in results]
    assert accuracies == sorted(accuracies)
    assert accuracies[-1] > accuracies[0]
    # Escalations go where the reply gives itself away: at ratio 0.3 (about a quarter of
    # the questions escalated) nearly all of the weak model's detectable faults are mended.
    assert results[1][2] > 0.6 + 0.25

"""Verifier signals: what a reply shows about itself, read without the right answer (pure)."""

from __future__ import annotations

import pytest

from agents.verifier import SIGNALS, final_answer, recompute, reply_signals, step_checks

QUESTION = "Tom has 3 boxes of 4 apples and eats 2. How many apples are left?"
GOOD = "3 boxes of 4 is 3 * 4 = <<3*4=12>>12 apples.\nHe eats 2: 12 - 2 = <<12-2=10>>10.\n#### 10"


def test_a_reply_whose_work_adds_up_shows_no_failure() -> None:
    shown = set(reply_signals(GOOD, question=QUESTION, output_tokens=40))
    assert shown == {"len:0"}


@pytest.mark.parametrize(
    ("reply", "signal"),
    [
        ("3 * 4 = <<3*4=13>>13 apples, 13 - 2 = 11.\n#### 11", "calc-bad"),
        ("3 * 4 = 13 apples, then 13 - 2 = 11 left.\n#### 11", "eq-bad"),
        ("3 * 4 = 12 apples, then 12 - 2 = 10 left.\n#### 12", "final-not-last"),
        ("3 * 4 = 12 apples, then 12 - 2 = 10 left.\n#### 7", "final-unsupported"),
        (
            "3 * 4 = 12 and 12 - 2 = 10 of them, which Tom keeps in a bowl in his kitchen.",
            "no-final",
        ),
        ("3 * 4 = 12, 12 - 2 = 10. The answer is: ten apples", "final-not-number"),
        ("3 * 4 = 12, 12 / 5 = 2.4 each.\n#### 2.4", "fraction"),
        ("3 * 4 = 12, 2 - 12 = -10.\n#### -10", "negative"),
        ("Assuming he eats 2, 3 * 4 = 12 and 12 - 2 = 10.\n#### 10", "hedge"),
        ("He has 10 left.\n#### 10", "few-steps"),
        ("", "empty"),
    ],
)
def test_each_signal_flags_its_own_fault(reply: str, signal: str) -> None:
    assert signal in SIGNALS
    assert signal in reply_signals(reply, question=QUESTION)
    assert signal not in reply_signals(GOOD, question=QUESTION)


def test_numbers_of_the_question_never_used_need_the_question() -> None:
    reply = "So the answer is 5 * 1 = 5 and 5 + 5 = 10.\n#### 10"
    assert "unused-numbers" in reply_signals(reply, question=QUESTION)
    assert "unused-numbers" not in reply_signals(reply)


def test_the_length_bucket_needs_the_token_count() -> None:
    assert "len:2" in reply_signals(GOOD, output_tokens=250)
    assert "len:4" in reply_signals(GOOD, output_tokens=10_000)
    assert not any(s.startswith("len:") for s in reply_signals(GOOD))


def test_only_plain_arithmetic_is_recomputed() -> None:
    assert recompute("3 x 4 + (10 / 4)") == pytest.approx(14.5)
    assert recompute("1,200 * 3") == 3600
    assert recompute("$5 * 2") == 10
    for unsafe in ("__import__('os')", "2 ** 999999", "9 // 2", "a + 1", "", "1" * 81):
        assert recompute(unsafe) is None
    assert recompute("1 / 0") is None
    assert step_checks("3 * 4", "12") is True
    assert step_checks("3 * 4", "12.004") is True  # rounding in the text is no fault
    assert step_checks("3 * 4", "13") is False
    assert step_checks("three * 4", "12") is None


def test_the_last_marker_is_the_final_answer() -> None:
    assert final_answer("The answer is 3. No wait: #### 5")[0] == 5
    assert final_answer("\\boxed{42}")[0] == 42
    assert final_answer("So 2 + 2 = 4 apples.") == (4, 9, False)  # no marker: a last '= n'
    assert final_answer("nothing to see") == (None, None, False)
    value, at, marked = final_answer("Answer: none")
    assert (value, marked) == (None, True)
    assert at == 0

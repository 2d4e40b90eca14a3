"""Money and budgets: exact nano-dollars, validation at the edge."""

from __future__ import annotations

from decimal import Decimal

import pytest

from budgets import Budget, Price, nanos_to_usd, usd_to_nanos
from budgets.errors import InvalidAmount
from budgets.money import MAX_NANOS, MAX_TOKENS, Amount


def test_usd_converts_exactly_to_nanos() -> None:
    assert usd_to_nanos("0.20") == 200_000_000
    assert usd_to_nanos(Decimal("1.000000001")) == 1_000_000_001
    assert usd_to_nanos(3) == 3_000_000_000
    # A float goes through its shortest repr, so 0.1 means exactly 0.1 USD.
    assert usd_to_nanos(0.1) == 100_000_000


def test_fractions_of_a_nano_round_up() -> None:
    assert usd_to_nanos("0.0000000001") == 1
    assert usd_to_nanos("1.0000000000001") == 1_000_000_001


@pytest.mark.parametrize(
    "bad", ["-0.01", "nan", "NaN", "inf", "-inf", float("nan"), float("inf"), "ten", True, "2e6"]
)
def test_bad_dollars_are_refused_with_the_field_named(bad: object) -> None:
    with pytest.raises(InvalidAmount, match="usd"):
        Budget(usd=bad)


@pytest.mark.parametrize("bad", [-1, 1.5, "100", MAX_TOKENS + 1, True])
def test_bad_tokens_are_refused(bad: object) -> None:
    with pytest.raises(InvalidAmount, match="tokens"):
        Budget(tokens=bad)


def test_budget_unlimited_and_limits() -> None:
    assert Budget().is_unlimited
    budget = Budget(tokens=50_000, usd="0.20")
    assert budget.nanos == 200_000_000
    assert budget.tokens == 50_000
    assert not budget.is_unlimited
    assert Budget(tokens=5).nanos is None


def test_budget_round_trips_json_exactly() -> None:
    budget = Budget(tokens=7, usd="123.456789012")
    again = Budget.model_validate_json(budget.model_dump_json())
    assert again == budget
    assert again.nanos == 123_456_789_012


def test_budget_from_nanos() -> None:
    assert Budget.from_nanos(tokens=None, nanos=1).usd == Decimal("0.000000001")
    assert Budget.from_nanos(tokens=3, nanos=None).usd is None


def test_max_money_is_exact_in_a_double() -> None:
    # Lua numbers are doubles: every amount we accept must be exactly representable.
    assert MAX_NANOS < 2**53
    assert MAX_TOKENS < 2**53
    assert nanos_to_usd(MAX_NANOS) == Decimal(1_000_000)


def test_price_cost_rounds_up_never_down() -> None:
    price = Price.of("10", "30")  # GPT-4-1106: $10 in, $30 out per million tokens
    # 1 input token costs 10,000 nanos; 1 output token 30,000 nanos: exact.
    assert price.cost_nanos(input_tokens=1, output_tokens=1) == 40_000
    assert Price.of("0.6", "0.6").cost_nanos(
        input_tokens=1_000_000, output_tokens=1_000_000
    ) == usd_to_nanos("1.2")
    tiny = Price.of("0.0006", "0")
    # 1 token at $0.0006/M is 0.6 nanos: charged as 1, never 0.
    assert tiny.cost_nanos(input_tokens=1, output_tokens=0) == 1
    assert tiny.cost_nanos(input_tokens=10, output_tokens=0) == 6
    assert Price.of(0, 0).is_free
    assert Price.of(0, 0).cost_nanos(input_tokens=10**6, output_tokens=10**6) == 0


def test_price_refuses_negative_rates_and_tokens() -> None:
    with pytest.raises(InvalidAmount):
        Price.of("-1", "1")
    with pytest.raises(InvalidAmount):
        Price.of("1", "1").cost_nanos(input_tokens=-1, output_tokens=0)


def test_amount_validates() -> None:
    assert Amount(tokens=3, nanos=4) == Amount(3, 4)
    with pytest.raises(InvalidAmount):
        Amount(tokens=-1)
    with pytest.raises(InvalidAmount):
        Amount(nanos=MAX_NANOS + 1)

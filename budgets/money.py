"""Money and budgets: integer nano-dollars inside, ``Decimal`` or ``str`` at the edge.

Redis Lua numbers are doubles, exact for integers up to 2**53 (about 9.007e15).
Nano-dollars therefore stay exact up to about 9 million USD; we cap every amount
well below that so no arithmetic inside a script can lose a nano-dollar.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer

from budgets.errors import InvalidAmount

NANOS_PER_USD = 1_000_000_000
#: Largest amount of money the ledger accepts anywhere: 1 million USD.
MAX_NANOS = 1_000_000 * NANOS_PER_USD
#: Largest token count the ledger accepts anywhere.
MAX_TOKENS = 10**15
#: How Redis stores "no limit" in a limit field.
UNLIMITED = -1

UsdLike = Decimal | str | int | float


def usd_to_nanos(value: UsdLike, *, field: str = "usd") -> int:
    """Convert dollars to integer nano-dollars, rounding up so a limit is never understated.

    Floats are accepted only through their shortest ``repr`` (``0.1`` means 0.1 USD);
    NaN, infinities, negatives and amounts above ``MAX_NANOS`` are refused.
    """
    if isinstance(value, bool):
        raise InvalidAmount(field, value, "expected a number of dollars, got a bool")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidAmount(field, value, "must be finite")
        value = repr(value)
    try:
        dec = Decimal(value)
    except (InvalidOperation, TypeError, ValueError) as e:
        raise InvalidAmount(field, value, "not a number of dollars") from e
    if not dec.is_finite():
        raise InvalidAmount(field, value, "must be finite")
    if dec < 0:
        raise InvalidAmount(field, value, "must not be negative")
    nanos = int((dec * NANOS_PER_USD).to_integral_value(rounding=ROUND_CEILING))
    if nanos > MAX_NANOS:
        raise InvalidAmount(field, value, f"exceeds the maximum of {nanos_to_usd(MAX_NANOS)} USD")
    return nanos


def nanos_to_usd(nanos: int) -> Decimal:
    """Exact dollars for an integer amount of nano-dollars."""
    return Decimal(nanos) / NANOS_PER_USD


def check_tokens(value: object, *, field: str = "tokens") -> int:
    """Validate a token count: a non-negative ``int`` no larger than ``MAX_TOKENS``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidAmount(field, value, "expected a whole number of tokens")
    if value < 0:
        raise InvalidAmount(field, value, "must not be negative")
    if value > MAX_TOKENS:
        raise InvalidAmount(field, value, f"exceeds the maximum of {MAX_TOKENS} tokens")
    return value


def check_nanos(value: object, *, field: str = "nanos") -> int:
    """Validate an amount of nano-dollars: a non-negative ``int`` up to ``MAX_NANOS``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidAmount(field, value, "expected a whole number of nano-dollars")
    if value < 0:
        raise InvalidAmount(field, value, "must not be negative")
    if value > MAX_NANOS:
        raise InvalidAmount(field, value, f"exceeds the maximum of {MAX_NANOS} nano-dollars")
    return value


@dataclass(frozen=True, slots=True)
class Amount:
    """A pair of quantities the ledger moves together: tokens and nano-dollars."""

    tokens: int = 0
    nanos: int = 0

    def __post_init__(self) -> None:
        check_tokens(self.tokens)
        check_nanos(self.nanos)


def _parse_tokens(value: object) -> int | None:
    if value is None:
        return None
    return check_tokens(value, field="tokens")


def _parse_usd(value: object) -> Decimal | None:
    if value is None:
        return None
    if isinstance(value, Decimal | str | int | float) and not isinstance(value, bool):
        return nanos_to_usd(usd_to_nanos(value))
    raise InvalidAmount("usd", value, "expected a number of dollars (str, Decimal, int)")


_Tokens = Annotated[int | None, BeforeValidator(_parse_tokens)]
_Usd = Annotated[
    Decimal | None,
    BeforeValidator(_parse_usd),
    PlainSerializer(lambda d: None if d is None else str(d), return_type=str | None),
]


class Budget(BaseModel):
    """What a task, an account or a call may spend: tokens and dollars, either unlimited.

    ``None`` means unlimited. Dollars are exact: ``Budget(usd="0.20")`` holds
    200,000,000 nano-dollars. Bad values raise :class:`budgets.errors.InvalidAmount`
    (a ``ValueError``) naming the field.
    """

    model_config = ConfigDict(frozen=True)

    tokens: _Tokens = Field(default=None, description="token limit; None for unlimited")
    usd: _Usd = Field(default=None, description="dollar limit; None for unlimited")

    def __init__(self, tokens: Any = None, usd: Any = None, **data: Any) -> None:
        # Validate here so a bad amount raises InvalidAmount itself, not a
        # ValidationError wrapping it: callers catch one type for bad money.
        super().__init__(tokens=_parse_tokens(tokens), usd=_parse_usd(usd), **data)

    @property
    def nanos(self) -> int | None:
        """The dollar limit in nano-dollars, or ``None`` for unlimited."""
        return None if self.usd is None else usd_to_nanos(self.usd)

    @classmethod
    def from_nanos(cls, *, tokens: int | None, nanos: int | None) -> Budget:
        """Build a budget from the ledger's integer representation."""
        return cls(tokens=tokens, usd=None if nanos is None else nanos_to_usd(check_nanos(nanos)))

    @property
    def is_unlimited(self) -> bool:
        """True when neither tokens nor dollars are limited."""
        return self.tokens is None and self.usd is None


@dataclass(frozen=True, slots=True)
class Price:
    """What an endpoint charges, in USD per million input and output tokens."""

    input_per_mtok: Decimal
    output_per_mtok: Decimal
    #: The two prices in nano-dollars per million tokens, converted once.
    _rates: tuple[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        rates = []
        for name in ("input_per_mtok", "output_per_mtok"):
            raw = getattr(self, name)
            # Nano-dollars per million tokens must fit our money range.
            rates.append(usd_to_nanos(raw, field=name))
            object.__setattr__(self, name, Decimal(str(raw)))
        object.__setattr__(self, "_rates", (rates[0], rates[1]))

    @classmethod
    def of(cls, input_per_mtok: UsdLike, output_per_mtok: UsdLike) -> Price:
        """Build a price from anything :func:`usd_to_nanos` accepts."""
        return cls(
            nanos_to_usd(usd_to_nanos(input_per_mtok)), nanos_to_usd(usd_to_nanos(output_per_mtok))
        )

    @property
    def is_free(self) -> bool:
        """True for endpoints that cost nothing (a local model)."""
        return self.input_per_mtok == 0 and self.output_per_mtok == 0

    def cost_nanos(self, *, input_tokens: int, output_tokens: int) -> int:
        """Exact cost in nano-dollars, rounded up: the ledger never undercharges.

        Integer arithmetic throughout: price nanos-per-Mtok times tokens, divided
        by a million with a ceiling.
        """
        check_tokens(input_tokens, field="input_tokens")
        check_tokens(output_tokens, field="output_tokens")
        in_rate, out_rate = self._rates
        numerator = in_rate * input_tokens + out_rate * output_tokens
        return -(-numerator // 1_000_000)

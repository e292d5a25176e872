"""Exact money: decimals checked on the way in, amounts and running totals that never round.

Products and sums of prices and quantities run in :data:`EXACT_CONTEXT`, which raises rather
than round; a division by a price's ``per`` is exact whenever ``per`` divides a power of ten.
"""

from __future__ import annotations

import decimal
import math
from decimal import Decimal

from meterkit.errors import ValidationError
from meterkit.models import Number

__all__ = [
    "EXACT_CONTEXT",
    "MAX_INT_DIGITS",
    "MAX_PLACES",
    "Tally",
    "amount",
    "divide",
    "to_decimal",
    "to_units",
]

# Products and sums of prices and quantities never need rounding at this precision; should one
# ever do, Inexact raises instead of silently losing money.
EXACT_CONTEXT = decimal.Context(
    prec=200,
    traps=[decimal.InvalidOperation, decimal.DivisionByZero, decimal.Overflow, decimal.Inexact],
)
_DIVIDE = decimal.Context(prec=50, traps=[decimal.InvalidOperation, decimal.DivisionByZero])
# Bounds on a price's digits, so the exact context above always suffices.
MAX_PLACES = 30
MAX_INT_DIGITS = 30
_ZERO = Decimal(0)


def to_decimal(field: str, value: object) -> Decimal:
    """A non-negative finite ``Decimal`` from a Decimal, an int or a decimal string."""
    if isinstance(value, bool):
        raise ValidationError(field, "must be a decimal string, an integer or a Decimal")
    if isinstance(value, float):
        raise ValidationError(
            field, "must not be a float (floats are inexact); give a string such as '2.50'"
        )
    if isinstance(value, Decimal):
        number = value
    elif isinstance(value, int):
        number = Decimal(value)
    elif isinstance(value, str):
        try:
            number = Decimal(value.strip())
        except decimal.InvalidOperation:
            raise ValidationError(field, f"{value!r} is not a decimal number") from None
    else:
        raise ValidationError(
            field, f"must be a decimal string, an integer or a Decimal, not {type(value).__name__}"
        )
    if not number.is_finite():
        raise ValidationError(field, "must be finite")
    if number < 0:
        raise ValidationError(field, "must not be negative")
    if number and (
        -int(number.as_tuple().exponent) > MAX_PLACES or number.adjusted() >= MAX_INT_DIGITS
    ):
        raise ValidationError(
            field,
            f"must have at most {MAX_PLACES} decimal places and be below 10**{MAX_INT_DIGITS}",
        )
    return number + 0 if number.is_zero() else number  # -0 becomes 0


def to_units(value: Number) -> Decimal:
    """A measure value as a ``Decimal``; a float by its shortest repr, so 1.1 is exactly 1.1."""
    if isinstance(value, float):
        return Decimal(repr(value))
    return Decimal(value)


def divide(numerator: Decimal, per: int) -> Decimal:
    """``numerator / per``, exactly where ``per`` divides a power of ten."""
    if per == 1:
        return numerator
    # per = 2**a * 5**b divides a power of ten: multiplying by 10**k / per is exact.
    rest, twos, fives = per, 0, 0
    while rest % 2 == 0:
        rest, twos = rest // 2, twos + 1
    while rest % 5 == 0:
        rest, fives = rest // 5, fives + 1
    if rest == 1:
        k = max(twos, fives)
        factor = Decimal(10**k // per)
        return EXACT_CONTEXT.scaleb(EXACT_CONTEXT.multiply(numerator, factor), -k)
    return _DIVIDE.divide(numerator, Decimal(per))


def amount(units: Decimal | int, unit_price: Decimal, per: int = 1) -> Decimal:
    """The amount of ``units`` at ``unit_price`` per ``per`` units (see the module docstring)."""
    return divide(EXACT_CONTEXT.multiply(Decimal(units), unit_price), per)


class Tally:
    """An exact running total of amounts given as ``numerator / per``.

    Numerators are summed per ``per``; :meth:`value` divides once, over the least common
    multiple of the ``per`` values seen, so adding never rounds.
    """

    __slots__ = ("_by_per",)

    def __init__(self) -> None:
        self._by_per: dict[int, Decimal] = {}

    def add(self, numerator: Decimal, per: int = 1) -> None:
        self._by_per[per] = EXACT_CONTEXT.add(self._by_per.get(per, _ZERO), numerator)

    def value(self) -> Decimal:
        if not self._by_per:
            return _ZERO
        common = math.lcm(*self._by_per)
        total = _ZERO
        for per, numerator in self._by_per.items():
            total = EXACT_CONTEXT.add(
                total, EXACT_CONTEXT.multiply(numerator, Decimal(common // per))
            )
        return divide(total, common)

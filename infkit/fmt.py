"""How infkit prints numbers: at a stated precision, so printed output does not depend on a CPU's last bits.

Influence scores are float32 computations: another CPU (AVX2 instead of AVX-512 kernels, another thread count)
changes their last bits. Printed with all their digits they would differ from machine to machine; printed with
:data:`DIGITS` significant digits they agree, except for a value on a rounding boundary, which may print one unit
higher or lower in its last digit. The notebooks print through this module, and their checks allow exactly that
one unit for such numbers (``notebooks/conftest.py``); integers that are not measurements (indices, counts) are
printed bare and must match exactly.

    >>> from infkit import fmt
    >>> fmt.num(420.31), fmt.num(-0.61138), fmt.num(2753.4), fmt.num(4.0294e5), fmt.num(3.2e-7), fmt.num(0.5, sign=True)
    ('420', '-0.611', '2753', '4.03e+05', '3.20e-07', '+0.500')
    >>> fmt.nums([0.1234, 5.678, 0.0])
    '[0.123, 5.68, 0]'
"""

from __future__ import annotations

import math
from collections.abc import Iterable

#: Significant digits of a printed number (from 10**DIGITS to 10**(DIGITS+1) it prints as a whole number instead).
DIGITS = 3


def num(value: float, digits: int = DIGITS, sign: bool = False) -> str:
    """``value`` with ``digits`` significant digits, trailing zeros kept ("0.500": the precision is in the text), in
    plain notation from 1e-4 up to 10**digits; from there up to 10**(digits+1) as a whole number ("2745", not
    "2.75e+03": one digit more, which last-bit noise never reaches); scientific notation beyond both ends
    ("4.03e+05", "3.20e-07"); exactly 0 as "0"; "nan", "inf"."""
    value = float(value)
    plus = "+" if sign else ""
    if not math.isfinite(value):
        return ("+" if sign and value > 0 else "") + str(value)
    if value == 0:
        return "0"
    rounded = abs(float(f"{value:.{digits}g}"))  # 999.6 rounds up to 1e+03
    if rounded >= 10 ** (digits + 1):
        return f"{value:{plus}.{max(digits - 1, 0)}e}"
    if rounded >= 10**digits:
        return f"{value:{plus}.0f}"
    return f"{value:{plus}#.{digits}g}".rstrip(".")


def nums(values: Iterable[float], digits: int = DIGITS, sign: bool = False) -> str:
    """A list of numbers, each through :func:`num`: ``[0.123, 5.68]``."""
    return "[" + ", ".join(num(v, digits, sign) for v in values) + "]"

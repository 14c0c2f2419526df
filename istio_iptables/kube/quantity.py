"""Kubernetes resource quantities in their canonical form (``2000m`` → ``2``, ``1024Mi`` → ``1Gi``), as the API
server, and so Istio's injector, writes them back (``k8s.io/apimachinery/pkg/api/resource``)."""

from __future__ import annotations

import math
import re
from fractions import Fraction

_BINARY = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_SUFFIX_OF_EXPONENT = {exponent: suffix for suffix, exponent in _DECIMAL.items()}
_BINARY_SUFFIX = {power: suffix for suffix, power in _BINARY.items()}
_QUANTITY = re.compile(r"([+-]?)([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?[0-9]+)?")


def quantity_value(text: str) -> Fraction:
    """The amount a quantity stands for (``100m`` → 1/10, ``1Ki`` → 1024); ValueError for text that is not one."""
    return _parsed(text)[0]


def canonical_quantity(text: str) -> str:
    """The canonical spelling of a quantity; ValueError for text that is not one."""
    value, style = _parsed(text)
    negative = value < 0
    value = abs(value)
    # A binary quantity that is not a whole number of units, or below 1024, is written in decimal.
    if style == "binary" and (value.denominator != 1 or value < 1024):
        style = "decimal"
    if style == "binary":
        amount, power = int(value), 0
        while amount % 1024 == 0 and power < 6:
            amount, power = amount // 1024, power + 1
        return f"{'-' if negative else ''}{amount}{_BINARY_SUFFIX.get(power, '')}"
    exponent = -9
    while exponent < 18 and (value / Fraction(10) ** (exponent + 3)).denominator == 1:
        exponent += 3
    amount = int(value / Fraction(10) ** exponent)
    if amount == 0:
        exponent = 0
    unit = (f"e{exponent}" if exponent else "") if style == "exponent" else _SUFFIX_OF_EXPONENT[exponent]
    return f"{'-' if negative else ''}{amount}{unit}"


def _parsed(text: str) -> tuple[Fraction, str]:
    """A quantity's amount, rounded up to a nano-unit as the API server does, and its style (binary,
    exponent, decimal)."""
    match = _QUANTITY.fullmatch(text.strip())
    if match is None:
        raise ValueError("quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'")
    sign, number, suffix = match.group(1), Fraction(match.group(2)), match.group(3) or ""
    if suffix in _BINARY:
        value, style = number * 1024 ** _BINARY[suffix], "binary"
    elif suffix[:1] in ("e", "E"):
        value, style = number * Fraction(10) ** int(suffix[1:]), "exponent"
    else:
        value, style = number * Fraction(10) ** _DECIMAL[suffix], "decimal"
    value = Fraction(math.ceil(value * 10**9), 10**9)
    return (-value if sign == "-" else value), style

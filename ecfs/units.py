"""Sizes and numbers as users type them: binary units, as rbd and rados take them.

Every number on the command line goes through here, and only ASCII digits
make a number: Python's int() also takes any Unicode digit ('٣', '３'),
surrounding whitespace, '+' and '_', none of which a user means as a
number (and a trailing newline is a quoting mistake, not a size).
"""
from __future__ import annotations

import re

from backend.errors import InvalidArgument

_UNITS = {"": 0, "b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50}
# 4K, 4k, 4Ki, 4KiB, 4KB (all binary, as rbd reads them), 4B, 4096. re.ASCII
# keeps \d to 0-9, and fullmatch leaves no room for a trailing newline.
_SIZE = re.compile(r"(?P<n>\d+)(?:(?P<unit>[kmgtp])(?:ib?|b)?|(?P<bytes>b))?",
                   re.IGNORECASE | re.ASCII)
_INT = re.compile(r"(?P<n>-?\d+)", re.ASCII)
MAX_DIGITS = 30         # past any size or count (2**64 has 20); int() refuses 4300+


def _number(rx: re.Pattern, text: str) -> re.Match | None:
    m = rx.fullmatch(str(text))
    return m if m and len(m["n"]) <= MAX_DIGITS else None


def _shown(text: str) -> str:
    """``text`` for an error line: quoted, escaped (a newline stays one
    line), and cut short when long."""
    t = str(text)
    return repr(t) if len(t) <= 40 else repr(t[:40]) + "..."


def parse_size(text: str, default_unit: str = "", what: str = "size") -> int:
    """'4K' -> 4096, '4Ki', '4KiB', '10G', '1T'; a bare number is in
    ``default_unit`` ('' bytes, 'M' MiB as ``rbd --size``)."""
    m = _number(_SIZE, text)
    if m is None:
        raise InvalidArgument(f"invalid {what} {_shown(text)}: use ASCII digits with an optional "
                              f"unit K, M, G, T (binary; 4K = 4Ki = 4KiB = 4096)")
    unit = "" if m["bytes"] else (m["unit"] or default_unit).lower()
    return int(m["n"]) << _UNITS[unit]


def parse_int(text: str, what: str) -> int:
    """A whole number (a leading '-' allowed, so that range checks can say
    what is wrong with it); ``what`` names the option in the error."""
    m = _number(_INT, text)
    if m is None:
        raise InvalidArgument(f"{what} must be a whole number in ASCII digits "
                              f"(got {_shown(text)})")
    return int(m["n"])


def int_option(what: str):
    """parse_int as an argparse ``type`` for the option ``what``."""
    def parse(text: str) -> int:
        return parse_int(text, what)
    return parse


def format_size(n: int) -> str:
    """1536 -> '1.5 KiB', as rbd prints sizes."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            v = n / (1 << shift)
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n} B"

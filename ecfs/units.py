"""Sizes and offsets as users type them: binary units, as rbd and rados take them."""
from __future__ import annotations

import re

from backend.errors import InvalidArgument

_UNITS = {"": 0, "b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50}
# 4K, 4k, 4Ki, 4KiB, 4KB (all binary, as rbd reads them), 4B, 4096
_RE = re.compile(r"^\s*(\d+)\s*(?:([kmgtp])(?:ib?|b)?|(b))?\s*$", re.IGNORECASE)


def parse_size(text: str, default_unit: str = "", what: str = "size") -> int:
    """'4K' -> 4096, '4Ki', '4KiB', '10G', '1T'; a bare number is in
    ``default_unit`` ('' bytes, 'M' MiB as ``rbd --size``)."""
    m = _RE.match(str(text))
    if not m:
        raise InvalidArgument(f"invalid {what} {text!r}: use a number with an optional "
                              f"unit K, M, G, T (binary; 4K = 4Ki = 4KiB = 4096)")
    if m.group(3):
        unit = ""
    else:
        unit = (m.group(2) or default_unit).lower()
    return int(m.group(1)) << _UNITS[unit]


def format_size(n: int) -> str:
    """1536 -> '1.5 KiB', as rbd prints sizes."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            v = n / (1 << shift)
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n} B"

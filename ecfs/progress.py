"""Progress bars on stderr, the one helper every long operation uses.

As ``rbd`` does: a bar on stderr while the operation runs, gone when it
ends. It appears only when it is enabled (no ``--no-progress``) and stderr
is a terminal; otherwise every call below does nothing, so callers never
test for it. Two kinds:

    with progress.bar(args, total=size, desc="get NAME") as b:     # bytes
        b.update(n)
    with progress.bar(args, total=secs, desc="bench", unit="s") as b:  # time
        b.update(1); b.print("a row for stdout")

``print`` writes a line to stdout without tearing the bar when both go to
the same terminal.
"""
from __future__ import annotations

import sys


def enabled(args) -> bool:
    return bool(getattr(args, "progress", True)) and _isatty(sys.stderr)


def bar(args, total: int | None, desc: str, unit: str = "B"):
    """A bar over ``total`` units (bytes with ``unit="B"``, shown in KiB/MiB;
    seconds with ``unit="s"``); a no-op bar when progress is off."""
    if not enabled(args):
        return _NoBar()
    from tqdm import tqdm
    if unit == "B":
        t = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                 file=sys.stderr, leave=False, dynamic_ncols=True)
    else:
        t = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False,
                 dynamic_ncols=True,
                 bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{unit} "
                            "[{elapsed}<{remaining}{postfix}]")
    return _Bar(t)


class _Bar:
    def __init__(self, t):
        self._t = t

    def update(self, n: int = 1) -> None:
        self._t.update(n)

    def set_total(self, total: int) -> None:
        """The total, once known (the bar started without one)."""
        if self._t.total != total:
            self._t.total = total
            self._t.refresh()

    def note(self, text: str) -> None:
        """Text after the bar (e.g. ``123 ops``)."""
        self._t.set_postfix_str(text, refresh=True)

    def print(self, line: str) -> None:
        from tqdm import tqdm
        with tqdm.external_write_mode(file=sys.stdout):
            print(line, flush=True)

    def close(self) -> None:
        self._t.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_total(self, total: int) -> None:
        pass

    def note(self, text: str) -> None:
        pass

    def print(self, line: str) -> None:
        print(line, flush=True)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def _isatty(f) -> bool:
    try:
        return f.isatty()
    except (AttributeError, ValueError):
        return False

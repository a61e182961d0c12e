"""Printing for the CLI: tables, JSON, progress bars on stderr."""
from __future__ import annotations

import json
import sys


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def print_table(headers: list[str], rows: list[list]) -> None:
    cols = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cols) for i in range(len(headers))]
    for r in cols:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def progress(total: int, desc: str, enabled: bool):
    """A tqdm bar on stderr as rbd shows one, or a no-op when disabled or
    stderr is not a terminal."""
    if enabled and sys.stderr.isatty():
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                    file=sys.stderr, leave=False)
    return _NoBar()


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

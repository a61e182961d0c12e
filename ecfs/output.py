"""Printing for the CLI: tables, JSON, and standard output that reports a
failed write as one error."""
from __future__ import annotations

import io
import json
import os
import sys
from contextlib import contextmanager

from backend.errors import OutputError


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def print_table(headers: list[str], rows: list[list]) -> None:
    cols = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cols) for i in range(len(headers))]
    for r in cols:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


class _GuardedOut(io.FileIO):
    """File descriptor 1, turning a failed write (a full disk, an I/O
    error) into OutputError. A closed pipe stays BrokenPipeError: the
    reader is gone, which is not an error (``ecfs rados ls | head``)."""

    def write(self, b):
        try:
            return super().write(b)
        except BrokenPipeError:
            raise
        except OSError as e:
            raise OutputError(f"cannot write to standard output: {e.strerror or e}") from None


@contextmanager
def guard_stdout():
    """While the command runs, ``sys.stdout`` (text and ``.buffer``) writes
    through _GuardedOut; the original stream comes back afterwards."""
    orig = sys.stdout
    try:
        fd = orig.fileno() if orig is sys.__stdout__ and orig is not None else -1
    except (OSError, ValueError, AttributeError):
        fd = -1
    if fd < 0:
        yield
        return
    orig.flush()
    raw = _GuardedOut(fd, "w", closefd=False)
    sys.stdout = io.TextIOWrapper(io.BufferedWriter(raw), encoding=orig.encoding,
                                  errors=orig.errors, line_buffering=orig.line_buffering)
    try:
        yield
    finally:
        guarded, sys.stdout = sys.stdout, orig
        try:
            guarded.flush()
        except (OSError, OutputError):
            drop_stdout()
            guarded.flush()


def drop_stdout() -> None:
    """Output failed (a closed pipe, a full disk): point fd 1 at /dev/null so
    what is still buffered goes nowhere instead of failing again, with a
    traceback, at exit."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, 1)
        os.close(fd)
    except OSError:
        pass

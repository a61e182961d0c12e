"""Waiting on a condition with a deadline (never a bare sleep as
synchronisation): the one polling helper of the suite."""
from __future__ import annotations

import time


def wait_for(pred, timeout: float = 30.0, what: str = "condition", interval: float = 0.02):
    """Poll ``pred`` until it returns something true and return that value;
    AssertionError once ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(interval)

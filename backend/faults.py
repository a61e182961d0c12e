"""Fault injection at run time, for tests and scripts/thrash: rules in
``STORE/faults.json``, re-read when the file changes, so a running mount
takes new faults (and drops them) without a restart.

Every object store process checks the file's identity (inode, size,
mtime) at most every ``POLL`` seconds, at its next shard I/O; with no file
the cost is a clock read per I/O and a stat per ``POLL``. Rules apply
where ObjectStore does its I/O, at these points:

=================  =====================================================
``read``           a shard file's data pages, read to serve a read (the
                   long way and the kept-fd way); scrub reads are not hit
``write``          a shard file write of a transaction being applied
                   (data or sidecar), after the journal made it durable
``commit_before``  before a transaction's journal record is appended (an
                   error here refuses it: nothing journaled)
``commit_after``   after the record is durable, before it is applied
                   (``kill`` and ``delay`` only: the record is there and
                   replay applies it, so an error could not undo it)
=================  =====================================================

A rule (docs/formats.md, "Fault injection rules")::

    {"at": "write", "osd": 3, "path": ".s1", "offset": [0, 65536],
     "action": "EIO", "after": 0, "times": 1, "pid": 1234}

``action`` is ``EIO`` or ``ENOSPC`` (the I/O fails with that errno,
nothing done), ``delay`` (``delay_ms`` first, then the I/O), ``flip``
(read only: one bit of what the read returned is flipped, the file is
untouched) or ``kill`` (SIGKILL this process there). ``osd``, ``path``
(a substring of the shard file's path), ``offset`` (a byte range the
I/O must overlap) and ``pid`` narrow where it applies; ``after`` lets
that many matching I/Os through first (kill at the Nth shard write:
``after`` N-1), ``times`` caps how often it fires (default: always).
Counts start again when the file changes. A file that does not parse is
logged once and applies nothing.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger("ecfs.faults")

POLL = 0.2          # seconds between looks at the rules file
FILE = "faults.json"
POINTS = ("read", "write", "commit_before", "commit_after")
ACTIONS = ("EIO", "ENOSPC", "delay", "flip", "kill")


@dataclass
class Rule:
    at: str
    action: str
    osd: int | None = None
    path: str | None = None
    offset: tuple[int, int] | None = None
    pid: int | None = None
    after: int = 0
    times: int | None = None
    delay_ms: int = 0
    seen: int = 0          # matching I/Os so far
    fired: int = 0

    def matches(self, path: str, off: int, n: int, osd_paths: dict) -> bool:
        if self.pid is not None and self.pid != os.getpid():
            return False
        if self.path is not None and self.path not in path:
            return False
        if self.osd is not None:
            root = osd_paths.get(self.osd)
            if root is None or not path.startswith(root.rstrip("/") + "/"):
                return False
        if self.offset is not None:
            lo, hi = self.offset
            if off >= hi or off + max(n, 1) <= lo:
                return False
        return True


def parse(doc) -> list[Rule]:
    """The rules of a parsed faults.json; ValueError names what is wrong."""
    if not isinstance(doc, dict) or doc.get("version") != 1:
        raise ValueError('expected {"version": 1, "rules": [...]}')
    rules = []
    for i, r in enumerate(doc.get("rules", [])):
        if not isinstance(r, dict):
            raise ValueError(f"rule {i}: not an object")
        at, action = r.get("at"), r.get("action")
        if at not in POINTS:
            raise ValueError(f"rule {i}: 'at' must be one of {', '.join(POINTS)}")
        if action not in ACTIONS:
            raise ValueError(f"rule {i}: 'action' must be one of {', '.join(ACTIONS)}")
        if action == "flip" and at != "read":
            raise ValueError(f"rule {i}: 'flip' applies to reads only")
        if at == "commit_after" and action not in ("kill", "delay"):
            raise ValueError(f"rule {i}: at 'commit_after' only 'kill' and 'delay' (the "
                             f"record is durable: replay would apply it anyway)")
        off = r.get("offset")
        if off is not None:
            if not (isinstance(off, list) and len(off) == 2 and
                    all(isinstance(x, int) and x >= 0 for x in off)):
                raise ValueError(f"rule {i}: 'offset' must be [lo, hi]")
            off = (off[0], off[1])
        ints = {}
        for key in ("osd", "pid", "after", "times", "delay_ms"):
            v = r.get(key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise ValueError(f"rule {i}: {key!r} must be a non-negative integer")
            ints[key] = v
        path = r.get("path")
        if path is not None and not isinstance(path, str):
            raise ValueError(f"rule {i}: 'path' must be a string")
        rules.append(Rule(at, action, osd=ints["osd"], path=path, offset=off,
                          pid=ints["pid"], after=ints["after"] or 0, times=ints["times"],
                          delay_ms=ints["delay_ms"] or 0))
    return rules


def write_rules(store: str, rules: list[dict]) -> None:
    """Replace the store's rules at once (an empty list: no faults)."""
    path = os.path.join(store, FILE)
    if not rules:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    parse({"version": 1, "rules": rules})
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({"version": 1, "rules": rules}, f)
    os.replace(tmp, path)


class Faults:
    """One store's rules in this process."""

    def __init__(self, store: str, osd_paths: Callable[[], dict] | None = None):
        self.path = os.path.join(store, FILE)
        self._osd_paths = osd_paths or dict          # the OSD map's present {id: directory}
        self._sig = None
        self._rules: list[Rule] = []
        self._next = 0.0
        self._lock = threading.Lock()

    def _poll(self) -> list[Rule]:
        now = time.monotonic()
        if now < self._next:
            return self._rules
        with self._lock:
            if now < self._next:
                return self._rules
            self._next = now + POLL
            try:
                st = os.stat(self.path)
                sig = (st.st_ino, st.st_size, st.st_mtime_ns)
            except OSError:
                sig = None
            if sig != self._sig:
                self._sig = sig
                self._rules = self._load() if sig is not None else []
        return self._rules

    def _load(self) -> list[Rule]:
        try:
            with open(self.path) as f:
                rules = parse(json.load(f))
        except (OSError, ValueError) as e:
            log.warning("%s: ignored (%s)", self.path, e)
            return []
        if rules:
            log.warning("%s: %d fault rule(s) in force", self.path, len(rules))
        return rules

    def _fire(self, at: str, path: str, off: int, n: int) -> Rule | None:
        rules = self._poll()
        if not rules:
            return None
        with self._lock:
            for r in rules:
                if r.at != at or not r.matches(path, off, n, self._osd_paths()):
                    continue
                r.seen += 1
                if r.seen <= r.after or (r.times is not None and r.fired >= r.times):
                    continue
                r.fired += 1
                log.warning("fault injected: %s %s at %s %s+%d", r.action, at, path, off, n)
                return r
        return None

    def _act(self, r: Rule) -> None:
        if r.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if r.action == "delay":
            time.sleep(r.delay_ms / 1000)
        elif r.action in ("EIO", "ENOSPC"):
            code = getattr(errno, r.action)
            raise OSError(code, f"{os.strerror(code)} (injected)")

    def armed(self) -> bool:
        """Whether any rule is in force (callers skip naming paths if not)."""
        return bool(self._poll())

    def on_write(self, path: str, off: int, n: int) -> None:
        r = self._fire("write", path, off, n)
        if r is not None:
            self._act(r)

    def on_read(self, path: str, off: int, buf) -> None:
        """After a read into ``buf`` (a writable buffer): fail it, or flip
        one bit of what it returned."""
        r = self._fire("read", path, off, len(buf))
        if r is None:
            return
        if r.action == "flip":
            mv = memoryview(buf).cast("B")
            if len(mv):
                at = (r.fired * 2654435761) % len(mv)
                mv[at] ^= 1 << (r.fired % 8)
            return
        self._act(r)

    def point(self, at: str, name: str = "") -> None:
        r = self._fire(at, name, 0, 0)
        if r is not None:
            self._act(r)

"""Locks that keep concurrent writers of one store correct.

* Stripe and metadata locks. An object hashes to one of 2**20 slots; slot
  S owns the bytes [S << 32, (S + 1) << 32) of ``STORE/locks``. Byte
  ``S << 32 | s`` stands for stripe s, the last byte of the range for the
  object's metadata (its headers, and the commit of a transaction).
  Cross-process these are fcntl record locks (released by the kernel when
  a process dies). POSIX locks belong to the process, not the thread, so
  inside a process the same ranges are also held in an in-process range
  table, and no two threads of a process ever hold overlapping ranges.
  An I/O locks the stripes it touches; its commit takes the metadata lock
  too (always in that order), so disjoint stripes of one object are read,
  planned and encoded in parallel and commit one after the other.
* In-flight markers. ``STORE/inflight`` has a byte per slot, set while a
  transaction on that slot is between "appended to the journal" and
  "applied". A holder that finds it set knows the previous holder died in
  between and replays that slot's journal records first.
* The checkpoint gate. Writers hold ``STORE/ckpt.lock`` shared (flock)
  while they commit; a checkpoint takes it exclusive, so it sees no
  transaction half done.
* The clients lock. Every open store holds ``STORE/clients.lock`` shared;
  the opener that gets it exclusive is alone, so it may replay the whole
  journal (after a crash or power cut) before anyone writes.
* The maintenance lock. ``STORE/maint.lock`` (flock, exclusive, never
  waited for) is held by whatever moves or rebuilds whole OSDs (``osd
  add``, ``rm``, ``rebuild``, ``replace``): two of them at once would
  delete each other's copies. It holds the holder's pid and command, for
  the refusal's message; re-entrant within a process.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import threading
import time
from contextlib import contextmanager

from .errors import Busy

SLOTS = 1 << 20
_INPROC = 4096
ALL_STRIPES = (0, (1 << 32) - 1)      # every stripe; the last byte is the meta lock
_META = (1 << 32) - 1


def slot_of(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(), "little") % SLOTS


def _lock_range(fd: int, length: int, start: int) -> None:
    """Wait for an exclusive fcntl lock on [start, start+length) of fd.

    The kernel's deadlock detection sees processes, not threads: with
    several threads per process each waiting on a different slot it can
    report a cycle that is no deadlock (EDEADLK). Locks here are taken in
    one order (a slot's stripes, then its metadata), so a real cycle
    cannot form; EDEADLK is retried after a short, growing pause."""
    pause = 0.0005
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX, length, start)
            return
        except OSError as e:
            if e.errno != errno.EDEADLK:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 0.02)


class StoreLocks:
    def __init__(self, store_dir: str, readonly: bool = False):
        self.readonly = readonly
        mode = os.O_RDONLY if readonly else os.O_RDWR | os.O_CREAT
        self._lockfd = os.open(os.path.join(store_dir, "locks"), mode, 0o600) \
            if not readonly else None
        self._inflight = os.open(os.path.join(store_dir, "inflight"), mode, 0o600) \
            if not readonly else None
        self._ckptfd = os.open(os.path.join(store_dir, "ckpt.lock"), mode, 0o600) \
            if not readonly else None
        self._mutex = [threading.Lock() for _ in range(_INPROC)]
        self._ranges = threading.Condition()
        self._held: dict[int, list[tuple[int, int]]] = {}
        self._gate = threading.Condition()
        self._gate_users = 0

    @contextmanager
    def stripes(self, slot: int, first: int, stop: int):
        """Exclusive hold of stripes [first, stop) of the objects in ``slot``."""
        with self._ranges:
            while any(a < stop and first < b for a, b in self._held.get(slot, ())):
                self._ranges.wait()
            self._held.setdefault(slot, []).append((first, stop))
        try:
            if self._lockfd is not None:
                _lock_range(self._lockfd, stop - first, (slot << 32) | first)
            try:
                yield
            finally:
                if self._lockfd is not None:
                    fcntl.lockf(self._lockfd, fcntl.LOCK_UN, stop - first, (slot << 32) | first)
        finally:
            with self._ranges:
                held = self._held[slot]
                held.remove((first, stop))
                if not held:
                    del self._held[slot]
                self._ranges.notify_all()

    @contextmanager
    def meta(self, slot: int):
        """Exclusive hold of the metadata of the objects in ``slot``."""
        with self._mutex[slot % _INPROC]:
            if self._lockfd is not None:
                _lock_range(self._lockfd, 1, (slot << 32) | _META)
            try:
                yield
            finally:
                if self._lockfd is not None:
                    fcntl.lockf(self._lockfd, fcntl.LOCK_UN, 1, (slot << 32) | _META)

    def inflight(self, slot: int) -> bool:
        return os.pread(self._inflight, 1, slot) == b"\x01"

    def set_inflight(self, slot: int, on: bool) -> None:
        os.pwrite(self._inflight, b"\x01" if on else b"\x00", slot)

    def inflight_slots(self) -> list[int]:
        import numpy as np
        size = os.fstat(self._inflight).st_size
        if not size:
            return []
        buf = np.frombuffer(os.pread(self._inflight, size, 0), dtype=np.uint8)
        return np.flatnonzero(buf).tolist()

    def clear_inflight(self) -> None:
        os.ftruncate(self._inflight, 0)

    @contextmanager
    def commit_gate(self):
        """Shared hold of the checkpoint gate, reference-counted in-process
        (flock belongs to the open file, shared by all threads)."""
        with self._gate:
            if self._gate_users == 0:
                fcntl.flock(self._ckptfd, fcntl.LOCK_SH)
            self._gate_users += 1
        try:
            yield
        finally:
            with self._gate:
                self._gate_users -= 1
                if self._gate_users == 0:
                    fcntl.flock(self._ckptfd, fcntl.LOCK_UN)
                    self._gate.notify_all()

    @contextmanager
    def checkpoint_gate(self):
        """Exclusive: no transaction of any process is between append and apply."""
        with self._gate:
            while self._gate_users:
                self._gate.wait()
            fcntl.flock(self._ckptfd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._ckptfd, fcntl.LOCK_UN)

    def close(self) -> None:
        for fd in (self._lockfd, self._inflight, self._ckptfd):
            if fd is not None:
                os.close(fd)


_maint_held: dict[str, list] = {}      # store -> [thread ident, depth, fd]
_maint_mutex = threading.Lock()


@contextmanager
def maintenance(store_dir: str, what: str):
    """Hold the store's maintenance lock for ``what`` (see the module
    docstring), or raise Busy naming the command that holds it. Re-entrant
    in the thread that holds it; another thread of the process is refused
    as another process would be."""
    key = os.path.realpath(store_dir)
    me = threading.get_ident()
    with _maint_mutex:
        held = _maint_held.get(key)
        if held is not None:
            if held[0] != me:
                raise Busy(f"'{what}' must wait: another thread of this process is moving "
                           f"or rebuilding OSDs of this store")
            held[1] += 1
        else:
            fd = os.open(os.path.join(store_dir, "maint.lock"), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "?"
                    raise Busy(f"'{what}' must wait: another command is moving or rebuilding "
                               f"OSDs of this store ({holder}); wait for it to end") from None
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()}: ecfs {what}\n".encode(), 0)
            except BaseException:
                os.close(fd)
                raise
            _maint_held[key] = held = [me, 1, fd]
    try:
        yield
    finally:
        with _maint_mutex:
            held[1] -= 1
            if held[1] == 0:
                del _maint_held[key]
                os.close(held[2])

"""I/O counters, accumulated in the store across processes.

Each process that opens the store for writing owns one file
``STORE/counters/<uuid>.ctr`` (flock'd while it lives), a little-endian u64
array memory-mapped into the process: counting is a memory write, and the
kernel keeps the file even if the process is SIGKILLed. ``total.ctr`` holds
what finished processes counted; a closing process, or the next opener for
a dead one, folds its file into it. ``ecfs status`` sums all files and
writes nothing.

File format (docs/formats.md): a 16-byte header (magic ``ECFSCTRS``, u8
format 1, 7 zero bytes), then ``SLOTS`` little-endian u64 in ``NAMES``
order. An empty file reads as zeros (``total.ctr`` before anything was
folded into it); any other size, or a wrong magic, is a damaged file and a
StoreError naming it. A live file is written whole under a temporary name
and renamed into place, so a reader never sees it half made.
"""
from __future__ import annotations

import fcntl
import glob
import os
import struct
import threading
import time
import uuid

import numpy as np

from .errors import StoreError

NAMES = (
    "client_read_ops", "client_read_bytes", "client_write_ops", "client_write_bytes",
    "client_other_ops",
    "shard_reads", "shard_read_bytes", "shard_writes", "shard_write_bytes",
    "read_shard_reads", "write_shard_reads", "write_shard_writes",
    "repair_shard_reads", "repair_shard_writes",
    "meta_reads", "meta_writes",
    "journal_records", "journal_bytes", "fsyncs",
    "decodes", "degraded_reads", "checksum_errors", "checksum_repairs",
    "writes_full", "writes_delta", "writes_reconstruct",
    "recovery_shard_reads", "recovery_shard_writes",
    "cache_hits",
    "journal_damaged", "journal_skipped",
    "cache_misses", "cache_writes", "cache_write_bytes", "cache_waits",
    "cache_flushes", "cache_flush_extents", "cache_dirty_bytes",
    "fast_reads", "state_loads", "stale_healed",
    "page_hits", "page_cache_bytes",
    "journal_seals",
)
# Levels, not counts: set by their process, and not carried into total.ctr
# when it ends (a dead process holds no dirty bytes).
GAUGES = ("cache_dirty_bytes", "page_cache_bytes")
# Room to add counters without changing the file format.
SLOTS = 64
IDX = {n: i for i, n in enumerate(NAMES)}
_GAUGE_IDX = [IDX[n] for n in GAUGES]


MAGIC = b"ECFSCTRS"
FORMAT = 1
HEADER = struct.Struct("<8sB7x")
FILE_SIZE = HEADER.size + SLOTS * 8


def _read(path: str) -> np.ndarray:
    """The counts in one counters file (zeros if it is gone or empty)."""
    arr = np.zeros(SLOTS, dtype="<u8")
    try:
        with open(path, "rb") as f:
            raw = f.read(FILE_SIZE + 1)
    except FileNotFoundError:
        return arr
    except OSError as e:
        raise StoreError(f"cannot read {path}: {(e.strerror or str(e)).lower()}")
    if not raw:
        return arr
    if len(raw) != FILE_SIZE or raw[:8] != MAGIC:
        raise StoreError(f"{path} is damaged (not an ecfs counters file); remove it to "
                         f"reset the I/O counters")
    if raw[8] > FORMAT:
        raise StoreError(f"{path}: counters format {raw[8]} is newer than this ecfs "
                         f"supports ({FORMAT}); upgrade ecfs")
    arr[:] = np.frombuffer(raw, dtype="<u8", offset=HEADER.size, count=SLOTS)
    return arr


def _image(arr: np.ndarray) -> bytes:
    return HEADER.pack(MAGIC, FORMAT) + arr.astype("<u8").tobytes()


def _as_dict(arr: np.ndarray) -> dict[str, int]:
    return {n: int(arr[i]) for n, i in IDX.items()}


def totals(store_dir: str) -> dict[str, int]:
    """Everything counted in this store, by every process, without writing."""
    acc = np.zeros(SLOTS, dtype="<u8")
    for p in glob.glob(os.path.join(store_dir, "counters", "*.ctr")):
        acc += _read(p)
    return _as_dict(acc)


class Counters:
    """This process's counters (a live, shared view)."""

    def __init__(self, store_dir: str | None):
        self._lock = threading.Lock()
        self._dir = os.path.join(store_dir, "counters") if store_dir else None
        if self._dir is None:
            self._arr = np.zeros(SLOTS, dtype="<u8")
            self._fd = None
            return
        try:
            os.makedirs(self._dir, exist_ok=True)
            self._fold_dead()
            name = uuid.uuid4().hex
            tmp = os.path.join(self._dir, f".{name}.tmp")
            self.path = os.path.join(self._dir, f"{name}.ctr")
            self._fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            os.pwrite(self._fd, _image(np.zeros(SLOTS, dtype="<u8")), 0)
            os.rename(tmp, self.path)
        except OSError as e:
            raise StoreError(f"cannot open the I/O counters in {self._dir}: "
                             f"{e.strerror or e}")
        self._map = np.memmap(self.path, dtype="<u8", mode="r+", offset=HEADER.size,
                              shape=(SLOTS,))
        # counting goes through a plain ndarray view of the same pages: a
        # memmap's own indexing costs several times more per count
        self._arr = self._map.view(np.ndarray)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._arr[IDX[name]] += n

    def set(self, name: str, value: int) -> None:
        """Set a gauge (GAUGES) to its current level."""
        with self._lock:
            self._arr[IDX[name]] = value

    def add_many(self, pairs, gauge: tuple[str, int] | None = None) -> None:
        """Add each (name, n); and set one gauge (name, level), under the
        same lock."""
        with self._lock:
            for name, n in pairs:
                if n:
                    self._arr[IDX[name]] += n
            if gauge is not None:
                self._arr[IDX[gauge[0]]] = gauge[1]

    def mark(self) -> np.ndarray:
        """This process's counts now, to ``rewind`` to."""
        with self._lock:
            return np.array(self._arr)

    def rewind(self, mark: np.ndarray) -> None:
        """Forget what was counted since ``mark`` (a command that failed
        with a user error changed nothing, its I/O counts included)."""
        with self._lock:
            self._arr[:] = mark

    def snapshot(self) -> dict[str, int]:
        """This process's counts since it opened the store."""
        with self._lock:
            return _as_dict(np.array(self._arr))

    def _fold_dead(self) -> None:
        total = os.path.join(self._dir, "total.ctr")
        fd = os.open(total, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            acc = _read(total)
            dead = []
            for p in glob.glob(os.path.join(self._dir, "*.ctr")):
                if p == total:
                    continue
                try:
                    pfd = os.open(p, os.O_RDONLY)
                except FileNotFoundError:
                    continue
                try:
                    fcntl.flock(pfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(pfd)
                    continue
                got = _read(p)
                got[_GAUGE_IDX] = 0
                acc += got
                dead.append((p, pfd))
            for p in glob.glob(os.path.join(self._dir, ".*.tmp")):
                _unlink_if_unlocked(p)      # left by a process killed while opening
            if dead:
                os.pwrite(fd, _image(acc), 0)
                os.fsync(fd)
                for p, pfd in dead:
                    os.unlink(p)
                    os.close(pfd)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Fold this process's counts into total.ctr. A thread still at work
        (a watch or proxy thread finishing while the store closes) may count
        after this: its counts stay in memory and are dropped, never an
        error in the middle of its operation."""
        with self._lock:
            if self._fd is None:
                return
            self._map.flush()
            self._arr = np.array(self._arr)     # a copy: the file is unmapped
            del self._map
            os.close(self._fd)
            self._fd = None
        self._fold_dead()


def _unlink_if_unlocked(path: str) -> None:
    """Remove a stale temporary file: unlocked, and old enough that its
    maker is not between creating and locking it."""
    try:
        if time.time() - os.stat(path).st_mtime < 60:
            return
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.unlink(path)
    except OSError:
        pass
    finally:
        os.close(fd)

"""I/O counters, accumulated in the store across processes.

Each process that opens the store for writing owns one file
``STORE/counters/<uuid>.ctr`` (flock'd while it lives), a little-endian u64
array memory-mapped into the process: counting is a memory write, and the
kernel keeps the file even if the process is SIGKILLed. ``total.ctr`` holds
what finished processes counted; a closing process, or the next opener for
a dead one, folds its file into it. ``ecfs status`` sums all files and
writes nothing.
"""
from __future__ import annotations

import fcntl
import glob
import os
import threading
import uuid

import numpy as np

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
)
# Room to add counters without changing the file format.
SLOTS = 64
IDX = {n: i for i, n in enumerate(NAMES)}


def _read(path: str) -> np.ndarray:
    try:
        raw = open(path, "rb").read()
    except FileNotFoundError:
        return np.zeros(SLOTS, dtype="<u8")
    arr = np.zeros(SLOTS, dtype="<u8")
    got = np.frombuffer(raw[: SLOTS * 8], dtype="<u8")
    arr[: len(got)] = got
    return arr


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
        os.makedirs(self._dir, exist_ok=True)
        self._fold_dead()
        self.path = os.path.join(self._dir, f"{uuid.uuid4().hex}.ctr")
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        os.ftruncate(self._fd, SLOTS * 8)
        self._arr = np.memmap(self.path, dtype="<u8", mode="r+", shape=(SLOTS,))

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._arr[IDX[name]] += n

    def add_many(self, pairs) -> None:
        with self._lock:
            for name, n in pairs:
                self._arr[IDX[name]] += n

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
                acc += _read(p)
                dead.append((p, pfd))
            if dead:
                os.pwrite(fd, acc.tobytes(), 0)
                os.fsync(fd)
                for p, pfd in dead:
                    os.unlink(p)
                    os.close(pfd)
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._fd is None:
            return
        self._arr.flush()
        del self._arr
        os.close(self._fd)
        self._fd = None
        self._fold_dead()

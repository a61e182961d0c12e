"""The object store: the erasure-coded I/O path over OSD directories.

Data path::

    read/write(name, offset, bytes)
      -> lock the object (locks), load its info header (shardfile)
      -> map the byte range to page rows of shards (codec's chunk layout)
      -> read only the pages needed, verify their crc32c, decode what is
         missing, stale or corrupt from K others, rewrite corrupt pages
      -> (write) per stripe choose parity-delta, reconstruct or full write
         by counting page reads, encode, and commit the new pages as one
         journal transaction (journal), then apply them in place

Reads and writes are page-granular: a 4 KiB read inside a chunk is one
shard read; a 4 KiB overwrite in parity-delta mode reads the old data page
and the M old parity pages and writes them back (1+M reads, 1+M writes).

Write modes (pool ``write_mode``, or ``ObjectStore(write_mode=...)``):

    delta        read old changed data pages + old parity rows; parity ^= encode(delta)
    reconstruct  read the untouched data pages of the rows; parity = encode(data)
                 (with nothing untouched this is a full-stripe write: no reads)
    full         re-encode whole stripes: read every untouched data page of them
    auto         per stripe, the cheaper of delta and reconstruct (fewest page
                 reads; delta on a tie)
    mixed        per stripe at random (tests)

Only the first and last stripe of a write can be partial, so only they need
a choice; every stripe a write covers whole (the stripes between, and a
first or last one it covers entirely) is encoded and written with no reads,
whatever the mode.

Write-back seam: the stripe cache (backend/stripecache.py) offers this
class's interface in front of it and hands writes down on flush.

Concurrency: each operation locks the stripes it touches (in-process and
across processes, backend/locks.py), so writes to one stripe apply in order
while disjoint stripes, of one object or of many, proceed in parallel;
commits of one object serialize on its metadata lock.
"""
from __future__ import annotations

import bisect
import ctypes
import errno
import functools
import os
import random
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import logging

import numpy as np
from crc32c import crc32c as _crc32c

from . import shardfile as sf
from .codec import FLAG_PARITY_DELTA, Codec
from .counters import Counters
from .errors import (Busy, DataUnavailable, EcfsError, InvalidArgument, NoSpace, NotFound,
                     ReadOnly, StoreError, TooBig)
from .faults import Faults
from .journal import FORMAT as JOURNAL_FORMAT
from .journal import OP_PUNCH, OP_TRUNCATE, OP_UNLINK, OP_WRITE, PUNCH_LEN, FileOp, Journal, Record
from .locks import ALL_STRIPES, StoreLocks, slot_of
from .missed import MissedLog
from .objstate import CommitSeq, ObjState, StateCache, fd_budget
from .osdmap import OsdMap
from .space import SpaceGuard
from .pool import MAX_OBJECT_SIZE, load_pool

_log = logging.getLogger("ecfs.store")
PAGE = sf.PAGE
JOURNAL_LIMIT = 64 << 20      # seal the journal when it grows past this (rotate)
MAX_SEALED = 4                # sealed segments left by failures: then checkpoint, gated
_DELTA_GROUP_ROWS = 64        # rows a _delta_batch reads, encodes and commits at a time
_JOIN_CRC_ENTRIES = 4096      # a batch's checksum writes to a shard join across at most this
_NEVER_WRITTEN = object()     # _fast_run: a shard with no data yet (reads as zeros)
MAX_NAME = 250


def validate_name(name: str) -> None:
    raw = name.encode("utf-8", "surrogateescape")
    if not 1 <= len(raw) <= MAX_NAME:
        raise InvalidArgument(f"object name must be 1..{MAX_NAME} bytes (got {len(raw)})")
    if "\0" in name:
        raise InvalidArgument("object name must not contain NUL")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument("object name must be valid UTF-8")


@dataclass
class ObjectStat:
    name: str
    size: int
    version: int
    chunk_size: int
    mtime: float


@dataclass
class _Obj:
    """Per-operation view of one object."""
    name: str
    slot: int
    loc: list[int]                         # OSD of each shard
    info: sf.ShardHeader | None = None     # from the first good info shard
    usable: dict[int, bool] = field(default_factory=dict)
    bad_header: set[int] = field(default_factory=set)
    absent: set[int] = field(default_factory=set)   # info shards known not to be there
    gen: int = 0                           # the OSD map generation this view was judged on
    whole: bool = True                     # all stripes locked (no one else can commit)


class _Window:
    """Shard pages of whole stripes s0..s1 in memory: bufs[i] is shard i's
    rows, ``valid[i]`` marks the pages that hold known contents,
    ``corrupt[i]`` the pages read from disk that failed their checksum and
    are not rewritten yet."""

    def __init__(self, width: int, k: int, chunk: int, s0: int, s1: int):
        self.k, self.C, self.P = k, chunk, chunk // PAGE
        self.s0, self.ns = s0, s1 - s0 + 1
        self.row0 = s0 * self.P
        self.rows = self.ns * self.P
        self.bufs = np.zeros((width, self.rows * PAGE), dtype=np.uint8)
        self.valid = np.zeros((width, self.rows), dtype=bool)
        self.corrupt = np.zeros((width, self.rows), dtype=bool)

    def pages(self, i: int, p0: int, p1: int) -> np.ndarray:
        return self.bufs[i, (p0 - self.row0) * PAGE:(p1 - self.row0) * PAGE]

    def data_view(self) -> np.ndarray:
        """Object-order view (stripe, chunk, byte) of the data shards."""
        return self.bufs[: self.k].reshape(self.k, self.ns, self.C).transpose(1, 0, 2)


class _Replan(Exception):
    """The OSD map changed under a write before it was journaled."""


class PlacementMoved(StoreError):
    """An 'osd add' or 'osd rm' switched placement under a repair or
    recovery step planned before it: nothing was written."""


_REPLANS = 8


def _replanning(fn):
    """Run a mutating operation again, from its locking on, while the OSD
    map changes between its plan and its commit (rare; bounded)."""
    @functools.wraps(fn)
    def run(self, *a, **k):
        for _ in range(_REPLANS - 1):
            try:
                return fn(self, *a, **k)
            except _Replan:
                continue
        try:
            return fn(self, *a, **k)
        except _Replan:
            raise DataUnavailable("the OSD map kept changing under this write; not done")
    return run


class ObjectStore:
    def __init__(self, store: str, *, write_mode: str | None = None, readonly: bool = False,
                 alone: bool = False):
        """``alone``: refuse (Busy) a store another process has open, and
        keep every other opener out until close (``ecfs fsck``)."""
        self.store = os.path.abspath(store)
        self.pool = load_pool(self.store)
        self.k, self.m = self.pool.k, self.pool.m
        self.width = self.k + self.m
        self.info_shards = [0] + list(range(self.k, self.width))
        self.codec = Codec(self.pool.plugin, self.k, self.m)
        self.osdmap = OsdMap(self.store, self.pool)
        self.write_mode = write_mode or self.pool.write_mode
        self.readonly = readonly
        self._rng = random.Random()
        self._crash_at = int(os.environ.get("ECFS_CRASH_AT", "0") or 0)
        self.faults = Faults(self.store, lambda: self.osdmap.paths)   # STORE/faults.json
        self._crash_n = 0
        self._crash_lock = threading.Lock()
        self._dirty = False
        self._closed = False
        self._bg: threading.Thread | None = None     # a background rotate()
        self._bg_lock = threading.Lock()
        self._bg_retry_at = 0.0
        self._chunk_hint: dict[str, int] = {}   # lock hint only; checked once locked
        self._recovering: set[int] = set()      # down OSDs this process is rebuilding
        self._stale: set[str] = set()           # objects with a stale shard on an up OSD
        self._guards: dict[str, object] = {}    # name prefix -> check run before each commit
        self.missed = None if readonly else MissedLog(self.store)
        self.space = SpaceGuard(lambda: self.osdmap.paths)
        self.seq: CommitSeq | None = None
        self.states: StateCache | None = None       # backend/objstate.py
        if readonly:
            self.counters = Counters(None)
            self.locks = None
            self.journal = None
            return
        try:
            self.locks = StoreLocks(self.store)
            self.journal = Journal(os.path.join(self.store, "journal.log"))
            self.seq = CommitSeq(self.store)
            self.states = StateCache(self.seq, fd_budget())
        except (OSError, ValueError) as e:
            raise StoreError(f"cannot open store {self.store}: {e}")
        self.counters = Counters(self.store)
        self._counts_at_open = self.counters.mark()
        self._clients_fd = os.open(os.path.join(self.store, "clients.lock"),
                                   os.O_RDWR | os.O_CREAT, 0o600)
        self._tls = threading.local()           # .depth: _locked nesting of this thread
        self._ckpt_due = False
        self._rotating = threading.Lock()
        self.background_checkpoints = False     # rotate() in a thread (the stripe cache)
        self._unsettled: dict[int, str] = {}    # OSDs whose syncfs failed, not yet settled
        # One directory fd per OSD, opened now and kept: syncfs reports the
        # writeback errors seen since *its file* was opened, so an fd opened
        # at checkpoint time would miss every error from before.
        self._osd_fds: dict[int, int] = {}
        self._osd_fd_lock = threading.Lock()
        self._osd_ident: dict[int, tuple[int, tuple[int, int]]] = {}   # osd -> (fd, identity)
        for osd, path in self.osdmap.paths.items():
            try:
                self._osd_fds[osd] = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                pass            # unreachable now: treated as unsynced at checkpoint
        self._open_recovery(alone)

    # ------------------------------------------------------------------ API
    def read(self, name: str, offset: int, length: int) -> bytes:
        """Bytes [offset, offset+length) of the object, short at its end."""
        validate_name(name)
        if offset < 0 or length < 0:
            raise InvalidArgument("offset and length must not be negative")
        with self._locked(name, offset, offset + length) as obj:
            if obj.info is None:
                self._absent(obj)
            size = obj.info.object_size
            end = min(offset + length, size)
            self.counters.add_many((("client_read_ops", 1),
                                    ("client_read_bytes", max(0, end - offset))))
            if offset >= end:
                return b""
            return self._read_range(obj, offset, end, "read")

    @_replanning
    def write(self, name: str, offset: int, data, *, size_hint: int = 0) -> None:
        """Write ``data`` at ``offset`` (creating the object), atomically."""
        validate_name(name)
        data = memoryview(data).cast("B")
        if offset < 0:
            raise InvalidArgument("offset must not be negative")
        if offset + len(data) > MAX_OBJECT_SIZE:
            raise TooBig(f"write past the object size limit ({MAX_OBJECT_SIZE} bytes)")
        with self._locked(name, offset, offset + len(data), size_hint=size_hint) as obj:
            self._known(obj)
            self.counters.add_many((("client_write_ops", 1), ("client_write_bytes", len(data))))
            self._write_locked(obj, offset, data, size_hint=size_hint)

    @_replanning
    def zero(self, name: str, offset: int, length: int) -> None:
        """Make bytes [offset, offset+length) of the object read as zeros,
        deallocating the shard pages that become all zero (discard). Never
        grows the object; a missing object is left missing."""
        validate_name(name)
        if offset < 0 or length < 0:
            raise InvalidArgument("offset and length must not be negative")
        with self._locked(name, offset, offset + max(length, 1)) as obj:
            if obj.info is None:
                self._known(obj)
                return
            end = min(offset + length, obj.info.object_size)
            if end <= offset:
                return
            self.counters.add("client_other_ops")
            self._write_locked(obj, offset, memoryview(bytes(end - offset)))

    @_replanning
    def write_full(self, name: str, data) -> None:
        """Replace the object's whole content (rados put)."""
        validate_name(name)
        data = memoryview(data).cast("B")
        if len(data) > MAX_OBJECT_SIZE:
            raise TooBig(f"object larger than the limit ({MAX_OBJECT_SIZE} bytes)")
        with self._locked(name) as obj:
            self._known(obj)
            self.counters.add_many((("client_write_ops", 1), ("client_write_bytes", len(data))))
            self._rewrite(obj, np.frombuffer(data, dtype=np.uint8), len(data),
                          self.pool.chunk_for(len(data)))

    @_replanning
    def truncate(self, name: str, size: int) -> None:
        validate_name(name)
        if size < 0 or size > MAX_OBJECT_SIZE:
            raise InvalidArgument(f"size must be within 0..{MAX_OBJECT_SIZE}")
        with self._locked(name) as obj:
            if obj.info is None:
                self._absent(obj)
            self.counters.add("client_other_ops")
            old = obj.info.object_size
            want_cs = self.pool.chunk_for(size)
            if want_cs != obj.info.chunk_size and self.pool.chunk_size == "auto":
                content = np.frombuffer(self._read_range(obj, 0, min(old, size), "write"),
                                        dtype=np.uint8) if min(old, size) else np.zeros(0, np.uint8)
                self._rewrite(obj, content, size, want_cs)
            elif size >= old:
                self._commit(obj, self._header_ops(obj, obj.info.chunk_size, size,
                                                   obj.info.object_version + 1, set()))
            else:
                self._shrink(obj, size)

    @_replanning
    def remove(self, name: str) -> None:
        validate_name(name)
        with self._locked(name) as obj:
            if obj.info is None:
                self._absent(obj)
            up = sum(1 for osd in obj.loc if self.osdmap.is_up(osd))
            if up < self.pool.write_min:
                raise DataUnavailable(f"object {name!r}: only {up} of its {self.width} OSDs "
                                      f"are up (need {self.pool.write_min}, the pool's "
                                      f"min_size); not removed")
            self.counters.add("client_other_ops")
            self._commit(obj, (self._unlink_ops(obj), None),
                         version=obj.info.object_version + 1)
            obj.info = None

    def stat(self, name: str) -> ObjectStat:
        validate_name(name)
        obj = self._load(name)
        if obj.info is None:
            self._absent(obj)
        try:
            mtime = os.stat(self._abs(obj, obj.info.shard)[1]).st_mtime
        except OSError:
            mtime = 0.0
        return ObjectStat(name, obj.info.object_size, obj.info.object_version,
                          obj.info.chunk_size, mtime)

    def exists(self, name: str) -> bool:
        """Whether the object exists; DataUnavailable when that cannot be told."""
        obj = self._load(name)
        if obj.info is None:
            self._known(obj)
        return obj.info is not None

    def _known(self, obj: _Obj) -> None:
        """With no info header found: go on only if the object is known
        not to exist (see ``_absent``)."""
        if obj.info is None and not obj.absent:
            self._absent(obj)

    def _absent(self, obj: _Obj) -> None:
        """Raise for an object no info shard speaks for: NotFound when an
        info shard on a reachable, current OSD says it is not there (every
        write updates all such shards), DataUnavailable when none can say
        (their OSDs down or behind, their headers unreadable): the object
        may exist on them, and must never read as absent or zeros."""
        if obj.absent:
            raise NotFound(f"object {obj.name!r} does not exist")
        where = ", ".join(f"shard {i} on osd.{obj.loc[i]}"
                          f" ({'damaged header' if i in obj.bad_header else self._why_down(obj.loc[i])})"
                          for i in self.info_shards)
        raise DataUnavailable(f"object {obj.name!r} is unavailable: none of its info shards "
                              f"can be read ({where})")

    def _why_down(self, osd: int) -> str:
        st = self.osdmap.states.get(osd)
        return (st.reason or "down") if st is not None and not st.up else "unreadable"

    def list(self, prefix: str = "") -> list[str]:
        """Object names (sorted), gathered from the info shards' sidecars."""
        names = set()
        paths = self.osdmap.paths
        for osd in self.osdmap.up_ids():
            if osd not in paths:
                continue                 # (another thread's newer map: not listed now)
            root = os.path.join(paths[osd], "objects")
            for sub in _listdir(root):
                d = os.path.join(root, sub)
                for f in _listdir(d):
                    if not f.endswith(".meta"):
                        continue
                    found = sf.shard_file_object(d, f)
                    if found is None:
                        continue
                    n, shard = found
                    if shard != 0 and shard < self.k or shard >= self.width:
                        continue
                    # a shard an 'osd add' moved away, until it is removed
                    if n.startswith(prefix) and \
                            self.osdmap.place(n, self.width)[shard] == osd:
                        names.add(n)
        return sorted(names)

    def flush(self, prefix: str = "") -> None:
        """Everything written so far is durable. (Writes are journaled and
        synced before they return: nothing is left to do here; the stripe
        cache in front, backend/stripecache.py, has.)"""

    def set_writeback(self, prefix: str, on: bool) -> bool:
        """Whether writes under ``prefix`` are written back: never here
        (the stripe cache in front says yes)."""
        return False

    def checkpoint(self, then: Callable[[], None] | None = None) -> None:
        """Empty the journal: every record it holds is applied and durable
        on its OSD, or the object is logged as missed by that OSD.
        ``then()`` runs after that, still under the exclusive gate: no
        transaction anywhere, an empty journal (backend/rebalance.py's
        switch of the OSD set).

        A dead writer's records are replayed first, each slot under all of
        its locks (never under the gate alone: readers and planning writers
        of that slot would see it half rewritten). Then, with the gate held
        exclusive (no transaction between append and apply anywhere), every
        OSD file system is synced. One whose syncfs fails, or that cannot
        be reached, may have lost shard writes the journal still holds: each
        object those records touch there is logged as missed (durably) and
        the OSD marked down, so its return rebuilds them. Only then is the
        journal emptied; if any of that fails, the journal is kept whole
        and the error raised."""
        if self.readonly:
            if then is not None:
                raise ReadOnly("this store is open read-only")
            return
        if self.journal.failed:
            self.journal.reset()        # raises the journal's failure
        # Sync once before the gate, while writers go on: the sync under the
        # gate (writers wait) then has only what was dirtied meanwhile to
        # write. A syncfs error is reported once only (a later syncfs would
        # succeed), so every failure seen is kept on the store until a
        # checkpoint settles it: an exception in between (a replay, a read
        # of the journal) cannot make the next checkpoint forget it.
        self._unsettled.update(self._syncfs_groups(self.osdmap.paths, set))
        retried = False
        while True:
            with self._quiet_gate():
                recs: list[Record] = []

                def records() -> list[Record]:
                    # the whole journal, slow to read: only when an OSD
                    # may lack what its records wrote
                    if not recs:
                        recs.extend(self.journal.records())
                    return recs

                # a retry syncs everything again (the failed OSDs' pages
                # were written again); a first round counts every failure
                # not yet settled as failed
                skip = set() if retried else set(self._unsettled)
                failed = self._syncfs_groups(
                    {o: p for o, p in self.osdmap.paths.items() if o not in skip},
                    lambda: _osds_of(records()))
                if not retried:
                    failed.update(self._unsettled)
                self._unsettled.update(failed)
                if not failed or retried:
                    self._settle_unsynced(records, failed)
                    self.journal.reset()
                    self.locks.clear_inflight()
                    self.counters.add("fsyncs")
                    self._unsettled.clear()
                    if then is not None:
                        then()
                    return
            # A file system whose syncfs failed may have dropped dirty pages
            # (and a later syncfs would not say so: an error is reported
            # once): write the journal's pages for it again, slot by slot
            # under the slot's locks, then sync everything once more.
            recs = records()
            self._reapply(recs, set(failed))
            retried = True

    @contextmanager
    def _quiet_gate(self):
        """The checkpoint gate held exclusive with no transaction of any
        process between append and apply. A dead writer's slots are
        replayed first, each under all of its locks (never under the gate
        alone: readers and planning writers of that slot would see it half
        rewritten)."""
        while True:
            for slot in self.locks.inflight_slots():
                self._replay_slot(slot)
            with self.locks.checkpoint_gate():
                if self.locks.inflight_slots():
                    continue        # a writer died since the scan: replay it too
                yield
                return

    def rotate(self) -> None:
        """The routine checkpoint: seal the journal (backend/journal.py,
        "Segments"), then make the sealed records durable on the OSDs and
        drop them, with no gate held. Writers wait only for the seal (a
        rename under the exclusive gate); the syncfs runs while they go on
        appending to the new segment.

        Only a clean sync drops a segment. Anything else (a syncfs that
        fails, an OSD unreachable, failures not yet settled, too many
        segments left by earlier failures) goes the gated way,
        ``checkpoint()``, which writes the pages again or marks the OSD
        down and logs its objects, and raises when it cannot."""
        if self.readonly:
            return
        if not self._rotating.acquire(blocking=False):
            return          # another thread of this process is at it
        try:
            self._rotate()
        finally:
            self._rotating.release()

    def _rotate(self) -> None:
        if self.journal.failed or self._unsettled or self.journal.format < JOURNAL_FORMAT \
                or len(self.journal.sealed()) >= MAX_SEALED:
            self.checkpoint()
            return
        sealed = False
        with self._quiet_gate():
            if self.journal.size() > JOURNAL_LIMIT:     # else another process sealed it
                self.journal.seal()
                self.counters.add("journal_seals")
                sealed = True
        if sealed:
            self._crashpoint()
        self._settle_sealed()

    def _rotate_soon(self) -> bool:
        """rotate() in a thread of its own (``background_checkpoints``: the
        stripe cache's flush threads, which hold their flush's bytes in
        flight and its object busy, never wait for an OSD sync). False if
        one is under way, or failed less than 5 s ago."""
        with self._bg_lock:
            if self._closed:
                return True
            if (self._bg is not None and self._bg.is_alive()) or \
                    time.monotonic() < self._bg_retry_at:
                return False
            self._bg = threading.Thread(target=self._rotate_bg, name="ecfs-journal",
                                        daemon=True)
            self._bg.start()
            return True

    def _rotate_bg(self) -> None:
        try:
            self.rotate()
        except Exception as e:
            # the journal is kept (it holds what the OSDs may lack): a
            # commit past the limit tries again, after a pause
            _log.error("checkpoint: %s", e)
            self._bg_retry_at = time.monotonic() + 5.0

    def _settle_sealed(self) -> None:
        """Sync the OSD file systems and drop the sealed segments listed
        before the sync began (their records were all applied before they
        were sealed, so the sync covers them)."""
        segs = self.journal.sealed()
        if not segs:
            return
        recs: list[Record] = []

        def records() -> list[Record]:
            if not recs:
                recs.extend(self.journal.records(segs))
            return recs

        failed = self._syncfs_groups(self.osdmap.paths, lambda: _osds_of(records()))
        self.osdmap.maybe_refresh()
        if failed or not all(self.osdmap.writable(i) for i in self.osdmap.paths):
            # a sync failed, or an OSD is down (it may have lost what the
            # records wrote to it before it went: its objects must be
            # logged, under the gate, where no 'osd up' runs meanwhile)
            self._unsettled.update(failed)
            self.checkpoint()
            return
        self._crashpoint()
        self.journal.drop(segs)
        self.counters.add("fsyncs")

    def close(self) -> None:
        with self._bg_lock:
            if self._closed:
                return
            self._closed = True
            bg = self._bg
        if bg is not None:
            bg.join()
        if self.readonly:
            return
        try:
            # only a process that wrote checkpoints: a reader (rbd ls, du,
            # info beside a writing mount) never stalls the writers with a
            # syncfs under the exclusive gate
            if not self.journal.failed and self._dirty:
                self.checkpoint()
        finally:
            self._close_files()

    def _close_files(self) -> None:
        self.counters.close()
        self.journal.close()
        self.locks.close()
        self.states.clear()
        self.seq.close()
        self.missed.close()
        with self._osd_fd_lock:
            for fd in self._osd_fds.values():
                os.close(fd)
            self._osd_fds.clear()
        os.close(self._clients_fd)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if isinstance(exc, EcfsError) and getattr(self, "_counts_at_open", None) is not None:
            # a command failing on bad input leaves the counters as they were
            self.counters.rewind(self._counts_at_open)
        self.close()

    def amplification(self) -> dict[str, float]:
        return amplification(self.counters.snapshot())

    # ------------------------------------------------------------- recovery
    def _open_recovery(self, alone: bool) -> None:
        """Alone with the store: replay the whole journal (a crash or power
        cut left it), then share the store with later openers (unless
        ``alone``: then nobody else may open it until this one closes)."""
        import fcntl
        try:
            fcntl.flock(self._clients_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if alone:
                self._close_files()
                raise Busy(f"the store {self.store} is in use (a mount or another command "
                           f"has it open)") from None
            fcntl.flock(self._clients_fd, fcntl.LOCK_SH)
            return
        if self.journal.size() > 16 or self.journal.sealed():
            self._replay_records(list(self.journal.records()), whole_journal=True)
            self.checkpoint()
        self.journal.upgrade()      # alone: no older ecfs has the journal open
        if not alone:
            fcntl.flock(self._clients_fd, fcntl.LOCK_SH)

    def _replay_slot(self, slot: int) -> None:
        """Finish the transaction of a writer that died between journal
        append and apply, holding every lock of the slot (all its stripes
        and its metadata), so no reader or writer sees it half done."""
        with self.locks.stripes(slot, *ALL_STRIPES), self.locks.meta(slot):
            if self.locks.inflight(slot):
                self._replay_records([r for r in self.journal.records() if r.slot == slot])
                self.locks.set_inflight(slot, False)

    def _replay_records(self, recs: list[Record], whole_journal: bool = False) -> None:
        """Re-apply journal records in order, never rolling an object back.

        Records hold whole page images, so re-applying every record of an
        object in order ends in its newest journaled state. That holds only
        if the newest applied record is still readable: when the object's
        shards already carry a version newer than every record left of it
        (a damaged journal lost the records that wrote it), replaying the
        older ones would write old pages over newer ones. Such an object is
        left as its shards have it, and the damage is counted and logged.
        Unreadable spans followed by valid records (a writer killed while
        appending, or damage) are counted once, by the replay of the whole
        journal."""
        skipped = self.journal.damaged if whole_journal else 0
        skip = self._rolled_back(recs)
        if skipped:
            _log.warning("journal: %d unreadable span(s) in the middle of %s skipped "
                         "(a writer killed while appending, or damage)",
                         skipped, self.journal.path)
            self.counters.add("journal_skipped", skipped)
        if skip:
            self.counters.add("journal_damaged", len(skip))
        for r in recs:
            if r.name not in skip:
                self._apply(r, counted=False, kind="replay")

    def _rolled_back(self, recs: list[Record]) -> set[str]:
        """Names of the objects whose shards hold a newer version than any
        of their records in ``recs``: replaying those would roll them back."""
        newest: dict[str, int | None] = {}
        for r in recs:
            if r.version is None:              # format-1 record: no version
                newest[r.name] = None
            elif r.name not in newest or newest[r.name] is not None:
                newest[r.name] = max(newest.get(r.name) or 0, r.version)
        skip = set()
        for name, ver in newest.items():
            if ver is None:
                continue
            obj = self._load(name)
            on_disk = obj.info.object_version if obj.info is not None else 0
            if on_disk > ver:
                skip.add(name)
                _log.warning("journal: object %r: its shards hold version %d but the "
                             "journal nothing newer than %d (records lost); not replayed",
                             name, on_disk, ver)
        return skip

    def _reapply(self, recs: list[Record], osds: set[int]) -> None:
        stale = self._rolled_back(recs)
        by_slot: dict[int, list[Record]] = {}
        for r in recs:
            if r.name not in stale:
                by_slot.setdefault(r.slot, []).append(r)
        for slot, srecs in by_slot.items():
            with self.locks.stripes(slot, *ALL_STRIPES), self.locks.meta(slot):
                for r in srecs:
                    ops = [op for op in r.ops if op.osd in osds]
                    if ops:
                        self._apply(Record(r.name, r.slot, ops, r.version), counted=False,
                                    kind="replay")

    def _settle_unsynced(self, records, failed: dict[int, str]) -> None:
        """Before the journal is emptied: the OSDs whose writes may not be
        durable (``failed``, and any that is down) are marked down, and
        every object the journal's records touch on them is logged as
        missed, so their return rebuilds it from the others. If more than
        M OSDs are then out, the journal may hold the only good copy of a
        stripe: it is kept, and StoreError raised."""
        # read the map afresh, or an OSD another process marked up meanwhile
        # ('osd up', a rebuild: under this gate) would be taken for down and
        # logged behind again. (One marked down after this read synced fine.)
        self.osdmap.maybe_refresh()
        out = set(failed) | {i for i in self.osdmap.paths if not self.osdmap.writable(i)}
        if out:
            try:
                for rec in records():
                    for osd in {op.osd for op in rec.ops if _shard_relpath(op.path)} & out:
                        self.missed.record(osd, rec.name)
            except OSError as e:
                raise StoreError(f"checkpoint: cannot log the writes OSDs may have lost "
                                 f"({e.strerror or e}); the journal is kept")
        if failed and len(out) > self.m:
            # not marked down: with more than M out nothing could rebuild
            # them; the journal kept is what holds their writes
            raise StoreError(f"checkpoint: {', '.join(f'osd.{i}' for i in sorted(failed))} "
                             f"could not make their writes durable and {len(out)} OSDs are "
                             f"out (more than M={self.m}); the journal is kept")
        for osd, why in sorted(failed.items()):
            _log.error("osd.%d: %s; marked down", osd, why)
            if self.osdmap.writable(osd):
                self.osdmap.mark_down(osd, why)

    def _syncfs_groups(self, osds, touched) -> dict[int, str]:
        """syncfs the file systems of ``osds`` (once per file system):
        {osd: why} for those that failed, or cannot be reached while the
        journal holds writes for them (``touched()``: the OSDs it does)."""
        by_dev: dict[int, list[int]] = {}
        failed: dict[int, str] = {}
        dups: dict[int, int] = {}
        try:
            with self._osd_fd_lock:
                for osd in [o for o in self._osd_fds if o not in self.osdmap.paths]:
                    os.close(self._osd_fds.pop(osd))     # removed ('osd rm'): let its disk go
                    self._osd_ident.pop(osd, None)
                for osd in osds:
                    fd = self._osd_fds.get(osd)
                    path = self.osdmap.paths.get(osd)
                    try:
                        if fd is None:      # back since open: errors from now on are seen
                            if path is None:
                                raise FileNotFoundError(errno.ENOENT, "not in the pool")
                            fd = self._osd_fds[osd] = os.open(path,
                                                              os.O_RDONLY | os.O_DIRECTORY)
                        # a dup shares the open file, and so its writeback
                        # error mark: a load following a remount may swap
                        # and close the kept fd while this one syncs
                        dups[osd] = os.dup(fd)
                    except OSError:
                        if osd in touched():
                            failed[osd] = "unreachable at checkpoint"
            for osd, fd in dups.items():
                by_dev.setdefault(os.fstat(fd).st_dev, []).append(osd)
            for group in by_dev.values():
                try:
                    syncfs(dups[group[0]])
                except OSError as e:
                    for osd in group:
                        failed[osd] = f"writeback failed: {e.strerror or e}"
        finally:
            for fd in dups.values():
                os.close(fd)
        return failed

    # ----------------------------------------------------------- object view
    @contextmanager
    def _locked(self, name: str, offset: int = 0, end: int | None = None, size_hint: int = 0):
        """Lock the stripes of object bytes [offset, end) (all stripes when
        ``end`` is None, the object is new or unknown here, or the write
        would restripe it) and yield the object's view, loaded under its
        metadata lock after replaying a dead writer's transaction if any."""
        slot = slot_of(name)
        if self.locks is None:
            yield self._load(name, slot)
            return
        depth = getattr(self._tls, "depth", 0)
        self._tls.depth = depth + 1
        try:
            with self._locked_slot(name, slot, offset, end, size_hint) as obj:
                yield obj
        finally:
            self._tls.depth = depth
        if depth == 0 and self._stale and not getattr(self._tls, "healing", False):
            self._heal_stale()
        if depth == 0 and self._ckpt_due:
            # the journal outgrew its limit: seal it now that this thread
            # holds no stripe (a seal replays a dead writer's slot whole)
            self._ckpt_due = False
            if self.background_checkpoints:
                if not self._rotate_soon():
                    self._ckpt_due = True       # one is under way, or pausing: later
            else:
                self.rotate()

    def _heal_stale(self) -> None:
        """Rebuild the stale shards on up OSDs that writes found and had to
        leave out (a shard file deleted or its header damaged by hand): no
        missed record covers them, since their OSD is up, so they would stay
        behind until a repair. Each object is locked whole for it, after the
        write that found it let its stripes go; a failure is logged (scrub
        still reports the shard) and never fails the write."""
        from .recovery import rebuild_shard
        self._tls.healing = True
        try:
            while self._stale:
                try:
                    name = self._stale.pop()
                except KeyError:
                    return          # another thread took the last one
                try:
                    with self._locked(name) as obj:
                        if obj.info is None:
                            continue
                        for j in range(self.width):
                            osd = obj.loc[j]
                            if self.osdmap.is_up(osd) and obj.info.vector[j] \
                                    and not self._is_usable(obj, j):
                                rebuild_shard(self, obj, j, osd, kind="recovery")
                                self.counters.add("stale_healed")
                except Exception as e:      # never the write's failure: it committed
                    _log.warning("object %r: a stale shard could not be rebuilt (%s); "
                                 "'ecfs repair' will", name, e)
        finally:
            self._tls.healing = False

    @contextmanager
    def _locked_slot(self, name: str, slot: int, offset: int, end: int | None, size_hint: int):
        C = self._chunk_hint.get(name) if end is not None else None
        while True:
            if C is None:
                first, stop = ALL_STRIPES
            else:
                KC = self.k * C
                first, stop = offset // KC, max(offset, end - 1) // KC + 1
            with self.locks.stripes(slot, first, stop):
                with self.locks.meta(slot):
                    replay = self.locks.inflight(slot)
                    if replay and C is None:
                        # a writer died mid-transaction: finish it (every
                        # stripe of the slot is held)
                        self._replay_records([r for r in self.journal.records()
                                              if r.slot == slot])
                        self.locks.set_inflight(slot, False)
                    obj = None if replay and C is not None else self._load(name, slot)
                if obj is None:
                    C = None        # replay needs the whole slot: lock it all
                    continue
                obj.whole = C is None
                if obj.info is not None:
                    self._remember_chunk(name, obj.info.chunk_size)
                if C is None or (obj.info is not None and obj.info.chunk_size == C
                                 and self._chunk_after(obj, end, size_hint) == C):
                    try:
                        yield obj
                    finally:
                        # a commit leaves the new header in obj.info
                        if obj.info is not None:
                            self._remember_chunk(name, obj.info.chunk_size)
                        else:
                            self._chunk_hint.pop(name, None)
                    return
            C = None      # chunk size changed, or will: take every stripe

    def _chunk_after(self, obj: _Obj, end: int, size_hint: int) -> int:
        """The chunk size the object has after a write ending at ``end``."""
        if self.pool.chunk_size != "auto":
            return obj.info.chunk_size
        return self.pool.chunk_for(max(obj.info.object_size, end, size_hint))

    def _remember_chunk(self, name: str, C: int) -> None:
        if len(self._chunk_hint) > 65536:
            self._chunk_hint.clear()
        self._chunk_hint[name] = C

    def _load(self, name: str, slot: int | None = None) -> _Obj:
        """The object's view, with the newest info header of its M+1 info
        shards (one that was away while the object changed is older):
        from the kept state when it is valid (backend/objstate.py), else
        from the headers on disk (then kept)."""
        self.osdmap.maybe_refresh()
        slot = slot if slot is not None else slot_of(name)
        gen = self.osdmap.generation        # first: a refresh after it makes the view stale
        loc = self.osdmap.place(name, self.width)
        if not self.readonly:
            self._check_identity(loc)
        if self.states is not None:
            st = self.states.pin(name, gen)
            if st is not None:
                obj = _Obj(name, slot, loc, st.info, dict(st.usable), set(st.bad_header),
                           set(st.absent), gen)
                self.states.unpin(st)
                return obj
            seq0 = self.seq.get(slot)
        obj = _Obj(name, slot, loc)
        obj.gen = gen
        self.counters.add("state_loads")
        hdrs: dict[int, sf.ShardHeader | None] = {}
        for i in self.info_shards:
            hdrs[i] = self._header(obj, i)
        self._judge(obj, hdrs)
        if self.states is not None and not seq0 & 1 and self.seq.get(slot) == seq0 \
                and self.osdmap.generation == gen:
            # the headers belong together (no apply in between): keep them
            self.states.put(ObjState(name, slot, seq0, gen, loc, hdrs, obj.info,
                                     dict(obj.usable), set(obj.bad_header), set(obj.absent)))
        return obj

    def _judge(self, obj: _Obj, hdrs: dict[int, sf.ShardHeader | None]) -> None:
        """Set the view's info header and usable shards from the shard
        headers ``hdrs`` (the info shards' at least; others are read here
        when needed, and added)."""
        obj.info = None
        obj.usable = {}
        for i in self.info_shards:
            hdr = hdrs.get(i)
            # only an up OSD's header says what the object is: a recovering
            # one's may be of an object removed (or rewritten) since
            if hdr is not None and hdr.info and self.osdmap.is_up(obj.loc[i]) and (
                    obj.info is None or hdr.object_version > obj.info.object_version):
                obj.info = hdr
        if obj.info is not None:
            # Judge every shard now, from headers read together: a writer of
            # other stripes may rewrite them while this view is in use.
            for i in range(self.width):
                want = obj.info.vector[i]
                if not self._readable(obj.loc[i]):
                    obj.usable[i] = False
                elif want == 0:
                    obj.usable[i] = True
                else:
                    if i not in hdrs:
                        hdrs[i] = self._header(obj, i)
                    hdr = hdrs[i]
                    obj.usable[i] = hdr is not None and hdr.shard_version >= want

    def _readable(self, osd: int) -> bool:
        """Whether shards of ``osd`` may be judged (and, current, used): an
        up OSD's, or a recovering one's (backend/osdmap.py)."""
        return self.osdmap.writable(osd)

    def _header(self, obj: _Obj, i: int) -> sf.ShardHeader | None:
        osd = obj.loc[i]
        if not self._readable(osd):
            return None
        _, meta = self._abs(obj, i)
        try:
            raw = _pread_path(meta, sf.HEADER_SIZE, 0)
            self.counters.add("meta_reads")
            hdr = sf.ShardHeader.unpack(raw)
            if hdr.name != obj.name or hdr.shard != i:
                raise sf.CorruptHeader("header names another shard")
            return hdr
        except FileNotFoundError:
            # evidence of absence from up OSDs only: a recovering one's
            # shard may be missing because it was away when it was written
            if i in self.info_shards and self.osdmap.is_up(osd) and os.path.isdir(
                    os.path.join(self.osdmap.paths[osd], "objects")):
                obj.absent.add(i)       # the OSD is there, the shard is not
            return None
        except sf.CorruptHeader:
            if self.osdmap.is_up(osd):
                obj.bad_header.add(i)   # a recovering OSD's stale header is no verdict
            return None
        except OSError as e:
            self._osd_failed(osd, e)
            return None

    def _is_usable(self, obj: _Obj, i: int) -> bool:
        """Shard i holds the version the vector asks for (or need hold nothing).

        A newer shard version than the vector's is current too: another
        writer of other stripes committed after this view was loaded."""
        u = obj.usable.get(i)
        if u is not None:
            return u
        want = obj.info.vector[i] if obj.info else 0
        if not self._readable(obj.loc[i]):
            u = False
        elif want == 0:
            u = True      # never written in this incarnation: all zeros
        else:
            hdr = obj.info if i == obj.info.shard else self._header(obj, i)
            u = hdr is not None and hdr.shard_version >= want
        obj.usable[i] = u
        return u

    def _abs(self, obj: _Obj, i: int) -> tuple[str, str]:
        d = self.osdmap.paths.get(obj.loc[i])
        if d is None:     # taken out ('osd rm') since this view was loaded: as gone
            raise FileNotFoundError(errno.ENOENT, f"osd.{obj.loc[i]} is not in the pool")
        rd, rm = sf.rel_paths(obj.name, i)
        return os.path.join(d, rd), os.path.join(d, rm)

    def _osd_failed(self, osd: int, e: OSError) -> None:
        why = f"I/O error: {e.strerror or e}"
        if self.readonly:      # a read-only view writes nothing, the OSD map included
            from .osdmap import OsdState
            self.osdmap.states[osd] = OsdState(osd, self.osdmap.paths.get(osd, ""), False, why)
            return
        self.osdmap.mark_down(osd, why)

    # ---------------------------------------------------------------- layout
    @staticmethod
    def _shard_extent(offset: int, end: int, i: int, k: int, C: int) -> tuple[int, int]:
        """Shard bytes [lo, hi) of data shard i holding object bytes [offset, end)."""
        if end <= offset:
            return 0, 0
        KC = k * C

        def to_shard(x: int, upper: bool) -> int:
            s, r = divmod(x, KC)
            pos = r - i * C
            if pos < 0:
                return s * C
            if pos >= C:
                return (s + 1) * C
            return s * C + pos

        lo, hi = to_shard(offset, False), to_shard(end, True)
        return (lo, hi) if hi > lo else (0, 0)

    def _extents(self, size: int, C: int) -> list[int]:
        """Byte extent of every shard for an object of ``size`` bytes: a
        data shard's bytes of the object, and for parity the longest data
        shard's rounded up to a page (a plugin of 16-bit words,
        liberasurecode's rs_vand, puts parity in the byte after an odd
        end: cut there, the parity would decode that end wrong)."""
        ext = [self._shard_extent(0, size, i, self.k, C)[1] for i in range(self.k)]
        return ext + [-(-max(ext) // PAGE) * PAGE if ext else 0] * self.m

    # ------------------------------------------------------------- read path
    def _read_range(self, obj: _Obj, offset: int, end: int, kind: str) -> bytes:
        C = obj.info.chunk_size
        KC = self.k * C
        s0, s1 = offset // KC, (end - 1) // KC
        win = _Window(self.width, self.k, C, s0, s1)
        ext = self._extents(obj.info.object_size, C)
        req: dict[int, list[tuple[int, int]]] = {}
        for i in range(self.k):
            lo, hi = self._shard_extent(offset, end, i, self.k, C)
            hi = min(hi, ext[i])
            if hi > lo:
                req[i] = [(lo // PAGE, -(-hi // PAGE))]
        self._mark_known_zero(win, ext)
        self._fetch(obj, win, req, kind)
        if s0 == s1 and (offset % KC) // C == ((end - 1) % KC) // C:
            i = (offset % KC) // C
            base = s0 * C + (offset % KC) % C - win.row0 * PAGE
            return win.bufs[i, base:base + end - offset].tobytes()
        flat = win.data_view().reshape(-1)   # a copy in object order
        a = offset - s0 * KC
        return flat[a:a + end - offset].tobytes()

    def _mark_known_zero(self, win: _Window, ext: list[int]) -> None:
        for i in range(self.width):
            first_zero = -(-ext[i] // PAGE) - win.row0
            if first_zero < win.rows:
                win.valid[i, max(0, first_zero):] = True

    def _fetch(self, obj: _Obj, win: _Window, req: dict[int, list[tuple[int, int]]],
               kind: str) -> None:
        """Fill the requested page ranges of ``win``; decode what cannot be read."""
        failed: list[tuple[int, int, int, np.ndarray | None]] = []
        for i, ranges in req.items():
            for p0, p1 in ranges:
                if p1 <= p0:
                    continue
                bad = self._read_pages(obj, i, p0, p1, win.pages(i, p0, p1), kind)
                if bad is None:
                    failed.append((i, p0, p1, None))
                elif bad.any():
                    win.valid[i, p0 - win.row0:p1 - win.row0] = ~bad
                    failed.append((i, p0, p1, bad))
                else:
                    win.valid[i, p0 - win.row0:p1 - win.row0] = True
        for i, p0, p1, bad in failed:
            self._recover(obj, win, i, p0, p1, bad, kind)

    def _read_pages(self, obj: _Obj, i: int, p0: int, p1: int, out: np.ndarray,
                    kind: str, kept: bool = True) -> np.ndarray | None:
        """Read shard i pages [p0, p1) into ``out``, verified. Returns the mask
        of pages failing their checksum, or None if the shard is unusable.
        ``kept=False``: skip the kept state (the caller tried it, or
        knows it cannot serve the run)."""
        if not self._is_usable(obj, i):
            return None
        n = p1 - p0
        if obj.info is None or obj.info.vector[i] == 0:
            out[:] = 0
            return np.zeros(n, dtype=bool)
        st = self.states.pin(obj.name, obj.gen) if self.states is not None and kept else None
        if st is not None:
            try:
                done = self._read_kept(st, i, p0, p1, out, kind)
            finally:
                self.states.unpin(st)
            if done:
                return np.zeros(n, dtype=bool)
            # anything unexpected is read again from disk, as without a state
        data_path, meta_path = self._abs(obj, i)
        try:
            raw = _pread_path(meta_path, 4 * n, sf.crc_offset(p0))
            self.counters.add("meta_reads")
            stored = np.zeros(n, dtype=np.uint32)
            got = np.frombuffer(raw[: len(raw) // 4 * 4], dtype="<u4")
            stored[: len(got)] = got
            try:
                fd = os.open(data_path, os.O_RDONLY)
            except FileNotFoundError:
                if not stored.any():
                    out[:] = 0      # zero pages, and no file holds anything
                    return np.zeros(n, dtype=bool)
                return np.ones(n, dtype=bool)
            try:
                # A stored 0 means "zero page", but it is also what a lost or
                # cut table reads as. With only zeros stored, the data file
                # is asked whether it holds anything there (SEEK_DATA, no data
                # moved): a hole is the zero pages the table says; data under
                # a 0 is read and fails its check, so it is healed, never
                # returned as zeros.
                if not stored.any() and _no_data(fd, p0 * PAGE, p1 * PAGE):
                    self.counters.add("meta_reads")
                    out[:] = 0
                    return np.zeros(n, dtype=bool)
                got_n = os.preadv(fd, [out], p0 * PAGE)
                self.faults.on_read(data_path, p0 * PAGE, out)
            finally:
                os.close(fd)
        except OSError as e:
            self._osd_failed(obj.loc[i], e)
            obj.usable[i] = False
            return None
        self.counters.add_many(((f"{kind}_shard_reads", 1), ("shard_reads", 1),
                                ("shard_read_bytes", n * PAGE)))
        if got_n < n * PAGE:
            out[got_n:] = 0
        return sf.page_crcs(out, n) != stored

    def _read_kept(self, st: ObjState, i: int, p0: int, p1: int, out: np.ndarray,
                   kind: str) -> bool:
        """Shard i's pages [p0, p1) through the pinned state ``st``: its
        kept pages, else its kept file and checksum table (verified).
        False: read them the long way (_read_pages)."""
        if self.states.get_pages(st, i, p0, p1, out):
            self.counters.add("page_hits")
            return True
        if self._read_pinned(st, i, p0, p1, out, lockless=False):
            self.counters.add_many(((f"{kind}_shard_reads", 1), ("shard_reads", 1),
                                    ("shard_read_bytes", (p1 - p0) * PAGE)))
            return True
        return False

    def _read_pinned(self, st: ObjState, i: int, p0: int, p1: int,
                     out: np.ndarray | list[np.ndarray], lockless: bool) -> bool:
        """Read shard i's pages [p0, p1) into ``out`` (one buffer, or a list
        of whole-page buffers filled in order) through the pinned
        state's kept file and checksum table. True only when every page
        was there in full and verified against a non-zero stored checksum
        (a zero stored is "zero page" or "lost": the long way tells);
        False for anything else: the caller goes the long way.

        ``lockless`` (try_read, no stripe lock held): data not in memory
        is not waited for (RWF_NOWAIT), and no file is opened: only fds
        kept by a caller holding locks are used. (An open racing with a
        removal or restripe could keep the fd of a file unlinked just
        after, and a later write through it would miss the new file.)"""
        seq = st.seq
        try:
            table = st.crcs.get(i)
            if table is None or len(table) < p1:
                table = self._load_crcs(st, i, seq, lockless)
                if table is None or len(table) < p1:
                    return False
            if p1 - p0 == 1:
                stored = int(table[p0])     # one page (most reads): no array ops
                if not stored:
                    return False
            else:
                stored = table[p0:p1]
                if not stored.all():
                    return False
            fd = st.fds.get(i) if lockless else self._kept_fd(st, i, False)
            if fd is None:
                return False
            n = (p1 - p0) * PAGE
            outs = out if isinstance(out, list) else [out]
            if os.preadv(fd, outs, p0 * PAGE, os.RWF_NOWAIT if lockless else 0) < n:
                return False
            if self.faults.armed():
                path = os.path.join(self.osdmap.paths.get(st.loc[i], ""),
                                    sf.rel_paths(st.name, i)[0])
                at = p0 * PAGE
                for part in outs:
                    self.faults.on_read(path, at, part)
                    at += len(part)
        except OSError:         # EAGAIN (not in memory), or an error the long way reports
            return False
        if p1 - p0 == 1:
            return (_crc32c(outs[0]) ^ sf.ZERO_PAGE_CRC) == stored
        at = 0
        for part in outs:
            k = len(part) // PAGE
            if not (sf.page_crcs(part, k) == stored[at:at + k]).all():
                return False
            at += k
        return True

    def _load_crcs(self, st: ObjState, i: int, seq: int, lockless: bool) -> np.ndarray | None:
        """Shard i's whole checksum table (as far as its extent goes), read
        and kept if the commit counter stays at ``seq`` (``lockless``: as
        in _read_pinned)."""
        info = st.info
        if info is None:
            return None
        fd = st.mfds.get(i) if lockless else self._kept_fd(st, i, True)
        if fd is None:
            return None
        pages = -(-self._extents(info.object_size, info.chunk_size)[i] // PAGE)
        buf = bytearray(4 * pages)
        got = os.preadv(fd, [buf], sf.crc_offset(0), os.RWF_NOWAIT if lockless else 0)
        self.counters.add("meta_reads")
        if lockless and got < len(buf) and got < os.fstat(fd).st_size - sf.crc_offset(0):
            # RWF_NOWAIT stops where the page cache does: the rest is not
            # zero, only not in memory. (A kept table is trusted as what
            # the sidecar holds: _crc_ops writes its entries back.)
            return None
        table = np.zeros(pages, dtype=np.uint32)
        table[:got // 4] = np.frombuffer(buf, dtype="<u4", count=got // 4)
        self.states.keep_crcs(st, i, table, seq)
        return table

    def try_read(self, name: str, offset: int, length: int) -> bytes | None:
        """``read``, if it can be done now without waiting or locking: the
        object's kept state is valid (backend/objstate.py), every shard
        the range lies on is usable, and its pages are in memory and
        verify; NotFound for an object the state knows absent. None: call
        ``read``, which may block, decode and heal.

        No lock is taken: the slot's commit counter, the same before and
        after, says no shard file changed in between (a sequence lock)."""
        if self.states is None or offset < 0 or length <= 0:
            return None
        self.osdmap.maybe_refresh()
        st = self.states.pin(name, self.osdmap.generation)
        if st is None:
            return None
        try:
            if self.locks.inflight(st.slot):
                # a writer between append and apply (or one that died
                # there: its record is durable, the counter never moved):
                # read() waits for it, or replays it first
                return None
            # the counter first: follow() sets the new view, then the new
            # counter, so a view older than the counter read is caught by
            # the check after
            seq = st.seq
            info = st.info
            if info is None:
                # known absent (an info shard on a current OSD says so), as
                # read() would raise; else unknown or unavailable: read() says
                if st.absent and self.seq.get(st.slot) == seq:
                    raise NotFound(f"object {name!r} does not exist")
                return None
            end = min(offset + length, info.object_size)
            if offset >= end:
                return None
            C = info.chunk_size
            KC = self.k * C
            s0, r0 = divmod(offset, KC)
            s1, r1 = divmod(end - 1, KC)
            i0, i1 = r0 // C, r1 // C
            counts = [0, 0, 0]          # kept-page hits, shard reads, their bytes
            if s0 == s1 and i0 == i1:
                # inside one chunk (most small reads): one copy out of the pages
                lo = s0 * C + r0 - i0 * C
                run = self._fast_run(st, i0, lo, lo + end - offset, counts)
                if run is None:
                    return None
                got = bytes(end - offset) if run is _NEVER_WRITTEN else \
                    run[0][run[1]:run[1] + end - offset].tobytes()
            else:
                # returned as it is (a bytearray: no copy into bytes)
                got = out = bytearray(end - offset)
                view = np.frombuffer(out, dtype=np.uint8)
                aligned = offset % PAGE == 0 and end % PAGE == 0
                for i in range(self.k):
                    # shard i's bytes of the range are one run of its file
                    # (the tail of a chunk, whole chunks, the head of one):
                    # one read each, however many stripes the range spans
                    first = s0 if i >= i0 else s0 + 1
                    last = s1 if i <= i1 else s1 - 1
                    if first > last:
                        continue
                    a = first * C + (r0 - i * C if (first, i) == (s0, i0) else 0)
                    b = last * C + (r1 + 1 - i * C if (last, i) == (s1, i1) else C)
                    pieces = []                 # (where in the range, in the run, bytes)
                    for t in range(first, last + 1):
                        x, y = max(a, t * C), min(b, (t + 1) * C)      # in the shard file
                        pieces.append((t * KC + i * C + x - t * C - offset, x - a, y - x))
                    if aligned:
                        # whole pages: the read puts each chunk's bytes in
                        # their place in the range (one preadv, no copy)
                        run = self._fast_run(st, i, a, b, counts,
                                             [view[at:at + n] for at, _, n in pieces])
                        if run is None:
                            return None
                        continue
                    run = self._fast_run(st, i, a, b, counts)
                    if run is None:
                        return None
                    if run is _NEVER_WRITTEN:
                        continue            # zeros (out starts zeroed)
                    buf, skip = run
                    for at, x, n in pieces:
                        view[at:at + n] = buf[x + skip:x + skip + n]
            if self.seq.get(st.slot) != seq:
                return None             # a shard file changed meanwhile
        finally:
            self.states.unpin(st)
        hits, reads, rbytes = counts
        self.counters.add_many((("client_read_ops", 1), ("client_read_bytes", end - offset),
                                ("fast_reads", 1), ("page_hits", hits),
                                ("read_shard_reads", reads), ("shard_reads", reads),
                                ("shard_read_bytes", rbytes)))
        return got

    def _fast_run(self, st: ObjState, i: int, lo: int, hi: int, counts: list,
                  into: list[np.ndarray] | None = None):
        """For try_read: shard i's bytes [lo, hi), from its kept pages or
        its kept file without waiting, verified: (the pages, the offset of
        ``lo`` in them), _NEVER_WRITTEN, or None (go the long way).
        ``into`` (lo and hi on pages): buffers of whole pages that take the
        run in order, filled in place (True when they are, zeros for a
        shard never written). ``counts`` gathers hits, reads and bytes read."""
        if not st.usable.get(i):
            return None
        if st.info.vector[i] == 0:
            if into is not None:
                return True             # zeros: the caller's buffers start zeroed
            return _NEVER_WRITTEN
        p0, p1 = lo // PAGE, -(-hi // PAGE)
        if into is not None and not st.pages.get(i):
            # no kept pages to look at: straight from the file into place
            if not self._read_pinned(st, i, p0, p1, into, lockless=True):
                return None
            counts[1] += 1
            counts[2] += (p1 - p0) * PAGE
            return True
        buf = np.empty((p1 - p0) * PAGE, dtype=np.uint8)
        if self.states.get_pages(st, i, p0, p1, buf):
            counts[0] += 1
        elif self._read_pinned(st, i, p0, p1, buf, lockless=True):
            counts[1] += 1
            counts[2] += len(buf)
        else:
            return None
        if into is not None:
            at = lo - p0 * PAGE
            for part in into:
                part[:] = buf[at:at + len(part)]
                at += len(part)
            return True
        return buf, lo - p0 * PAGE

    def _recover(self, obj: _Obj, win: _Window, i: int, p0: int, p1: int,
                 bad: np.ndarray | None, kind: str) -> None:
        """Decode shard i's failed pages in [p0, p1) from K other shards, then
        rewrite the pages that failed their checksum.

        Pages are decoded run by run of failed pages, and row by row when a
        run has no K helpers clean over all of it, so corruption scattered
        over several shards decodes as long as every page row keeps K good
        pages. A helper page that fails its checksum is decoded and
        rewritten too."""
        r0 = p0 - win.row0
        todo = ~win.valid[i, r0:r0 + p1 - p0]      # a helper repair may have fixed some
        if bad is not None:
            todo &= bad
        if not todo.any():
            return
        for f0, f1 in _runs(p0 + np.flatnonzero(todo)):
            self._decode_span(obj, win, i, f0, f1, kind)
        if bad is not None:
            self._repair_pages(obj, win, i, p0 + np.flatnonzero(todo))

    def _decode_span(self, obj: _Obj, win: _Window, i: int, f0: int, f1: int, kind: str) -> None:
        """Fill shard i's pages [f0, f1) of ``win`` by decoding."""
        r0, r1 = f0 - win.row0, f1 - win.row0
        helpers: dict[int, np.ndarray] = {}
        order = [j for j in range(self.width) if j != i]
        order.sort(key=lambda j: (not win.valid[j, r0:r1].all(), j >= self.k))
        for j in order:
            if len(helpers) == self.k:
                break
            if win.valid[j, r0:r1].all():
                helpers[j] = win.bufs[j, r0 * PAGE:r1 * PAGE]
                continue
            tmp = np.empty((f1 - f0) * PAGE, dtype=np.uint8)
            b = self._read_pages(obj, j, f0, f1, tmp, kind)
            if b is None:
                continue
            # keep what verified; pages already known stay as they are
            fresh = ~b & ~win.valid[j, r0:r1]
            win.bufs[j, r0 * PAGE:r1 * PAGE][np.repeat(fresh, PAGE)] = tmp[np.repeat(fresh, PAGE)]
            win.valid[j, r0:r1] |= ~b
            if b.any():
                win.corrupt[j, r0:r1] |= b & ~win.valid[j, r0:r1]
                continue
            helpers[j] = win.bufs[j, r0 * PAGE:r1 * PAGE]
        if len(helpers) < self.k:
            if f1 - f0 > 1:
                for p in range(f0, f1):
                    if not win.valid[i, p - win.row0]:
                        self._decode_span(obj, win, i, p, p + 1, kind)
                return
            raise DataUnavailable(
                f"object {obj.name!r}: stripe {f0 // win.P}: only {len(helpers)} of the "
                f"{self.k} shards needed are readable (shard {i} on osd.{obj.loc[i]} failed)")
        # helper pages seen failing their crc in these rows are decoded too
        corrupt = {j: np.flatnonzero(win.corrupt[j, r0:r1]) for j in range(self.width)
                   if j != i and j not in helpers and win.corrupt[j, r0:r1].any()}
        got = self.codec.decode(helpers, [i] + list(corrupt))
        self.counters.add_many((("decodes", 1), ("degraded_reads", 1)))
        win.bufs[i, r0 * PAGE:r1 * PAGE] = np.frombuffer(got[i], dtype=np.uint8)
        win.valid[i, r0:r1] = True
        for j, pages in corrupt.items():
            rebuilt = np.frombuffer(got[j], dtype=np.uint8)
            for p in pages:
                win.bufs[j, (r0 + p) * PAGE:(r0 + p + 1) * PAGE] = rebuilt[p * PAGE:(p + 1) * PAGE]
            win.valid[j, r0 + pages] = True
            win.corrupt[j, r0 + pages] = False
            self._repair_pages(obj, win, j, f0 + pages)

    def _repair_pages(self, obj: _Obj, win: _Window, i: int, pages: np.ndarray) -> None:
        """Rewrite pages of shard i whose checksum failed, from decoded bytes."""
        n = len(pages)
        self.counters.add("checksum_errors", n)
        if self.readonly:
            return
        rd, rm = sf.rel_paths(obj.name, i)
        osd = obj.loc[i]
        ext = self._extents(obj.info.object_size, obj.info.chunk_size)[i]
        ops = []
        for run0, run1 in _runs(pages):
            buf = win.pages(i, run0, run1)
            stop = min(run1 * PAGE, ext)      # never pad the file past its extent
            ops.append(FileOp(OP_WRITE, osd, rd, run0 * PAGE, buf[: stop - run0 * PAGE].tobytes()))
            ops.append(FileOp(OP_WRITE, osd, rm, sf.crc_offset(run0),
                              sf.page_crcs(buf).astype("<u4").tobytes()))
        try:
            self._commit(obj, (ops, None), kind="repair")
        except PlacementMoved:
            # the decoded bytes are right; the page is rewritten by the
            # next read or scrub that meets it at the shard's new home
            return
        self.counters.add("checksum_repairs", n)

    # ------------------------------------------------------------ write path
    def _write_locked(self, obj: _Obj, offset: int, data: memoryview, size_hint: int = 0,
                      new_size: int | None = None, tail_ops: list[FileOp] | None = None,
                      tail_touched: set[int] = frozenset()) -> None:
        end = offset + len(data)
        old_size = obj.info.object_size if obj.info else 0
        size = max(old_size, end) if new_size is None else new_size
        want_cs = self.pool.chunk_for(max(size, size_hint))
        if obj.info is not None and want_cs != obj.info.chunk_size and self.pool.chunk_size == "auto" \
                and new_size is None:
            # the object outgrew its chunk size: restripe, data intact
            content = np.zeros(size, dtype=np.uint8)
            if old_size:
                content[:old_size] = np.frombuffer(self._read_range(obj, 0, old_size, "write"),
                                                   dtype=np.uint8)
            content[offset:end] = np.frombuffer(data, dtype=np.uint8)
            self._rewrite(obj, content, size, want_cs)
            return
        C = obj.info.chunk_size if obj.info else want_cs
        if obj.info is None and not len(data):
            self._rewrite(obj, np.zeros(0, np.uint8), size, C)
            return
        if not len(data):
            def grow(cur: _Obj):
                final = max(size, cur.info.object_size) if new_size is None else new_size
                hops, hdr = self._header_ops(cur, C, final, self._next_version(cur), set())
                return (tail_ops or []) + hops, hdr
            self._commit(obj, grow)
            return
        shard_ops = self._stripe_ops(obj, offset, data, C, size)
        touched = set(shard_ops) | set(tail_touched)

        def build(cur: _Obj):
            # cur: the object as it is now, under the metadata lock; writers
            # of other stripes may have committed since it was loaded
            cur_size = cur.info.object_size if cur.info else 0
            final = max(cur_size, end) if new_size is None else new_size
            hops, hdr = self._header_ops(cur, C, final, self._next_version(cur), touched)
            return self._shard_txn(cur, shard_ops) + (tail_ops or []) + hops, hdr

        self._commit(obj, build)

    def _shard_txn(self, cur: _Obj, shard_ops: dict[int, list[FileOp]]) -> list[FileOp]:
        ops = []
        for j, jops in shard_ops.items():
            if self._writable(cur, j):     # else the vector calls it stale
                ops += self._drop_leftovers(cur, j) + jops
        return ops

    @_replanning
    def write_extents(self, name: str, extents, *, size_hint: int = 0) -> None:
        """Write several disjoint ranges ``[(offset, data), ...]`` of one
        object (the stripe cache's flush of it). The overwrites inside one
        chunk each, the common flush, go as a transaction per group of 64
        or so page rows (one journal record, one version, each header
        written once) planned row by row, when every shard is current
        (``_delta_batch``). Other ranges
        (growth, across chunks, a degraded object, a group of rows whose
        read needs healing) go in transactions of
        ranges whose page rows are disjoint (``_rows_of``); a range
        sharing a row with an earlier one starts the next transaction
        (its plan must read the parity the earlier one wrote)."""
        validate_name(name)
        extents = sorted((off, memoryview(d).cast("B")) for off, d in extents if len(d))
        if not extents:
            return
        for (a, da), (b, _) in zip(extents, extents[1:]):
            if a + len(da) > b:
                raise InvalidArgument("extents overlap")
        if extents[0][0] < 0:
            raise InvalidArgument("offset must not be negative")
        end = extents[-1][0] + len(extents[-1][1])
        if end > MAX_OBJECT_SIZE:
            raise TooBig(f"write past the object size limit ({MAX_OBJECT_SIZE} bytes)")
        with self._locked(name) as obj:
            self._known(obj)
            self.counters.add_many((("client_write_ops", len(extents)),
                                    ("client_write_bytes", sum(len(d) for _, d in extents))))
            if obj.info is None or (
                    self.pool.chunk_size == "auto" and
                    self.pool.chunk_for(max(obj.info.object_size, end, size_hint))
                    != obj.info.chunk_size):
                # a new object, or one to restripe: one range at a time
                for off, d in extents:
                    self._write_locked(obj, off, d, size_hint=size_hint)
                return
            C = obj.info.chunk_size
            # the overwrites inside one chunk each go first, planned row by
            # row (_delta_batch); the rest, and what that could not write,
            # in transactions of disjoint rows
            extents = self._delta_batch(obj, extents)
            batch: list = []
            claimed: set[int] = set()
            for off, d in extents:
                rows = self._rows_of(off, len(d), C)
                if batch and not claimed.isdisjoint(rows):
                    self._write_batch(obj, batch)
                    batch, claimed = [], set()
                batch.append((off, d))
                claimed |= rows
            if batch:
                self._write_batch(obj, batch)

    def _rows_of(self, offset: int, n: int, C: int) -> set[int]:
        """The page rows (shard page numbers) a write's plan may read or
        write: the rows from its first to its last changed page in each
        stripe it touches, all of a stripe's rows once it crosses a chunk
        boundary there, or in a mode that may rewrite whole stripes
        ("full", "mixed"). Writes with disjoint rows touch disjoint data
        and parity pages, so they can be planned against the same on-disk
        state and committed as one transaction."""
        KC, P = self.k * C, C // PAGE
        rows: set[int] = set()
        end = offset + n
        whole = self.write_mode in ("full", "mixed")
        for s in range(offset // KC, (end - 1) // KC + 1):
            a, b = max(offset, s * KC) - s * KC, min(end, (s + 1) * KC) - s * KC
            if whole or a // C != (b - 1) // C:
                rows.update(range(s * P, (s + 1) * P))
            else:
                rows.update(range(s * P + (a % C) // PAGE, s * P + ((b - 1) % C) // PAGE + 1))
        return rows

    def _write_batch(self, obj: _Obj, batch) -> None:
        """Ranges of disjoint page rows of an existing object (locked whole),
        planned against what is on the OSDs now, committed together."""
        C = obj.info.chunk_size
        end = max(off + len(d) for off, d in batch)
        size = max(obj.info.object_size, end)
        shard_ops: dict[int, list[FileOp]] = {}
        for off, d in batch:
            for j, jops in self._stripe_ops(obj, off, d, C, size).items():
                shard_ops.setdefault(j, []).extend(jops)
        self._commit_batch(obj, C, end, shard_ops)

    def _commit_batch(self, obj: _Obj, C: int, end: int,
                      shard_ops: dict[int, list[FileOp]]) -> None:
        """Commit a batch's page ops with the headers of the shards they
        touch, built on the object as it is at commit (size at least ``end``)."""
        touched = set(shard_ops)

        def build(cur: _Obj):
            hops, hdr = self._header_ops(cur, C, max(cur.info.object_size, end),
                                         self._next_version(cur), touched)
            return self._shard_txn(cur, shard_ops) + hops, hdr

        self._commit(obj, build)

    def _delta_batch(self, obj: _Obj, batch) -> list:
        """The common flush, as arrays over its ranges: each range an
        overwrite inside one chunk of existing data, every shard current.
        Planned row by row (a row: the pages at one offset of every shard
        of a stripe; they share their parity pages), so ranges meeting in a
        row read and write its parity pages once: a row's parity is updated
        by delta from its changed data pages, or, in auto mode where that
        reads fewer pages (weighed stripe by stripe, as _stripe_ops weighs
        one range), encoded again from the row's data. One codec call per
        group of rows does both kinds of row (the code is linear, column by
        column).

        One transaction per group of about _DELTA_GROUP_ROWS rows, cut only
        where no range goes on (each range is one atomic write, as on the
        general path; a 4 MiB object's scattered flush is one or a few): a
        transaction holds every page it writes (its data pages and its
        rows' parity: up to 1 + M times the bytes of scattered pages) until
        its commit, so the memory a flush holds beyond its dirty bytes is
        one group's, however large the flush (the stripe cache's
        FLIGHT_COST).

        Returns the ranges not written, in offset order: those outside its
        kind (growth, across chunks), all of them when a shard is not
        current, and those of the group whose read needs decoding or
        healing and of the groups after it (the general path does that;
        the reads done here count twice)."""
        info, k, m = obj.info, self.k, self.m
        if self.write_mode not in ("delta", "auto") or not self.codec.flags & FLAG_PARITY_DELTA:
            return batch
        if not all(self._is_usable(obj, j) and self.osdmap.writable(obj.loc[j])
                   for j in range(self.width)):
            return batch
        C, size = info.chunk_size, info.object_size
        KC = k * C
        ext = self._extents(size, C)
        lim = [-(-e // PAGE) for e in ext]      # pages below each shard's extent
        plan = []       # (data, data shard, byte offset in the shard, first row, last row + 1)
        rows: dict[int, dict[int, bool]] = {}   # row -> {data shard: page written whole}
        taken, rest = [], []
        for off, d in batch:
            n = len(d)
            s, r = divmod(off, KC)
            i, c = divmod(r, C)
            if off + n > size or c + n > C:
                rest.append((off, d))       # growth, or across chunks: the general path
                continue
            taken.append((off, d))
            lo = s * C + c
            q0, q1 = lo // PAGE, -(-(lo + n) // PAGE)
            plan.append((d, i, lo, q0, q1))
            for q in range(q0, q1):
                whole = lo <= q * PAGE and (q + 1) * PAGE <= lo + n
                pages = rows.setdefault(q, {})
                # (two ranges in one page: each writes it in part)
                pages[i] = whole if i not in pages else False
        order = sorted(rows)
        recon = set()
        if self.write_mode == "auto":
            # auto reconstructs a stripe's rows where that reads fewer
            # pages, counted as _plan_stripe does: pages below the old
            # extents only (a last, partial stripe has fewer of them). By
            # stripe, not row by row: a stripe read one way is a few long
            # runs, where rows choosing apart cut them into more syscalls
            P = C // PAGE
            cost: dict[int, list[int]] = {}     # stripe -> [delta reads, rebuild reads]
            for q in order:
                pages = rows[q]
                c = cost.setdefault(q // P, [0, 0])
                c[0] += len(pages) + sum(q < lim[j] for j in range(k, k + m))
                c[1] += sum(q < lim[x] for x in range(k) if x not in pages) + \
                    sum(not whole for whole in pages.values())
            recon = {q for q in order if cost[q // P][1] < cost[q // P][0]}
        # groups of about G rows, cut only between rows no range spans: a
        # range is one atomic write, so all of it is in one transaction (a
        # range's rows are consecutive rows of the batch, at most a chunk's)
        G = _DELTA_GROUP_ROWS
        at = {q: t for t, q in enumerate(order)}
        spanned = [False] * len(order)      # order[t] and order[t + 1] in one range
        for e in plan:
            for t in range(at[e[3]], at[e[4] - 1]):
                spanned[t] = True
        cuts = [0]
        for t in range(len(order)):
            if t + 1 - cuts[-1] >= G and not spanned[t]:
                cuts.append(t + 1)
        if cuts[-1] < len(order):
            cuts.append(len(order))
        group = [bisect.bisect_right(cuts, at[e[3]]) - 1 for e in plan]     # each range's
        ranges: list[list] = [[] for _ in cuts[1:]]
        for e, g in zip(plan, group):
            ranges[g].append(e)
        paths = [sf.rel_paths(obj.name, j) for j in range(self.width)]
        for g, mine in enumerate(ranges):
            shard_ops: dict[int, list[FileOp]] = {}
            crcs: dict[int, list] = {}
            if not self._delta_rows(obj, order[cuts[g]:cuts[g + 1]], rows, recon, mine, ext,
                                    lim, paths, shard_ops, crcs):
                left = [x for x, eg in zip(taken, group) if eg >= g]
                return sorted(left + rest, key=lambda x: x[0]) if rest else left
            self._crc_ops(obj, crcs, paths, shard_ops)
            self._commit_batch(obj, C, size, shard_ops)
            n_recon = sum(e[3] in recon for e in mine)      # (a range is in one stripe)
            self.counters.add_many((("writes_delta", len(mine) - n_recon),
                                    ("writes_reconstruct", n_recon)))
        return rest

    def _crc_ops(self, obj: _Obj, crcs: dict[int, list], paths: list,
                 shard_ops: dict[int, list[FileOp]]) -> None:
        """The checksum writes of a batch's page runs (``crcs``: shard ->
        [(first page, its runs' stored checksums)]), after each shard's
        page writes: one per shard where its ranges lie within
        _JOIN_CRC_ENTRIES entries and its table is kept, the entries
        between the runs taken from the kept table (valid: the object is
        locked whole and its state pinned current, so the table is what
        the sidecar holds); else one per run. Each small pwrite was a
        syscall, a journal op and a GIL round trip; a shard's whole table
        is about 1 KiB per MiB of shard."""
        st = self.states.pin(obj.name, obj.gen) if self.states is not None else None
        try:
            for j, parts in crcs.items():
                meta = paths[j][1]
                ops = shard_ops.setdefault(j, [])
                table = st.crcs.get(j) if st is not None else None
                a = parts[0][0]
                b = parts[-1][0] + len(parts[-1][1])      # (runs in page order)
                if len(parts) > 1 and table is not None and b <= len(table) \
                        and b - a <= _JOIN_CRC_ENTRIES:
                    joined = table[a:b].astype("<u4")       # a copy
                    for p0, vals in parts:
                        joined[p0 - a:p0 - a + len(vals)] = vals
                    ops.append(_crc_op(obj.loc[j], meta, a, joined))
                    continue
                ops.extend(_crc_op(obj.loc[j], meta, p0, vals) for p0, vals in parts)
        finally:
            if st is not None:
                self.states.unpin(st)

    def _delta_rows(self, obj: _Obj, group: list[int], rows: dict[int, dict[int, bool]],
                    recon: set[int], plan: list, ext: list[int], lim: list[int], paths: list,
                    shard_ops: dict[int, list[FileOp]], crcs: dict[int, list]) -> bool:
        """Read, encode and build the page ops of some rows of a _delta_batch
        (sorted; side by side in a few arrays, a row's pages at its slot)
        and of the ranges ``plan``, all of whose rows are among them; their
        checksums go to ``crcs`` (for _crc_ops)."""
        k, m = self.k, self.m
        G = len(group)
        slot = {q: t for t, q in enumerate(group)}
        data = np.zeros((k, G * PAGE), dtype=np.uint8)      # old, then new, data pages
        par = np.empty((m, G * PAGE), dtype=np.uint8)
        # what each row reads: a delta row its changed data pages and its
        # parity; a rebuilt row the pages it does not change and those it
        # changes in part
        reads: list[list[int]] = [[] for _ in range(k)]
        for t, q in enumerate(group):
            pages = rows[q]
            if q in recon:
                for x in range(k):
                    if (x not in pages and q < lim[x]) or pages.get(x) is False:
                        reads[x].append(t)
            else:
                for x in pages:
                    reads[x].append(t)
        dslots = [t for t, q in enumerate(group) if q not in recon]
        # every shard was usable when the batch began (_delta_batch; a
        # failed apply or a new map generation drops the state, so later
        # groups find none and read the long way): the kept state serves
        # each run if it can, one pin for them all; a shard never written
        # in this incarnation (vector 0) is zeros, whatever files an
        # earlier one left: _read_pages says so without reading them
        st = self.states.pin(obj.name, obj.gen) if self.states is not None else None
        vector = obj.info.vector
        try:
            def read(j: int, a: int, b: int, out: np.ndarray) -> bool:
                q0, q1 = group[a], group[b - 1] + 1
                if st is not None and vector[j] and \
                        self._read_kept(st, j, q0, q1, out, "write"):
                    return True
                bad = self._read_pages(obj, j, q0, q1, out, "write", kept=False)
                return bad is not None and not bad.any()

            for x in range(k):
                for a, b in _slot_runs(group, reads[x]):
                    if not read(x, a, b, data[x, a * PAGE:b * PAGE]):
                        return False
            for a, b in _slot_runs(group, dslots):
                for x in range(m):
                    if not read(k + x, a, b, par[x, a * PAGE:b * PAGE]):
                        return False
        finally:
            if st is not None:
                self.states.unpin(st)
        old = data.copy()
        for d, i, lo, q0, q1 in plan:
            # the range's rows are consecutive slots of the group (its pages
            # are all rows of the batch, and groups never cut a range)
            x0 = slot[q0] * PAGE + lo - q0 * PAGE
            data[i, x0:x0 + len(d)] = np.frombuffer(d, dtype=np.uint8)
        # the codec's input: a delta row's change, a rebuilt row's data
        delta = np.bitwise_xor(data, old, out=old)
        pd = np.empty((m, G * PAGE), dtype=np.uint8)
        if len(dslots) == G:
            self.codec.encode_into(list(delta), list(pd))
            np.bitwise_xor(par, pd, out=par)
        else:
            rmask = np.array([q in recon for q in group])
            dv, pv, ev = (x.reshape(len(x), G, PAGE) for x in (delta, par, pd))
            dv[:, rmask] = data.reshape(k, G, PAGE)[:, rmask]
            self.codec.encode_into(list(delta), list(pd))
            pv[:, ~rmask] ^= ev[:, ~rmask]
            pv[:, rmask] = ev[:, rmask]
        del old, delta, pd
        for x in range(k):
            # (copies: the ops keep what they write, and most of a data
            # row is pages this batch does not write)
            mine = [t for t, q in enumerate(group) if x in rows[q]]
            self._run_ops(obj, x, group, mine, data[x], ext, paths, shard_ops, crcs, copy=True)
        every = list(range(G))
        for x in range(m):
            self._run_ops(obj, k + x, group, every, par[x], ext, paths, shard_ops, crcs)
        return True

    def _run_ops(self, obj: _Obj, j: int, group: list[int], slots: list[int], src: np.ndarray,
                 ext: list[int], paths: list, shard_ops: dict[int, list[FileOp]],
                 crcs: dict[int, list], copy: bool = False) -> None:
        """The page writes of shard j's pages at ``slots`` of a row group,
        from its row ``src`` of the group's arrays, and their checksums
        (into ``crcs``: one checksum call for the row when every slot is
        written, as for parity; else one per run)."""
        runs = _slot_runs(group, slots)
        if not runs:
            return          # (a shard without a page here is not touched: no header)
        whole = sf.page_crcs(src) if len(slots) == len(group) else None
        ops = shard_ops.setdefault(j, [])
        parts = crcs.setdefault(j, [])
        for a, b in runs:
            buf = src[a * PAGE:b * PAGE]
            if copy:
                buf = buf.copy()
            vals = whole[a:b] if whole is not None else sf.page_crcs(buf, b - a)
            q0, q1 = group[a], group[b - 1] + 1
            ops.extend(_page_ops(obj.loc[j], paths[j], q0, buf, vals,
                                 min(q1 * PAGE, ext[j]), crc=False))
            parts.append((q0, vals))

    def _stripe_ops(self, obj: _Obj, offset: int, data: memoryview, C: int,
                    size: int) -> dict[int, list[FileOp]]:
        """Plan, read and encode a write of ``data`` at ``offset`` (object
        size ``size`` after it): the page and checksum writes per shard."""
        end = offset + len(data)
        old_size = obj.info.object_size if obj.info else 0
        P, KC = C // PAGE, self.k * C
        s0, s1 = offset // KC, (end - 1) // KC
        win = _Window(self.width, self.k, C, s0, s1)
        old_ext = self._extents(old_size, C)
        new_ext = self._extents(size, C)
        self._mark_known_zero(win, old_ext)

        # changed bytes and pages of each data shard
        chg = [self._shard_extent(offset, end, i, self.k, C) for i in range(self.k)]
        degraded = obj.info is not None and not all(
            self._is_usable(obj, j) for j in range(self.width))
        if not self.codec.flags & FLAG_PARITY_DELTA:
            degraded = True     # no deltas: reconstruct/full only

        plans = []   # (stripe, mode, r0, r1) rows absolute
        req: dict[int, list[tuple[int, int]]] = {}
        for s in sorted({s0, s1}):
            plans.append(self._plan_stripe(s, P, C, chg, old_ext, offset, end, degraded, req))
        if s1 - s0 > 1:
            plans.append((s0 + 1, "reconstruct", (s0 + 1) * P, s1 * P))
        self._fetch(obj, win, req, "write")

        # new data into the window, keeping the old copy of delta rows
        delta_rows = [(r0, r1) for (_, mode, r0, r1) in plans if mode == "delta"]
        old_copy = {(r0, r1): win.bufs[: self.k, (r0 - win.row0) * PAGE:(r1 - win.row0) * PAGE].copy()
                    for r0, r1 in delta_rows}
        self._overlay(win, data, offset, s0)

        writes: dict[int, list[tuple[int, int]]] = {j: [] for j in range(self.width)}
        for s, mode, r0, r1 in plans:
            if r1 <= r0:
                continue
            a, b = (r0 - win.row0) * PAGE, (r1 - win.row0) * PAGE
            if mode == "delta":
                old = old_copy[(r0, r1)]
                deltas = {i: np.bitwise_xor(old[i], win.bufs[i, a:b]) for i in range(self.k)
                          if _overlaps(chg[i], r0 * PAGE, r1 * PAGE)}
                pd = self.codec.parity_deltas(deltas)
                for j in range(self.m):
                    np.bitwise_xor(win.bufs[self.k + j, a:b], pd[j], out=win.bufs[self.k + j, a:b])
            else:
                self.codec.encode_into([win.bufs[i, a:b] for i in range(self.k)],
                                       [win.bufs[self.k + j, a:b] for j in range(self.m)])
            self.counters.add(f"writes_{'reconstruct' if mode in ('reconstruct', 'degraded') else mode}")
            for i in range(self.k):
                if mode == "full":
                    lo, hi = r0 * PAGE, r1 * PAGE
                else:
                    lo, hi = max(chg[i][0], r0 * PAGE), min(chg[i][1], r1 * PAGE)
                if hi > lo:
                    writes[i].append((lo // PAGE, -(-hi // PAGE)))
            for j in range(self.k, self.width):
                writes[j].append((r0, r1))

        shard_ops: dict[int, list[FileOp]] = {}
        runs_of = {}
        for j in range(self.width):
            lim = -(-new_ext[j] // PAGE)
            runs_of[j] = [(p0, min(p1, lim)) for p0, p1 in _merge(writes[j]) if min(p1, lim) > p0]
        # The ops keep what they write alive until the commit, and a flush
        # builds the ops of many extents before it: a few pages out of a
        # stripe's window are copied out, not kept as views of all of it
        # (a 4 KiB extent's window is a whole stripe, 384 KiB in 4+2).
        compact = 4 * PAGE * sum(p1 - p0 for r in runs_of.values() for p0, p1 in r) \
            < win.bufs.nbytes
        for j, runs in runs_of.items():
            if not runs:
                continue
            paths = sf.rel_paths(obj.name, j)
            jops = shard_ops[j] = []
            for p0, p1 in runs:
                buf = win.pages(j, p0, p1)
                if compact:
                    buf = buf.copy()
                jops += _page_ops(obj.loc[j], paths, p0, buf, sf.page_crcs(buf),
                                  min(p1 * PAGE, new_ext[j]))
        return shard_ops

    def _drop_leftovers(self, obj: _Obj, j: int) -> list[FileOp]:
        """Before the first write of shard j in this incarnation of the object
        (its vector entry is 0: it holds nothing), empty whatever file an
        earlier incarnation left there while its OSD was down, so no old page
        or checksum can show through the new shard."""
        if obj.info is not None and obj.info.vector[j] != 0:
            return []
        rd, rm = sf.rel_paths(obj.name, j)
        osd = obj.loc[j]
        return [FileOp(OP_TRUNCATE, osd, rd, 0), FileOp(OP_TRUNCATE, osd, rm, sf.crc_offset(0))]

    def _writable(self, obj: _Obj, j: int) -> bool:
        """Shard j can take writes now: its OSD is up (or recovering) and
        it is current."""
        if not self.osdmap.writable(obj.loc[j]):
            return False
        return obj.info is None or self._is_usable(obj, j)

    def _plan_stripe(self, s, P, C, chg, old_ext, offset, end, degraded, req):
        """Choose the write mode of a (possibly partial) stripe and add the
        page reads it needs to ``req``."""
        base = s * C
        rows_lo, rows_hi = None, None
        full_pages, part_pages = {}, {}
        for i in range(self.k):
            lo, hi = max(chg[i][0], base), min(chg[i][1], base + C)
            if hi <= lo:
                continue
            p_lo, p_hi = lo // PAGE, -(-hi // PAGE)
            rows_lo = p_lo if rows_lo is None else min(rows_lo, p_lo)
            rows_hi = p_hi if rows_hi is None else max(rows_hi, p_hi)
            f_lo, f_hi = -(-lo // PAGE), hi // PAGE      # fully overwritten pages
            full_pages[i] = (f_lo, max(f_lo, f_hi))
            part_pages[i] = (p_lo, p_hi)
        if rows_lo is None:
            return (s, "reconstruct", 0, 0)
        if offset <= s * self.k * C and end >= (s + 1) * self.k * C:
            # the whole stripe is new: encode it, read nothing, whatever the mode
            return (s, "reconstruct", s * P, (s + 1) * P)

        def known(j, p0, p1):
            """Pages of [p0, p1) of shard j that hold data (below its old extent)."""
            lim = -(-old_ext[j] // PAGE)
            return max(0, min(p1, lim) - p0)

        def recon_reads(r0, r1):
            n, rq = 0, {}
            for i in range(self.k):
                f_lo, f_hi = full_pages.get(i, (r1, r1))
                f_lo, f_hi = max(f_lo, r0), min(f_hi, r1)
                spans = [(r0, r1)] if f_hi <= f_lo else [(r0, f_lo), (f_hi, r1)]
                for a, b in spans:
                    cnt = known(i, a, b)
                    if cnt:
                        n += cnt
                        rq.setdefault(i, []).append((a, a + cnt))
            return n, rq

        def delta_reads():
            n, rq = 0, {}
            for i, (p_lo, p_hi) in part_pages.items():
                cnt = known(i, p_lo, p_hi)
                if cnt:
                    n += cnt
                    rq.setdefault(i, []).append((p_lo, p_lo + cnt))
            for j in range(self.k, self.width):
                cnt = known(j, rows_lo, rows_hi)
                if cnt:
                    n += cnt
                    rq.setdefault(j, []).append((rows_lo, rows_lo + cnt))
            return n, rq

        mode = self.write_mode
        if mode == "mixed":
            mode = self._rng.choice(("delta", "reconstruct", "full"))
        if degraded and mode in ("delta", "auto"):
            mode = "reconstruct"
        if mode == "full":
            r0, r1 = s * P, (s + 1) * P
            _, rq = recon_reads(r0, r1)
        elif mode == "reconstruct":
            r0, r1 = rows_lo, rows_hi
            _, rq = recon_reads(r0, r1)
        else:
            nd, rqd = delta_reads()
            r0, r1 = rows_lo, rows_hi
            if mode == "auto":
                nr, rqr = recon_reads(r0, r1)
                if nr < nd:
                    mode, rq = "reconstruct", rqr
                else:
                    mode, rq = "delta", rqd
            else:
                rq = rqd
        for j, ranges in rq.items():
            req.setdefault(j, []).extend(ranges)
        return (s, mode, r0, r1)

    def _overlay(self, win: _Window, data: memoryview, offset: int, s0: int) -> None:
        """Copy the written bytes into the data shards of the window."""
        KC, C = self.k * win.C, win.C
        src = np.frombuffer(data, dtype=np.uint8)
        view = win.data_view()            # (stripe, chunk, byte), a view
        a = offset - s0 * KC
        b = a + len(src)
        first_full = -(-a // KC)
        last_full = b // KC               # exclusive
        if first_full < last_full:
            n = last_full - first_full
            view[first_full:last_full] = src[first_full * KC - a:last_full * KC - a].reshape(n, self.k, C)
            edges = [(a, first_full * KC), (last_full * KC, b)]
        else:
            edges = [(a, b)]
        for x0, x1 in edges:
            x = x0
            while x < x1:
                s, r = divmod(x, KC)
                i, c = divmod(r, C)
                n = min(C - c, x1 - x)
                view[s, i, c:c + n] = src[x - a:x - a + n]
                x += n

    def _next_version(self, obj: _Obj) -> int:
        if obj.info is None:
            # versions are time-based so a re-created object never shares one
            # with leftovers of an earlier incarnation
            return time.time_ns()
        return obj.info.object_version + 1

    def _header_ops(self, obj: _Obj, C: int, size: int, version: int,
                    touched: set[int]) -> tuple[list[FileOp], sf.ShardHeader]:
        writable = [j for j in range(self.width) if self._writable(obj, j)]
        # min_size and the info shard count up OSDs only: a recovering OSD's
        # shards are written, but nothing counts on them (backend/osdmap.py)
        up = [j for j in writable if self.osdmap.is_up(obj.loc[j])]
        need = self.pool.write_min
        if len(up) < need or not set(up) & set(self.info_shards):
            # as Ceph's min_size: below it a write is refused, so a write
            # that returned always has redundancy left (at K it could never
            # survive one more loss)
            raise DataUnavailable(f"object {obj.name!r}: only {len(up)} of {self.width} "
                                  f"shards can be written (need {need}, the pool's min_size, "
                                  f"and an info shard)")
        vec = list(obj.info.vector) if obj.info else [0] * self.width
        for j in touched:
            vec[j] = version
        ops = []
        info = sf.ShardHeader(shard=0, k=self.k, m=self.m, name=obj.name, info=True,
                              object_version=version, object_size=size, chunk_size=C,
                              vector=vec)
        for j in sorted(set(self.info_shards) | touched):
            if not self._writable(obj, j):
                continue
            osd = obj.loc[j]
            h = sf.ShardHeader(shard=j, k=self.k, m=self.m, name=obj.name,
                               shard_version=vec[j], info=j in self.info_shards,
                               object_version=version, object_size=size, chunk_size=C,
                               vector=vec)
            ops.append(FileOp(OP_WRITE, osd, sf.rel_paths(obj.name, j)[1], 0, h.pack()))
        return ops, info

    def _unlink_ops(self, obj: _Obj) -> list[FileOp]:
        ops = []
        for j in range(self.width):
            osd = obj.loc[j]
            if self.osdmap.writable(osd):
                rd, rm = sf.rel_paths(obj.name, j)
                ops += [FileOp(OP_UNLINK, osd, rd), FileOp(OP_UNLINK, osd, rm)]
        return ops

    def _rewrite(self, obj: _Obj, content: np.ndarray, size: int, C: int) -> None:
        """Replace the whole object (put, restripe): no reads, every shard new."""
        KC = self.k * C
        version = self._next_version(obj)
        ops = self._unlink_ops(obj) if obj.info is not None else []
        stored = min(len(content), size)
        nstripes = -(-stored // KC)
        touched = set()
        if nstripes:
            win = _Window(self.width, self.k, C, 0, nstripes - 1)
            self._overlay(win, memoryview(content[:stored]), 0, 0)
            self.codec.encode_into([win.bufs[i] for i in range(self.k)],
                                   [win.bufs[self.k + j] for j in range(self.m)])
            data_ext = self._extents(stored, C)
            for j in range(self.width):
                n = data_ext[j]
                if not n:
                    continue
                pages = -(-n // PAGE)
                buf = win.bufs[j, : pages * PAGE]
                crcs = sf.page_crcs(buf)
                if not crcs.any():
                    continue       # all zero: keep the shard a hole
                touched.add(j)
                osd = obj.loc[j]
                if not self.osdmap.writable(osd):
                    continue
                rd, rm = sf.rel_paths(obj.name, j)
                ops += self._drop_leftovers(obj, j) if obj.info is None else []
                for a, b in _runs(np.flatnonzero(crcs)):
                    # sparse: runs of non-zero pages only
                    ops.append(FileOp(OP_WRITE, osd, rd, a * PAGE, buf[a * PAGE:min(b * PAGE, n)].tobytes()))
                ops.append(FileOp(OP_WRITE, osd, rm, sf.crc_offset(0), crcs.astype("<u4").tobytes()))
        self.counters.add("writes_full")
        obj.info = None       # a fresh vector: only the new content's shards
        obj.usable = {}
        hops, hdr = self._header_ops(obj, C, size, version, touched)
        self._commit(obj, (ops + hops, hdr))

    def _shrink(self, obj: _Obj, size: int) -> None:
        """Cut the object to ``size``: zero the tail of the last kept stripe
        (so parity stays right) and trim shard files, in one transaction."""
        C = obj.info.chunk_size
        KC = self.k * C
        old = obj.info.object_size
        stripe_end = min(old, -(-size // KC) * KC)
        ext = self._extents(size, C)
        old_ext = self._extents(old, C)
        # every shard that loses bytes takes the new version, so a copy that
        # could not be trimmed now (its OSD is down) is stale, never current
        # with its old tail still in it
        shrunk = {j for j in range(self.width) if ext[j] < old_ext[j] and obj.info.vector[j]}
        trims = []
        for j in range(self.width):
            osd = obj.loc[j]
            if not self._writable(obj, j):
                continue
            rd, rm = sf.rel_paths(obj.name, j)
            keep = -(-ext[j] // PAGE)
            trims.append(FileOp(OP_TRUNCATE, osd, rd, ext[j]))
            trims.append(FileOp(OP_TRUNCATE, osd, rm, sf.crc_offset(keep)))
        if stripe_end > size:
            self._write_locked(obj, size, memoryview(bytes(stripe_end - size)),
                               new_size=size, tail_ops=trims, tail_touched=shrunk)
        else:
            ops, hdr = self._header_ops(obj, C, size, obj.info.object_version + 1, shrunk)
            self._commit(obj, (trims + ops, hdr))

    # ---------------------------------------------------------------- commit
    def _commit(self, obj: _Obj, txn, kind: str = "write", version: int | None = None) -> None:
        """Journal, sync and apply a transaction under the object's metadata
        lock. ``txn`` is (ops, new info header or None), or a function of
        the object's current view returning that: a writer holding only
        some stripes builds its header from what is committed now."""
        if self.readonly:
            raise StoreError("store opened read-only")
        self._dirty = True
        with self.locks.meta(obj.slot):
            plan_gen = obj.gen
            if callable(txn):
                cur = obj if obj.whole else self._load(obj.name, obj.slot)
                plan_gen = cur.gen
                txn = txn(cur)
            ops, hdr = txn
            if hdr is not None:
                version = hdr.object_version
            elif version is None:
                # a repair or recovery step: the object stays at its version
                cur = obj if obj.whole else self._load(obj.name, obj.slot)
                version = cur.info.object_version if cur.info is not None else 0
            self._commit_locked(obj, Record(obj.name, obj.slot, ops, version), hdr, kind,
                                plan_gen)
        if self.journal.size() > JOURNAL_LIMIT:
            self._ckpt_due = True

    def _commit_locked(self, obj: _Obj, rec: Record, hdr: sf.ShardHeader | None,
                       kind: str, plan_gen: int | None = None) -> None:
        with self.locks.commit_gate():
            if kind == "write" and plan_gen is not None:
                # An OSD came up (or went down) between planning and now: the
                # plan left out shards it could write now and would log them
                # as missed (an OSD just brought up would be behind again).
                # Nothing is journaled yet: plan again (see _replanning).
                self.osdmap.maybe_refresh()
                # obj.loc: where the planned ops write (a writer of some
                # stripes reloads its header view at commit, on the new map)
                if self.osdmap.generation != plan_gen or \
                        obj.loc != self.osdmap.place(obj.name, self.width):
                    raise _Replan()
            elif kind != "write":
                # a repair or recovery planned before an 'osd add' or 'rm'
                # switched placement would write the shards' old homes
                self.osdmap.maybe_refresh()
                if obj.loc != self.osdmap.place(obj.name, self.width):
                    raise PlacementMoved(f"object {obj.name!r}: the OSD set changed ('osd add' "
                                         f"or 'osd rm') during this {kind}; nothing written: "
                                         f"run it again")
            for prefix, check in list(self._guards.items()):
                if obj.name.startswith(prefix):
                    check()         # e.g. an image's lock epoch (fencing): may raise
            if kind != "repair":
                # a full OSD refuses the whole transaction before anything is
                # journaled (a repair of a read is small and must not fail it)
                needs: dict[int, int] = {}
                for op in rec.ops:
                    if op.type == OP_WRITE:
                        needs[op.osd] = needs.get(op.osd, 0) + len(op.data)
                # a removal or discard (no data written, only headers and
                # checksums beside unlinks and holes) may use the reserve
                frees = not any(op.type == OP_WRITE and not op.path.endswith(".meta")
                                for op in rec.ops)
                self.space.check(needs, frees=frees)
            self._note_missed(obj)
            if kind == "write" and obj.info is not None and any(
                    obj.info.vector[j] and self.osdmap.is_up(obj.loc[j])
                    and not self._is_usable(obj, j) for j in range(self.width)):
                self._stale.add(obj.name)       # rebuilt after it (_heal_stale)
            self._fault_point("commit_before", rec.name)
            self.locks.set_inflight(obj.slot, True)
            self._crashpoint()
            try:
                ticket, nbytes = self.journal.append(rec)
            except BaseException as e:
                self.locks.set_inflight(obj.slot, False)    # nothing of it is anywhere
                if not isinstance(e, OSError):
                    raise
                if e.errno == errno.ENOSPC:
                    raise NoSpace(f"journal {self.journal.path}: no space left; "
                                  f"the write is refused")
                raise StoreError(f"journal {self.journal.path}: {e.strerror or e}")
            self._crashpoint()
            if self.journal.wait_durable(ticket):
                self.counters.add("fsyncs")
            self.counters.add_many((("journal_records", 1), ("journal_bytes", nbytes)))
            self._crashpoint()
            self._fault_point("commit_after", rec.name)
            self._apply(rec, counted=True, kind=kind)
            self.locks.set_inflight(obj.slot, False)
        if hdr is not None:
            obj.info = hdr
            # the shards whose headers this wrote are current; the rest are
            # asked again (obj.info is no shard's own header: never trust it
            # as shard 0's, whose write may have been left out)
            obj.usable = {}
            for op in rec.ops:
                if op.type == OP_WRITE and op.offset == 0 and op.path.endswith(".meta") \
                        and self.osdmap.writable(op.osd):
                    obj.usable[sf.parse_shard_filename(op.path[:-len(".meta")])[1]] = True

    def _apply(self, rec: Record, counted: bool, kind: str = "write") -> None:
        """Apply a transaction's ops to the shard files, between the two
        steps of the slot's commit counter (backend/objstate.py). A write
        goes through the object's kept state, if valid, which then follows
        what was written. Repair and recovery go by path (they exist to
        recreate files that may have been deleted, which a kept fd would
        not see) and drop the state."""
        st = where = None
        if self.states is not None:
            if kind == "write":
                st = self.states.pin(rec.name, self.osdmap.generation)
                where = _where(rec.name, self.width) if st is not None else None
            else:
                self.states.drop(rec.name)
        seq0 = self.seq.begin(rec.slot) if self.seq else 0
        ok = False
        try:
            ok = self._apply_ops(rec, counted, kind, st, where)
        finally:
            if st is not None:
                if ok and st.gen == self.osdmap.generation:
                    self.states.follow(st, seq0, lambda s: self._follow(s, rec, where))
                else:
                    self.states.drop(rec.name)
                self.states.unpin(st)
                if self.states.page_budget is not None:
                    self.counters.set("page_cache_bytes", self.states.page_bytes())
            if self.seq:
                self.seq.end(rec.slot)

    def _apply_ops(self, rec: Record, counted: bool, kind: str, st: ObjState | None,
                   where: dict | None) -> bool:
        """The ops of ``apply`` (through ``st``'s kept fds, ``where``
        naming its shard files); True when every one reached its file."""
        ok = True
        failed: set[int] = set()
        armed = self.faults.armed()
        writes = write_bytes = meta_writes = 0
        try:
            for op in rec.ops:
                path = self.osdmap.paths.get(op.osd)     # (a refresh may replace the map)
                if path is None or not _shard_relpath(op.path):
                    continue
                if op.osd in failed:
                    # after a failed op, none of the OSD's: a header or checksum
                    # written after a lost data write would call the shard current
                    continue
                if not (self.osdmap.writable(op.osd) or op.osd in self._recovering):
                    # e.g. replay with a disk late to appear: its shard is
                    # stale now, and its return must rebuild it
                    self._log_missed(op.osd, rec.name)
                    failed.add(op.osd)
                    ok = False
                    continue
                shard = where.get(op.path) if where is not None else None
                if shard is not None and st.loc[shard[0]] != op.osd:
                    shard = None
                full = os.path.join(path, op.path)
                try:
                    if op.type == OP_WRITE:
                        fd = self._kept_fd(st, *shard, create=True) if shard is not None else None
                        if armed:
                            self.faults.on_write(full, op.offset, len(op.data))
                        _write_shard(full, fd, op.data, op.offset)
                    elif op.type == OP_TRUNCATE:
                        try:
                            if os.stat(full).st_size > op.offset:
                                os.truncate(full, op.offset)
                        except FileNotFoundError:
                            pass
                    elif op.type == OP_UNLINK:
                        if shard is not None:
                            self.states.forget_fd(st, st.mfds if shard[1] else st.fds,
                                                  shard[0])
                        try:
                            os.unlink(full)
                        except FileNotFoundError:
                            pass
                    elif op.type == OP_PUNCH:
                        sf.punch_hole(full, op.offset, PUNCH_LEN.unpack(op.data)[0])
                except OSError as e:
                    ok = False
                    if op.osd in self._recovering:
                        raise StoreError(f"osd.{op.osd}: cannot write {full}: "
                                         f"{e.strerror or e}")
                    if not os.path.isdir(path):
                        self.osdmap.refresh()
                    if e.errno == errno.ENOSPC:
                        self.space.forget()
                    self._osd_failed(op.osd, e)
                    failed.add(op.osd)
                    # before the write is acknowledged: the shard missed it
                    self._log_missed(op.osd, rec.name)
                    continue
                if counted and op.type in (OP_WRITE, OP_PUNCH):
                    if op.path.endswith(".meta"):
                        meta_writes += 1
                    else:
                        writes += 1
                        if op.type == OP_WRITE:
                            write_bytes += len(op.data)
                self._crashpoint()
        finally:
            # what reached its file, counted once (a crash point may end the
            # process here: what it counted then dies with it)
            if writes or meta_writes:
                self.counters.add_many((("shard_writes", writes),
                                        (f"{kind}_shard_writes", writes),
                                        ("shard_write_bytes", write_bytes),
                                        ("meta_writes", meta_writes)))
        return ok

    def _follow(self, st: ObjState, rec: Record, where: dict) -> None:
        """Bring a kept state up to what ``rec`` wrote (under the state
        cache's lock, the counter odd): headers written are taken from
        the ops, kept checksum tables take the entries written (or are
        forgotten, to be read again), and the shards are judged again.
        Anything else a sidecar went through (cut into its header)
        raises: the state is dropped."""
        hdrs = dict(st.hdrs)
        absent, bad = set(st.absent), set(st.bad_header)
        for op in rec.ops:
            shard = where.get(op.path)
            if shard is None:
                continue
            i, meta = shard
            if not meta:
                self._follow_pages(st, i, op)
                continue
            if op.type == OP_WRITE:
                if op.offset == 0:
                    if len(op.data) < sf.HEADER_SIZE:
                        raise ValueError("a part of a header written")
                    hdrs[i] = sf.ShardHeader.unpack(bytes(op.data[:sf.HEADER_SIZE]))
                    absent.discard(i)
                    bad.discard(i)
                    if len(op.data) > sf.HEADER_SIZE:
                        st.crcs.pop(i, None)
                else:
                    _follow_crcs(st, i, op)
            elif op.type == OP_UNLINK:
                hdrs[i] = None
                st.crcs.pop(i, None)
                if i in self.info_shards:
                    absent.add(i)
            elif op.offset >= sf.HEADER_SIZE:      # truncate or punch of the table
                st.crcs.pop(i, None)
            else:
                raise ValueError("a header cut")
        self.states.trim_state(st)
        obj = _Obj(st.name, st.slot, st.loc, gen=st.gen)
        obj.absent, obj.bad_header = absent, bad
        self._judge(obj, hdrs)
        st.hdrs, st.info, st.usable = hdrs, obj.info, obj.usable
        st.absent, st.bad_header = obj.absent, obj.bad_header

    def _follow_pages(self, st: ObjState, i: int, op: FileOp) -> None:
        """The kept pages of shard i after ``op`` on its data file: whole
        pages written are kept (what a later overwrite's plan would read:
        the old data and parity), anything else the op touched is
        forgotten."""
        if op.osd != st.loc[i] or op.type == OP_UNLINK:
            self.states.drop_pages(st, i)
        elif op.type == OP_WRITE:
            p0, n = op.offset // PAGE, len(op.data) // PAGE
            if op.offset % PAGE:
                self.states.drop_pages(st, i, p0, -(-(op.offset + len(op.data)) // PAGE))
                return
            if n:
                self.states.set_pages(st, i, p0, op.data[:n * PAGE])
            if len(op.data) % PAGE:     # a page cut at the shard's end: not kept
                self.states.drop_pages(st, i, p0 + n, p0 + n + 1)
        elif op.type == OP_TRUNCATE:
            self.states.drop_pages(st, i, op.offset // PAGE)
        else:                           # a hole punched
            self.states.drop_pages(st, i, op.offset // PAGE,
                                   -(-(op.offset + PUNCH_LEN.unpack(op.data)[0]) // PAGE))

    def _kept_fd(self, st: ObjState, i: int, meta: bool, create: bool = False) -> int | None:
        """Shard i's data file (or sidecar) of the pinned state ``st``,
        opened on first use and kept; None when it cannot be kept (not
        there, or not writable: the caller goes by path, as without a
        state, and meets the error there)."""
        table = st.mfds if meta else st.fds
        fd = table.get(i)
        if fd is not None:
            return fd
        root = self.osdmap.paths.get(st.loc[i])
        if root is None:
            return None
        path = os.path.join(root, sf.rel_paths(st.name, i)[meta])
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0), 0o600)
        except OSError:
            return None
        return self.states.add_fd(st, table, i, fd)

    def _note_missed(self, obj: _Obj) -> None:
        """Before a transaction is journaled: every OSD of the object that
        is away misses it; log that, so its return rebuilds this object. A
        recovering OSD misses it only where its shard is stale (a current
        one is written like an up OSD's)."""
        for j, osd in enumerate(obj.loc):
            if self.osdmap.is_up(osd) or osd in self._recovering:
                continue
            if self.osdmap.is_recovering(osd) and self._writable(obj, j):
                continue
            self._log_missed(osd, obj.name)

    def _check_identity(self, osds) -> None:
        """Before writing to an OSD directory: is it still the one opened?
        A disk unmounted, or another directory mounted over the path, shows
        as a new (st_dev, st_ino); it is judged again by its osd.json (this
        store's fsid and this OSD's id) and marked down unless it passes,
        so a foreign or empty directory is never written into."""
        for osd in osds:
            path = self.osdmap.paths.get(osd)
            if path is None or not self.osdmap.writable(osd):
                continue                # (not in the pool any more: 'osd rm')
            try:
                st = os.stat(path)      # one stat per OSD per load: the fd's own is kept
                with self._osd_fd_lock:     # a checkpoint closes removed OSDs' fds
                    fd = self._osd_fds.get(osd)
                    if fd is None:
                        continue
                    if (st.st_dev, st.st_ino) == self._osd_id(osd, fd):
                        continue
                why = self.osdmap.check_dir(osd, path)
            except OSError as e:
                why = f"directory unreachable: {e.strerror or e}"
            if why:
                _log.error("osd.%d: %s is not the directory opened as osd.%d (%s); "
                           "marked down", osd, path, osd, why)
                self.osdmap.mark_down(osd, f"directory replaced: {why}")
                continue
            try:     # the same OSD, mounted again: follow it
                with self._osd_fd_lock:
                    if self._osd_fds.get(osd) == fd:
                        self._osd_fds[osd] = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
                        os.close(fd)
            except OSError:
                pass

    def _osd_id(self, osd: int, fd: int) -> tuple[int, int]:
        """(st_dev, st_ino) of the directory fd kept for ``osd`` (it cannot
        change while the fd is open: asked once per fd)."""
        got = self._osd_ident.get(osd)
        if got is None or got[0] != fd:
            st = os.fstat(fd)
            got = self._osd_ident[osd] = (fd, (st.st_dev, st.st_ino))
        return got[1]

    def _log_missed(self, osd: int, name: str) -> None:
        try:
            self.missed.record(osd, name)
        except OSError as e:
            raise StoreError(f"cannot log that osd.{osd} missed a write of {name!r} "
                             f"({e.strerror or e}); the write is not acknowledged")

    def add_guard(self, prefix: str, check) -> None:
        """Run ``check()`` before committing any transaction on an object
        whose name starts with ``prefix``, under the commit gate (a
        checkpoint-gate holder sees no commit between its change and the
        checks that follow). An exception from it aborts the transaction."""
        self._guards[prefix] = check

    def remove_guard(self, prefix: str) -> None:
        self._guards.pop(prefix, None)

    def begin_recovery(self, osd: int) -> None:
        """Let transactions write to ``osd`` although it is not up
        (backend/recovery.py rebuilds its shards)."""
        self._recovering.add(osd)

    def end_recovery(self, osd: int) -> None:
        self._recovering.discard(osd)

    def _fault_point(self, at: str, name: str) -> None:
        """An injected fault at a commit point (backend/faults.py): an
        error there refuses the transaction, nothing journaled."""
        try:
            self.faults.point(at, name)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise NoSpace(f"object {name!r}: {e.strerror}") from None
            raise StoreError(f"object {name!r}: {e.strerror}") from None

    def _crashpoint(self) -> None:
        """Fault injection for crash tests: ECFS_CRASH_AT=N SIGKILLs this
        process at the Nth point between journal and apply steps."""
        if not self._crash_at:
            return
        with self._crash_lock:
            self._crash_n += 1
            if self._crash_n == self._crash_at:
                os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------------------ helpers
_libc = None


def syncfs(fd: int) -> None:
    """syncfs(2) on the file system of ``fd``; OSError when it reports a
    writeback error (Linux >= 5.8 does)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _osds_of(recs: list[Record]) -> set[int]:
    return {op.osd for rec in recs for op in rec.ops}


def amplification(c: dict[str, int]) -> dict[str, float]:
    ops = c["client_read_ops"] + c["client_write_ops"]
    cb = c["client_read_bytes"] + c["client_write_bytes"]
    return {
        "shard_ios_per_op": (c["shard_reads"] + c["shard_writes"]) / ops if ops else 0.0,
        "shard_reads_per_read": c["read_shard_reads"] / c["client_read_ops"] if c["client_read_ops"] else 0.0,
        "shard_ios_per_write": (c["write_shard_reads"] + c["write_shard_writes"]) / c["client_write_ops"]
        if c["client_write_ops"] else 0.0,
        "byte_amplification": (c["shard_read_bytes"] + c["shard_write_bytes"]) / cb if cb else 0.0,
    }


def _listdir(p: str) -> list[str]:
    try:
        return os.listdir(p)
    except OSError:
        return []


def _no_data(fd: int, lo: int, hi: int) -> bool:
    """File bytes [lo, hi) are a hole (or past the end)."""
    try:
        return os.lseek(fd, lo, os.SEEK_DATA) >= hi
    except OSError as e:
        if e.errno == errno.ENXIO:      # no data at or after lo
            return True
        raise


def _pread_path(path: str, n: int, off: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, n, off)
    finally:
        os.close(fd)


def _follow_crcs(st: ObjState, i: int, op: FileOp) -> None:
    """A write into shard i's checksum table: the kept table takes the new
    entries (a copy: readers may hold the old one), or is forgotten when
    the write is not whole entries inside it (read again when needed)."""
    table = st.crcs.get(i)
    if table is None:
        return
    at, rem = divmod(op.offset - sf.crc_offset(0), 4)
    n = len(op.data) // 4
    if at < 0 or rem or len(op.data) % 4 or at + n > len(table):
        del st.crcs[i]
        return
    new = table.copy()
    new[at:at + n] = np.frombuffer(op.data, dtype="<u4")
    st.crcs[i] = new


def _where(name: str, width: int) -> dict[str, tuple[int, bool]]:
    """{shard file path relative to its OSD: (shard, is the sidecar)}."""
    out = {}
    for i in range(width):
        rd, rm = sf.rel_paths(name, i)
        out[rd], out[rm] = (i, False), (i, True)
    return out


def _write_shard(path: str, fd: int | None, data, off: int) -> None:
    """Every shard file write of a transaction: through the kept ``fd``
    of ``path`` when there is one, else by path (one seam for tests that
    inject write faults)."""
    if fd is None:
        _pwrite_path(path, data, off)
    else:
        _pwrite_all(fd, data, off)


def _pwrite_all(fd: int, data, off: int) -> None:
    mv = memoryview(data)
    while len(mv):
        n = os.pwrite(fd, mv, off)
        mv, off = mv[n:], off + n


def _pwrite_path(path: str, data, off: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    except FileNotFoundError:
        # create the fan-out directory only: a missing OSD directory (or its
        # objects/) is a failed OSD, never silently recreated
        try:
            os.mkdir(os.path.dirname(path), 0o700)
        except FileExistsError:
            pass
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        _pwrite_all(fd, data, off)
    finally:
        os.close(fd)


def _shard_relpath(p: str) -> bool:
    """A journal op may only name a shard file under the OSD's objects/."""
    parts = p.split("/")
    return len(parts) == 3 and parts[0] == "objects" and ".." not in parts and "" not in parts


def _crc_op(osd: int, meta: str, p0: int, crcs: np.ndarray) -> FileOp:
    """The write of stored checksums ``crcs`` for pages p0.. into the sidecar ``meta``."""
    return FileOp(OP_WRITE, osd, meta, sf.crc_offset(p0), crcs.astype("<u4").tobytes())


def _page_ops(osd: int, paths: tuple[str, str], p0: int, buf: np.ndarray, crcs: np.ndarray,
              stop: int, crc: bool = True) -> list[FileOp]:
    """Write pages p0.. of a shard (bytes up to ``stop``) and their
    checksums (``paths``: its data file and sidecar; ``crc=False``: the
    caller writes them): runs of all-zero pages (stored crc 0) become
    holes, the others one pwrite per run."""
    path, meta = paths
    tail = [_crc_op(osd, meta, p0, crcs)] if crc else []
    if crcs.all():
        # no zero page (the common case): one write, without the run search
        # (its five numpy calls were a tenth of a scattered flush's CPU)
        hi = min((p0 + len(crcs)) * PAGE, stop)
        if hi <= p0 * PAGE:
            return tail
        return [FileOp(OP_WRITE, osd, path, p0 * PAGE, memoryview(buf[:hi - p0 * PAGE]))] + tail
    zero = crcs == 0
    edges = np.flatnonzero(np.diff(zero.astype(np.int8))) + 1
    bounds = [0, *edges.tolist(), len(zero)]
    ops = []
    for a, b in zip(bounds, bounds[1:]):
        lo, hi = (p0 + a) * PAGE, min((p0 + b) * PAGE, stop)
        if hi <= lo:
            continue
        if zero[a]:
            ops.append(FileOp(OP_PUNCH, osd, path, lo, PUNCH_LEN.pack(hi - lo)))
        else:
            # a view of the window, not a copy: nothing changes the window
            # once its ops are built, and the ops keep it alive
            ops.append(FileOp(OP_WRITE, osd, path, lo, memoryview(buf[a * PAGE:hi - p0 * PAGE])))
    return ops + tail


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def _runs(pages: np.ndarray) -> list[tuple[int, int]]:
    """Contiguous runs [a, b) of sorted page numbers."""
    if not len(pages):
        return []
    breaks = np.flatnonzero(np.diff(pages) != 1)
    starts = np.concatenate(([0], breaks + 1))
    ends = np.concatenate((breaks, [len(pages) - 1]))
    return [(int(pages[s]), int(pages[e]) + 1) for s, e in zip(starts, ends)]


def _slot_runs(group: list[int], slots: list[int]) -> list[tuple[int, int]]:
    """Runs [a, b) of sorted ``slots`` that are consecutive both as slots
    and as the rows ``group[slot]`` they stand for (one read or write each)."""
    out: list[tuple[int, int]] = []
    for t in slots:
        if out and out[-1][1] == t and group[t] == group[t - 1] + 1:
            out[-1] = (out[-1][0], t + 1)
        else:
            out.append((t, t + 1))
    return out


def _overlaps(rng: tuple[int, int], a: int, b: int) -> bool:
    return rng[1] > rng[0] and rng[0] < b and rng[1] > a

"""The stripe cache: a bounded write-back cache in front of an ObjectStore.

The layer s3backer calls block_cache: it offers the store's own interface
(``read``, ``write``, ``zero``, ``write_full``, ``truncate``, ``remove``,
``stat``, ``exists``, ``list``, ``flush``; everything else is passed to
the store), so an image cannot tell it is there, except that ``write``
returns before its bytes are on the OSDs and ``flush`` is what makes them
durable (fsync, close, a lock hand-over).

Write-back is per name prefix: ``set_writeback(prefix, True)`` (an image
takes its exclusive lock: ``rbd_data.<id>.``); other names are written
through. Shared images (no exclusive lock, several writers) never turn it
on: another process's write would not see our dirty bytes.

Per object the cache keeps *extents*: runs of bytes written and not yet
flushed, byte-granular, so a 512-byte write needs no read of the rest of
its page; repeated writes to the same bytes coalesce (in place); extents
that touch, as sequential writes leave them, are joined when flushed and
leave as one store write (whole stripes: no reads). An object's state::

    state      dirty map   flushing map   on
    ---------  ----------  -------------  ------------------------------------
    clean      empty       empty          (entry dropped)
    dirty      extents     empty          write -> dirty; flush -> flushing
    flushing   any         extents        store writes under way, one flusher
                                          per object; writes go to the dirty
                                          map meanwhile (the flushing map is
                                          never changed, so what the store
                                          encodes is what it writes)
       flush ok:     flushing map dropped -> clean or dirty
       flush failed: flushing map put back under the dirty map -> dirty,
                     error kept for the next flush() of its prefix
       fenced:       both maps dropped (the lock was broken: its bytes must
                     never be written) -> clean, the error kept (the next
                     fsync or close fails: EIO)

Reads take the store's bytes and lay the object's flushing and then dirty
extents over them (newest last); a read inside one cached extent is served
from it (a hit: no shard read). Both maps are referenced before the store
read: a flush finishing meanwhile cannot leave the read with the store's
older bytes and no extent to correct them.

Bounds: dirty plus flushing bytes, plus room for the transactions of the
flushes (FLIGHT_COST times the bytes flying, at least an eighth of the
capacity and at most a quarter), never exceed the capacity when a write
is admitted; flushes under way hold
at most ``fly_limit`` (an eighth of it, at least 1 MiB) at once (one
always goes, however large). A write that
does not fit waits (backpressure) while the flusher writes the oldest
objects out; ``try_write`` instead says no, so the FUSE layer can run the
write in a worker thread. A write larger than a quarter of the cache is
written through. The flusher thread writes objects dirty longer than
``max_age`` seconds, and, when dirty bytes pass three quarters of the
cache or a writer waits, the oldest objects until they are under half.
An object's extents leave in few store transactions
(``ObjectStore.write_extents``: each one journal record, one version bump,
each header once; one per 64 page rows of overwrites inside chunks of an
object whose shards are all current), each extent wholly in one; objects are flushed concurrently
(``FLUSH_THREADS``) so their journal records share fdatasyncs (group
commit).

Crash safety is the store's: each flushed extent is one atomic store write,
so a crash loses at most writes no completed ``flush`` covered, and never
leaves a stripe whose parity disagrees with its data.

Clean pages (data and parity) are kept by the store below, in its object
states (backend/objstate.py, "Kept pages"; a pool of a quarter of the
capacity, backend/pagepool.py), within what the dirty bytes leave of the
capacity (at least an eighth of it, at most the pool; the budget is that
of the last cache opened over the store, and goes with it at close): an
overwrite of a page whose old data and parity are kept flushes with 0
shard reads, and a read of kept pages reads no shard.

Not yet here (issue 11): one journal record per flush batch of many
objects, and readahead.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from sortedcontainers import SortedDict

from .codec import give_back_heap
from .errors import EcfsError, Fenced, NotFound, StoreError

log = logging.getLogger("ecfs.cache")

MAX_AGE = 5.0          # seconds dirty data may wait for the flusher
# Two: one encodes and writes while the other waits for its fdatasync.
# More only fight over the GIL: through the mount, 4K random writes past
# the cache ran at 3,050 IOPS with 4, 3,350 with 3, 3,500 with 2 and
# 3,650 with 1 (1M writes: 185, 195, 205, 163 MB/s); docs/design.md.
FLUSH_THREADS = 2
# Past the high mark of dirty bytes the flusher writes the oldest objects
# out until the low mark is left (as the kernel's dirty_background ratio).
# At half full and all objects at once, a 32 MiB working set in the 64 MiB
# cache was flushed over and over. (That row's ratio did not move with
# this, 0.65 -> 0.63 in one run each: its cost is the FUSE loop's.)
FLUSH_HIGH, FLUSH_LOW = 0.75, 0.5
# Kept clean pages take at most a quarter of the capacity. With all of what
# dirty bytes left, the 4K rows over a 32 MiB working set kept up to 32 MiB
# of them (and their heap holes) for no IOPS (9,547 with them, 9,538 with
# none: those pages are dirty again before an overwrite would read them).
KEPT_SHARE = 4
# A flush holds its transaction beside the bytes it writes: the stripes'
# window of data and parity (1.5x in 4+2). A flush of scattered overwrites
# holds one transaction of at most 64 rows at a time (ObjectStore.
# _delta_batch: its pages, their rows' parity and the group's arrays, at
# most 4.4 MiB in 4+2 with 64 KiB chunks, however large the flush: two
# flush threads hold about the eighth of a 64 MiB cache kept as headroom).
# Writers wait for that room too,
# else a stream of 1M writes held the whole capacity dirty plus two
# flushes of 10 MiB each (the mount peaked at 178 MiB of RSS with a 64
# MiB cache).
FLIGHT_COST = 1.5


@dataclass
class _Entry:
    name: str
    hint: int = 0                      # the store's size_hint for the object
    dirty: SortedDict = field(default_factory=SortedDict)      # offset -> bytearray
    flushing: SortedDict = field(default_factory=SortedDict)   # offset -> bytearray
    busy: bool = False                 # a flusher owns the flushing map
    since: float = 0.0                 # monotonic time the dirty map became non-empty
    error: EcfsError | None = None     # the last flush failed (bytes kept, retried)
    lost: EcfsError | None = None      # bytes dropped (fenced): reported once

    def idle(self) -> bool:
        return not (self.dirty or self.flushing or self.busy or self.error or self.lost)


class StripeCache:
    def __init__(self, store, capacity: int, *, max_age: float = MAX_AGE):
        if capacity <= 0:
            raise ValueError("capacity must be positive (0 means no cache: use the store)")
        self.lower = store
        # the flush threads hold their flush's bytes in flight: a journal
        # checkpoint (an OSD sync) runs in a thread of its own
        store.background_checkpoints = True
        self.capacity = capacity
        self.max_age = max_age
        self.through = capacity // 4       # larger writes are written through
        self._cv = threading.Condition()
        self._objs: dict[str, _Entry] = {}
        self._wb: tuple[str, ...] = ()     # name prefixes written back (for str.startswith)
        self._bytes = 0                    # dirty + flushing bytes
        self._waiting = 0                  # writers waiting for room
        self._flying = 0                   # bytes of flushes under way
        self.fly_limit = max(capacity // 8, 1 << 20)
        self._headroom = capacity // 8     # room kept for flushes' transactions
        self._flushed_since_trim = 0       # bytes flushed since the heap was last given back
        self._stall: EcfsError | None = None   # a flush pass freed nothing and failed
        self._closed = False
        self._states = getattr(store, "states", None)
        if self._states is not None:
            # clean pages (data and parity, kept by the store's object
            # states, in a pool of their own) use what dirty bytes leave
            # of the capacity, at least an eighth of it (a flush's own pages
            # stay for the next one) and at most a quarter
            self._states.keep_pages(self._page_budget, capacity // KEPT_SHARE)
        self._pool = ThreadPoolExecutor(FLUSH_THREADS, thread_name_prefix="ecfs-flush")
        self._flusher = threading.Thread(target=self._flush_loop, name="ecfs-flusher",
                                         daemon=True)
        self._flusher.start()

    def __getattr__(self, attr):
        return getattr(self.lower, attr)

    # ---------------------------------------------------------- write-back
    def set_writeback(self, prefix: str, on: bool) -> bool:
        """Write names under ``prefix`` back (on) or through (off; flush
        first). True: write-back is what the store now does for them."""
        with self._cv:
            # replaced, never changed: writers read it without the lock
            rest = tuple(p for p in self._wb if p != prefix)
            self._wb = rest + (prefix,) if on else rest
        return on

    def dirty_bytes(self) -> int:
        return self._bytes

    # ---------------------------------------------------------------- writes
    def try_write(self, name: str, offset: int, data, *, size_hint: int = 0) -> bool:
        """Cache the write if that needs no waiting; False: call ``write``
        (from a thread that may block)."""
        data = memoryview(data).cast("B")
        n = len(data)
        if not n or n > self.through or not name.startswith(self._wb):
            return False
        with self._cv:
            if self._closed:
                return False
            e = self._objs.get(name)
            keys, grow = _placing(e, offset, n)
            if self._used() + grow > self.capacity or self._waiting:
                return False
            self._put(name, e, offset, data, size_hint, keys)
        return True

    def write(self, name: str, offset: int, data, *, size_hint: int = 0) -> None:
        data = memoryview(data).cast("B")
        if not len(data) or len(data) > self.through or \
                not name.startswith(self._wb) or self._closed:
            self._through(name)
            self.lower.write(name, offset, data, size_hint=size_hint)
            return
        with self._cv:
            waited = False
            while True:
                e = self._objs.get(name)
                keys, grow = _placing(e, offset, len(data))
                if self._used() + grow <= self.capacity:
                    break
                if self._stall is not None:
                    raise self._stall       # nothing can be flushed: say why, not hang
                if not waited:
                    self.lower.counters.add("cache_waits")
                    waited = True
                self._waiting += 1
                self._cv.notify_all()       # the flusher: make room
                try:
                    self._cv.wait(1.0)
                finally:
                    self._waiting -= 1
            self._put(name, e, offset, data, size_hint, keys)

    def _put(self, name: str, e: _Entry | None, offset: int, data: memoryview,
             size_hint: int, keys: list[int]) -> None:
        """Add the write to the object's dirty map (under the lock; ``keys``:
        the extents it touches, from ``_touching``)."""
        if e is None:
            e = self._objs[name] = _Entry(name)
        if size_hint:
            e.hint = size_hint
        if not e.dirty:
            e.since = time.monotonic()
        grown = _insert(e.dirty, keys, offset, data)
        if grown:
            self._bytes += grown
            if self._states is not None and self._states.page_bytes() > self._page_budget():
                self._states.trim_pages()   # dirty bytes take their room back
            if self._bytes > self.capacity * FLUSH_HIGH:
                self._cv.notify_all()       # the flusher: time to write out
        self.lower.counters.add_many((("cache_writes", 1), ("cache_write_bytes", len(data))),
                                     ("cache_dirty_bytes", self._bytes))

    def _used(self) -> int:
        """What writes have taken of the capacity: dirty and flushing bytes,
        and room for the transactions flushes hold beside them (an eighth
        kept for them before they start: a flush started when writes had
        filled the capacity would add its transaction above it; more while
        more is flying, up to a quarter, so a small cache whose one flush
        is larger than its flight limit still takes writes meanwhile)."""
        return self._bytes + max(self._headroom,
                                 min(int(self._flying * FLIGHT_COST), self.capacity // 4))

    def _page_budget(self) -> int:
        return min(self.capacity // KEPT_SHARE, max(self.capacity // 8, self.capacity - self._bytes))

    def _through(self, name: str) -> None:
        """Before a store operation on ``name`` that bypasses the cache:
        its cached bytes go first (a flush under way finishes), so the
        operation lands after them. If they cannot be written, the
        operation is refused (written later, they would land over it);
        bytes dropped for fencing are no obstacle."""
        if name in self._objs:
            err = self._flush_one(name)
            if err is not None and not isinstance(err, Fenced):
                raise err

    # ------------------------------------------------- other store calls
    def zero(self, name: str, offset: int, length: int) -> None:
        self._through(name)
        self.lower.zero(name, offset, length)

    def truncate(self, name: str, size: int) -> None:
        self._through(name)
        self.lower.truncate(name, size)

    def write_full(self, name: str, data) -> None:
        self._forget(name)
        self.lower.write_full(name, data)

    def remove(self, name: str) -> None:
        cached = self._forget(name)
        try:
            self.lower.remove(name)
        except NotFound:
            if not cached:
                raise           # (an object only the cache held is removed)

    def _forget(self, name: str) -> bool:
        """The object's content is about to be replaced: its cached bytes
        are dropped unwritten, after any flush of them under way. Whether
        there were any."""
        with self._cv:
            e = self._settled(name)
            if e is None:
                return False
            had = bool(e.dirty)
            self._bytes -= _size(e.dirty) + _size(e.flushing)
            self.lower.counters.set("cache_dirty_bytes", self._bytes)
            e.dirty.clear()
            e.flushing.clear()
            e.error = None
            if e.idle():
                del self._objs[name]
            self._cv.notify_all()
            return had

    def stat(self, name: str):
        self._through(name)
        return self.lower.stat(name)

    def exists(self, name: str) -> bool:
        e = self._objs.get(name)
        if e is not None and (e.dirty or e.flushing):
            return True
        return self.lower.exists(name)

    def list(self, prefix: str = "") -> list[str]:
        with self._cv:
            cached = {n for n, e in self._objs.items()
                      if n.startswith(prefix) and (e.dirty or e.flushing)}
        return sorted(set(self.lower.list(prefix)) | cached)

    # ----------------------------------------------------------------- reads
    def _lookup(self, name: str, offset: int, length: int):
        """(the object's entry if it has cached bytes, else None; the bytes
        [offset, offset+length) if one cached extent holds them all, else
        None), counting a hit. Under the lock."""
        e = self._objs.get(name)
        if e is None or not (e.dirty or e.flushing):
            return None, None
        hit = _within(e.dirty, offset, length)
        if hit is None and not _overlaps(e.dirty, offset, length):
            hit = _within(e.flushing, offset, length)
        if hit is not None:
            self.lower.counters.add("cache_hits")
        return e, hit

    def read(self, name: str, offset: int, length: int) -> bytes:
        with self._cv:
            e, hit = self._lookup(name, offset, length)
            if hit is not None:
                return hit
            if e is not None:
                maps = (e.flushing, e.dirty)
        if e is None:
            return self.lower.read(name, offset, length)
        self.lower.counters.add("cache_misses")
        try:
            got = self.lower.read(name, offset, length)
        except NotFound:
            got = b""
        with self._cv:
            end = max(len(got), max((_end(m) for m in maps), default=0) - offset)
            end = max(0, min(length, end))
            if not end:
                return got          # past the end (the object exists: it is cached)
            out = bytearray(end)
            out[:len(got)] = got
            for m in maps:
                _overlay(m, offset, out)
        return bytes(out)

    def try_read(self, name: str, offset: int, length: int) -> bytes | None:
        """``read`` if it can be done now without waiting: bytes wholly in
        one cached extent, or none cached there and the store below can
        read them without waiting. None: call ``read``."""
        if not self._cv.acquire(blocking=False):
            return None
        try:
            e, hit = self._lookup(name, offset, length)
            if hit is not None:
                return hit
            if e is not None and (_overlaps(e.dirty, offset, length) or
                                  _overlaps(e.flushing, offset, length)):
                return None         # partly cached: read merges
        finally:
            self._cv.release()
        try:
            got = self.lower.try_read(name, offset, length)
        except NotFound:
            if e is not None:
                return None         # absent below, bytes cached elsewhere in it: read merges
            raise
        if got is not None and e is not None:
            self.lower.counters.add("cache_misses")
        return got

    # ---------------------------------------------------------------- flush
    def flush(self, prefix: str = "") -> None:
        """Every write to names under ``prefix`` that returned before this
        call is durable when it returns; else the first error (a write-back
        that failed or was dropped since the last flush) is raised."""
        with self._cv:
            names = [n for n in self._objs if n.startswith(prefix)]
        if len(names) > 1:
            errs = list(self._pool.map(self._flush_one, names))
        else:       # (an fsync after one write: no hop to a flush thread)
            errs = [self._flush_one(n) for n in names]
        self.lower.flush()
        with self._cv:
            for n in names:
                e = self._objs.get(n)
                if e is not None and e.lost is not None:
                    errs.append(e.lost)
                    e.lost = None
                    if e.idle():
                        del self._objs[n]
        for err in errs:
            if err is not None:
                raise err

    def drop(self, prefix: str) -> None:
        """Forget the dirty bytes under ``prefix`` unwritten (the image's
        lock was broken: they must never reach the store)."""
        with self._cv:
            names = [n for n in self._objs if n.startswith(prefix)]
        for n in names:
            self._forget(n)

    def _settled(self, name: str) -> _Entry | None:
        """The object's entry once no flush of it is under way (under the lock)."""
        while True:
            e = self._objs.get(name)
            if e is None or not e.busy:
                return e
            self._cv.wait()

    def _flush_one(self, name: str) -> EcfsError | None:
        """Write the object's dirty extents out (waiting for a flush of it
        under way first); the error if that failed."""
        with self._cv:
            e = self._settled(name)
            if e is None:
                return None
            if not e.dirty:
                return e.error      # nothing new: the last attempt's outcome
            e.busy = True
            # the flushing map holds the extents joined where they touch
            # (what the store writes), so the pieces go now, not after it
            e.flushing, e.dirty = _runs(e.dirty), SortedDict()
            e.since = 0.0
            todo = list(e.flushing.items())
            hint = e.hint
            # a flush holds its transaction in memory (the stripes' window,
            # parity: about 1.5x its bytes beyond the cache's own): bytes
            # in flight are bounded, one flush always goes
            nbytes = sum(len(d) for _, d in todo)
            while self._flying and self._flying + nbytes > self.fly_limit:
                self._cv.wait()
            self._flying += nbytes
        err: EcfsError | None = None
        try:
            # few transactions, each extent in one (ObjectStore.write_extents)
            self.lower.write_extents(name, todo, size_hint=hint)
        except EcfsError as x:
            err = x
        except Exception as x:          # a defect: keep the bytes, say so
            log.exception("flush of %s failed", name)
            err = StoreError(f"flush of {name}: {type(x).__name__}: {x}")
        except BaseException:
            with self._cv:
                self._flying -= nbytes
                self._cv.notify_all()
            raise
        with self._cv:
            self._flying -= nbytes
            self.lower.counters.add_many((("cache_flushes", 1),
                                          ("cache_flush_extents", len(todo))))
            if err is None:
                self._flushed_since_trim += nbytes
                self._bytes -= _size(e.flushing)
                e.flushing = SortedDict()
                e.error = None
            elif isinstance(err, Fenced):
                self._bytes -= _size(e.flushing) + _size(e.dirty)
                e.flushing, e.dirty = SortedDict(), SortedDict()
                e.error, e.lost = None, err
                log.warning("%s: dirty bytes dropped: %s", name, err)
            else:
                # put back under what was written meanwhile (newer wins)
                merged = e.flushing
                before = _size(merged) + _size(e.dirty)
                for off, buf in e.dirty.items():
                    _insert(merged, _touching(merged, off, off + len(buf)), off,
                            memoryview(buf))
                self._bytes += _size(merged) - before
                e.flushing, e.dirty = SortedDict(), merged
                e.since = e.since or time.monotonic()
                e.error = err
            e.busy = False
            self.lower.counters.set("cache_dirty_bytes", self._bytes)
            if e.idle():
                del self._objs[name]
            self._cv.notify_all()
        return err

    def _flush_loop(self) -> None:
        while True:
            trim = False
            with self._cv:
                if self._closed:
                    return
                now = time.monotonic()
                dirty = sorted((e for e in self._objs.values() if e.dirty and not e.busy),
                               key=lambda e: e.since)
                due = [e for e in dirty if now - e.since >= self.max_age]
                if self._waiting or self._bytes > self.capacity * FLUSH_HIGH:
                    # the oldest objects, until what is left is under the
                    # low mark (not all of them: a working set under the
                    # high mark then stays cached, and younger objects go
                    # on gathering extents for their flush)
                    # (bytes already being flushed leave by themselves)
                    excess = self._bytes - self._flying - int(self.capacity * FLUSH_LOW)
                    seen = {e.name for e in due}
                    for e in dirty:
                        if excess <= 0:
                            break
                        excess -= _size(e.dirty)
                        if e.name not in seen:
                            due.append(e)
                if not due and not self._bytes and \
                        self._flushed_since_trim >= max(1, self.capacity // 4):
                    self._flushed_since_trim = 0
                    trim = True             # (not under the lock: about 4 ms)
                elif not due:
                    oldest = min((e.since for e in self._objs.values() if e.dirty),
                                 default=None)
                    wait = self.max_age if oldest is None else \
                        max(0.01, oldest + self.max_age - now)
                    self._cv.wait(min(wait, self.max_age))
                    continue
                due.sort(key=lambda e: e.since)
                names = [e.name for e in due]
                before = self._bytes
            if trim:
                give_back_heap()        # (about 4 ms)
                continue
            errs = list(self._pool.map(self._flush_one, names))
            with self._cv:
                failed = next((x for x in errs if x is not None and not isinstance(x, Fenced)),
                              None)
                # objects this pass did not try may flush where these could
                # not (another OSD set, another disk): the next pass takes
                # them (a failed object's age starts again: it is the
                # youngest now), and writers are told of a stall only when
                # nothing is left to try
                untried = failed is not None and any(
                    e.dirty and not e.busy and e.name not in names for e in self._objs.values())
                stuck = failed is not None and self._bytes >= before and not untried
                self._stall = failed if stuck else None
                self._cv.notify_all()
            if failed is not None:
                log.warning("write-back of %d objects: %s", len(names), failed)
                if not untried:
                    with self._cv:
                        self._cv.wait(1.0)      # do not spin on a full or failed disk

    # ----------------------------------------------------------------- close
    def close(self, close_lower: bool = True) -> None:
        """Flush everything, stop the flusher, close the store (unless
        ``close_lower`` is false). Bytes that cannot be written are logged
        (they are lost with this process)."""
        try:
            try:
                self.flush()
            except EcfsError as e:
                log.error("cache close: %s bytes not written: %s", self._bytes, e)
        finally:
            with self._cv:
                self._closed = True
                self._cv.notify_all()
            self._flusher.join()
            self._pool.shutdown()
            if self._states is not None and self._states.page_budget == self._page_budget:
                self._states.clear_pages()      # no cache in front: no pages kept
            self.lower.counters.set("cache_dirty_bytes", 0)
            if close_lower:
                self.lower.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ------------------------------------------------------------- extent maps
# A map is a SortedDict offset -> bytearray of disjoint extents, none
# crossing a BLOCK boundary (but runs put back after a failed flush,
# which are written into in place like any other). A write's bytes over existing extents are
# written into them in place and the rest become extents of their own:
# extents are never merged or resized, so the heap sees few sizes (4K
# writes make 4 KiB buffers, streams 64 KiB ones) and reuses what flushes
# free. Merging and growing them in place left holes the heap never gave
# back: 4K writes over a 32 MiB working set took a mount to 156 MiB of RSS
# with 26 MiB of it in use. A flush joins the extents that touch
# (``_runs``).
BLOCK = 64 << 10

def _size(m: SortedDict) -> int:
    return sum(len(b) for b in m.values())


def _end(m: SortedDict) -> int:
    if not m:
        return 0
    off, buf = m.peekitem(-1)
    return off + len(buf)


def _touching(m: SortedDict, a: int, b: int) -> list[int]:
    """Offsets of the extents overlapping or touching [a, b)."""
    keys = []
    for k in m.irange(maximum=a, reverse=True):     # the one starting at or before a
        if k + len(m[k]) >= a:
            keys.append(k)
        break
    keys.extend(m.irange(a, b, inclusive=(False, True)))
    return keys


def _placing(e: _Entry | None, a: int, n: int) -> tuple[list[int], int]:
    """Where a write of [a, a+n) goes in the object's dirty map: (the
    extents it touches, how many bytes the map grows by). Bytes cached at
    the write's own offset, as many or more, take it in place with one
    lookup (extents are disjoint: no other one overlaps)."""
    if e is None:
        return [], n
    buf = e.dirty.get(a)
    if buf is not None and len(buf) >= n:
        return [a], 0
    keys = _touching(e.dirty, a, a + n)
    return keys, _growth(e.dirty, keys, a, n)


def _growth(m: SortedDict, keys: list[int], a: int, n: int) -> int:
    """How many bytes the map grows by if [a, a+n) is inserted (``keys``:
    the extents it touches)."""
    covered = 0
    for k in keys:
        buf = m[k]
        covered += max(0, min(k + len(buf), a + n) - max(k, a))
    return n - covered


def _insert(m: SortedDict, keys: list[int], a: int, data: memoryview) -> int:
    """Write ``data`` at ``a`` into the map (newest wins; ``keys``: the
    extents it touches); the growth in bytes."""
    b = a + len(data)
    grown = 0
    pos = a
    for k in keys:
        buf = m[k]
        lo, hi = max(k, a), min(k + len(buf), b)
        if hi <= lo:
            continue                # only touching
        if pos < lo:
            grown += _add(m, pos, data[pos - a:lo - a])
        buf[lo - k:hi - k] = data[lo - a:hi - a]
        pos = hi
    if pos < b:
        grown += _add(m, pos, data[pos - a:])
    return grown


def _add(m: SortedDict, a: int, data: memoryview) -> int:
    """New extents for bytes no extent holds, split at BLOCK boundaries."""
    b = a + len(data)
    x = a
    while x < b:
        y = min(b, x - x % BLOCK + BLOCK)
        m[x] = bytearray(data[x - a:y - a])
        x = y
    return len(data)


def _runs(m: SortedDict) -> SortedDict:
    """The map with its touching extents joined into maximal runs: what a
    flush writes (an extent alone is kept, not copied)."""
    out: list = []
    for off, buf in m.items():
        if out and out[-1][0] + out[-1][2] == off:
            out[-1][1].append(buf)
            out[-1][2] += len(buf)
        else:
            out.append([off, [buf], len(buf)])
    runs = SortedDict()
    for off, bufs, _ in out:
        if len(bufs) == 1:
            runs[off] = bufs[0]
            continue
        runs[off] = bytearray().join(bufs)
    return runs


def _overlaps(m: SortedDict, a: int, n: int) -> bool:
    return any(min(k + len(m[k]), a + n) > max(k, a) for k in _touching(m, a, a + n))


def _within(m: SortedDict, a: int, n: int) -> bytes | None:
    """The bytes [a, a+n) if the map's extents hold them all (one extent,
    or several that touch: extents are never merged, so a read wider than
    the writes that made them spans several)."""
    i = m.bisect_right(a) - 1
    if i < 0:
        return None
    k, buf = m.keys()[i], m.values()[i]
    if k + len(buf) >= a + n:
        return bytes(buf[a - k:a - k + n])
    covered = a
    for k in _touching(m, a, a + n):
        if k > covered:
            return None         # a gap
        covered = max(covered, k + len(m[k]))
    if covered < a + n:
        return None
    out = bytearray(n)
    _overlay(m, a, out)
    return bytes(out)


def _overlay(m: SortedDict, a: int, out: bytearray) -> None:
    """Lay the map's bytes within [a, a+len(out)) over ``out``."""
    b = a + len(out)
    for k in _touching(m, a, b):
        buf = m[k]
        lo, hi = max(k, a), min(k + len(buf), b)
        if hi > lo:
            out[lo - a:hi - a] = buf[lo - k:hi - k]

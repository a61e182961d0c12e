"""Per-object state kept between operations, and when it may be trusted.

Every operation on an object starts from its state: the shard headers (the
info header with its version vector, each shard's own version), which
shards are usable, and, for the I/O, the open shard files and their page
checksum tables. Read from disk that is 3-6 header reads, and an open and
close of two files per shard touched. This module keeps it in memory.

The commit sequence
-------------------
``STORE/seq`` holds one unsigned 32-bit counter per lock slot
(backend/locks.py), in native byte order, mapped shared by every process
that opens the store for writing (docs/formats.md). Every application of
a transaction to shard files (a commit, a replay, a recovery or repair
step: ObjectStore._apply, the only code that changes shard files) makes
its slot's counter odd before the first file changes and even again (the
next value) after the last. Both happen under the slot's metadata lock,
or alone with the store (replay at open), so the counter has one writer
at a time. Hence: while a slot's counter is even and unchanged, no shard
file of any object of that slot changed.

A state is read with the counter at ``seq`` (even) before the headers are
read and still ``seq`` after: the headers belong together. It is *valid*
while the counter is still ``seq`` and the OSD map generation is the one
its shards were judged on (``gen``: an OSD went down or came up, and with
it which shards are usable).

States of an entry (one per object name, at most ``capacity`` fds held):

=============  ===========================================  ==================
state          entered when                                 used for
=============  ===========================================  ==================
absent         never read, evicted, or dropped              nothing
valid(s, g)    headers read at counter s (even, unchanged)   _load without disk
               and OSD map generation g; or this process     reads; kept fds for
               applied a transaction to it that began at s   preads, pwrites;
               (then s+2, the headers the transaction wrote  kept checksum
               taken from its ops)                           tables
stale          the counter moved (another object of the      nothing: dropped,
               slot, another process, a replay) or the map   fds closed, at the
               generation changed (then every entry goes at  next lookup
               once: no fd keeps an OSD taken down busy)
=============  ===========================================  ==================

Readers without locks (the fast read path) use the counter as a sequence
lock: counter read before, preads and checks, counter read after; a
changed or odd counter discards what was read and the read is done again
the long way (locks, headers from disk).

Fds are opened and kept only by callers holding the object's locks (a
read's stripes, a commit's metadata lock): a lock-free reader uses the
kept ones and opens none, since an open racing with a removal could keep
the fd of a file unlinked a moment later. (Backfill also unlinks leftover
shard files, of an OSD that is down: its return changes the OSD map
generation, so no state kept from before is used. It also unlinks, on up
OSDs, shard files an 'osd add' moved away: the add changed the generation
and placement first, so no state kept since holds them.)

Kept pages
----------
A state may also keep shard pages (``pages``: shard -> page -> a slot of
the page pool, backend/pagepool.py, which holds the 4 KiB), data and
parity alike, under the same validity as its checksum tables:

=================  ====================================================
event              kept pages
=================  ====================================================
this process       the whole pages it wrote are kept (runs up to
applies a write    MAX_KEPT_RUN, 64 KiB: longer ones are streams);
                   pages it cut, punched, truncated or unlinked are
                   forgotten (follow)
a read             keeps nothing: what an overwrite's plan needs is what
                   the last write of the row wrote (random reads over an
                   image much larger than the cache would rarely hit)
stale, dropped     gone with the state
over the budget    the least recently used states' pages go first
or the pool full   (``page_budget()``: none kept while it is None)
=================  ====================================================

So a later overwrite of a page whose old data and parity pages are kept
plans with 0 shard reads (parity delta from the kept pages), and a read of
kept pages is 0 shard reads. The budget is set by the stripe cache in
front (backend/stripecache.py): what its dirty bytes leave of its
capacity. A kept page is trusted as written: bytes flipped on disk under
it are found by the next read from disk or a scrub, not by a read it
serves.

What the counter cannot see is a shard file changed by hand, outside ecfs.
Bytes flipped or lost still fail their page checksum on every read (kept
tables are the stored ones), and a failed check always goes the long way,
which re-reads everything from disk, decodes and heals. A shard file
deleted by hand goes on being read through its open fd (its old bytes,
which are right) until the entry is dropped; scrub reports the file
missing.
"""
from __future__ import annotations

import mmap
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import shardfile as sf
from .locks import SLOTS
from .pagepool import PagePool

SEQ_FILE = "seq"
MAX_KEPT_RUN = 16 * sf.PAGE     # longer runs written are not kept (a stripe's chunk: 64 KiB)
_SEQ_BYTES = SLOTS * 4


class CommitSeq:
    """The shared per-slot commit counters of ``STORE/seq``."""

    def __init__(self, store: str):
        path = os.path.join(store, SEQ_FILE)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < _SEQ_BYTES:
                os.ftruncate(fd, _SEQ_BYTES)        # sparse: pages appear as slots are used
            self._mm = mmap.mmap(fd, _SEQ_BYTES, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self._v = memoryview(self._mm).cast("I")

    def get(self, slot: int) -> int:
        return self._v[slot]

    def begin(self, slot: int) -> int:
        """Before shard files of ``slot`` change (metadata lock held): the
        counter before, made odd. A counter found odd was left so by a
        writer that died mid-apply; it stays odd until this apply ends."""
        s = self._v[slot]
        if not s & 1:
            self._v[slot] = s + 1
        return s

    def end(self, slot: int) -> int:
        """After the last shard file change: the counter, even again."""
        s = self._v[slot]
        if s & 1:
            s = (s + 1) & 0xFFFFFFFF
            self._v[slot] = s
        return s

    def close(self) -> None:
        self._v.release()
        self._mm.close()


@dataclass
class ObjState:
    """What the headers of one object said at counter ``seq`` and OSD map
    generation ``gen``, and its kept files."""
    name: str
    slot: int
    seq: int
    gen: int
    loc: list[int]
    hdrs: dict[int, sf.ShardHeader | None]   # shard -> its header as read (None: none)
    info: sf.ShardHeader | None
    usable: dict[int, bool]
    bad_header: set[int]
    absent: set[int]
    fds: dict[int, int] = field(default_factory=dict)     # shard -> data file fd
    mfds: dict[int, int] = field(default_factory=dict)    # shard -> sidecar fd
    crcs: dict[int, np.ndarray] = field(default_factory=dict)   # shard -> checksum table
    pages: dict[int, dict[int, int]] = field(default_factory=dict)  # shard -> page -> pool slot
    npages: int = 0          # pages kept in ``pages``
    retired: list[int] = field(default_factory=list)   # fds of unlinked files, to close
    pins: int = 0            # users of its fds now: they are closed when it drops to 0
    dead: bool = False       # dropped from the cache


class StateCache:
    """A bounded LRU of ObjState, bounded by the fds its entries hold and
    by their number. Thread-safe.

    An fd is used only by a holder of a pin on its entry: an entry
    dropped while pinned closes its fds when the last pin goes, so an fd
    number is never closed (and reused by another open) under a reader
    or writer still using it."""

    def __init__(self, seq: CommitSeq, max_fds: int, max_entries: int = 8192):
        self.seq = seq
        self.max_fds = max_fds
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._d: OrderedDict[str, ObjState] = OrderedDict()
        self._fds = 0            # fds held by entries in _d
        self._pages = 0          # page bytes held by entries in _d
        self.page_budget: Callable[[], int] | None = None   # None: no pages kept
        self.pool: PagePool | None = None                    # where kept pages are
        self._gen: int | None = None     # the OSD map generation of the entries

    def pin(self, name: str, gen: int) -> ObjState | None:
        """The entry of ``name``, pinned, if it is valid now (a stale one
        is dropped). Unpin it when done with its fds.

        A new OSD map generation drops every entry at once: their fds may
        hold files of an OSD now down or replaced (a disk the admin wants
        to unmount, a wiped directory whose space they would pin)."""
        with self._lock:
            if gen != self._gen:
                for old in list(self._d.values()):
                    self._remove(old)
                self._gen = gen
            st = self._d.get(name)
            if st is None:
                return None
            now = self.seq.get(st.slot)
            if st.gen != gen or st.seq != now:
                if not now & 1:         # odd: an apply is under way; it may follow
                    self._remove(st)
                return None
            st.pins += 1
            self._d.move_to_end(name)
            return st

    def unpin(self, st: ObjState) -> None:
        with self._lock:
            st.pins -= 1
            if not st.pins:
                if st.dead:
                    self._close(st)
                elif st.retired:
                    for fd in st.retired:
                        os.close(fd)
                    st.retired.clear()

    def put(self, st: ObjState) -> None:
        """Keep a state read at counter ``st.seq`` (replacing the name's
        entry), if the counter has not moved since."""
        with self._lock:
            if self.seq.get(st.slot) != st.seq:
                return
            old = self._d.get(st.name)
            if old is not None:
                self._remove(old)
            self._d[st.name] = st
            self._trim(keep=st.name)

    def keep_crcs(self, st: ObjState, i: int, table: np.ndarray, seq: int) -> None:
        """Keep shard i's checksum table, read with the counter at ``seq``
        before and after, if it has still not moved."""
        with self._lock:
            if self.seq.get(st.slot) == seq == st.seq and not st.dead:
                st.crcs[i] = table

    def follow(self, st: ObjState, seq0: int, change) -> None:
        """This process applied a transaction to ``st``'s object, which
        began with the counter at ``seq0`` (now odd, under the metadata
        lock): ``change(st)`` brings the state up to what it wrote, and it
        becomes valid at the counter the apply ends with. A state that
        was not valid at ``seq0`` is dropped."""
        with self._lock:
            if st.dead:
                return
            if st.seq != seq0 or self.seq.get(st.slot) != (seq0 | 1):
                self._remove(st)
                return
            try:
                change(st)
            except Exception:           # a change it cannot follow: read it afresh
                self._remove(st)
                return
            st.seq = (seq0 + 2) & 0xFFFFFFFF

    # ------------------------------------------------------------ pages
    def keep_pages(self, budget: Callable[[], int] | None, max_bytes: int = 0) -> None:
        """Keep pages within ``budget()`` bytes, in a pool of ``max_bytes``
        (backend/pagepool.py); None: keep none (every kept page goes)."""
        with self._lock:
            self._drop_all_pages()
            self.page_budget = budget
            self.pool = PagePool(max_bytes) if budget is not None else None

    def get_pages(self, st: ObjState, i: int, p0: int, p1: int, out: np.ndarray) -> bool:
        """Copy shard i's pages [p0, p1) into ``out`` if all are kept (the
        caller pins ``st`` and judges validity as for its fds: a page is
        kept only while the state is). No lock: pages are put in and
        replaced only by follow(), while the counter is odd, and dropped
        whole at any time; a lock-free reader that finds the counter
        unchanged after it read them read the pages of that counter. A
        slot dropped meanwhile (and perhaps given to another page) is
        caught here: its map entry went first, then its generation moved."""
        sp = st.pages.get(i)
        pool = self.pool
        if not sp or pool is None:
            return False
        slots = [sp.get(p) for p in range(p0, p1)]
        if None in slots:
            return False
        gens = [pool.gen[s] for s in slots]
        pool.copy_out(slots, out)
        return [pool.gen[s] for s in slots] == gens and \
            [sp.get(p) for p in range(p0, p1)] == slots

    def set_pages(self, st: ObjState, i: int, p0: int, buf) -> None:
        """(under the lock: follow's change) Shard i's pages from p0 now
        hold ``buf`` (whole pages). The caller calls ``trim_state`` after
        its last one (the budget is asked once per transaction, not once
        per page run; the pool bounds what is kept meanwhile)."""
        n = len(buf) // sf.PAGE
        pool = self.pool
        self.drop_pages(st, i, p0, p0 + n)
        if pool is None or self.page_budget is None or len(buf) > MAX_KEPT_RUN \
                or self._d.get(st.name) is not st:
            # (a long run is a stream: keeping it would push out the small
            # writes' pages, the ones a later overwrite reads; a state not
            # in the cache could not give its slots back)
            return
        if pool.free_count() < n:
            self._trim_pages(st, pool.nbytes - n * sf.PAGE)
        slots = pool.alloc(n)
        pool.put(slots, buf)
        sp = st.pages.setdefault(i, {})
        sp.update(zip(range(p0, p0 + n), slots))
        self._count(st, n)

    def trim_state(self, st: ObjState) -> None:
        """(under the lock) Back within the budget after set_pages calls,
        ``st``'s own pages last."""
        self._trim_pages(st)

    def drop_pages(self, st: ObjState, i: int, p0: int = 0, p1: int | None = None) -> None:
        """(under the lock) Forget shard i's kept pages in [p0, p1)."""
        sp = st.pages.get(i)
        if not sp:
            return
        if p1 is not None and p1 - p0 <= len(sp):
            slots = [s for s in (sp.pop(p, None) for p in range(p0, p1)) if s is not None]
        else:
            slots = [sp.pop(p) for p in [p for p in sp if p >= p0 and (p1 is None or p < p1)]]
        self._release(st, slots)

    def clear_pages(self) -> None:
        """Keep no pages (the stripe cache that set the budget closed)."""
        self.keep_pages(None)

    def page_bytes(self) -> int:
        return self._pages

    def trim_pages(self) -> None:
        """Back within the budget (it shrank: dirty bytes grew above)."""
        with self._lock:
            self._trim_pages(None)

    def _count(self, st: ObjState, n: int) -> None:
        st.npages += n
        self._pages += n * sf.PAGE

    def _release(self, st: ObjState, slots: list[int]) -> None:
        """(under the lock) ``st``'s map no longer names these slots."""
        if slots:
            self.pool.release(slots)
            self._count(st, -len(slots))

    def _drop_state_pages(self, st: ObjState) -> None:
        """(under the lock) Every page ``st`` keeps goes (its maps are
        emptied in place: a lock-free reader holding one sees it)."""
        for sp in st.pages.values():
            slots = list(sp.values())
            sp.clear()
            self._release(st, slots)
        st.pages = {}

    def _drop_all_pages(self) -> None:
        for st in self._d.values():
            self._drop_state_pages(st)

    def _trim_pages(self, keep: ObjState | None, budget: int | None = None) -> None:
        """Within the budget (or ``budget``): the pages of the least
        recently used states go first, then the oldest of ``keep``'s own."""
        if budget is None:
            budget = self.page_budget() if self.page_budget is not None else 0
        if self._pages <= budget:
            return
        for st in self._d.values():
            if self._pages <= budget:
                return
            if st is not keep and st.npages:
                self._drop_state_pages(st)
        while keep is not None and self._pages > budget and keep.npages:
            sp = next(sp for sp in keep.pages.values() if sp)
            self._release(keep, [sp.pop(next(iter(sp)))])

    def drop(self, name: str) -> None:
        with self._lock:
            st = self._d.get(name)
            if st is not None:
                self._remove(st)

    def add_fd(self, st: ObjState, table: dict[int, int], i: int, fd: int) -> int:
        """Keep ``fd`` (caller pins ``st``) as shard i's file in ``table``;
        returns the fd to use: one another thread kept first, else ``fd``
        (kept unless ``st`` is dropped: then closed with it)."""
        with self._lock:
            have = table.get(i)
            if have is not None:
                os.close(fd)
                return have
            table[i] = fd
            if not st.dead:
                self._fds += 1
                self._trim(keep=st.name)
            return fd

    def forget_fd(self, st: ObjState, table: dict[int, int], i: int) -> None:
        """Shard i's file is unlinked (caller pins ``st``): its fd goes
        with the last pin (a fresh open finds the new file)."""
        with self._lock:
            fd = table.pop(i, None)
            if fd is not None:
                st.retired.append(fd)
                if not st.dead:
                    self._fds -= 1

    def clear(self) -> None:
        with self._lock:
            for st in list(self._d.values()):
                self._remove(st)

    def __len__(self) -> int:
        return len(self._d)

    def fd_count(self) -> int:
        return self._fds

    def _remove(self, st: ObjState) -> None:
        del self._d[st.name]
        self._drop_state_pages(st)
        st.dead = True
        self._fds -= len(st.fds) + len(st.mfds)
        if not st.pins:
            self._close(st)

    def _trim(self, keep: str) -> None:
        while len(self._d) > 1 and (self._fds > self.max_fds or
                                    len(self._d) > self.max_entries):
            st = next(iter(self._d.values()))
            if st.name == keep:
                self._d.move_to_end(keep)
                continue
            self._remove(st)

    def _close(self, st: ObjState) -> None:
        for table in (st.fds, st.mfds):
            for fd in table.values():
                os.close(fd)
            table.clear()
        for fd in st.retired:
            os.close(fd)
        st.retired.clear()


def fd_budget() -> int:
    """How many shard fds a process keeps: a quarter of its fd limit."""
    import resource
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(0, min(1 << 16, soft // 4 - 16))

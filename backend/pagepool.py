"""A fixed slab of 4 KiB pages: where the object states keep pages
(backend/objstate.py, "Kept pages").

Why a slab and not a bytes object per page: kept pages come and go by the
thousand (each flushed 4K write keeps its data page and its parity pages;
the budget trims them as dirty bytes grow), and as heap objects, allocated
by the flush threads and freed by whichever thread trimmed them, they
left the mount's heap in holes it never gave back. 4K random writes over
a 32 MiB working set took a mount with a 64 MiB cache to 193 MiB of RSS,
95 MiB of which ``malloc_trim(0)`` then returned (docs/benchmarks.md). A
slab's pages are touched once and reused: its RSS never exceeds its size.

A slot's life (all changes under the owner's lock, backend/objstate.py)::

    state   entered by                          left by
    ------  ----------------------------------  ---------------------------
    free    the pool made; release()            alloc()
    held    alloc(): the owner maps one page    release(): the owner's map
            of one shard of one object to it    entry goes first, then the
                                                generation moves on

Readers without the lock copy held slots and check afterwards that each
slot's generation did not move and that their map still names it
(``StateCache.get_pages``): a slot released and handed to another page
while they copied is never taken for the page they asked for.

Freed slots are reused last-freed first, so the pages the slab has
touched are the ones used again and the rest of it costs no memory.
"""
from __future__ import annotations

import mmap

from .shardfile import PAGE

MIN_PAGES = 64          # room for a few whole runs (MAX_KEPT_RUN: 16 pages each)


class PagePool:
    """``nbytes`` of pages (at least MIN_PAGES). Not thread-safe: the
    owner serialises alloc, put and release; ``gen`` and ``copy_out`` may
    be used without it (see the module docstring)."""

    def __init__(self, nbytes: int):
        self.n = max(MIN_PAGES, nbytes // PAGE)
        # An anonymous mapping of its own, without huge pages: numpy asks
        # for transparent huge pages for a large array, and their first
        # touches (the kernel compacting memory to find 2 MiB) cost 31-60 us
        # a 4 KiB slot here, 2 us without
        self._map = mmap.mmap(-1, self.n * PAGE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_NOHUGEPAGE"):
            self._map.madvise(mmap.MADV_NOHUGEPAGE)
        self._mv = memoryview(self._map)       # untouched pages cost no RSS
        # a list, not an array: one to three slots at a time, where
        # numpy's fancy indexing costs more than the pages' copies
        self.gen = [0] * self.n
        self._free = list(range(self.n - 1, -1, -1))            # pop() takes slot 0 first

    @property
    def nbytes(self) -> int:
        return self.n * PAGE

    def free_count(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int]:
        """``n`` free slots (the caller made sure there are)."""
        if n > len(self._free):
            raise ValueError(f"page pool: {n} slots asked, {len(self._free)} free")
        if n <= 0:
            return []           # (_free[-0:] is all of it)
        got = self._free[-n:]
        del self._free[-n:]
        return got

    def put(self, slots: list[int], buf) -> None:
        """The slots' pages now hold ``buf`` (len(slots) whole pages)."""
        src = memoryview(buf).cast("B")
        mv = self._mv
        for x, s in enumerate(slots):
            mv[s * PAGE:(s + 1) * PAGE] = src[x * PAGE:(x + 1) * PAGE]

    def copy_out(self, slots: list[int], out) -> None:
        """The slots' pages, in order, into ``out``."""
        dst = memoryview(out).cast("B")
        mv = self._mv
        for x, s in enumerate(slots):
            dst[x * PAGE:(x + 1) * PAGE] = mv[s * PAGE:(s + 1) * PAGE]

    def release(self, slots: list[int]) -> None:
        """The slots are free again (their owner's map no longer names them)."""
        gen = self.gen
        for s in slots:
            gen[s] += 1
        self._free.extend(slots)

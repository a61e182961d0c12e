"""A seeded I/O generator with a reference model (fsx / ceph_test_rados style).

``IOGen(seed, ...).ops(n)`` yields ``n`` operations on a few objects. The
sequence depends only on the arguments, so a crash test can regenerate what
a killed child was doing. Offsets and lengths favour every boundary the
store's layout has (0, 1, page-1, page, chunk-1, chunk, chunk+1, stripe-1,
stripe, stripe+1, the object's end), for every chunk size the store may use,
mixed with random ones; truncates shrink and grow, and sizes wander across
the chunk-size "auto" restripe threshold. Written bytes are a function of
(seed, op index, 4 KiB block of the object), see ``block_data``.

``Model`` is the reference: a bytearray per object. ``run_op`` applies one
op to a store and to the model, and checks every read against the model.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

PAGE = 4096
BLOCK = 4096


@dataclass(frozen=True)
class Op:
    index: int
    kind: str          # write | write_full | read | truncate | remove
    name: str
    offset: int = 0
    length: int = 0    # bytes to write/read, or the new size of a truncate
    seed: int = 0

    @property
    def mutates(self) -> bool:
        return self.kind != "read"

    def data(self) -> bytes:
        if self.kind not in ("write", "write_full"):
            return b""
        return block_data(self.seed, self.index, self.offset, self.length)


def block_data(seed: int, index: int, offset: int, length: int) -> bytes:
    """Bytes for object range [offset, offset+length) written by op ``index``:
    each 4 KiB block of the object gets its own stream from (seed, index,
    block), so the content identifies the write and the block it came from."""
    if length == 0:
        return b""
    b0, b1 = offset // BLOCK, (offset + length - 1) // BLOCK
    parts = []
    for b in range(b0, b1 + 1):
        rng = np.random.default_rng([seed, index, b])
        parts.append(rng.integers(1, 256, BLOCK, dtype=np.uint8).tobytes())
    blob = b"".join(parts)
    start = offset - b0 * BLOCK
    return blob[start:start + length]


class IOGen:
    """Seeded op stream over ``names``; sizes stay below ``max_size``."""

    def __init__(self, seed: int, *, k: int, chunks=(4096, 65536), names=("obj",),
                 max_size: int = 1 << 20, weights=None, truncates: bool = True,
                 write_full: bool = True, reads: bool = True):
        self.seed = seed
        self.k = k
        self.chunks = tuple(chunks)
        self.names = tuple(names)
        self.max_size = max_size
        self.rng = random.Random(seed)
        self.sizes = {n: 0 for n in self.names}     # the generator's own idea of sizes
        w = {"write": 60, "read": 20 if reads else 0, "truncate": 10 if truncates else 0,
             "write_full": 4 if write_full else 0, "remove": 1}
        if weights:
            w.update(weights)
        self.kinds = [kk for kk in w if w[kk]]
        self.weights = [w[kk] for kk in self.kinds]
        self.index = 0

    # -- boundaries ------------------------------------------------------------
    def points(self, size: int) -> list[int]:
        """Interesting offsets for an object of ``size`` bytes."""
        pts = {0, 1, PAGE - 1, PAGE, PAGE + 1, size, size - 1, size + 1, size - PAGE,
               size + PAGE}
        for c in self.chunks:
            s = self.k * c
            pts |= {c - 1, c, c + 1, 2 * c - 1, s - 1, s, s + 1, 2 * s - 1, 2 * s, 2 * s + 1}
            if size:
                last = size // s * s
                pts |= {last - 1, last, last + 1, last + c, last - c}
        # page-rounded edges of the object's end
        pts |= {size // PAGE * PAGE, -(-size // PAGE) * PAGE}
        return sorted(p for p in pts if 0 <= p < self.max_size)

    def lengths(self) -> list[int]:
        ls = {1, 2, PAGE - 1, PAGE, PAGE + 1, 2 * PAGE, 3 * PAGE - 7}
        for c in self.chunks:
            s = self.k * c
            ls |= {c - 1, c, c + 1, s - 1, s, s + 1}
        return sorted(x for x in ls if 0 < x <= self.max_size // 2)

    def _offset(self, size: int) -> int:
        r = self.rng.random()
        if r < 0.6:
            return self.rng.choice(self.points(size))
        if r < 0.8 and size:
            return self.rng.randrange(0, size)
        return self.rng.randrange(0, self.max_size)

    def _length(self, off: int, size: int) -> int:
        r = self.rng.random()
        if r < 0.55:
            n = self.rng.choice(self.lengths())
        elif r < 0.7 and size > off:
            n = size - off            # to the object's end
        elif r < 0.8:
            # to a boundary point
            nxt = [p for p in self.points(size) if p > off]
            n = (self.rng.choice(nxt) - off) if nxt else 1
        else:
            n = self.rng.randrange(1, 3 * max(self.chunks) + 1)
        return max(1, min(n, self.max_size - off))

    def _size(self, size: int) -> int:
        """A new size for truncate/write_full: boundaries, the restripe
        threshold of every chunk size, shrink and grow."""
        cands = [p for p in self.points(size) if p <= self.max_size]
        for c in self.chunks:
            thr = self.k * c
            cands += [thr - 1, thr, thr + 1, thr - PAGE]
        cands += [0, size // 2, size + self.rng.randrange(1, 3 * PAGE),
                  self.rng.randrange(0, self.max_size)]
        return min(self.max_size, max(0, self.rng.choice(cands)))

    # -- the stream --------------------------------------------------------------
    def next(self) -> Op:
        i = self.index
        self.index += 1
        name = self.rng.choice(self.names)
        size = self.sizes[name]
        kind = self.rng.choices(self.kinds, self.weights)[0]
        if size == 0 and kind in ("truncate", "remove", "read"):
            kind = "write"
        if kind == "write":
            off = self._offset(size)
            n = self._length(off, size)
            self.sizes[name] = max(size, off + n)
            return Op(i, "write", name, off, n, self.seed)
        if kind == "write_full":
            n = self._size(size) or 1
            self.sizes[name] = n
            return Op(i, "write_full", name, 0, n, self.seed)
        if kind == "read":
            off = self._offset(size)
            return Op(i, "read", name, off, self._length(off, size), self.seed)
        if kind == "truncate":
            n = self._size(size)
            self.sizes[name] = n
            return Op(i, "truncate", name, 0, n, self.seed)
        self.sizes[name] = 0
        return Op(i, "remove", name, seed=self.seed)

    def ops(self, n: int):
        for _ in range(n):
            yield self.next()


class Model:
    """The reference content of every object (absent = not in the dict)."""

    def __init__(self):
        self.objs: dict[str, bytearray] = {}

    def copy(self) -> "Model":
        m = Model()
        m.objs = {k: bytearray(v) for k, v in self.objs.items()}
        return m

    def apply(self, op: Op) -> None:
        if op.kind == "write":
            b = self.objs.setdefault(op.name, bytearray())
            end = op.offset + op.length
            if len(b) < end:
                b.extend(bytes(end - len(b)))
            b[op.offset:end] = op.data()
        elif op.kind == "write_full":
            self.objs[op.name] = bytearray(op.data())
        elif op.kind == "truncate":
            b = self.objs[op.name]
            if op.length < len(b):
                del b[op.length:]
            else:
                b.extend(bytes(op.length - len(b)))
        elif op.kind == "remove":
            self.objs.pop(op.name, None)

    def read(self, name: str, off: int, n: int) -> bytes:
        return bytes(self.objs[name][off:off + n])


def run_op(store, op: Op, model: Model) -> None:
    """Apply ``op`` to the store and the model; verify reads."""
    if op.kind == "read":
        got = store.read(op.name, op.offset, op.length)
        want = model.read(op.name, op.offset, op.length)
        if got != want:
            raise AssertionError(f"op {op}: read differs from the model "
                                 f"(first difference at +{_first_diff(got, want)})")
        return
    if op.kind == "write":
        store.write(op.name, op.offset, op.data())
    elif op.kind == "write_full":
        store.write_full(op.name, op.data())
    elif op.kind == "truncate":
        store.truncate(op.name, op.length)
    elif op.kind == "remove":
        store.remove(op.name)
    model.apply(op)


def verify_all(store, model: Model) -> None:
    """Every object the model has reads back whole and right; the store has
    no other objects."""
    assert sorted(store.list()) == sorted(model.objs), (store.list(), sorted(model.objs))
    for name, want in model.objs.items():
        st = store.stat(name)
        assert st.size == len(want), (name, st.size, len(want))
        got = store.read(name, 0, len(want) + 1)
        if got != bytes(want):
            raise AssertionError(f"{name}: content differs from the model at "
                                 f"+{_first_diff(got, bytes(want))} (size {len(want)})")


def _first_diff(a: bytes, b: bytes) -> int:
    if len(a) != len(b):
        n = min(len(a), len(b))
    else:
        n = len(a)
    x = np.frombuffer(a[:n], np.uint8) != np.frombuffer(b[:n], np.uint8)
    idx = np.flatnonzero(x)
    return int(idx[0]) if len(idx) else n

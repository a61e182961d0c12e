r"""The erasure codec: pyeclib behind a Ceph-shaped interface.

How bytes map to chunks (as in Ceph's ErasureCodeInterface.h)::

     object bytes   0 ......... C-1 | C ....... 2C-1 | ... | (K-1)C .. KC-1 | KC ...
                    \_ data chunk 0 / \_ data chunk 1 /       \_ chunk K-1 _/  next stripe
     stripe s  = object bytes [s*K*C, (s+1)*K*C)
     shard i   = data chunk i of every stripe, back to back: stripe s at s*C
     shard K+j = parity chunk j of every stripe

    byte B of the object lives in stripe B // (K*C), data chunk (B // C) % K,
    at offset (B // (K*C)) * C + B % C of that shard.

The code is linear and works column-wise, so any page-aligned slice of the
chunks (the same rows of each) encodes on its own: ecfs encodes and decodes
only the 4 KiB page rows an I/O touches, never whole chunks it did not need.

pyeclib wraps every fragment in an 80-byte header. ecfs stores raw chunks,
so to decode it rebuilds fragments from header templates taken once per
length from an encode of zeros (the headers hold index and sizes, and no
checksum of the payload, since ecfs keeps its own crc32c per page).

Capabilities are flags a caller asks for instead of assuming
(Ceph's FLAG_EC_PLUGIN_PARITY_DELTA_OPTIMIZATION).

Encoding with the ISA-L plugins calls the ISA-L library pyeclib bundles
(``ec_encode_data``, through ctypes) with the coding matrix the plugin
builds (``gf_gen_rs_matrix`` for isa_l_rs_vand, ``gf_gen_cauchy1_matrix``
for isa_l_rs_cauchy), straight into the caller's parity buffers: pyeclib
holds the GIL for the whole of its call and copies the stripe four times
around it (joined input, aligned buffers, fragments with headers, out),
so every encode of a flush stopped the mount's FUSE loop. A ctypes call
lets the GIL go. It is used only where it gives pyeclib's parity byte for
byte (checked at start-up, ``_DirectEncoder.matches``); decoding is
pyeclib's. ``ECFS_PYECLIB_ENCODE=1`` in the environment turns it off.
"""
from __future__ import annotations

import ctypes
import os
import threading
from typing import Iterable, Mapping

import numpy as np

from .delta import GF_MUL, as_u8
from .errors import InvalidArgument

FLAG_PARITY_DELTA = 1 << 0      # apply_delta is available
FLAG_DELTA_GF8_TABLE = 1 << 1   # the plugin is byte-wise GF(2^8): table deltas valid

SUPPORTED_PLUGINS = ("isa_l_rs_vand", "liberasurecode_rs_vand", "isa_l_rs_cauchy")
PAGE = 4096
ENCODE_SLICE = 256 << 10    # bytes of each row per plugin call in encode_into


def _keep_freed_heap() -> None:
    # pyeclib mallocs and frees every fragment on each call. With glibc's
    # default trim threshold the freed top of the heap goes back to the
    # kernel after each encode and the next one faults it in again: 64 KiB
    # chunk encodes measured ~14x slower (0.7 vs 10 GB/s, docs/benchmarks.md).
    # Raising M_TRIM_THRESHOLD keeps up to 128 MiB of freed heap in the
    # process. Setting it also freezes glibc's mmap threshold at its 128 KiB
    # start (no dynamic raise), so every larger buffer (a flush's journal
    # record, encode results, tobytes copies) was a fresh mmap faulted in
    # page by page: ~2,500 minor faults and 9 ms of system time per 1 MiB
    # write through the mount. Buffers up to 32 MiB (glibc's own dynamic
    # ceiling) now come from the heap: 25 faults and 2.7 ms per 1 MiB write,
    # 1.8x the throughput (docs/benchmarks.md, "Malloc tuning").
    libc = _libc()
    if libc is None:
        return
    try:
        libc.mallopt(-1, 128 * 1024 * 1024)  # M_TRIM_THRESHOLD
        libc.mallopt(-3, 32 * 1024 * 1024)   # M_MMAP_THRESHOLD
        # One arena for every thread: each flush thread's own arena kept its
        # high water (a flush's transaction, the plugin's buffers) apart from
        # the others', ~30 MiB of a mount's peak RSS with four of them
        # (docs/benchmarks.md, "Peak RSS"); Python holds the GIL around
        # nearly every malloc anyway, so they never contended for arenas.
        libc.mallopt(-8, 1)                  # M_ARENA_MAX
    except AttributeError:
        pass


def give_back_heap() -> None:
    """The other half of _keep_freed_heap: hand the heap's free memory back
    to the system now (glibc's malloc_trim; elsewhere nothing). Called by
    the stripe cache's flusher once the cache has gone clean: a stream of
    writes left a mount at 155 MiB of RSS with 54 MiB in use, and every
    later job's peak started from there (docs/benchmarks.md, "Under the
    bound"). About 4 ms."""
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is not None:
        trim(0)


_LIBC: list = []


def _libc():
    """The C library (loaded once), or None where there is no libc.so.6."""
    if not _LIBC:
        try:
            _LIBC.append(ctypes.CDLL("libc.so.6"))
        except OSError:
            _LIBC.append(None)
    return _LIBC[0]


_keep_freed_heap()


class _DirectEncoder:
    """ISA-L's encode of the plugin's matrix, called without pyeclib."""

    MATRIX = {"isa_l_rs_vand": "gf_gen_rs_matrix", "isa_l_rs_cauchy": "gf_gen_cauchy1_matrix"}

    def __init__(self, lib, gen: str, k: int, m: int):
        self.k, self.m = k, m
        self._encode = lib.ec_encode_data
        self._encode.restype = None
        self._encode.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                                 ctypes.c_void_p, ctypes.c_void_p]
        matrix = (ctypes.c_ubyte * ((k + m) * k))()
        getattr(lib, gen)(matrix, k + m, k)
        self._tables = (ctypes.c_ubyte * (32 * k * m))()
        lib.ec_init_tables(k, m, ctypes.byref(matrix, k * k), self._tables)

    def encode_into(self, data: list[np.ndarray], parity: list[np.ndarray]) -> None:
        """Parity of K contiguous uint8 rows into M contiguous writable ones
        (of one length: ISA-L reads and writes that many bytes of each)."""
        length = parity[0].nbytes
        if len(data) != self.k or len(parity) != self.m or \
                any(x.ndim != 1 or x.nbytes != length for x in (*data, *parity)):
            raise ValueError(f"{self.k} data and {self.m} parity rows of one length needed")
        dp = (ctypes.c_void_p * self.k)(*[d.ctypes.data for d in data])
        pp = (ctypes.c_void_p * self.m)(*[x.ctypes.data for x in parity])
        self._encode(length, self.k, self.m, self._tables, dp, pp)

    def matches(self, drv) -> bool:
        """Whether this gives pyeclib's parity (random rows of a few lengths)."""
        for length in (PAGE, 3 * PAGE, 64 << 10):
            data = [np.frombuffer(os.urandom(length), dtype=np.uint8) for _ in range(self.k)]
            mine = [np.empty(length, dtype=np.uint8) for _ in range(self.m)]
            self.encode_into(data, mine)
            frags = drv.encode(b"".join(d.tobytes() for d in data))
            hdr = len(frags[0]) - length
            if any(bytes(frags[self.k + j][hdr:hdr + length]) != mine[j].tobytes()
                   for j in range(self.m)):
                return False
        return True

    @classmethod
    def load(cls, plugin: str, k: int, m: int, drv) -> "_DirectEncoder | None":
        gen = cls.MATRIX.get(plugin)
        if gen is None:
            return None
        try:
            import glob

            import pyeclib_c
            here = os.path.dirname(pyeclib_c.__file__)
            paths = sorted(glob.glob(os.path.join(here, "pyeclib.libs", "libisal*.so*")))
            if not paths:
                from ctypes.util import find_library
                found = find_library("isal")
                paths = [found] if found else []
            if not paths:
                return None
            enc = cls(ctypes.CDLL(paths[0]), gen, k, m)
            return enc if enc.matches(drv) else None
        except (OSError, AttributeError, ImportError):
            return None


def load_driver(plugin: str, k: int, m: int):
    """A pyeclib driver, or InvalidArgument naming why the plugin cannot load."""
    if plugin not in SUPPORTED_PLUGINS:
        raise InvalidArgument(
            f"unknown plugin {plugin!r} (supported: {', '.join(SUPPORTED_PLUGINS)})")
    try:
        import warnings

        from pyeclib.ec_iface import ECDriver
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ECDriver(k=k, m=m, ec_type=plugin)
    except Exception as e:  # pyeclib raises its own ECDriverError family
        raise InvalidArgument(f"plugin {plugin!r} cannot load here with k={k} m={m}: {e}")


class Codec:
    """K+M erasure code over raw chunks of equal, page-multiple length."""

    def __init__(self, plugin: str, k: int, m: int, delta_method: str = "auto"):
        self.plugin, self.k, self.m = plugin, k, m
        self._drv = load_driver(plugin, k, m)
        self._templates: dict[int, list[bytes]] = {}
        self._tlock = threading.Lock()
        self._hdr = len(self._drv.encode(bytes(k * PAGE))[0]) - PAGE
        self._direct = None if os.environ.get("ECFS_PYECLIB_ENCODE") == "1" else \
            _DirectEncoder.load(plugin, k, m, self._drv)
        self.coefficients = self._probe_coefficients()
        self.flags = FLAG_PARITY_DELTA if self._delta_self_test() else 0
        if self.coefficients is not None:
            self.flags |= FLAG_DELTA_GF8_TABLE
        if delta_method == "auto":
            # encode-of-delta measured faster than numpy lookups for ISA-L and
            # is valid for every linear plugin (docs/benchmarks.md).
            delta_method = "encode"
        if delta_method == "table" and not self.flags & FLAG_DELTA_GF8_TABLE:
            raise InvalidArgument(f"plugin {plugin} is not byte-wise GF(2^8): no table deltas")
        self.delta_method = delta_method

    # -- Ceph-shaped interface -------------------------------------------------
    def encode(self, data: list) -> list[memoryview]:
        """The M parity chunks of K data chunks (buffers of one page-multiple length)."""
        length = len(data[0])
        if self._direct is not None:
            par = [np.empty(length, dtype=np.uint8) for _ in range(self.m)]
            self.encode_into(data, par)
            return [memoryview(x) for x in par]
        frags = self._drv.encode(b"".join(data) if len(data) > 1 else bytes(data[0]))
        hdr = self._hdr
        return [memoryview(f)[hdr:hdr + length] for f in frags[self.k:]]

    def encode_into(self, data: list, parity: list) -> None:
        """Encode K data rows into the M ``parity`` rows (numpy views of
        one length): in one call of ISA-L's own encode when the rows are
        contiguous and the plugin's is there, else through pyeclib,
        ENCODE_SLICE bytes of each row per call (its own copies of a call,
        joined input, aligned buffers, K+M fragments, are several times
        the input: a flush of a whole object in one call was ~17 MiB of
        transient heap per flush thread)."""
        if self._direct is not None:
            # (rows ISA-L cannot take as they are: a contiguous copy in, or
            # out into a scratch row)
            outs = [p if isinstance(p, np.ndarray) and p.dtype == np.uint8 and
                    p.flags.c_contiguous and p.flags.writeable else
                    np.empty(len(p), dtype=np.uint8) for p in parity]
            self._direct.encode_into([np.ascontiguousarray(as_u8(d)) for d in data], outs)
            for p, o in zip(parity, outs):
                if o is not p:
                    p[:] = o
            return
        length = len(data[0])
        for a in range(0, length, ENCODE_SLICE):
            b = min(length, a + ENCODE_SLICE)
            par = self.encode([d[a:b] for d in data])
            for j in range(self.m):
                parity[j][a:b] = np.frombuffer(par[j], dtype=np.uint8)

    def minimum_to_decode(self, want: Iterable[int], available: Iterable[int]) -> list[int]:
        """Which chunks to read to get ``want``: the wanted ones if all are
        available, else K available ones, data chunks first (cheapest: they
        are also what a healthy read touches)."""
        want, avail = set(want), sorted(set(available))
        if want <= set(avail):
            return sorted(want)
        if len(avail) < self.k:
            raise InvalidArgument("fewer than K chunks available")
        return avail[: self.k]

    def decode(self, chunks: Mapping[int, object], want: Iterable[int]) -> dict[int, bytes]:
        """Chunks ``want`` (any of 0..K+M-1) from at least K of ``chunks``."""
        want = list(want)
        out = {i: bytes(chunks[i]) for i in want if i in chunks}
        missing = [i for i in want if i not in chunks]
        if not missing:
            return out
        have = sorted(chunks)[: self.k]
        length = len(chunks[have[0]])
        tmpl = self._template(length)
        frags = [tmpl[i] + bytes(chunks[i]) for i in have]
        hdr = self._hdr
        if all(i < self.k for i in missing):
            data = self._drv.decode(frags)
            for i in missing:
                out[i] = data[i * length:(i + 1) * length]
        else:
            rebuilt = self._drv.reconstruct(frags, missing)
            for i, f in zip(missing, rebuilt):
                out[i] = f[hdr:hdr + length]
        return out

    # -- parity delta --------------------------------------------------------
    @staticmethod
    def make_delta(old, new) -> np.ndarray:
        return np.bitwise_xor(as_u8(old), as_u8(new))

    def parity_deltas(self, deltas: Mapping[int, object]) -> list[np.ndarray]:
        """The M parity changes caused by data chunk changes {index: delta}."""
        if not self.flags & FLAG_PARITY_DELTA:
            raise InvalidArgument(f"plugin {self.plugin} cannot do parity deltas")
        length = len(next(iter(deltas.values())))
        if self.delta_method == "table":
            out = [np.zeros(length, dtype=np.uint8) for _ in range(self.m)]
            for i, d in deltas.items():
                for j in range(self.m):
                    np.bitwise_xor(out[j], GF_MUL[self.coefficients[j][i]].take(as_u8(d)), out=out[j])
            return out
        zero = bytes(length)
        data = [deltas[i] if i in deltas else zero for i in range(self.k)]
        return [as_u8(p) for p in self.encode(data)]

    def apply_delta(self, parity_index: int, data_index: int, delta, old_parity) -> np.ndarray:
        """New parity chunk ``parity_index`` (0..M-1) after data chunk
        ``data_index`` changed by ``delta``."""
        if self.delta_method == "table":
            change = GF_MUL[self.coefficients[parity_index][data_index]].take(as_u8(delta))
        else:
            change = self.parity_deltas({data_index: delta})[parity_index]
        return np.bitwise_xor(as_u8(old_parity), change)

    # -- internals -------------------------------------------------------------
    def _template(self, length: int) -> list[bytes]:
        t = self._templates.get(length)
        if t is None:
            with self._tlock:
                frags = self._drv.encode(bytes(self.k * length))
                t = [bytes(f[: self._hdr]) for f in frags]
                self._templates[length] = t
        return t

    def _probe_coefficients(self):
        """The plugin's M x K coefficients if it is byte-wise GF(2^8), else None."""
        coef = np.zeros((self.m, self.k), dtype=np.uint8)
        for i in range(self.k):
            unit = [bytes(PAGE)] * self.k
            one = bytearray(PAGE)
            one[0] = 1
            unit[i] = bytes(one)
            par = self.encode(unit)
            for j in range(self.m):
                coef[j, i] = par[j][0]
        data = [os.urandom(PAGE) for _ in range(self.k)]
        par = self.encode(data)
        for j in range(self.m):
            acc = np.zeros(PAGE, dtype=np.uint8)
            for i in range(self.k):
                acc ^= GF_MUL[coef[j, i]].take(as_u8(data[i]))
            if acc.tobytes() != bytes(par[j]):
                return None
        return coef.tolist()

    def _delta_self_test(self) -> bool:
        """Linearity over GF(2): encode(a) ^ encode(b) == encode(a ^ b)."""
        a = [os.urandom(PAGE) for _ in range(self.k)]
        b = [os.urandom(PAGE) for _ in range(self.k)]
        ab = [np.bitwise_xor(as_u8(x), as_u8(y)).tobytes() for x, y in zip(a, b)]
        pa, pb, pab = self.encode(a), self.encode(b), self.encode(ab)
        return all(np.array_equal(np.bitwise_xor(as_u8(x), as_u8(y)), as_u8(z))
                   for x, y, z in zip(pa, pb, pab))

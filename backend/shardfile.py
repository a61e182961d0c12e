"""Shard files: where and how one shard of one object is kept on an OSD.

For shard i of object NAME on an OSD directory::

    OSD/objects/XX/ESC.sI        the shard's bytes: chunk i of stripe s at s*C.
                                 Sparse: padding and holes are never written
                                 and read back as zeros.
    OSD/objects/XX/ESC.sI.meta   the sidecar: a 4 KiB header, then one u32
                                 page checksum per 4 KiB page of the shard.

XX is two hex digits of a hash of NAME (fan-out); ESC is NAME with every
byte outside [A-Za-z0-9_.-] (and a leading '.') written %XX, or, when that
would be longer than 200 bytes, '#' and a hash (the header keeps the name).

The header (format in docs/formats.md, "Shard sidecar"): magic, format
version, flags, shard index, K, M, the shard's own version; on the M+1 info
shards (data shard 0 and the M parity shards) also the object info (size,
version, chunk size) and the version vector saying which version every
shard of the object must have. A shard whose own version is lower than its
vector entry is stale and is not used.

Page checksums are stored as crc32c(page) XOR crc32c(zero page), so the
stored value of an all-zero page is 0 and an unwritten (sparse) part of the
table reads as "zero page" with no special case. Checksum records are
metadata: their I/O is counted apart from shard reads and writes.
"""
from __future__ import annotations

import errno
import functools
import hashlib
import os
import struct
from dataclasses import dataclass, field

import crc32c as _crc32c
import numpy as np

PAGE = 4096
HEADER_AREA = 4096       # the crc table starts here in the sidecar
MAGIC = b"ECFSSHRD"
FORMAT = 1
MAX_WIDTH = 64           # K+M limit: the vector has 64 slots
FLAG_INFO = 1
FLAG_EXISTS = 2          # cleared header = object removed (not used on disk yet)

# magic, format, flags, shard, k, m, pad, shard_version, object_version,
# object_size, chunk_size, name_len, name, vector
_HDR = struct.Struct("<8sBBBBB3xQQQIH2x256s64Q")
_HCRC = struct.Struct("<I")
HEADER_SIZE = _HDR.size + _HCRC.size

ZERO_PAGE_CRC = _crc32c.crc32c(bytes(PAGE))


class CorruptHeader(ValueError):
    pass


@dataclass
class ShardHeader:
    shard: int
    k: int
    m: int
    name: str
    shard_version: int = 0
    info: bool = False
    object_version: int = 0
    object_size: int = 0
    chunk_size: int = 0
    vector: list[int] = field(default_factory=list)

    def pack(self) -> bytes:
        nb = self.name.encode()
        vec = list(self.vector) + [0] * (MAX_WIDTH - len(self.vector))
        body = _HDR.pack(MAGIC, FORMAT, FLAG_INFO if self.info else 0, self.shard, self.k,
                         self.m, self.shard_version, self.object_version, self.object_size,
                         self.chunk_size, len(nb), nb, *vec)
        return body + _HCRC.pack(_crc32c.crc32c(body))

    @classmethod
    def unpack(cls, buf: bytes) -> "ShardHeader":
        if len(buf) < HEADER_SIZE:
            raise CorruptHeader("short header")
        body = buf[: _HDR.size]
        (crc,) = _HCRC.unpack_from(buf, _HDR.size)
        if crc != _crc32c.crc32c(body):
            raise CorruptHeader("header checksum mismatch")
        f = _HDR.unpack(body)
        if f[0] != MAGIC:
            raise CorruptHeader("bad magic")
        if f[1] > FORMAT:
            raise CorruptHeader(f"shard format {f[1]} is newer than this ecfs knows")
        flags, shard, k, m = f[2], f[3], f[4], f[5]
        name = f[11][: f[10]].decode()
        vec = list(f[12:12 + k + m]) if flags & FLAG_INFO else []
        return cls(shard=shard, k=k, m=m, name=name, shard_version=f[6],
                   info=bool(flags & FLAG_INFO), object_version=f[7], object_size=f[8],
                   chunk_size=f[9], vector=vec)


def name_hash(name: str) -> bytes:
    return hashlib.blake2b(name.encode(), digest_size=16).digest()


_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")


def escape_name(name: str) -> str:
    raw = name.encode()
    out = "".join(chr(b) if b in _SAFE and not (i == 0 and b == 0x2E) else f"%{b:02X}"
                  for i, b in enumerate(raw))
    if len(out) > 200:
        return "#" + hashlib.sha256(raw).hexdigest()
    return out


def unescape_name(esc: str) -> str | None:
    """The object name of a file stem, or None for a hashed one (read the header)."""
    if esc.startswith("#"):
        return None
    out = bytearray()
    i = 0
    while i < len(esc):
        if esc[i] == "%":
            out.append(int(esc[i + 1:i + 3], 16))
            i += 3
        else:
            out.append(ord(esc[i]))
            i += 1
    return out.decode()


@functools.lru_cache(maxsize=16384)
def rel_paths(name: str, shard: int) -> tuple[str, str]:
    """(data, sidecar) paths of a shard, relative to the OSD directory.
    (Pure, and asked ~20 times per write: kept, bounded.)"""
    sub = name_hash(name)[:1].hex()
    base = f"objects/{sub}/{escape_name(name)}.s{shard}"
    return base, base + ".meta"


def parse_shard_filename(fname: str) -> tuple[str, int] | None:
    """(escaped stem, shard) of a data file name ``ESC.sI``; None for others."""
    if fname.endswith(".meta"):
        return None
    stem, dot, idx = fname.rpartition(".s")
    if not dot or not idx.isdigit():
        return None
    return stem, int(idx)


def shard_file_object(dirpath: str, fname: str) -> tuple[str, int] | None:
    """(object name, shard) of a shard data file or sidecar ``fname`` in
    ``dirpath``, or None for a file that is none of ours. A hashed long
    name is read from the sidecar's header (None if it cannot be)."""
    try:
        parsed = parse_shard_filename(fname[:-5] if fname.endswith(".meta") else fname)
        if parsed is None:
            return None
        name = unescape_name(parsed[0])
    except (ValueError, UnicodeDecodeError):
        return None                         # a stray %-escape: not a name we wrote
    if name is None:
        meta = os.path.join(dirpath, fname if fname.endswith(".meta") else fname + ".meta")
        try:
            with open(meta, "rb") as fh:
                name = ShardHeader.unpack(fh.read(HEADER_SIZE)).name
        except (OSError, CorruptHeader):
            return None
    return name, parsed[1]


def page_crcs(buf, pages: int | None = None) -> np.ndarray:
    """Stored checksum values (crc32c ^ ZERO_PAGE_CRC) for each page of buf.

    A short last page counts as zero-padded, which is what a read of a sparse
    file returns. One C call per page; no Python work per byte.
    """
    mv = memoryview(buf).cast("B")
    n = len(mv)
    if pages is None:
        pages = (n + PAGE - 1) // PAGE
    crc = _crc32c.crc32c
    if n == PAGE and pages == 1:        # most of a scattered flush's calls
        return np.array((crc(mv) ^ ZERO_PAGE_CRC,), dtype=np.uint32)
    vals = np.empty(pages, dtype=np.uint32)
    full = n // PAGE
    if full:
        vals[:full] = [crc(mv[o:o + PAGE]) for o in range(0, full * PAGE, PAGE)]
    if full < pages:
        tail = bytes(mv[full * PAGE:]).ljust(PAGE, b"\0")
        vals[full] = crc(tail)
        vals[full + 1:] = ZERO_PAGE_CRC
    vals ^= np.uint32(ZERO_PAGE_CRC)
    return vals


_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 1, 2
_libc = None


def punch_hole(path: str, offset: int, length: int) -> None:
    """Deallocate [offset, offset+length) of a shard file (reads as zeros);
    where the file system cannot punch holes, write the zeros instead."""
    global _libc
    if _libc is None:
        import ctypes
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    try:
        fd = os.open(path, os.O_WRONLY)
    except FileNotFoundError:
        return          # nothing there: already a hole
    try:
        size = os.fstat(fd).st_size
        length = min(length, size - offset)
        if length <= 0:
            return
        if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length):
            import ctypes
            err = ctypes.get_errno()
            if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise OSError(err, os.strerror(err), path)
            zeros = bytes(min(length, 1 << 20))
            pos, end = offset, offset + length
            while pos < end:
                pos += os.pwrite(fd, zeros[: end - pos], pos)
    finally:
        os.close(fd)


def crc_offset(page: int) -> int:
    return HEADER_AREA + 4 * page

r"""Ceph's ``rbd diff v1`` stream (``rbd export-diff`` / ``import-diff``).

The byte layout is Ceph's, from ``doc/dev/rbd-diff.rst``; every integer is
little-endian::

    "rbd diff v1\n"                          12-byte banner
    'f' le32 LEN  LEN bytes                  from snapshot   (absent: from the beginning)
    't' le32 LEN  LEN bytes                  to snapshot     (absent: image HEAD)
    's' le64 SIZE                            image size at the end of the diff
    'w' le64 OFFSET le64 LENGTH  LENGTH bytes   updated data  } ascending offsets,
    'z' le64 OFFSET le64 LENGTH                 zeroed range  } never overlapping
    'e'                                      end

``DiffWriter`` writes exactly what ``rbd export-diff`` writes: the banner,
then 'f', 't', 's' in that order (f/t only when there is such a snapshot),
data records, 'e'. It refuses data records that go backwards or overlap,
since Ceph's ``import-diff`` applies several records at once and
``merge-diff`` refuses offsets that go backwards.

Reading is two-phase so nothing is applied from a stream that turns out to
be bad: ``validate()`` reads the whole stream and checks its structure,
``records()`` then yields the data records lazily, a data record cut into
pieces of at most ``CHUNK_SIZE`` bytes. A pipe is first copied to a
temporary file with ``spool()``. Everything malformed raises
``InvalidArgument`` with one line naming the byte offset (counted from the
first byte of the banner).

The "rbd diff v2" stream (found inside ``rbd export --export-format 2``
images) is recognised and refused.
"""
from __future__ import annotations

import io
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator, NamedTuple, Union

from backend.errors import InvalidArgument

BANNER = b"rbd diff v1\n"
BANNER_V2 = b"rbd diff v2\n"
_IMAGE_BANNER_PREFIX = b"rbd image v"   # 'rbd export' of a whole image

TAG_FROM_SNAP = ord("f")
TAG_TO_SNAP = ord("t")
TAG_SIZE = ord("s")
TAG_WRITE = ord("w")
TAG_ZERO = ord("z")
TAG_END = ord("e")
_METADATA_TAGS = (TAG_FROM_SNAP, TAG_TO_SNAP, TAG_SIZE)

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_EXTENT = struct.Struct("<QQ")      # offset, length
U64_MAX = (1 << 64) - 1

# Ceph's tools refuse snapshot names longer than this in a diff stream.
MAX_SNAP_NAME = 4096
# Largest piece of a 'w' record records() hands out, and the read size
# validate() uses to step over data in a pipe.
CHUNK_SIZE = 4 << 20

PathOrFile = Union[str, "os.PathLike[str]", BinaryIO]


@dataclass(frozen=True)
class DiffHeader:
    """The metadata records: from-snap ('f'), to-snap ('t'), size ('s')."""

    from_snap: str | None
    to_snap: str | None
    size: int


class Extent(NamedTuple):
    """One data record: kind 'w' (data follows) or 'z' (zeroed range)."""

    kind: str
    offset: int
    length: int


@dataclass
class DiffSummary:
    """What validate() found in a well-formed stream."""

    header: DiffHeader
    records: int = 0            # data records ('w' and 'z')
    data_bytes: int = 0         # payload of the 'w' records
    zero_bytes: int = 0         # bytes covered by 'z' records
    stream_bytes: int = 0       # banner through 'e'
    extents: list[Extent] = field(default_factory=list)


# -- writing -----------------------------------------------------------------

def _encode_snap_name(name: str, what: str) -> bytes:
    raw = name.encode("utf-8")
    if not raw:
        raise ValueError(f"{what} snapshot name is empty")
    if len(raw) > MAX_SNAP_NAME:
        raise ValueError(f"{what} snapshot name is longer than {MAX_SNAP_NAME} bytes")
    return raw


class DiffWriter:
    """Writes one rbd diff v1 stream to ``out``, record by record.

    Nothing is buffered: each call writes its record at once. The caller
    owns ``out`` (close() writes the end record and does not close it).
    As a context manager the end record is written only when the block
    succeeds, so an export that fails half way leaves a stream every
    reader refuses as truncated.
    """

    def __init__(self, out: BinaryIO, header: DiffHeader) -> None:
        if not 0 <= header.size <= U64_MAX:
            raise ValueError(f"image size {header.size} does not fit in 64 bits")
        parts = [BANNER]
        if header.from_snap is not None:
            raw = _encode_snap_name(header.from_snap, "from")
            parts += [b"f", _U32.pack(len(raw)), raw]
        if header.to_snap is not None:
            raw = _encode_snap_name(header.to_snap, "to")
            parts += [b"t", _U32.pack(len(raw)), raw]
        parts += [b"s", _U64.pack(header.size)]
        self._out = out
        self.header = header
        self._end = 0           # end of the last data record
        self._closed = False
        out.write(b"".join(parts))

    def _check(self, offset: int, length: int) -> None:
        if self._closed:
            raise ValueError("diff stream already closed")
        if offset < 0 or length < 0:
            raise ValueError(f"negative offset or length ({offset}, {length})")
        if offset < self._end:
            raise ValueError(
                f"data record at offset {offset} overlaps or is out of order "
                f"(the previous one ends at {self._end})")
        if offset + length > self.header.size:
            raise ValueError(
                f"extent {offset}+{length} is past the image size {self.header.size}")

    def data(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """A 'w' record: ``data`` replaces the image bytes at ``offset``.

        An empty ``data`` writes nothing (Ceph's merge-diff refuses
        zero-length records).
        """
        view = memoryview(data).cast("B")
        self._check(offset, len(view))
        if not view:
            return
        self._out.write(b"w" + _EXTENT.pack(offset, len(view)))
        self._out.write(view)
        self._end = offset + len(view)

    def zero(self, offset: int, length: int) -> None:
        """A 'z' record: ``length`` bytes at ``offset`` read as zeros.

        A zero ``length`` writes nothing.
        """
        self._check(offset, length)
        if not length:
            return
        self._out.write(b"z" + _EXTENT.pack(offset, length))
        self._end = offset + length

    def close(self) -> None:
        """Write the end record; the stream is complete."""
        if not self._closed:
            self._out.write(b"e")
            self._closed = True

    def __enter__(self) -> DiffWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


# -- reading -----------------------------------------------------------------

def _truncated(detail: str) -> InvalidArgument:
    return InvalidArgument(f"truncated stream (no end record): {detail}")


def _tag_text(tag: int) -> str:
    return chr(tag) if 0x21 <= tag < 0x7F else f"\\x{tag:02x}"


class _Reader:
    """Reads a stream, counting bytes from its start for error messages."""

    def __init__(self, inp: BinaryIO) -> None:
        self.inp = inp
        self.pos = 0

    def read(self, n: int) -> bytes:
        """Up to n bytes (fewer only at end of stream)."""
        parts = []
        while n > 0:
            got = self.inp.read(n)
            if not got:
                break
            parts.append(got)
            n -= len(got)
            self.pos += len(got)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def exact(self, n: int, what: str, at: int) -> bytes:
        got = self.read(n)
        if len(got) != n:
            raise _truncated(f"{what} at byte {at} is cut short")
        return got


def _read_snap_name(r: _Reader, tag: int, at: int) -> str:
    what = f"'{chr(tag)}' record"
    (length,) = _U32.unpack(r.exact(4, what, at))
    if length > MAX_SNAP_NAME:
        raise InvalidArgument(
            f"snapshot name in the {what} at byte {at} is {length} bytes "
            f"(at most {MAX_SNAP_NAME})")
    if length == 0:
        raise InvalidArgument(f"empty snapshot name in the {what} at byte {at}")
    raw = r.exact(length, what, at)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgument(
            f"snapshot name in the {what} at byte {at} is not UTF-8") from None


def _read_banner(r: _Reader) -> None:
    head = r.read(len(BANNER))
    if head == BANNER:
        return
    if head == BANNER_V2:
        raise InvalidArgument(
            "rbd diff v2 streams are not supported (they are the parts of an "
            "'rbd export --export-format 2' image; make the diff with "
            "'rbd export-diff', which writes v1)")
    if head.startswith(_IMAGE_BANNER_PREFIX):
        raise InvalidArgument(
            "not an rbd diff v1 stream (this is a whole-image 'rbd export' stream)")
    if head and BANNER.startswith(head):
        raise _truncated("the header is cut short")
    raise InvalidArgument("not an rbd diff v1 stream")


def _scan(inp: BinaryIO, *, with_data: bool, chunk_size: int,
          max_size: int | None) -> Iterator[tuple]:
    """The one parser: yields ('h', DiffHeader), then ('w', offset, chunk)
    or ('w', offset, length) without data, ('z', offset, length), and
    finally ('e', stream length through the end record). Raises InvalidArgument on anything else."""
    r = _Reader(inp)
    _read_banner(r)

    seen: dict[int, int] = {}
    from_snap = to_snap = None
    size: int | None = None
    while True:
        at = r.pos
        raw = r.read(1)
        if not raw:
            raise _truncated(f"stream ends at byte {at}")
        tag = raw[0]
        if tag not in _METADATA_TAGS:
            break
        if tag in seen:
            raise InvalidArgument(
                f"second '{chr(tag)}' record at byte {at} "
                f"(the first is at byte {seen[tag]})")
        seen[tag] = at
        if tag == TAG_SIZE:
            (size,) = _U64.unpack(r.exact(8, "'s' record", at))
        elif tag == TAG_FROM_SNAP:
            from_snap = _read_snap_name(r, tag, at)
        else:
            to_snap = _read_snap_name(r, tag, at)

    if tag not in (TAG_WRITE, TAG_ZERO, TAG_END):
        raise InvalidArgument(f"unknown record tag '{_tag_text(tag)}' at byte {at}")
    if size is None:
        raise InvalidArgument(
            f"no image size ('s') record before the '{chr(tag)}' record at byte {at}")
    if max_size is not None and size > max_size:
        raise InvalidArgument(
            f"image size {size} in the stream is larger than the limit {max_size}")
    yield ("h", DiffHeader(from_snap, to_snap, size))

    prev_offset = 0
    end = 0
    while tag != TAG_END:
        if tag in _METADATA_TAGS:
            raise InvalidArgument(
                f"'{chr(tag)}' record at byte {at} comes after data records")
        if tag not in (TAG_WRITE, TAG_ZERO):
            raise InvalidArgument(f"unknown record tag '{_tag_text(tag)}' at byte {at}")
        kind = chr(tag)
        offset, length = _EXTENT.unpack(r.exact(16, f"'{kind}' record", at))
        if length == 0:
            raise InvalidArgument(f"'{kind}' record at byte {at} has length 0")
        if offset < prev_offset:
            raise InvalidArgument(
                f"data record at byte {at} is out of order (offset {offset} "
                f"comes after offset {prev_offset})")
        if offset < end:
            raise InvalidArgument(
                f"data record at byte {at} overlaps the previous one (offset "
                f"{offset} < {end})")
        if offset + length > size:
            raise InvalidArgument(
                f"extent past image size: '{kind}' record at byte {at} covers "
                f"{offset}..{offset + length}, the image is {size} bytes")
        if tag == TAG_ZERO:
            yield ("z", offset, length)
        elif with_data:
            done = 0
            while done < length:
                n = min(chunk_size, length - done)
                chunk = r.read(n)
                if len(chunk) != n:
                    raise _truncated(
                        f"'w' record at byte {at} has {done + len(chunk)} of "
                        f"its {length} data bytes")
                yield ("w", offset + done, memoryview(chunk))
                done += n
        else:
            _skip(r, length, at)
            yield ("w", offset, length)
        prev_offset, end = offset, offset + length

        at = r.pos
        raw = r.read(1)
        if not raw:
            raise _truncated(f"stream ends at byte {at}")
        tag = raw[0]

    if r.read(1):
        raise InvalidArgument(f"trailing data after the end record at byte {at}")
    yield ("e", at + 1)


def _skip(r: _Reader, length: int, at: int) -> None:
    """Step over a 'w' record's data, seeking where the file allows."""
    inp = r.inp
    try:
        seekable = inp.seekable()
    except (AttributeError, ValueError):
        seekable = False
    if seekable:
        here = inp.tell()
        eof = inp.seek(0, io.SEEK_END)
        if eof - here < length:
            raise _truncated(
                f"'w' record at byte {at} has {eof - here} of its {length} data bytes")
        inp.seek(here + length)
        r.pos += length
        return
    left = length
    while left:
        got = len(r.read(min(CHUNK_SIZE, left)))
        if got == 0:
            raise _truncated(
                f"'w' record at byte {at} has {length - left} of its {length} data bytes")
        left -= got


def validate(src: PathOrFile, *, max_size: int | None = None,
             want_extents: bool = True) -> DiffSummary:
    """Read a whole stream and check it; return what it holds.

    ``src`` is a path or a binary file read from its current position; a
    seekable file is put back where it was, ready for records(). Checks:
    the v1 banner; only known tags; 'f', 't', 's' (each at most once, 's'
    required, snapshot names 1..4096 bytes of UTF-8) before any data
    record; data records of non-zero length in ascending offset order,
    not overlapping, inside the image size (and the size within
    ``max_size`` when given); an 'e' record, and nothing after it.
    ``want_extents=False`` leaves ``extents`` empty for huge diffs.
    """
    if isinstance(src, (str, os.PathLike)):
        with open(src, "rb") as f:
            return validate(f, max_size=max_size, want_extents=want_extents)
    start = src.tell() if _seekable(src) else None
    summary: DiffSummary | None = None
    for ev in _scan(src, with_data=False, chunk_size=CHUNK_SIZE, max_size=max_size):
        kind = ev[0]
        if kind == "h":
            summary = DiffSummary(header=ev[1])
            continue
        assert summary is not None
        if kind == "e":
            summary.stream_bytes = ev[1]
            break
        summary.records += 1
        if kind == "w":
            summary.data_bytes += ev[2]
        else:
            summary.zero_bytes += ev[2]
        if want_extents:
            summary.extents.append(Extent(kind, ev[1], ev[2]))
    assert summary is not None
    if start is not None:
        src.seek(start)
    return summary


def read_header(inp: BinaryIO) -> DiffHeader:
    """The header of a stream, read from the current position (which moves
    past the metadata records and the first data tag)."""
    for ev in _scan(inp, with_data=False, chunk_size=CHUNK_SIZE, max_size=None):
        return ev[1]
    raise AssertionError("unreachable")


def records(inp: BinaryIO, *, chunk_size: int = CHUNK_SIZE) -> Iterator[tuple]:
    """Yield the data records of a stream read from the current position.

    ``('w', offset, memoryview)`` for data, a record longer than
    ``chunk_size`` cut into consecutive pieces with their own offsets;
    ``('z', offset, length)`` for zeroed ranges. The stream is checked
    as it is read (an error can come after records were yielded, so run
    validate() first when nothing must be applied from a bad stream).
    """
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    for ev in _scan(inp, with_data=True, chunk_size=chunk_size, max_size=None):
        if ev[0] in ("w", "z"):
            yield ev


def _seekable(f: BinaryIO) -> bool:
    try:
        return bool(f.seekable())
    except (AttributeError, ValueError, OSError):
        return False


def spool(inp: BinaryIO, *, dir: str | None = None) -> BinaryIO:
    """A seekable file with the stream's bytes: ``inp`` itself when it is
    seekable, else a temporary file (in ``dir``) holding a copy of the
    rest of ``inp``, positioned at its start. The temporary file is gone
    once closed."""
    if _seekable(inp):
        return inp
    tmp = tempfile.TemporaryFile(prefix="ecfs-diff-", dir=dir)
    try:
        shutil.copyfileobj(inp, tmp, CHUNK_SIZE)
        tmp.seek(0)
    except BaseException:
        tmp.close()
        raise
    return tmp

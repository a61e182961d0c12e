"""rbdlike.diffstream: Ceph's rbd diff v1 stream, byte for byte.

Streams are built by hand from doc/dev/rbd-diff.rst with struct.pack; the
last tests hand DiffWriter output to Ceph's own parser (`rbd merge-diff`).
"""
from __future__ import annotations

import io
import os
import random
import shutil
import struct
import subprocess

import pytest

from backend.errors import InvalidArgument
from rbdlike.diffstream import (
    BANNER,
    DiffHeader,
    DiffWriter,
    Extent,
    records,
    read_header,
    spool,
    validate,
)


# -- the format, spelled out independently of the module -----------------------

def snap(tag: bytes, name: str) -> bytes:
    raw = name.encode()
    return tag + struct.pack("<I", len(raw)) + raw


def size_rec(n: int) -> bytes:
    return b"s" + struct.pack("<Q", n)


def w(off: int, data: bytes) -> bytes:
    return b"w" + struct.pack("<QQ", off, len(data)) + data


def z(off: int, length: int) -> bytes:
    return b"z" + struct.pack("<QQ", off, length)


END = b"e"


def sample_stream() -> bytes:
    return (b"rbd diff v1\n" + snap(b"f", "s1") + snap(b"t", "s2")
            + size_rec(64) + w(0, b"hello") + z(8, 8) + w(16, b"world!") + END)


def write_stream(header: DiffHeader, ops) -> bytes:
    out = io.BytesIO()
    with DiffWriter(out, header) as wr:
        for op in ops:
            if op[0] == "w":
                wr.data(op[1], op[2])
            else:
                wr.zero(op[1], op[2])
    return out.getvalue()


def apply(model: bytearray, stream: bytes) -> bytearray:
    """Apply a stream to an image model as import-diff does: resize to the
    's' size, then the data records."""
    f = io.BytesIO(stream)
    summary = validate(f)
    size = summary.header.size
    del model[size:]
    model.extend(bytes(size - len(model)))
    for rec in records(f):
        if rec[0] == "w":
            model[rec[1]:rec[1] + len(rec[2])] = rec[2]
        else:
            model[rec[1]:rec[1] + rec[2]] = bytes(rec[2])
    return model


# -- writer --------------------------------------------------------------------

def test_writer_emits_the_documented_bytes():
    got = write_stream(DiffHeader("s1", "s2", 64),
                       [("w", 0, b"hello"), ("z", 8, 8), ("w", 16, b"world!")])
    assert got == sample_stream()


def test_writer_omits_absent_snapshots():
    assert write_stream(DiffHeader(None, None, 4096), []) == BANNER + size_rec(4096) + END
    assert (write_stream(DiffHeader(None, "snap", 10), [("w", 2, b"ab")])
            == BANNER + snap(b"t", "snap") + size_rec(10) + w(2, b"ab") + END)
    assert (write_stream(DiffHeader("a", None, 0), [])
            == BANNER + snap(b"f", "a") + size_rec(0) + END)


def test_writer_utf8_names_are_counted_in_bytes():
    got = write_stream(DiffHeader(None, "été", 0), [])
    assert got == BANNER + b"t" + struct.pack("<I", 5) + "été".encode() + size_rec(0) + END


def test_writer_adjacent_records_and_empty_ones():
    got = write_stream(DiffHeader(None, None, 12),
                       [("w", 0, b"abcd"), ("z", 4, 4), ("w", 8, b""), ("z", 8, 0),
                        ("w", 8, memoryview(b"wxyz"))])
    assert got == BANNER + size_rec(12) + w(0, b"abcd") + z(4, 4) + w(8, b"wxyz") + END


@pytest.mark.parametrize("ops", [
    [("w", 8, b"ab"), ("w", 0, b"ab")],          # descending
    [("w", 0, b"abcd"), ("z", 3, 2)],            # overlapping
    [("z", 0, 8), ("z", 4, 8)],                  # overlapping zeros
    [("w", 60, b"123456")],                      # past the image size
    [("z", 0, 65)],
    [("w", -1, b"a")],
])
def test_writer_refuses_bad_order(ops):
    out = io.BytesIO()
    wr = DiffWriter(out, DiffHeader(None, None, 64))
    with pytest.raises(ValueError):
        for op in ops:
            (wr.data if op[0] == "w" else wr.zero)(op[1], op[2])


def test_writer_refuses_bad_header_and_use_after_close():
    with pytest.raises(ValueError):
        DiffWriter(io.BytesIO(), DiffHeader("", None, 0))
    with pytest.raises(ValueError):
        DiffWriter(io.BytesIO(), DiffHeader(None, None, 1 << 64))
    wr = DiffWriter(io.BytesIO(), DiffHeader(None, None, 8))
    wr.close()
    with pytest.raises(ValueError):
        wr.zero(0, 1)


def test_writer_leaves_a_failed_export_truncated():
    out = io.BytesIO()
    with pytest.raises(RuntimeError):
        with DiffWriter(out, DiffHeader(None, None, 8)) as wr:
            wr.data(0, b"ab")
            raise RuntimeError("read failed")
    with pytest.raises(InvalidArgument, match="truncated"):
        validate(io.BytesIO(out.getvalue()))


# -- reader --------------------------------------------------------------------

def test_validate_summary():
    s = validate(io.BytesIO(sample_stream()))
    assert s.header == DiffHeader("s1", "s2", 64)
    assert s.records == 3
    assert s.data_bytes == 11
    assert s.zero_bytes == 8
    assert s.stream_bytes == len(sample_stream())
    assert s.extents == [Extent("w", 0, 5), Extent("z", 8, 8), Extent("w", 16, 6)]
    assert validate(io.BytesIO(sample_stream()), want_extents=False).extents == []


def test_validate_path_and_position(tmp_path):
    p = tmp_path / "d"
    p.write_bytes(sample_stream())
    assert validate(str(p)).records == 3
    assert validate(p).records == 3
    f = io.BytesIO(b"JUNK" + sample_stream())
    f.seek(4)
    validate(f)
    assert f.tell() == 4
    assert [r[0] for r in records(f)] == ["w", "z", "w"]


def test_metadata_order_is_free_before_data():
    # Ceph: "Order is not important, as long as all the metadata records
    # come before the data records."
    stream = BANNER + size_rec(8) + snap(b"t", "b") + snap(b"f", "a") + z(0, 8) + END
    assert validate(io.BytesIO(stream)).header == DiffHeader("a", "b", 8)


def test_round_trip_with_chunking():
    rng = random.Random(7)
    payload = rng.randbytes(1000)
    ops = [("w", 10, payload), ("z", 1010, 90), ("w", 2000, b"x")]
    stream = write_stream(DiffHeader(None, "s", 4096), ops)
    assert validate(io.BytesIO(stream)).extents == [
        Extent("w", 10, 1000), Extent("z", 1010, 90), Extent("w", 2000, 1)]
    got = list(records(io.BytesIO(stream), chunk_size=300))
    assert [(r[0], r[1], len(r[2]) if r[0] == "w" else r[2]) for r in got] == [
        ("w", 10, 300), ("w", 310, 300), ("w", 610, 300), ("w", 910, 100),
        ("z", 1010, 90), ("w", 2000, 1)]
    assert b"".join(bytes(r[2]) for r in got[:4]) == payload
    assert all(isinstance(r[2], memoryview) for r in got if r[0] == "w")


def test_read_header():
    assert read_header(io.BytesIO(sample_stream())) == DiffHeader("s1", "s2", 64)


class Pipe(io.RawIOBase):
    """A non-seekable stream handing out a few bytes per read."""

    def __init__(self, data: bytes):
        self._data = memoryview(data)

    def readable(self):
        return True

    def readinto(self, b):
        n = min(len(b), 7, len(self._data))
        b[:n] = self._data[:n]
        self._data = self._data[n:]
        return n


def test_spool_pipe_and_validate_pipe():
    stream = sample_stream()
    # a pipe validates (reading through the data) but cannot be re-read
    assert validate(Pipe(stream)).records == 3
    f = spool(Pipe(stream))
    assert f.seekable()
    assert validate(f).records == 3
    assert [r[0] for r in records(f)] == ["w", "z", "w"]
    f.close()
    seekable = io.BytesIO(stream)
    assert spool(seekable) is seekable


def test_truncated_at_every_byte():
    stream = sample_stream()
    for n in range(len(stream)):
        with pytest.raises(InvalidArgument) as ei:
            validate(io.BytesIO(stream[:n]))
        if n:
            assert "truncated" in str(ei.value), (n, str(ei.value))
        with pytest.raises(InvalidArgument):
            list(records(io.BytesIO(stream[:n])))
        with pytest.raises(InvalidArgument):
            validate(Pipe(stream[:n]))


@pytest.mark.parametrize("stream, message", [
    (b"", "not an rbd diff v1 stream"),
    (b"hello world\n" + size_rec(0) + END, "not an rbd diff v1 stream"),
    (b"rbd diff v2\n" + size_rec(0) + END, "rbd diff v2 streams are not supported"),
    (b"rbd image v2\n", "not an rbd diff v1 stream"),
    (BANNER + size_rec(8) + b"x" + END, "unknown record tag 'x' at byte 21"),
    (BANNER + b"q" + size_rec(8) + END, "unknown record tag 'q' at byte 12"),
    (BANNER + size_rec(8) + z(0, 2) + b"\x00", "unknown record tag '\\x00' at byte 38"),
    (BANNER + size_rec(8) + w(4, b"ab") + w(0, b"ab") + END,
     "data record at byte 40 is out of order"),
    (BANNER + size_rec(8) + w(0, b"abcd") + z(2, 4) + END,
     "data record at byte 42 overlaps"),
    (BANNER + size_rec(8) + w(6, b"abc") + END, "extent past image size"),
    (BANNER + size_rec(8) + z(0, 9) + END, "extent past image size"),
    (BANNER + size_rec(8) + z(4, 0) + END, "length 0"),
    (BANNER + size_rec(8) + z(0, 8), "truncated stream (no end record)"),
    (BANNER + size_rec(8) + z(0, 8) + END + b"x", "trailing data after the end record"),
    (BANNER + size_rec(8) + z(0, 8) + size_rec(8) + END, "comes after data records"),
    (BANNER + size_rec(8) + size_rec(8) + END, "second 's' record"),
    (BANNER + snap(b"t", "a") + snap(b"t", "b") + size_rec(8) + END, "second 't' record"),
    (BANNER + snap(b"t", "a") + z(0, 8) + END, "no image size ('s') record"),
    (BANNER + snap(b"t", "a") + END, "no image size ('s') record"),
    (BANNER + b"f" + struct.pack("<I", 0) + size_rec(8) + END, "empty snapshot name"),
    (BANNER + b"f" + struct.pack("<I", 4097) + b"a" * 4097 + size_rec(8) + END,
     "4097 bytes"),
    (BANNER + b"t" + struct.pack("<I", 2) + b"\xff\xfe" + size_rec(8) + END, "not UTF-8"),
    (BANNER + size_rec(8) + b"w" + struct.pack("<QQ", 0, 8) + b"abc",
     "truncated stream (no end record)"),
])
def test_malformed(stream, message):
    with pytest.raises(InvalidArgument) as ei:
        validate(io.BytesIO(stream))
    assert message in str(ei.value)
    with pytest.raises(InvalidArgument):
        validate(Pipe(stream))


def test_max_size():
    stream = BANNER + size_rec(1 << 40) + END
    assert validate(io.BytesIO(stream)).header.size == 1 << 40
    with pytest.raises(InvalidArgument, match="larger than the limit"):
        validate(io.BytesIO(stream), max_size=1 << 30)


def test_huge_write_length_is_not_allocated():
    # a 'w' record claiming 2**60 bytes must fail as truncated, not OOM
    stream = BANNER + size_rec(1 << 62) + b"w" + struct.pack("<QQ", 0, 1 << 60) + b"ab"
    for f in (io.BytesIO(stream), Pipe(stream)):
        with pytest.raises(InvalidArgument, match="truncated"):
            validate(f)
    with pytest.raises(InvalidArgument, match="truncated"):
        list(records(io.BytesIO(stream)))


# -- Ceph's own parser ---------------------------------------------------------

RBD = shutil.which("rbd")
needs_rbd = pytest.mark.skipif(RBD is None, reason="rbd (Debian ceph-common) is not installed")


def merge_diff(tmp_path, a: bytes, b: bytes) -> bytes:
    pa, pb, po = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    for p in (pa, pb, po):
        if p.exists():
            p.unlink()
    pa.write_bytes(a)
    pb.write_bytes(b)
    # -c /dev/null: an empty config, so rbd neither looks for
    # /etc/ceph/ceph.conf nor complains; merge-diff needs no cluster.
    proc = subprocess.run(
        [RBD, "-c", "/dev/null", "merge-diff", str(pa), str(pb), str(po), "--no-progress"],
        capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return po.read_bytes()


def random_ops(rng: random.Random, size: int, block: int) -> list:
    """Non-overlapping ascending 'w'/'z' extents, some adjacent."""
    ops = []
    pos = 0
    while True:
        pos += rng.choice([0, 0, block, rng.randrange(1, 3 * block)])
        if pos >= size:
            break
        length = min(rng.randrange(1, 3 * block), size - pos)
        if rng.random() < 0.7:
            ops.append(("w", pos, rng.randbytes(length)))
        else:
            ops.append(("z", pos, length))
        pos += length
        if rng.random() < 0.15:
            break
    return ops


@needs_rbd
def test_rbd_merge_diff_hand_checked(tmp_path):
    a = write_stream(DiffHeader(None, "s1", 16), [("w", 0, b"abcdefgh")])
    b = write_stream(DiffHeader("s1", "s2", 16), [("z", 2, 2), ("w", 6, b"XYZ")])
    out = merge_diff(tmp_path, a, b)
    # Ceph splits A's record around B's: the exact bytes rbd writes
    assert out == (BANNER + snap(b"t", "s2") + size_rec(16) + w(0, b"ab") + z(2, 2)
                   + w(4, b"ef") + w(6, b"XYZ") + END)
    assert validate(io.BytesIO(out)).header == DiffHeader(None, "s2", 16)


@needs_rbd
@pytest.mark.parametrize("seed", range(12))
def test_rbd_merge_diff_accepts_our_streams(tmp_path, seed):
    rng = random.Random(seed)
    block = 512
    size_a = rng.randrange(1, 40) * block + rng.choice([0, 7])
    # the second diff keeps, grows or shrinks the image
    size_b = rng.choice([size_a, size_a + rng.randrange(1, 20) * block,
                         max(1, size_a - rng.randrange(1, 20) * block)])
    a = write_stream(DiffHeader(None, "s1", size_a), random_ops(rng, size_a, block))
    b = write_stream(DiffHeader("s1", "s2", size_b), random_ops(rng, size_b, block))

    out = merge_diff(tmp_path, a, b)
    summary = validate(io.BytesIO(out))
    assert summary.header == DiffHeader(None, "s2", size_b)

    expect = apply(apply(bytearray(), a), b)
    got = apply(bytearray(), out)
    assert got == expect

    # and the merged stream, re-written by DiffWriter, is byte-identical
    f = io.BytesIO(out)
    merged_ops = [(r[0], r[1], bytes(r[2])) if r[0] == "w" else r for r in records(f)]
    assert write_stream(summary.header, merged_ops) == out


@needs_rbd
def test_rbd_merge_diff_refuses_mismatched_snapshots(tmp_path):
    # sanity check that merge-diff really parses our header
    a = write_stream(DiffHeader(None, "s1", 8), [])
    b = write_stream(DiffHeader("other", "s2", 8), [])
    pa, pb = tmp_path / "a", tmp_path / "b"
    pa.write_bytes(a)
    pb.write_bytes(b)
    proc = subprocess.run(
        [RBD, "-c", "/dev/null", "merge-diff", str(pa), str(pb), str(tmp_path / "o"),
         "--no-progress"], capture_output=True, timeout=60)
    assert proc.returncode != 0
    assert not os.path.exists(tmp_path / "o")

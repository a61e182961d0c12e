"""Silent corruption: flipped bytes in shard pages and in their checksum
records are detected on read, the right bytes returned, the pages rewritten
on disk, and each flipped page counted once as a checksum repair."""
import os
import random

import pytest

from backend import shardfile as sf

from .util import check_parity, counted, flip_byte, osd_of, shard_paths

K, M = 4, 2
PAGE = 4096


def _snapshot(d, name):
    out = {}
    for i in range(K + M):
        for p in shard_paths(d, name, i):
            with open(p, "rb") as f:
                out[p] = f.read()
    return out


def _flip(path, off, rng):
    flip_byte(path, off, rng.randrange(1, 256))


def _corrupt(d, name, shards, n, rng, per_row=1, rows_used=None):
    """Flip ``n`` distinct pages (data bytes or checksum records) among
    ``shards``, at most ``per_row`` per page row. Returns the (shard, page)s."""
    rows_used = {} if rows_used is None else rows_used
    done = set()
    tries = 0
    while len(done) < n:
        tries += 1
        assert tries < 100000
        i = rng.choice(shards)
        dpath, mpath = shard_paths(d, name, i)
        size = os.path.getsize(dpath)
        page = rng.randrange(0, -(-size // PAGE))
        if (i, page) in done or rows_used.get(page, 0) >= per_row:
            continue
        if rng.random() < 0.5:
            off = page * PAGE + rng.randrange(0, min(PAGE, size - page * PAGE))
            _flip(dpath, off, rng)
        else:
            _flip(mpath, sf.crc_offset(page) + rng.randrange(4), rng)
        done.add((i, page))
        rows_used[page] = rows_used.get(page, 0) + 1
    return done


def _read_all(s, data):
    """A whole-object read that must return ``data``."""
    def go():
        got = s.read("obj", 0, len(data))
        assert got == data, "a read returned wrong bytes"
    return go


def _check(got, want):
    assert got == want, "a read returned wrong bytes"


@pytest.fixture(params=[65536, 4096], ids=["64K", "4K"])
def store(request, make_store):
    d, s = make_store(k=K, m=M, chunk_size=request.param, write_mode="delta")
    data = os.urandom(1 << 20) + os.urandom(12345)
    s.write_full("obj", data)
    return d, s, data


@pytest.mark.parametrize("per_row", [1, M])
def test_data_shard_flips_read_right_and_repaired(store, per_row):
    d, s, data = store
    rng = random.Random(per_row)
    clean = _snapshot(d, "obj")
    flipped = _corrupt(d, "obj", list(range(K)), 24, rng, per_row=per_row)
    c = counted(s, _read_all(s, data))
    assert c["checksum_errors"] == c["checksum_repairs"] == len(flipped), c
    assert c["decodes"] > 0
    assert _snapshot(d, "obj") == clean, "pages were not repaired on disk"
    c = counted(s, _read_all(s, data))
    assert c["decodes"] == 0 and c["checksum_errors"] == 0, c
    s.close()
    check_parity(d)


def test_small_reads_see_corruption(store):
    d, s, data = store
    rng = random.Random(5)
    clean = _snapshot(d, "obj")
    flipped = _corrupt(d, "obj", list(range(K)), 10, rng)
    total = 0
    for i, page in sorted(flipped):
        # a read of just that page of shard i
        C = s.stat("obj").chunk_size
        stripe, within = divmod(page * PAGE, C)
        off = stripe * K * C + i * C + within
        n = min(PAGE, len(data) - off)
        c = counted(s, lambda: _check(s.read("obj", off, n), data[off:off + n]))
        total += c["checksum_repairs"]
        assert c["checksum_repairs"] == 1, (i, page, c)
    assert total == len(flipped)
    assert _snapshot(d, "obj") == clean


def test_parity_flips_found_by_degraded_reads(store):
    d, s, data = store
    rng = random.Random(7)
    clean = _snapshot(d, "obj")
    # data shard 0 is away: every read decodes it from 1..K-1 and parity K,
    # or parity K+1 where parity K's page is bad (which gets repaired too)
    flipped = _corrupt(d, "obj", [K], 12, rng)
    s.osdmap.mark_down(osd_of(d, "obj", 0), "test")
    c = counted(s, _read_all(s, data))
    assert c["checksum_repairs"] == len(flipped), c
    s.osdmap.mark_up(osd_of(d, "obj", 0))
    assert _snapshot(d, "obj") == clean
    s.osdmap.mark_down(osd_of(d, "obj", 0), "test")
    c = counted(s, _read_all(s, data))
    assert c["checksum_repairs"] == 0, c


def test_parity_flips_found_by_delta_writes(store):
    d, s, data = store
    data = bytearray(data)
    rng = random.Random(8)
    flipped = _corrupt(d, "obj", [K, K + 1], 12, rng)
    C = s.stat("obj").chunk_size
    repairs = 0
    for _, page in sorted(flipped):
        # a 4K overwrite in that page row of data shard 2 reads the row's parity
        stripe, within = divmod(page * PAGE, C)
        off = stripe * K * C + 2 * C + within
        if off >= len(data):
            off = stripe * K * C + within
        new = rng.randbytes(min(PAGE, len(data) - off))
        c = counted(s, lambda: s.write("obj", off, new))
        data[off:off + len(new)] = new
        repairs += c["checksum_repairs"]
    assert repairs == len(flipped)
    assert s.read("obj", 0, len(data)) == bytes(data)
    s.close()
    check_parity(d)


def test_mixed_flips_everywhere(store):
    d, s, data = store
    rng = random.Random(9)
    clean = _snapshot(d, "obj")
    flipped = _corrupt(d, "obj", list(range(K + M)), 30, rng)
    data_flips = {(i, p) for i, p in flipped if i < K}
    c = counted(s, _read_all(s, data))
    # a healthy read touches only data shards: their flips are found
    assert c["checksum_repairs"] == len(data_flips), c
    # any read through any single missing shard returns the right bytes
    for i in range(K + M):
        o = osd_of(d, "obj", i)
        s.osdmap.mark_down(o, "test")
        assert s.read("obj", 0, len(data)) == data
        s.osdmap.mark_up(o)
    s.close()
    snap = _snapshot(d, "obj")
    for i, p in flipped:
        dpath, mpath = shard_paths(d, "obj", i)
        assert snap[dpath][p * PAGE:(p + 1) * PAGE] == clean[dpath][p * PAGE:(p + 1) * PAGE], (i, p)
        assert snap[mpath] == clean[mpath], (i, p)
    check_parity(d)


@pytest.mark.parametrize("damage", ["cut", "zeroed"])
def test_a_lost_checksum_table_is_damage_never_zeros(store, damage):
    """A data shard's sidecar cut to its 4 KiB header, or zeroed past it:
    its pages hold data against checksums that read as 'zero page'. The
    read returns the right bytes, counts every page as a checksum error,
    and rewrites the table, so the next read is clean."""
    d, s, data = store
    clean = _snapshot(d, "obj")
    _, meta = shard_paths(d, "obj", 1)
    dpath = shard_paths(d, "obj", 1)[0]
    pages = -(-os.path.getsize(dpath) // PAGE)
    if damage == "cut":
        os.truncate(meta, sf.HEADER_AREA)
    else:
        with open(meta, "r+b") as f:
            f.seek(sf.HEADER_AREA)
            f.write(bytes(4 * pages))
    c = counted(s, _read_all(s, data))
    assert c["checksum_errors"] == c["checksum_repairs"] == pages, c
    assert _snapshot(d, "obj") == clean, "the table was not rewritten"
    c = counted(s, _read_all(s, data))
    assert c["checksum_errors"] == 0, c
    s.close()
    check_parity(d)

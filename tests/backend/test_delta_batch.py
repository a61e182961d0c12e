"""A flush's batch of overwrites planned as arrays over all its ranges,
row by row (ObjectStore._delta_batch): the same bytes and parity as
planning each range alone, in a transaction per group of rows (each
range wholly in one) and no more shard I/O,
whatever mix of ranges it meets (those it does not take go the general
way)."""
import os
import random

import pytest

from backend import shardfile as sf
from backend.objectstore import ObjectStore

from .util import check_parity, counted, flip_byte, shard_paths

OBJ = "rbd_data.x.0"


def _extents(rng, size, C, n):
    """n disjoint ranges of random lengths, some across chunks or past the end."""
    out, used = [], []
    for _ in range(n):
        for _ in range(20):
            ln = rng.choice((1, 100, 4096, 5000, 8192, C // 2, C))
            off = rng.randrange(0, size + C // 2)
            if all(off + ln <= a or off >= b for a, b in used):
                used.append((off, off + ln))
                out.append((off, os.urandom(ln)))
                break
    return out


@pytest.mark.parametrize("k,m,mode,C", [(4, 2, "auto", 65536), (4, 2, "delta", 4096),
                                        (2, 2, "auto", 65536), (3, 1, "delta", 16384)])
def test_batches_of_mixed_ranges_read_back_and_keep_parity(make_store, k, m, mode, C):
    d, s = make_store(k=k, m=m, chunk_size=C, write_mode=mode)
    rng = random.Random(k * 100 + m * 10 + C)
    size = 40 * k * C + 1234
    model = bytearray(os.urandom(size))
    s.write(OBJ, 0, bytes(model))
    for _ in range(12):
        batch = _extents(rng, len(model), C, rng.randrange(1, 12))
        s.write_extents(OBJ, batch)
        for off, data in batch:
            if off > len(model):
                model.extend(bytes(off - len(model)))
            model[off:off + len(data)] = data
    assert s.read(OBJ, 0, len(model) + 10) == bytes(model)
    check_parity(d)


def test_a_batch_of_overwrites_in_distinct_rows_is_3_reads_and_3_writes_each(make_store):
    d, s = make_store(k=4, m=2, chunk_size=65536, write_mode="auto")
    s.write(OBJ, 0, os.urandom(4 << 20))
    stripe = 4 * 65536
    batch = [(n * stripe + (n % 4) * 65536 + (n % 16) * 4096, os.urandom(4096))
             for n in range(16)]
    got = counted(s, lambda: s.write_extents(OBJ, batch))
    assert (got["shard_reads"], got["shard_writes"]) == (48, 48), got
    assert (got["journal_records"], got["writes_delta"], got["decodes"]) == (1, 16, 0), got
    # partial pages: 1 data page + 2 parity pages read, as for whole ones
    batch = [(n * stripe + 100, os.urandom(10)) for n in range(4)]
    got = counted(s, lambda: s.write_extents(OBJ, batch))
    assert (got["shard_reads"], got["shard_writes"], got["journal_records"]) == (12, 12, 1)
    for off, data in batch:
        assert s.read(OBJ, off, len(data)) == data
    check_parity(d)


def test_a_batch_meeting_a_shard_it_cannot_read_goes_the_general_way(make_store):
    d, s = make_store(k=4, m=2, chunk_size=65536, write_mode="auto")
    data = bytearray(os.urandom(4 << 20))
    s.write(OBJ, 0, bytes(data))
    # shard 0's file is gone: the batch's read of it fails, the general
    # path decodes around it and writes the rest
    os.unlink(shard_paths(d, OBJ, 0)[0])
    batch = [(4096, os.urandom(4096)), (5 * 262144 + 65536, os.urandom(300))]
    s.write_extents(OBJ, batch)
    for off, piece in batch:
        data[off:off + len(piece)] = piece
    assert s.read(OBJ, 0, len(data)) == bytes(data)


def test_a_group_meeting_a_bad_page_goes_the_general_way_after_those_before(make_store):
    """A batch over several groups of rows whose second group reads a page
    that fails its checksum: the first group is committed (its ranges
    whole), the ranges of the second and later groups go the general way,
    which decodes around the page; nothing is counted twice."""
    from backend.objectstore import _DELTA_GROUP_ROWS as G
    C = 16384
    d, s = make_store(k=4, m=2, chunk_size=C, write_mode="delta")
    stripe, P = 4 * C, C // 4096
    nrows = 40 * P                                   # 160 rows: groups of 64, 64, 32
    data = bytearray(os.urandom(40 * stripe))
    s.write(OBJ, 0, bytes(data))
    # every page of chunk 0 of every stripe: one row each, the rows of a
    # chunk (P of them) also joined by an 8 KiB range now and then
    batch, q = [], 0
    while q < nrows:
        n = 2 if q % 5 == 3 and (q + 1) % P else 1
        off = (q // P) * stripe + (q % P) * 4096
        batch.append((off, os.urandom(n * 4096)))
        q += n
    bad_row = G + 10                                 # in the second group
    flip_byte(shard_paths(d, OBJ, 4)[0], bad_row * 4096 + 7)      # parity shard 0's page
    got = counted(s, lambda: s.write_extents(OBJ, batch))
    for off, piece in batch:
        data[off:off + len(piece)] = piece
    assert s.read(OBJ, 0, len(data)) == bytes(data)
    check_parity(d)
    # the first group's record, then the general path's: the rest in one
    # transaction (disjoint rows), and the bad page's repair after it
    # decoded around it; each range counted once
    assert got["writes_delta"] == len(batch), got
    assert (got["journal_records"], got["decodes"]) == (3, 1), got
    assert got["client_write_ops"] == len(batch), got


def _shard_files(d):
    out = {}
    for root, _, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            if "/objects/" in p:
                with open(p, "rb") as fh:
                    b = fh.read()
                # (headers carry time-based versions: compare what follows)
                out[os.path.relpath(p, d)] = b[sf.HEADER_AREA:] if p.endswith(".meta") else b
    return out


@pytest.mark.parametrize("k,m,C,mode,S,most", [
    (4, 2, 65536, "auto", 3, 9), (2, 2, 65536, "auto", 3, 9), (6, 3, 16384, "auto", 3, 9),
    (3, 1, 8192, "delta", 3, 9), (4, 2, 16384, "delta", 3, 9),
    # rows past one group of a transaction (_DELTA_GROUP_ROWS), ranges
    # across two groups, groups of delta and rebuilt rows together
    (4, 2, 16384, "auto", 48, 120), (3, 2, 4096, "delta", 240, 400)])
def test_the_batched_path_writes_what_the_general_path_does_and_no_more(make_store, k, m, C,
                                                                       mode, S, most):
    from backend.objectstore import _DELTA_GROUP_ROWS
    rng = random.Random(k * 10 + m + S)
    size = S * k * C + C // 3 + 17            # a last stripe partly filled
    stores = []
    for name in ("batched", "general"):
        d, s = make_store(k=k, m=m, chunk_size=C, write_mode=mode, name=name)
        if name == "general":
            s._delta_batch = lambda obj, batch: batch
        s.states.keep_pages(lambda: 1 << 30, 64 << 20)      # kept pages too (as under a cache)
        stores.append((d, s))
    init = os.urandom(size)
    for d, s in stores:
        s.write(OBJ, 0, init)
    keys = ("shard_reads", "shard_writes", "shard_write_bytes", "writes_delta",
            "writes_reconstruct", "writes_full", "meta_writes", "journal_records")
    for _ in range(10):
        # overwrites inside one chunk each (the batch _delta_batch takes)
        batch = [(off, data) for off, data in _extents(rng, size, C, rng.randrange(1, most))
                 if off + len(data) <= S * k * C and off % C + len(data) <= C]
        tail = S * k * C + rng.randrange(C // 3)         # and one in the partial stripe
        batch.append((tail, os.urandom(min(size - tail, rng.choice((1, 4096, 5000))))))
        got = []
        for d, s in stores:
            n = counted(s, lambda: s.write_extents(OBJ, batch))
            got.append({x: n[x] for x in keys})
        # a transaction per group of rows, the same files, in no more
        # syscalls or bytes:
        # the batched path joins the pages of adjacent rows (of any of its
        # ranges) into one read or write, reads and writes a page (a row's
        # parity) once however many ranges meet in it, and writes a
        # shard's checksums once per transaction, one per group of rows
        # (auto may choose otherwise for a stripe several ranges meet in:
        # it weighs their reads together, so reads are compared in delta
        # mode)
        b, g = got
        rows = set().union(*(stores[0][1]._rows_of(off, len(data), C) for off, data in batch))
        groups = -(-len(rows) // _DELTA_GROUP_ROWS)
        assert b["journal_records"] == groups, got
        for x in ("shard_writes", "shard_write_bytes") + (
                ("shard_reads",) if mode == "delta" else ()) + (
                ("meta_writes",) if groups == 1 else ()):
            assert b[x] <= g[x], (x, batch, got)
        assert b["writes_delta"] + b["writes_reconstruct"] == \
            g["writes_delta"] + g["writes_reconstruct"] == len(batch)
        assert b["writes_full"] == g["writes_full"] == 0
        assert _shard_files(stores[0][0]) == _shard_files(stores[1][0])


def test_a_batch_writes_each_shards_checksums_once(make_store):
    d, s = make_store(k=4, m=2, chunk_size=65536, write_mode="delta")
    s.states.keep_pages(lambda: 1 << 30, 64 << 20)
    data = bytearray(os.urandom(4 << 20))
    s.write(OBJ, 0, bytes(data))
    stripe = 4 * 65536
    first = os.urandom(4096)
    one = counted(s, lambda: s.write_extents(OBJ, [(4096, first)]))
    data[4096:8192] = first
    # eight pages of shard 0 (rows of eight stripes), far apart in its file
    batch = [(n * stripe + 8192, os.urandom(4096)) for n in range(8)]
    eight = counted(s, lambda: s.write_extents(OBJ, batch))
    assert (eight["shard_writes"], eight["journal_records"]) == (24, 1)
    # the checksums of shard 0 and the 2 parity shards, one write each, and
    # their headers: what one range costs (it was 7 x 3 more)
    assert eight["meta_writes"] == one["meta_writes"]
    for off, piece in batch:
        data[off:off + len(piece)] = piece
    s.close()
    check_parity(d)
    s2 = ObjectStore(d)
    assert s2.read(OBJ, 0, len(data)) == bytes(data)
    s2.close()


def test_an_overwrite_in_a_partial_last_stripe_reconstructs_as_auto_chooses(make_store):
    d, s = make_store(k=4, m=2, chunk_size=65536, write_mode="auto")
    s.write(OBJ, 0, os.urandom(8192))           # all of it in chunk 0 of stripe 0
    new = os.urandom(4096)
    got = counted(s, lambda: s.write_extents(OBJ, [(0, new)]))
    # the other data shards hold nothing there: encoding reads nothing
    assert (got["shard_reads"], got["shard_writes"], got["writes_reconstruct"]) == (0, 3, 1)
    assert s.read(OBJ, 0, 4096) == new
    check_parity(d)


def test_ranges_meeting_in_a_row_share_its_parity_and_auto_rebuilds_a_full_row(make_store):
    d, s = make_store(k=4, m=2, chunk_size=65536, write_mode="auto")
    data = bytearray(os.urandom(4 << 20))
    s.write(OBJ, 0, bytes(data))
    stripe, C = 4 * 65536, 65536
    # page 3 of every chunk of stripe 2: the row's data is all new, so auto
    # encodes it (no reads) and writes its 4 data pages and 2 parity pages
    batch = [(2 * stripe + i * C + 3 * 4096, os.urandom(4096)) for i in range(4)]
    got = counted(s, lambda: s.write_extents(OBJ, batch))
    assert (got["shard_reads"], got["shard_writes"], got["journal_records"]) == (0, 6, 1), got
    assert (got["writes_reconstruct"], got["writes_delta"]) == (4, 0), got
    # two pages of that row: rebuilding reads the 2 others (delta would
    # read 2 data and 2 parity pages), then writes 2 data pages and parity
    two = [(5 * stripe + 4096, os.urandom(4096)), (5 * stripe + 2 * C + 4096, os.urandom(4096))]
    got = counted(s, lambda: s.write_extents(OBJ, two))
    assert (got["shard_reads"], got["shard_writes"], got["journal_records"]) == (2, 4, 1), got
    # an overwrite inside a chunk goes as a batch of one; the ranges the
    # batch does not take (one across two chunks, one past the end) after
    # it, in a transaction of their own
    rest = [(9 * stripe, os.urandom(4096)), (7 * stripe + C - 100, os.urandom(200)),
            (len(data) + 10, b"x" * 10)]
    got = counted(s, lambda: s.write_extents(OBJ, rest))
    assert got["journal_records"] == 2, got
    for off, piece in batch + two + rest:
        data.extend(bytes(max(0, off + len(piece) - len(data))))
        data[off:off + len(piece)] = piece
    assert s.read(OBJ, 0, len(data) + 100) == bytes(data)
    check_parity(d)


def test_a_shard_never_written_reads_as_zeros_whatever_an_earlier_incarnation_left(make_store):
    """A shard of the object that this incarnation never wrote (its vector
    entry 0) holds zeros, even where an OSD that missed the removal still
    has the earlier object's files (verified, with their own checksum
    table): the batch's delta must start from zeros there, or the row's
    parity comes out wrong."""
    d, s = make_store(k=4, m=2, chunk_size=4096, write_mode="delta")
    PAGE = sf.PAGE
    s.write_full(OBJ, os.urandom(4 * PAGE))
    dpath, mpath = shard_paths(d, OBJ, 2)
    with open(dpath, "rb") as f:
        left_data = f.read()
    with open(mpath, "rb") as f:
        left_meta = f.read()
    s.remove(OBJ)
    s.write(OBJ, 3 * PAGE, os.urandom(PAGE))       # shards 0-2 in the extent, never written
    os.makedirs(os.path.dirname(dpath), exist_ok=True)
    for path, raw in ((dpath, left_data), (mpath, left_meta)):
        with open(path, "wb") as f:
            f.write(raw)
    new = os.urandom(PAGE)
    before = s.counters.snapshot()["writes_delta"]
    s.write_extents(OBJ, [(2 * PAGE, new)])
    assert s.counters.snapshot()["writes_delta"] == before + 1     # the batch's way
    check_parity(d)
    assert s.read(OBJ, 0, 3 * PAGE) == bytes(2 * PAGE) + new

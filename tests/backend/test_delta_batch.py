"""A flush's batch of overwrites planned as arrays over all its ranges
(ObjectStore._delta_batch): the same shard reads and writes as planning
each range alone, and the same bytes and parity, whatever mix of ranges
it meets (those it does not take go the general way)."""
import os
import random

import pytest

from .util import check_parity, counted, shard_paths

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

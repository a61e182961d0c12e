"""Exact shard I/O counts for the operations the spec prices (4+2, 64 KiB chunks)."""
import os

import pytest

from .util import check_parity, counted

MiB = 1 << 20
K, M, C = 4, 2, 65536
STRIPE = K * C


@pytest.fixture
def big(make_store):
    d, s = make_store(k=K, m=M, chunk_size=C, write_mode="delta")
    data = bytearray(os.urandom(4 * MiB))
    s.write("obj", 0, bytes(data))
    return d, s, data


def test_4k_overwrite_delta_is_3_reads_3_writes(big):
    d, s, data = big
    # inside one chunk, at several places (chunk start, middle, a parity-row
    # far from the start, the last page of the object)
    for off in (0, 5 * 4096, 3 * STRIPE + 2 * C + 7 * 4096, 4 * MiB - 4096):
        new = os.urandom(4096)
        c = counted(s, lambda: s.write("obj", off, new))
        data[off:off + 4096] = new
        assert (c["shard_reads"], c["shard_writes"]) == (3, 3), (off, c)
        assert c["shard_read_bytes"] == c["shard_write_bytes"] == 3 * 4096
        assert c["writes_delta"] == 1 and c["decodes"] == 0
        # durable before it returns: one journal record, synced
        assert c["journal_records"] == 1 and c["fsyncs"] == 1, c
    assert s.read("obj", 0, 4 * MiB) == bytes(data)
    check_parity(d)


def test_4k_read_is_1_read(big):
    d, s, data = big
    for off in (0, 4096, C - 4096, 3 * STRIPE + C + 8192, 4 * MiB - 4096):
        got = []
        c = counted(s, lambda: got.append(s.read("obj", off, 4096)))
        assert got[0] == bytes(data[off:off + 4096])
        assert c["shard_reads"] == 1 and c["shard_read_bytes"] == 4096, (off, c)
        assert c["shard_writes"] == 0 and c["decodes"] == 0


def test_full_stripe_write_is_0_reads_6_writes(big):
    d, s, data = big
    for off in (0, 5 * STRIPE, 4 * MiB - STRIPE):
        new = os.urandom(STRIPE)
        c = counted(s, lambda: s.write("obj", off, new))
        data[off:off + STRIPE] = new
        assert (c["shard_reads"], c["shard_writes"]) == (0, K + M), (off, c)
        assert c["shard_write_bytes"] == (K + M) * C
    assert s.read("obj", 0, 4 * MiB) == bytes(data)
    check_parity(d)


def test_unwritten_range_read_is_0_reads(make_store):
    d, s = make_store(k=K, m=M, chunk_size=C, write_mode="delta")
    tail = os.urandom(4096)
    s.write("sparse", 4 * MiB - 4096, tail)
    assert s.stat("sparse").size == 4 * MiB
    for off in (0, MiB, 2 * MiB + 12345, 4 * MiB - 8192, 4 * MiB - 4096 - C * K):
        got = []
        c = counted(s, lambda: got.append(s.read("sparse", off, 4096)))
        assert got[0] == bytes(4096)
        assert c["shard_reads"] == 0, (off, c)
    assert s.read("sparse", 4 * MiB - 4096, 4096) == tail
    check_parity(d)


def test_auto_mode_small_write_preferscounted(make_store):
    d, s = make_store(k=K, m=M, chunk_size=C, write_mode="auto")
    s.write("obj", 0, os.urandom(MiB))
    c = counted(s, lambda: s.write("obj", 8192, os.urandom(4096)))
    assert (c["shard_reads"], c["shard_writes"]) == (3, 3), c
    # three of four chunks of a stripe rewritten: reconstruct reads fewer pages
    c = counted(s, lambda: s.write("obj", STRIPE, os.urandom(3 * C)))
    assert c["writes_reconstruct"] == 1 and c["shard_reads"] == 1, c
    check_parity(d)

"""Any M OSDs down: every byte reads back right; writes while degraded
survive the OSDs coming back (their stale shards are never used as data)."""
import itertools
import os
import random
import shutil

import pytest

from backend.objectstore import ObjectStore

from .iogen import IOGen, Model, run_op, verify_all
from .util import check_parity, osd_of

K, M = 4, 2
PAIRS = list(itertools.combinations(range(K + M), M))


def _fill(s, rng):
    """A few objects: a 64K-chunk one with a partial last stripe, a small
    4K-chunk one, a sparse one."""
    model = Model()
    objs = {
        "big": bytearray(rng.randbytes(5 * 256 * 1024 + 12345)),
        "small": bytearray(rng.randbytes(3 * 16384 + 100)),
    }
    for name, data in objs.items():
        s.write_full(name, bytes(data))
        model.objs[name] = data
    s.write("sparse", 700 * 1024, b"z" * 5000)
    model.objs["sparse"] = bytearray(700 * 1024) + b"z" * 5000
    return model


def _check_reads(s, model, rng):
    verify_all(s, model)
    for name, data in model.objs.items():
        for _ in range(6):
            off = rng.randrange(0, len(data))
            n = rng.choice((1, 4095, 4096, 65537, rng.randrange(1, 300000)))
            assert s.read(name, off, n) == bytes(data[off:off + n]), (name, off, n)


def test_every_m_down_marked(make_store):
    d, s = make_store(k=K, m=M, chunk_size="auto")
    rng = random.Random(1)
    model = _fill(s, rng)
    assert len(PAIRS) == 15
    for pair in PAIRS:
        for o in pair:
            s.osdmap.mark_down(o, "test")
        before = s.counters.snapshot()["decodes"]
        _check_reads(s, model, rng)
        assert s.counters.snapshot()["decodes"] > before, pair
        for o in pair:
            s.osdmap.mark_up(o)
    c = s.counters.snapshot()
    assert c["checksum_errors"] == 0
    s.close()
    check_parity(d)


@pytest.mark.parametrize("how", ["rename", "delete"])
def test_every_m_down_directory_gone(make_store, tmp_path, how):
    d, s = make_store(k=K, m=M, chunk_size="auto")
    rng = random.Random(2)
    model = _fill(s, rng)
    s.close()
    for pair in PAIRS:
        for o in pair:
            src, dst = os.path.join(d, f"osd.{o}"), os.path.join(d, f"gone.{o}")
            if how == "rename":
                os.rename(src, dst)
            else:
                shutil.copytree(src, str(tmp_path / f"backup.{o}"))
                shutil.rmtree(src)
                shutil.move(str(tmp_path / f"backup.{o}"), dst)   # restored below
        try:
            s = ObjectStore(d)
            try:
                for o in pair:
                    assert not s.osdmap.is_up(o)
                _check_reads(s, model, rng)
            finally:
                s.close()
        finally:
            for o in pair:
                os.rename(os.path.join(d, f"gone.{o}"), os.path.join(d, f"osd.{o}"))
    check_parity(d)


def test_directory_vanishes_while_open(make_store):
    """An OSD directory removed under a running store: reads decode around
    it, writes do not recreate it, and it comes back intact."""
    d, s = make_store(k=K, m=M, chunk_size="auto")
    rng = random.Random(3)
    model = _fill(s, rng)
    victim = osd_of(d, "big", 1)
    os.rename(os.path.join(d, f"osd.{victim}"), os.path.join(d, "away"))
    _check_reads(s, model, rng)
    gen = IOGen(3, k=K, names=("big", "small", "sparse"), max_size=1 << 20)
    for op in gen.ops(40):
        run_op(s, op, model)
    verify_all(s, model)
    assert not os.path.exists(os.path.join(d, f"osd.{victim}")), "a write recreated a missing OSD"
    assert not s.osdmap.is_up(victim)
    s.close()
    os.rename(os.path.join(d, "away"), os.path.join(d, f"osd.{victim}"))
    s = ObjectStore(d)
    try:
        # the map remembers it failed; bring it back as an admin would
        s.osdmap.mark_up(victim)
        verify_all(s, model)
    finally:
        s.close()
    check_parity(d, allow_stale=True)


@pytest.mark.parametrize("mode", ["auto", "delta", "reconstruct", "full"])
@pytest.mark.parametrize("pair", [(0, 1), (2, 5), (3, 4)])
def test_writes_while_degraded_then_up(make_store, mode, pair):
    d, s = make_store(k=K, m=M, chunk_size="auto", write_mode=mode)
    rng = random.Random(f"{mode}{pair}")
    model = _fill(s, rng)
    for o in pair:
        s.osdmap.mark_down(o, "test")
    gen = IOGen(sum(pair) * 7 + len(mode), k=K, names=("big", "small", "sparse", "new"),
                max_size=1 << 20, weights={"remove": 0})
    for op in gen.ops(60):
        run_op(s, op, model)
    verify_all(s, model)
    for o in pair:
        s.osdmap.mark_up(o)
    assert check_parity(d, allow_stale=True).stale_shards > 0
    # stale shards are back "up": the version vector must keep them out
    decodes = s.counters.snapshot()["decodes"]
    _check_reads(s, model, rng)
    assert s.counters.snapshot()["decodes"] > decodes
    # and writing on top of a partly stale object stays right
    for op in gen.ops(40):
        run_op(s, op, model)
    verify_all(s, model)
    s.close()
    check_parity(d, allow_stale=True)
    s = ObjectStore(d)
    try:
        verify_all(s, model)
    finally:
        s.close()


def test_remove_and_recreate_while_degraded(make_store):
    """Shards left on a down OSD by an earlier incarnation of an object
    must never show through the new one."""
    d, s = make_store(k=K, m=M, chunk_size=4096)
    old = os.urandom(64 * 1024)
    s.write_full("x", old)
    down = [osd_of(d, "x", 1), osd_of(d, "x", 2)]
    for o in down:
        s.osdmap.mark_down(o, "test")
    s.remove("x")
    # recreate with a hole where shards 1 and 2 were, then bring them back
    s.write("x", 0, b"a" * 4096)
    s.write("x", 3 * 4096, b"d" * 4096)
    for o in down:
        s.osdmap.mark_up(o)
    model = bytearray(16384)
    model[0:4096] = b"a" * 4096
    model[12288:16384] = b"d" * 4096
    assert s.read("x", 0, 1 << 20) == bytes(model)
    # writes that land in the stale shards' files must not revive old pages
    s.write("x", 4096 + 100, b"b" * 10)
    model[4196:4206] = b"b" * 10
    s.write("x", 16384 + 4 * 4096 + 8192, b"e" * 8)  # grow into a second stripe... of shard 2
    model.extend(bytes(16384 + 4 * 4096 + 8192 + 8 - len(model)))
    model[16384 + 4 * 4096 + 8192:] = b"e" * 8
    assert s.read("x", 0, 1 << 20) == bytes(model)
    s.close()
    check_parity(d, allow_stale=True)
    s = ObjectStore(d)
    try:
        assert s.read("x", 0, 1 << 20) == bytes(model)
    finally:
        s.close()


def test_more_than_m_down_is_unavailable(make_store):
    from backend.errors import DataUnavailable
    d, s = make_store(k=K, m=M, chunk_size="auto")
    s.write_full("o", os.urandom(300000))
    for o in range(M + 1):
        s.osdmap.mark_down(o, "test")
    with pytest.raises(DataUnavailable):
        s.read("o", 0, 300000)


@pytest.mark.parametrize("cut", [16384, 16384 + 5000, 3])
def test_shrink_while_down_then_grow(make_store, cut):
    """A shard that could not be trimmed (OSD down) must not bring its old
    tail back when the object grows again."""
    d, s = make_store(k=K, m=M, chunk_size=4096)
    data = os.urandom(65536)
    s.write_full("t", data)
    down = [osd_of(d, "t", 1), osd_of(d, "t", K)]
    for o in down:
        s.osdmap.mark_down(o, "test")
    s.truncate("t", cut)
    for o in down:
        s.osdmap.mark_up(o)
    s.truncate("t", 65536)
    want = data[:cut] + bytes(65536 - cut)
    assert s.read("t", 0, 65536) == want
    s.write("t", 65536 - 10, b"q" * 10)       # a write that touches the stale shards' rows
    want = want[:-10] + b"q" * 10
    assert s.read("t", 0, 65536) == want
    s.close()
    check_parity(d, allow_stale=True)


def test_writes_stop_below_min_size_and_nothing_written_is_lost(make_store):
    """As Ceph's min_size (default K+1): with M OSDs of an object down a
    write is refused (nothing changes), with M-1 down it goes on."""
    from backend.errors import DataUnavailable
    d, s = make_store(k=4, m=2, chunk_size=4096, min_size=5)
    old = os.urandom(40 << 10)
    s.write_full("o", old)
    s.osdmap.mark_down(osd_of(d, "o", 1), "test")
    new = os.urandom(4096)
    s.write("o", 0, new)                                  # 5 reachable: goes on
    s.osdmap.mark_down(osd_of(d, "o", 2), "test")
    with pytest.raises(DataUnavailable, match="min_size"):
        s.write("o", 4096, os.urandom(4096))
    with pytest.raises(DataUnavailable, match="min_size"):
        s.remove("o")
    assert s.read("o", 0, 40 << 10) == new + old[4096:]


@pytest.mark.parametrize("plugin", ["liberasurecode_rs_vand", "isa_l_rs_vand"])
def test_an_odd_end_decodes_from_parity_with_16_bit_words(make_store, plugin):
    # liberasurecode's rs_vand works in 16-bit words: the parity of a shard
    # ending at an odd byte has a byte past that end, which must be stored
    k, m, C = 3, 3, 8192
    d, s = make_store(k=k, m=m, chunk_size=C, plugin=plugin, write_mode="delta")
    data = os.urandom(k * C * 3 + C // 3 + 17)       # shard 0 ends at an odd byte
    s.write("o", 0, data)
    check_parity(d)
    for i in range(k):                               # only parity left to decode from
        s.osdmap.mark_down(osd_of(d, "o", i), "test")
    assert s.read("o", 0, len(data)) == data

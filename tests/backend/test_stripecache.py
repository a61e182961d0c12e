"""The stripe cache (backend/stripecache.py) over a real ObjectStore:
exact shard I/O per flush, coalescing, hits, bounds, errors, fencing,
and a seeded model test with the flusher running."""
import os
import random
import threading

import pytest

from backend.errors import DataUnavailable, Fenced, NoSpace
from backend.objectstore import ObjectStore
from backend.stripecache import FLUSH_THREADS, StripeCache

from ..waiting import wait_for
from .util import check_parity, counted

K, M, C = 4, 2, 65536
STRIPE = K * C
P = "rbd_data.x."
OBJ = P + "0"


@pytest.fixture
def cached(make_store):
    d, s = make_store(k=K, m=M, chunk_size=C, write_mode="delta")
    c = StripeCache(s, 8 << 20, max_age=3600)      # the flusher only under pressure
    c.set_writeback(P, True)
    yield d, s, c
    c.close()


def _on_disk(d, offset, length):
    """What a store opened afresh reads (no kept state, no kept pages)."""
    fresh = ObjectStore(d)
    try:
        return fresh.read(OBJ, offset, length)
    finally:
        fresh.close()


def _write_stripe(c, n):
    """Stripe n of OBJ written whole in sequential 4 KiB writes; its bytes."""
    new = os.urandom(STRIPE)
    for off in range(0, STRIPE, 4096):
        c.write(OBJ, n * STRIPE + off, new[off:off + 4096])
    return new


def _fill(s, n=4 << 20):
    data = bytearray(os.urandom(n))
    s.write(OBJ, 0, bytes(data))
    return data


def test_write_returns_before_the_store_sees_it_and_flush_makes_it_durable(cached):
    d, s, c = cached
    data = _fill(s)
    new = os.urandom(4096)
    n = counted(s, lambda: c.write(OBJ, 8192, new))
    assert n["shard_writes"] == n["journal_records"] == n["fsyncs"] == 0
    assert n["cache_writes"] == 1 and s.counters.snapshot()["cache_dirty_bytes"] == 4096
    assert _on_disk(d, 8192, 4096) == bytes(data[8192:12288])     # not yet
    n = counted(s, lambda: c.flush(P))
    data[8192:12288] = new
    assert s.read(OBJ, 0, len(data)) == bytes(data)
    # the 4K overwrite flushed alone, stripe not cached: 3 reads + 3 writes
    assert (n["shard_reads"], n["shard_writes"]) == (3, 3), n
    assert n["cache_flushes"] == 1 and s.counters.snapshot()["cache_dirty_bytes"] == 0
    check_parity(d)


def test_repeated_writes_to_a_page_coalesce_into_one_store_write(cached):
    d, s, c = cached
    data = _fill(s)
    for i in range(10):
        piece = bytes([i]) * 4096
        c.write(OBJ, 3 * C, piece)
    n = counted(s, lambda: c.flush())
    data[3 * C:3 * C + 4096] = piece
    assert (n["shard_reads"], n["shard_writes"], n["journal_records"]) == (3, 3, 1), n
    assert s.read(OBJ, 0, len(data)) == bytes(data)


def test_scattered_writes_to_one_object_flush_as_one_transaction(cached):
    d, s, c = cached
    data = _fill(s)
    offs = [0, 3 * STRIPE + C + 4096, 9 * STRIPE + 2 * C, 15 * STRIPE + 3 * C + 8192]
    for off in offs:
        piece = os.urandom(4096)
        c.write(OBJ, off, piece)
        data[off:off + 4096] = piece
    n = counted(s, lambda: c.flush())
    # 4 stripes, delta each: 4 x (3 reads + 3 writes); one record, one fsync
    assert (n["shard_reads"], n["shard_writes"]) == (12, 12), n
    assert (n["journal_records"], n["fsyncs"], n["writes_delta"]) == (1, 1, 4), n
    # two extents in one stripe, in adjacent page rows: one transaction;
    # each parity shard's two pages are read and written as one run
    c.write(OBJ, STRIPE + 4096, b"1" * 4096)
    c.write(OBJ, STRIPE + 3 * C, b"2" * 4096)
    n = counted(s, lambda: c.flush())
    data[STRIPE + 4096:STRIPE + 8192] = b"1" * 4096
    data[STRIPE + 3 * C:STRIPE + 3 * C + 4096] = b"2" * 4096
    assert (n["journal_records"], n["shard_reads"], n["shard_writes"]) == (1, 4, 4), n
    assert n["shard_read_bytes"] == n["shard_write_bytes"] == 6 * 4096, n
    assert s.read(OBJ, 0, len(data)) == bytes(data)
    check_parity(d)
    # the same page row of two chunks: one transaction still, the row's
    # parity read and written once for both (2 data pages + 2 parity
    # pages read, 4 written), where a transaction each read it twice
    c.write(OBJ, 2 * STRIPE + 4096, b"3" * 4096)
    c.write(OBJ, 2 * STRIPE + C + 4096, b"4" * 4096)
    n = counted(s, lambda: c.flush())
    data[2 * STRIPE + 4096:2 * STRIPE + 8192] = b"3" * 4096
    data[2 * STRIPE + C + 4096:2 * STRIPE + C + 8192] = b"4" * 4096
    assert (n["journal_records"], n["shard_reads"], n["shard_writes"]) == (1, 4, 4), n
    assert n["writes_delta"] == 2, n
    assert s.read(OBJ, 0, len(data)) == bytes(data)
    check_parity(d)


def test_write_extents_refuses_overlaps_and_writes_new_objects(cached):
    d, s, c = cached
    from backend.errors import InvalidArgument
    with pytest.raises(InvalidArgument):
        s.write_extents(OBJ, [(0, b"a" * 10), (5, b"b" * 10)])
    s.write_extents(P + "n", [(STRIPE * 3, b"z" * 5), (0, b"y" * 3)])
    assert s.read(P + "n", 0, 1 << 20) == b"y" * 3 + bytes(STRIPE * 3 - 3) + b"z" * 5
    check_parity(d)


def test_sequential_4k_writes_filling_a_stripe_flush_as_a_full_stripe_write(cached):
    d, s, c = cached
    data = _fill(s)
    new = _write_stripe(c, 1)
    n = counted(s, lambda: c.flush())
    data[STRIPE:2 * STRIPE] = new
    # K+M shard writes per stripe, 0 reads
    assert (n["shard_reads"], n["shard_writes"], n["writes_full"] + n["writes_reconstruct"]) \
        == (0, K + M, 1), n
    assert s.read(OBJ, 0, len(data)) == bytes(data)
    check_parity(d)


def test_an_overwrite_of_a_stripe_whose_pages_and_parity_are_cached_reads_nothing(cached):
    d, s, c = cached
    data = _fill(s)
    for n in range(3):
        piece = os.urandom(4096)
        c.write(OBJ, 5 * STRIPE + 2 * C + 8192, piece)
        got = counted(s, lambda: c.flush(P))
        data[5 * STRIPE + 2 * C + 8192:5 * STRIPE + 2 * C + 12288] = piece
        # the first flush reads the old data page and 2 parity pages; it
        # keeps what it wrote, so the next ones read nothing
        assert (got["shard_reads"], got["shard_writes"]) == ((3, 3) if n == 0 else (0, 3)), got
    assert got["page_hits"] == 3
    # a read of the page: 0 shard reads
    back = []
    got = counted(s, lambda: back.append(c.read(OBJ, 5 * STRIPE + 2 * C + 8192, 4096)))
    assert back[0] == piece and got["shard_reads"] == 0 and got["page_hits"] == 1, got
    assert _on_disk(d, 0, len(data)) == bytes(data)
    check_parity(d)


def test_a_stripe_written_whole_is_kept_whole_and_any_page_of_it_overwrites_with_0_reads(cached):
    d, s, c = cached
    data = _fill(s)
    new = _write_stripe(c, 7)
    got = counted(s, lambda: c.flush(P))
    assert (got["shard_reads"], got["shard_writes"]) == (0, K + M), got
    data[7 * STRIPE:8 * STRIPE] = new
    for off in (100, C + 4096, 3 * C + C - 4096):
        piece = os.urandom(4096)
        c.write(OBJ, 7 * STRIPE + off, piece)
        data[7 * STRIPE + off:7 * STRIPE + off + 4096] = piece
        got = counted(s, lambda: c.flush(P))
        # (4 KiB straddling two pages: one 2-page write per shard)
        assert (got["shard_reads"], got["shard_writes"]) == (0, 3), (off, got)
        assert got["page_hits"] == 3, got
    assert c.read(OBJ, 0, len(data)) == bytes(data)
    check_parity(d)


def test_kept_pages_are_not_trusted_after_another_process_writes_the_object(cached):
    d, s, c = cached
    data = _fill(s)
    at = 9 * STRIPE + C
    c.write(OBJ, at, b"a" * 4096)
    c.flush(P)
    assert counted(s, lambda: c.read(OBJ, at, 4096))["shard_reads"] == 0
    other = ObjectStore(d)
    try:
        other.write(OBJ, at, b"b" * 4096)
    finally:
        other.close()
    got = []
    n = counted(s, lambda: got.append(c.read(OBJ, at, 4096)))
    assert got[0] == b"b" * 4096 and n["page_hits"] == 0 and n["shard_reads"] == 1, n
    # an overwrite plans on what is on disk: the old page and parity read again
    c.write(OBJ, at + 4096, b"c" * 4096)
    c.write(OBJ, at, b"d" * 4096)
    c.flush(P)
    data[at:at + 8192] = b"d" * 4096 + b"c" * 4096
    assert c.read(OBJ, 0, len(data)) == bytes(data)
    check_parity(d)


def test_kept_pages_stay_within_what_dirty_bytes_leave_of_the_capacity(make_store):
    d, s = make_store(k=K, m=M, chunk_size=C, write_mode="delta")
    c = StripeCache(s, 1 << 20, max_age=3600)
    try:
        c.set_writeback(P, True)
        for o in range(3):
            s.write(P + str(o), 0, os.urandom(4 << 20))
        rng = random.Random(4)
        peak = 0
        for _ in range(150):            # 150 x (1 data + 2 parity pages) kept: 1.8 MiB
            c.write(P + str(rng.randrange(3)), rng.randrange(1024) * 4096, os.urandom(4096))
            c.flush(P)
            peak = max(peak, s.states.page_bytes())
        assert (1 << 18) - 12288 < peak <= 1 << 18         # at most a quarter of it
        assert s.counters.snapshot()["page_cache_bytes"] == s.states.page_bytes()
        # dirty bytes take the room back, down to an eighth of the capacity
        for n in range(200):
            c.write(P + "0", n * 4096, os.urandom(4096))
        c.write(P + "1", 0, os.urandom(4096))
        c.flush(P)
        assert s.states.page_bytes() <= 1 << 18
    finally:
        c.close()


def test_a_read_of_cached_bytes_is_0_shard_reads_and_a_partial_one_overlays(cached):
    d, s, c = cached
    data = _fill(s)
    new = os.urandom(4096)
    c.write(OBJ, 4096 + 100, new[:1000])          # byte-granular, no page read
    got = []
    n = counted(s, lambda: got.append(c.read(OBJ, 4196, 1000)))
    assert got[0] == new[:1000] and n["shard_reads"] == 0 and n["cache_hits"] == 1
    n = counted(s, lambda: got.append(c.read(OBJ, 4096, 4096)))
    data[4196:5196] = new[:1000]
    assert got[1] == bytes(data[4096:8192]) and n["shard_reads"] == 1, n
    assert n["cache_misses"] == 1


def test_a_cached_object_exists_and_reads_past_the_stored_end(cached):
    d, s, c = cached
    c.write(P + "1", 10000, b"abc")
    assert c.exists(P + "1") and not s.exists(P + "1")
    assert c.list(P) == [P + "1"]
    assert c.read(P + "1", 0, 1 << 20) == bytes(10000) + b"abc"
    c.flush()
    assert s.read(P + "1", 0, 1 << 20) == bytes(10000) + b"abc"


def test_names_outside_write_back_prefixes_are_written_through(cached):
    d, s, c = cached
    n = counted(s, lambda: c.write("other", 0, b"x" * 4096))
    assert n["journal_records"] == 1 and n["cache_writes"] == 0
    assert c.try_write("other", 0, b"y") is False


def test_remove_and_write_full_drop_cached_bytes_zero_and_truncate_flush_them(cached):
    d, s, c = cached
    data = _fill(s, 1 << 20)
    c.write(OBJ, 0, b"A" * 4096)
    c.write_full(OBJ, b"B" * 8192)
    assert c.read(OBJ, 0, 1 << 20) == b"B" * 8192
    c.write(OBJ, 4096, b"C" * 4096)
    c.zero(OBJ, 0, 1024)
    assert s.read(OBJ, 0, 1 << 20) == bytes(1024) + b"B" * 3072 + b"C" * 4096
    c.write(OBJ, 0, b"D" * 100)
    c.truncate(OBJ, 50)
    assert s.read(OBJ, 0, 100) == b"D" * 50
    c.write(OBJ, 0, b"E" * 100)
    c.remove(OBJ)
    assert not c.exists(OBJ)
    c.flush()
    assert not s.exists(OBJ) and data


def test_a_fenced_flush_drops_the_bytes_and_fails_once(cached):
    d, s, c = cached
    data = _fill(s, 1 << 20)
    fenced = [True]

    def guard():
        if fenced[0]:
            raise Fenced("lock broken")
    s.add_guard(P, guard)
    c.write(OBJ, 0, b"Z" * 4096)
    with pytest.raises(Fenced):
        c.flush(P)
    assert s.counters.snapshot()["cache_dirty_bytes"] == 0
    assert c.read(OBJ, 0, 4096) == bytes(data[:4096])    # never written
    c.flush(P)                                           # reported once
    fenced[0] = False
    assert s.read(OBJ, 0, len(data)) == bytes(data)


def test_a_failed_flush_keeps_the_bytes_says_so_and_a_later_flush_writes_them(cached):
    d, s, c = cached
    data = _fill(s, 1 << 20)
    full = [True]

    def guard():
        if full[0]:
            raise NoSpace("no space left")
    s.add_guard(P, guard)
    c.write(OBJ, 0, b"Q" * 4096)
    c.write(OBJ, 8192, b"R" * 10)
    with pytest.raises(NoSpace):
        c.flush(P)
    with pytest.raises(NoSpace):                 # still not durable: still an error
        c.flush(P)
    assert c.read(OBJ, 0, 8202) == b"Q" * 4096 + bytes(data[4096:8192]) + b"R" * 10
    c.write(OBJ, 4, b"S")                        # newer bytes stay on top
    full[0] = False
    c.flush(P)
    data[0:4096] = b"Q" * 4096
    data[4] = ord("S")
    data[8192:8202] = b"R" * 10
    assert s.read(OBJ, 0, len(data)) == bytes(data)
    assert s.counters.snapshot()["cache_dirty_bytes"] == 0


def test_an_operation_behind_cached_bytes_that_cannot_be_flushed_is_refused(cached):
    """zero/truncate/write-through go after the object's cached bytes: if
    those cannot be written now, the operation fails and changes nothing
    (else the bytes, flushed later, would land over it)."""
    d, s, c = cached
    _fill(s, 1 << 20)
    fails = [1]

    def guard():
        if fails[0]:
            fails[0] -= 1
            raise NoSpace("no space left")
    s.add_guard(P, guard)
    c.write(OBJ, 0, b"A" * 4096)
    with pytest.raises(NoSpace):
        c.zero(OBJ, 0, 4096)
    c.flush(P)
    assert s.read(OBJ, 0, 4096) == b"A" * 4096


def test_past_the_high_mark_the_oldest_objects_leave_until_the_low_mark(make_store):
    """Not every object at once: a working set under the high mark stays
    cached, and the youngest objects go on gathering extents."""
    d, s = make_store(k=K, m=M, chunk_size=C)
    c = StripeCache(s, 1 << 20, max_age=3600)
    c.set_writeback(P, True)
    piece = 112 << 10
    try:
        for n in range(8):          # 896 KiB: past 3/4 at the 7th
            assert c.try_write(P + str(n), 0, bytes([n + 1]) * piece)
        wait_for(lambda: s.counters.snapshot()["cache_flushes"] >= 3 and
                 not any(e.busy for e in list(c._objs.values())) and not c._flying,
                 what="the flusher's pass")
        left = c.dirty_bytes()
        assert (1 << 20) // 2 - piece < left <= (1 << 20) * 3 // 4, left
        assert all(s.exists(P + str(n)) for n in range(3))      # the oldest went
        assert not s.exists(P + "7")                             # the youngest stays
        c.flush()
        assert [s.read(P + str(n), 0, piece) for n in range(8)] == \
            [bytes([n + 1]) * piece for n in range(8)]
    finally:
        c.close()


def test_an_object_that_cannot_flush_does_not_stall_writers_while_others_can(make_store):
    """The oldest object fails its write-back (its OSDs are down): the
    flusher goes on to the next ones instead of telling a writer waiting
    for room that the cache is stuck."""
    d, s = make_store(k=K, m=M, chunk_size=C)
    real = s.write_extents

    def write_extents(name, todo, **kw):
        if name == P + "A":
            raise DataUnavailable(f"object {name!r}: too few OSDs up (injected)")
        return real(name, todo, **kw)

    s.write_extents = write_extents
    c = StripeCache(s, 1 << 20, max_age=3600)
    c.set_writeback(P, True)
    try:
        for i in range(3):
            c.write(P + "A", i * (200 << 10), os.urandom(200 << 10))    # the oldest
        b = os.urandom(200 << 10)
        c.write(P + "B", 0, b)                        # past 3/4: the flusher starts
        wait_for(lambda: s.counters.snapshot()["cache_flushes"] >= 1,
                 what="the first pass (A, which fails)")
        c.write(P + "C", 0, os.urandom(250 << 10))   # needs room: B's, not a stall
        assert s.exists(P + "B") and s.read(P + "B", 0, len(b)) == b
    finally:
        s.write_extents = real
        c.close()


def test_a_full_cache_pushes_back_and_writers_wait_for_the_flusher(make_store):
    d, s = make_store(k=K, m=M, chunk_size=C)
    gate = threading.Event()
    s.add_guard(P, lambda: gate.wait(30))
    c = StripeCache(s, 64 << 10, max_age=3600)
    c.set_writeback(P, True)
    # writes get the capacity less the room kept for flushes' transactions
    assert c._headroom == 8 << 10
    n = 14 << 10                    # four of them fill that
    try:
        assert c.try_write(OBJ, 0, b"a" * n)
        assert c.try_write(P + "1", 0, b"b" * n)
        assert c.try_write(OBJ, 0, b"c" * n)      # an overwrite needs no room
        assert c.dirty_bytes() == 2 * n
        # past 3/4 the flusher writes out, but the store is stalled
        assert c.try_write(P + "2", 0, b"d" * n)
        assert c.try_write(P + "3", 0, b"e" * n)
        assert c.try_write(P + "4", 0, b"f" * n) is False    # full: no room, no wait
        done = threading.Event()
        t = threading.Thread(target=lambda: (c.write(P + "4", 0, b"f" * n), done.set()))
        t.start()
        wait_for(lambda: c._waiting == 1, what="the writer waits for room")
        assert not done.is_set()
        assert c.dirty_bytes() <= (64 << 10) - c._headroom
        gate.set()
        assert done.wait(30)
        t.join()
        assert s.counters.snapshot()["cache_waits"] == 1
        c.flush()
        assert [s.read(P + x, 0, n) for x in "01234"] == \
            [b"c" * n, b"b" * n, b"d" * n, b"e" * n, b"f" * n]
    finally:
        gate.set()
        c.close()


def test_flushes_under_way_hold_at_most_the_flight_limit(make_store):
    d, s = make_store(k=K, m=M, chunk_size=C)
    gate, lock = threading.Event(), threading.Lock()
    inside = []

    def guard():                    # under the commit of each flush: hold it there
        with lock:
            inside.append(c._flying)
        gate.wait(30)

    s.add_guard(P, guard)
    c = StripeCache(s, 8 << 20, max_age=3600)
    assert FLUSH_THREADS >= 2
    held = FLUSH_THREADS - 1                # flushes the flight limit lets in at once
    c.fly_limit = held * (512 << 10)
    c.set_writeback(P, True)
    try:
        datas = [os.urandom(512 << 10) for _ in range(4)]
        for n, data in enumerate(datas):
            c.write(P + str(n), 0, data)
        t = threading.Thread(target=c.flush, args=(P,))
        t.start()
        wait_for(lambda: len(inside) == held, what="flushes in their commit")
        # the last flush thread waits for room in flight (beside the idle flusher)
        wait_for(lambda: len(c._cv._waiters) >= 2, what="a flush waits")
        assert c._flying == held * (512 << 10) and len(inside) == held
        gate.set()
        t.join(30)
        assert not t.is_alive() and c._flying == 0
        assert max(inside) <= held * (512 << 10)
        assert [s.read(P + str(n), 0, 512 << 10) for n in range(4)] == datas
    finally:
        gate.set()
        c.close()


def test_dirty_bytes_older_than_max_age_leave_by_themselves(make_store):
    d, s = make_store(k=K, m=M, chunk_size=C)
    c = StripeCache(s, 1 << 20, max_age=0.2)
    c.set_writeback(P, True)
    try:
        c.write(OBJ, 0, b"t" * 4096)
        wait_for(lambda: not s.counters.snapshot()["cache_dirty_bytes"],
                 what="the flusher wrote the old bytes")
        assert s.read(OBJ, 0, 4096) == b"t" * 4096
    finally:
        c.close()


@pytest.mark.parametrize("mode", ["mixed", "auto"])
@pytest.mark.parametrize("seed", range(int(os.environ.get("ECFS_MODEL_SEEDS", "4"))))
def test_model(make_store, seed, mode):
    """Random writes, reads, zeros, removals, truncations and flushes
    through a small cache with an eager flusher, against a model. (In
    "auto" extents of one stripe in different page rows share a flush
    transaction; "mixed" may rewrite whole stripes, so they do not.)"""
    rng = random.Random(seed)
    d, s = make_store(k=K, m=M, chunk_size=16384, write_mode=mode)
    c = StripeCache(s, 256 << 10, max_age=0.01)
    c.set_writeback(P, True)
    names = [P + str(i) for i in range(3)]
    model: dict[str, bytearray] = {}
    try:
        for step in range(300):
            name = rng.choice(names)
            op = rng.random()
            if op < 0.55:
                # page-aligned offsets half the time: rewrites of an
                # extent at its own offset take try_write's in-place path
                off = rng.randrange(0, 400_000) if rng.random() < 0.5 else \
                    rng.randrange(0, 97) * 4096
                n = rng.choice([1, 100, 4096, 5000, 70_000])
                piece = rng.randbytes(n)
                if rng.random() < 0.5 and c.try_write(name, off, piece):
                    pass
                else:
                    c.write(name, off, piece)
                cur = model.setdefault(name, bytearray())
                if len(cur) < off + n:
                    cur.extend(bytes(off + n - len(cur)))
                cur[off:off + n] = piece
            elif op < 0.8:
                off = rng.randrange(0, 420_000)
                n = rng.randrange(1, 100_000)
                want = model.get(name)
                if want is None:
                    assert not c.exists(name)
                    continue
                assert c.read(name, off, n) == bytes(want[off:off + n]), (seed, step)
            elif op < 0.86 and name in model:
                off = rng.randrange(0, 400_000)
                n = rng.randrange(1, 50_000)
                c.zero(name, off, n)
                cur = model[name]
                end = min(len(cur), off + n)
                if end > off:
                    cur[off:end] = bytes(end - off)
            elif op < 0.9 and name in model:
                c.remove(name)
                del model[name]
            elif op < 0.94 and name in model:
                size = rng.randrange(0, 400_000)
                c.truncate(name, size)
                cur = model[name]
                del cur[size:]
                cur.extend(bytes(size - len(cur)))
            else:
                c.flush(P)
                assert s.counters.snapshot()["cache_dirty_bytes"] == 0
        c.flush()
        for name in names:
            want = model.get(name)
            if want is None:
                assert not s.exists(name)
            else:
                assert s.read(name, 0, 1 << 20) == bytes(want), (seed, name)
        check_parity(d)
    finally:
        c.close()


def test_a_rewrite_at_an_extents_offset_goes_into_it_and_a_longer_one_is_split(cached):
    """try_write's in-place path (bytes cached at the write's offset, as
    long as it or longer) writes into that extent and grows nothing; a
    longer write there takes the general path: the extent's bytes in
    place, the rest a new extent."""
    d, s, c = cached
    data = _fill(s)
    a = os.urandom(4096)
    assert c.try_write(OBJ, 8192, a)
    buf = c._objs[OBJ].dirty[8192]
    before = c.dirty_bytes()
    b = os.urandom(1000)
    n = counted(s, lambda: c.try_write(OBJ, 8192, b))
    assert c._objs[OBJ].dirty[8192] is buf and c.dirty_bytes() == before
    assert n["cache_writes"] == 1 and n["cache_write_bytes"] == 1000
    assert c.read(OBJ, 8192, 4096) == b + a[1000:]
    longer = os.urandom(6000)
    assert c.try_write(OBJ, 8192, longer)
    dirty = c._objs[OBJ].dirty
    assert list(dirty) == [8192, 12288] and dirty[8192] is buf
    assert c.dirty_bytes() == before + 6000 - 4096
    c.flush(P)
    assert _on_disk(d, 8192, 6000) == longer
    assert _on_disk(d, 8192 + 6000, 4096) == bytes(data[8192 + 6000:8192 + 6000 + 4096])


def test_extents_are_written_in_place_never_merged_and_flush_joined(cached):
    """A write over cached bytes goes into their buffers; bytes no extent
    holds get buffers of their own (the heap sees the writes' sizes only);
    touching extents still leave as one store write."""
    d, s, c = cached
    _fill(s)
    a, b = os.urandom(4096), os.urandom(4096)
    c.write(OBJ, 0, a)
    c.write(OBJ, 4096, b)
    bufs = dict(c._objs[OBJ].dirty)
    mid = os.urandom(8000)                     # over both and past them
    c.write(OBJ, 2048, mid)
    dirty = c._objs[OBJ].dirty
    assert list(dirty) == [0, 4096, 8192] and len(dirty[8192]) == 2048 + 8000 - 8192
    assert dirty[0] is bufs[0] and dirty[4096] is bufs[4096]
    want = a[:2048] + mid
    got = []
    n = counted(s, lambda: got.append(c.read(OBJ, 0, len(want))))
    assert got == [want] and n["shard_reads"] == 0 and n["cache_hits"] == 1   # touching: a hit
    assert c.try_read(OBJ, 1000, 9000) == want[1000:10000]
    assert c.read(OBJ, 0, len(want) + 1) == want + _on_disk(d, len(want), 1)  # past them: merged
    n = counted(s, lambda: c.flush(P))
    assert n["client_write_ops"] == 1          # one run
    assert _on_disk(d, 0, len(want)) == want


def test_the_flusher_gives_the_heap_back_once_the_cache_is_clean(make_store, monkeypatch):
    import backend.stripecache as sc
    calls = []
    monkeypatch.setattr(sc, "give_back_heap", lambda: calls.append(1))
    d, s = make_store(k=K, m=M, chunk_size=C)
    c = StripeCache(s, 1 << 20, max_age=3600)
    c.set_writeback(P, True)
    c.set_writeback("rbd_data.y.", True)
    try:
        for n in range(3):                               # a quarter of the capacity, and more
            c.write(OBJ, n * (100 << 10), os.urandom(100 << 10))
        c.write("rbd_data.y.0", 0, b"y" * 4096)
        c.flush(P)
        assert not calls                                 # bytes are still dirty
        c.flush("rbd_data.y.")
        wait_for(lambda: calls, what="the heap given back")
        assert len(calls) == 1 and c._flushed_since_trim == 0
    finally:
        c.close()

"""The kept object state (backend/objstate.py): reads without header reads
or locks while it is valid, and never a stale or torn byte when another
writer, an OSD map change or damage by hand moves under it."""
import os
import random
import subprocess
import sys
import textwrap

import pytest

from backend.errors import NotFound
from backend.objectstore import ObjectStore
from backend.objstate import StateCache

from .util import counted, die_before_apply, flip_byte, osd_of, osd_paths, shard_paths

C = 4096          # chunk: 4 KiB, so a 16 KiB stripe spans all four data shards


def _written_elsewhere(s, d, name):
    """Another opener of the store writes page 0 of ``name``: the kept
    state of ``s`` goes stale (its slot's commit counter moved)."""
    other = ObjectStore(d)
    try:
        new = os.urandom(C)
        other.write(name, 0, new)
    finally:
        other.close()
    assert s.try_read(name, 0, C) is None
    assert s.read(name, 0, C) == new
    return new


def _flip(d, name, shard, at):
    """Damage by hand: flip the bits of one byte of a shard file."""
    flip_byte(shard_paths(d, name, shard)[0], at)


def _store(make_store):
    d, s = make_store(k=4, m=2, chunk_size=C)
    data = os.urandom(256 << 10)
    s.write_full("o", data)
    return d, s, data


def test_a_kept_state_reads_a_page_with_one_shard_read_and_no_header_read(make_store):
    d, s, data = _store(make_store)
    assert s.read("o", 5 * C, C) == data[5 * C:6 * C]       # the state is kept now
    got = {}
    c = counted(s, lambda: got.update(slow=s.read("o", 10 * C, C)))
    assert got["slow"] == data[10 * C:11 * C]
    # shard 2's checksum table is read (and kept); no header is read
    assert (c["shard_reads"], c["meta_reads"]) == (1, 1)
    c = counted(s, lambda: got.update(fast=s.try_read("o", 13 * C + 100, 2000)))
    assert got["fast"] == data[13 * C + 100:13 * C + 2100]
    assert (c["shard_reads"], c["meta_reads"], c["client_read_ops"]) == (1, 0, 1)


def test_a_read_across_shards_is_one_read_per_shard(make_store):
    d, s, data = _store(make_store)
    s.read("o", 0, 1)
    s.read("o", 0, 16 * C)          # every data shard's table kept
    got = {}
    c = counted(s, lambda: got.update(b=s.try_read("o", 3000, 3 * C)))
    assert got["b"] == data[3000:3000 + 3 * C]
    assert (c["shard_reads"], c["meta_reads"]) == (4, 0)


def test_a_read_over_many_stripes_is_still_one_read_per_shard(make_store):
    d, s, data = _store(make_store)
    s.read("o", 0, 16 * C)          # every data shard's table kept
    got = {}
    # 3000 .. 11 stripes on: the tail of a chunk of shard 0, whole chunks,
    # the head of one: each shard's part is one run of its file
    c = counted(s, lambda: got.update(b=s.try_read("o", 3000, 40 * C + 5)))
    assert got["b"] == data[3000:3000 + 40 * C + 5]
    assert (c["shard_reads"], c["meta_reads"], c["fast_reads"]) == (4, 0, 1)
    assert c["shard_read_bytes"] == 41 * C      # the 41 chunks it touches, whole pages
    rng = random.Random(5)
    for _ in range(200):
        off = rng.randrange(len(data))
        n = rng.choice((1, 100, C, 3 * C + 7, 17 * C, rng.randrange(1, 60 * C)))
        b = s.try_read("o", off, n)
        assert b == data[off:off + n], (off, n)


def test_a_page_aligned_read_over_stripes_reads_each_chunk_into_its_place(make_store):
    """Whole pages across chunks: each shard's run is read straight into
    its chunks' places in the answer (a preadv of several buffers), checked
    page by page; a page flipped by hand in the middle of a run sends the
    read the long way, which heals it."""
    d, s, data = _store(make_store)
    s.read("o", 0, 16 * C)          # every data shard's table and fd kept
    rng = random.Random(11)
    for _ in range(200):
        p = rng.randrange(64)
        n = rng.randrange(1, 64 - p + 1)
        got = {}
        c = counted(s, lambda: got.update(b=s.try_read("o", p * C, n * C)))
        assert got["b"] == data[p * C:(p + n) * C], (p, n)
        assert c["shard_reads"] == min(n, 4) and c["shard_read_bytes"] == n * C
    _flip(d, "o", 1, 5 * C + 100)         # shard 1's page 5 holds object page 21
    assert s.try_read("o", 16 * C, 16 * C) is None
    got = {}
    c = counted(s, lambda: got.update(b=s.read("o", 16 * C, 16 * C)))
    assert got["b"] == data[16 * C:32 * C] and c["checksum_repairs"] == 1
    assert s.read("o", 0, 64 * C) == data[:64 * C]       # (the repair renewed the state)
    assert s.try_read("o", 0, 64 * C) == data[:64 * C]


def test_a_known_absent_object_is_absent_without_a_lock_until_someone_writes_it(make_store):
    d, s, data = _store(make_store)
    with pytest.raises(NotFound):
        s.read("nothere", 0, C)         # the state is kept: its info shards say absent
    c = counted(s, lambda: pytest.raises(NotFound, s.try_read, "nothere", 0, C))
    assert (c["state_loads"], c["shard_reads"], c["meta_reads"]) == (0, 0, 0)
    _written_elsewhere(s, d, "nothere")


def test_a_writer_that_died_between_journal_and_apply_is_not_read_around(make_store):
    """Its record is durable, the commit counter never moved: the kept
    state looks valid, but the slot's in-flight marker sends the read the
    long way, which replays the record first."""
    d, s, data = _store(make_store)
    with pytest.raises(NotFound):
        s.read("x", 0, C)
    s.read("o", 0, 16 * C)
    for name in ("x", "o"):
        die_before_apply(d, name, 0, b"Z" * 4096)
        assert s.try_read(name, 0, C) is None
        assert s.read(name, 0, C) == b"Z" * 4096


def test_own_writes_keep_the_state_valid(make_store):
    d, s, data = _store(make_store)
    s.read("o", 0, 16 * C)            # every data shard's checksum table kept
    new = os.urandom(2 * C)
    c = counted(s, lambda: s.write("o", 6 * C, new))
    assert c["state_loads"] == 0
    got = {}
    c = counted(s, lambda: got.update(b=s.try_read("o", 6 * C, 2 * C)))
    assert got["b"] == new
    # the kept tables took the checksums the write stored: nothing read again
    assert (c["meta_reads"], c["fast_reads"], c["shard_reads"]) == (0, 1, 2)


def test_another_writer_makes_the_state_stale(make_store):
    d, s, data = _store(make_store)
    s.read("o", 0, C)
    assert s.try_read("o", 0, C) == data[:C]
    new = _written_elsewhere(s, d, "o")
    assert s.try_read("o", 0, C) == new


def test_an_osd_marked_down_elsewhere_is_not_read_through_the_state(make_store):
    d, s, data = _store(make_store)
    s.read("o", 0, 16 * C)
    assert s.try_read("o", 0, C) == data[:C]
    other = ObjectStore(d)
    try:
        other.osdmap.mark_down(osd_of(d, "o", 0), "test")
    finally:
        other.close()
    assert s.try_read("o", 0, C) is None
    c = counted(s, lambda: None)
    got = {}
    c = counted(s, lambda: got.update(b=s.read("o", 0, C)))
    assert got["b"] == data[:C] and c["degraded_reads"] == 1


def test_bytes_flipped_by_hand_go_the_long_way_and_are_healed(make_store):
    d, s, data = _store(make_store)
    s.read("o", 0, 16 * C)
    _flip(d, "o", 2, 3 * C + 7)           # shard 2's page 3 holds object page 14
    assert s.try_read("o", 14 * C, C) is None
    got = {}
    c = counted(s, lambda: got.update(b=s.read("o", 14 * C, C)))
    assert got["b"] == data[14 * C:15 * C]
    assert c["checksum_errors"] == 1 and c["checksum_repairs"] == 1
    assert s.read("o", 14 * C, C) == data[14 * C:15 * C]
    assert s.try_read("o", 14 * C, C) == data[14 * C:15 * C]


def test_the_fd_budget_bounds_the_open_files(make_store):
    d, s = make_store(k=4, m=2, chunk_size=C)
    s.states.clear()
    s.states = StateCache(s.seq, max_fds=8)
    blobs = {f"o{i}": os.urandom(16 * C) for i in range(12)}
    for n, b in blobs.items():
        s.write_full(n, b)
    fds_before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        for n, b in blobs.items():
            assert s.read(n, 0, 16 * C) == b
            assert s.states.fd_count() <= 8 + 4
            s.write(n, C, b[C:2 * C])
    assert len(os.listdir("/proc/self/fd")) <= fds_before + 8 + 4
    s.states.clear()
    assert s.states.fd_count() == 0
    assert len(os.listdir("/proc/self/fd")) <= fds_before


_WRITER = textwrap.dedent("""
    import sys
    from backend.objectstore import ObjectStore
    s = ObjectStore(sys.argv[1])
    for k in range(1, int(sys.argv[2]) + 1):
        s.write("o", 0, bytes([k % 256]) * (4 * 4096))
    s.close()
""")


def test_reads_without_locks_never_see_another_process_half_way(make_store):
    """A writer process rewrites four pages spread over the four data
    shards with one byte value each time; every lock-free read returns
    one whole write, never pages of two."""
    d, s, data = _store(make_store)
    w = subprocess.Popen([sys.executable, "-c", _WRITER, d, "150"],
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    fast = slow = 0
    try:
        while w.poll() is None:
            got = s.try_read("o", 0, 4 * C)
            if got is None:
                got = s.read("o", 0, 4 * C)
                slow += 1
            else:
                fast += 1
            assert got == got[:1] * len(got) or got == data[:4 * C], "a torn read"
    finally:
        w.kill()
        w.wait()
    assert w.returncode == 0
    assert s.read("o", 0, 4 * C) == bytes([150]) * (4 * C)
    assert fast > 0 and slow > 0


def test_an_object_removed_by_another_process_is_not_read_through_kept_files(make_store):
    """Kept fds still reach the unlinked files, whose pages verify against
    the kept tables: only the commit counter tells they are gone."""
    d, s, data = _store(make_store)
    s.read("o", 0, 16 * C)
    assert s.try_read("o", 0, C) == data[:C]
    other = ObjectStore(d)
    try:
        other.remove("o")
    finally:
        other.close()
    assert s.try_read("o", 0, C) is None
    assert not s.exists("o")


def test_reads_without_locks_open_no_files(make_store):
    """Only callers holding locks open and keep shard files (an open racing
    with a removal could keep an unlinked file, and a write through it
    would miss the new one): a lock-free read with no kept fd goes the
    long way, which keeps it."""
    d, s = make_store(k=4, m=2, chunk_size=C)
    data = os.urandom(16 << 10)
    s.write_full("obj", data)
    s.states.clear()
    s.exists("obj")                       # a kept state, no fds yet
    st = s.states.pin("obj", s.osdmap.generation)
    try:
        assert st is not None and not st.fds and not st.mfds
        assert s.try_read("obj", 0, 4096) is None
        assert not st.fds and not st.mfds
    finally:
        s.states.unpin(st)
    assert s.read("obj", 0, 4096) == data[:4096]
    assert s.try_read("obj", 0, 4096) == data[:4096]


def test_an_osd_map_change_closes_every_kept_file(make_store):
    """Kept fds must not pin the files of an OSD taken down (a disk to
    unmount, a wiped directory's space): the next use after the map
    changes drops every state."""
    d, s = make_store(k=4, m=2, chunk_size=C)
    for n in ("a", "b", "c"):
        s.write_full(n, os.urandom(16 * C))
        s.read(n, 0, 16 * C)
    assert s.states.fd_count() > 0
    down = osd_of(d, "a", 0)
    other = ObjectStore(d)
    try:
        other.osdmap.mark_down(down, "test")
    finally:
        other.close()
    s.try_read("b", 0, C)                 # any use under the new map
    osd_dir = os.path.realpath(osd_paths(d)[down])
    held = []
    for f in os.listdir("/proc/self/fd"):
        try:
            held.append(os.readlink(f"/proc/self/fd/{f}"))
        except FileNotFoundError:
            pass            # the listing's own fd
    assert not [p for p in held if p.startswith(osd_dir + "/objects")], held
    assert len(s.states) == 0

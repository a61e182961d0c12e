"""Journal segments (format 3): the routine checkpoint seals journal.log
under the gate and syncs with no gate held; replay reads sealed segments
first; another process's next append follows the seal."""
import fcntl
import os
import signal
import subprocess
import sys
import threading

import pytest

from backend import objectstore
from backend.journal import (FORMAT, MAGIC, OP_WRITE, _FILE_HDR, FileOp, Journal, Record,
                             encode_record)
from backend.objectstore import ObjectStore
from backend.pool import create_store
from backend.stripecache import StripeCache

from ..waiting import wait_for
from .util import check_parity, shard_paths

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
K, M = 4, 2


def _rec(i):
    return Record(f"obj{i}", i, [FileOp(OP_WRITE, 0, f"objects/ab/obj{i}.s0", 0, bytes([i]) * 100)],
                  version=i)


def _names(recs):
    return [r.name for r in recs]


def _two_sealed(tmp_path):
    """A journal of obj1 and obj2 in two sealed segments, obj3 in journal.log."""
    j = Journal(str(tmp_path / "journal.log"))
    j.append(_rec(1))
    seg1 = j.seal()
    j.append(_rec(2))
    seg2 = j.seal()
    j.append(_rec(3))
    return j, seg1, seg2


def test_sealed_segments_are_read_first_then_dropped(tmp_path):
    j, seg1, seg2 = _two_sealed(tmp_path)
    assert j.sealed() == [seg1, seg2] and seg1 < seg2
    assert _names(j.records()) == ["obj1", "obj2", "obj3"]
    assert _names(j.records([seg2])) == ["obj2"]
    assert j.size() == _FILE_HDR.size + len(encode_record(_rec(3)))
    j.drop([seg1])
    assert _names(j.records()) == ["obj2", "obj3"]
    j.reset()
    assert j.sealed() == [] and list(j.records()) == [] and j.size() == _FILE_HDR.size
    j.close()


def test_an_append_after_another_opener_sealed_lands_in_the_new_journal(tmp_path):
    path = str(tmp_path / "journal.log")
    mine, other = Journal(path), Journal(path)      # two processes' views of one journal
    other.append(_rec(1))
    seg = mine.seal()
    t, _ = other.append(_rec(2))        # other still holds the sealed file open
    other.wait_durable(t)
    assert _names(mine.records([seg])) == ["obj1"]
    assert _names(mine.records()) == ["obj1", "obj2"]
    mine.drop([seg])
    assert _names(other.records()) == ["obj2"], "the record went to the dropped segment"
    mine.close()
    other.close()


def test_a_seal_cut_short_between_link_and_rename_reads_each_record_once(tmp_path):
    path = str(tmp_path / "journal.log")
    j = Journal(path)
    j.append(_rec(1))
    os.link(path, path + ".%020d" % 5)      # the seal's first step, then a crash
    assert j.sealed() == []
    assert _names(j.records()) == ["obj1"]
    j.reset()
    assert os.listdir(tmp_path) == ["journal.log"]
    j.close()


def test_a_journal_of_a_newer_format_is_refused(tmp_path):
    path = tmp_path / "journal.log"
    path.write_bytes(_FILE_HDR.pack(MAGIC, FORMAT + 1))
    with pytest.raises(ValueError, match="newer than this ecfs knows"):
        Journal(str(path))
    assert FORMAT == 3


def _reads_back(d, data):
    """A fresh open of the store reads every object as ``data`` has it."""
    s = ObjectStore(d)
    try:
        assert {n: s.read(n, 0, 1 << 20) for n in data} == data
    finally:
        s.close()


def _watch_syncfs(monkeypatch, what):
    """Every syncfs of the store records ``what()`` (then syncs) in the
    list returned, until ``monkeypatch.undo()``."""
    real, seen = objectstore.syncfs, []

    def watching(fd):
        seen.append(what())
        real(fd)

    monkeypatch.setattr(objectstore, "syncfs", watching)
    return seen


def _gate_free(store):
    """Whether a writer could take the checkpoint gate now."""
    fd = os.open(os.path.join(store, "ckpt.lock"), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_the_routine_checkpoint_syncs_with_no_gate_held(make_store, monkeypatch):
    d, s = make_store(k=K, m=M, chunk_size=4096)
    monkeypatch.setattr(objectstore, "JOURNAL_LIMIT", 256 << 10)
    gated = _watch_syncfs(monkeypatch, lambda: not _gate_free(d))
    data = {f"o{i}": os.urandom(100 << 10) for i in range(12)}
    for n, b in data.items():
        s.write_full(n, b)
    c = s.counters.snapshot()
    assert c["journal_seals"] >= 3
    assert gated and not any(gated), "a syncfs ran under the exclusive gate"
    assert s.journal.sealed() == [], "a synced segment was kept"
    assert s.journal.size() <= (256 << 10) + (200 << 10)
    monkeypatch.undo()
    s.close()
    _reads_back(d, data)
    check_parity(d)


def test_a_failed_sync_of_a_sealed_segment_keeps_it_until_the_gated_way_settles_it(
        make_store, monkeypatch):
    d, s = make_store(k=K, m=M, chunk_size=4096)
    monkeypatch.setattr(objectstore, "JOURNAL_LIMIT", 64 << 10)
    real = objectstore.syncfs
    seen = []

    def failing(fd):
        seen.append((len(s.journal.sealed()), _gate_free(d)))
        raise OSError(5, "injected")

    s.write_full("a", os.urandom(100 << 10))    # journal past the limit: sealed next
    monkeypatch.setattr(objectstore, "syncfs", failing)
    with pytest.raises(objectstore.StoreError, match="journal is kept"):
        s.write_full("b", os.urandom(100 << 10))
    # the first sync (no gate) failed with the segment there; the gated
    # way tried, failed on every OSD (one file system) and kept everything
    assert seen[0] == (1, True) and any(not free for _, free in seen[1:])
    assert len(s.journal.sealed()) == 1
    monkeypatch.setattr(objectstore, "syncfs", real)
    s.checkpoint()
    assert s.journal.sealed() == [] and s.journal.size() == _FILE_HDR.size
    s.close()


_CHILD = """
import os, sys
from backend.objectstore import ObjectStore
s = ObjectStore(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()
s._apply = lambda *a, **k: os.kill(os.getpid(), 9)    # journaled, durable, never applied
s.write_full("x", open(sys.argv[2], "rb").read())
"""


def test_another_writers_record_after_a_seal_is_replayed(tmp_path, monkeypatch):
    """A second process opened the store before this one sealed the
    journal; its next record must land in the new journal.log (a record
    in the dropped segment would be lost): it dies after the record is
    durable, before applying it, and the replay finds it."""
    d = str(tmp_path / "store")
    create_store(d, k=K, m=M, chunk_size=4096)
    monkeypatch.setattr(objectstore, "JOURNAL_LIMIT", 64 << 10)
    new = os.urandom(50 << 10)
    (tmp_path / "new").write_bytes(new)
    s = ObjectStore(d)
    p = subprocess.Popen([sys.executable, "-c", _CHILD, d, str(tmp_path / "new")], cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=ROOT), stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        for i in range(3):
            s.write_full(f"o{i}", os.urandom(100 << 10))
        assert s.counters.snapshot()["journal_seals"] >= 2 and s.journal.sealed() == []
        p.stdin.write("go\n")
        p.stdin.flush()
        assert p.wait(60) == -signal.SIGKILL
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    s.close()                   # replays the dead writer's slot, then checkpoints
    _reads_back(d, {"x": new})
    check_parity(d)


def test_a_crash_after_seals_replays_the_segments_in_order(tmp_path):
    """SIGKILL after two seals whose syncs never ran, nothing applied to
    the shards: the next opener, alone, replays both sealed segments,
    oldest first, then journal.log, and empties all three."""
    d = str(tmp_path / "store")
    create_store(d, k=K, m=M, chunk_size=4096)
    child = (
        "import os, sys\n"
        "from backend import objectstore\n"
        "from backend.objectstore import ObjectStore\n"
        "objectstore.JOURNAL_LIMIT = 64 << 10\n"
        "s = ObjectStore(sys.argv[1])\n"
        "s._settle_sealed = lambda: None\n"        # sealed, never synced nor dropped
        "s._apply_ops = lambda *a, **k: True\n"    # nothing reaches the shards: only the journal
        "s.write_full('o', b'\\x01' * (100 << 10))\n"
        "s.write_full('o', b'\\x02' * (100 << 10))\n"
        "s.write_full('p', b'\\x03' * 4096)\n"
        "os.kill(os.getpid(), 9)\n")
    p = subprocess.run([sys.executable, "-c", child, d], cwd=ROOT, capture_output=True,
                       text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=60)
    assert p.returncode == -signal.SIGKILL, p.stderr
    j = Journal(os.path.join(d, "journal.log"))
    assert len(j.sealed()) == 2 and j.size() > _FILE_HDR.size
    j.close()
    s = ObjectStore(d)
    try:
        assert s.journal.sealed() == [] and s.journal.size() == _FILE_HDR.size
        assert s.read("o", 0, 1 << 20) == b"\x02" * (100 << 10)
        assert s.read("p", 0, 1 << 20) == b"\x03" * 4096
    finally:
        s.close()
    check_parity(d)


def test_reset_drops_the_sealed_segments_before_it_empties_journal_log(tmp_path, monkeypatch):
    """A crash inside reset must leave newer records without older ones,
    never an old segment whose newer records are gone (its replay would
    bring back what they removed)."""
    j = Journal(str(tmp_path / "journal.log"))
    j.append(_rec(1))
    j.seal()
    j.append(_rec(2))

    def cut(self, segments):
        raise OSError(5, "killed here")

    monkeypatch.setattr(Journal, "drop", cut)
    with pytest.raises(OSError):
        j.reset()
    assert _names(j.records()) == ["obj1", "obj2"], "journal.log was emptied first"
    monkeypatch.undo()
    j.reset()
    assert j.sealed() == [] and list(j.records()) == []
    j.close()


def test_a_reader_sees_a_suffix_of_the_journal_while_another_process_drops(tmp_path,
                                                                           monkeypatch):
    j, s1, s2 = _two_sealed(tmp_path)
    # segments dropped (oldest first) while the reader scans the first:
    # it opened them all before reading, so it reads all of them
    other = Journal(j.path)
    scan = Journal._scan
    dropped = []

    def scanning(self, raw, path):
        if not dropped:
            dropped.append(path)
            other.drop([s1, s2])
        return scan(self, raw, path)

    monkeypatch.setattr(Journal, "_scan", scanning)
    assert _names(j.records()) == ["obj1", "obj2", "obj3"]
    monkeypatch.undo()
    # listed, then the newer one dropped before it is opened: the older
    # is not read either (its records without the newer ones' are wrong)
    j2 = Journal(j.path)
    j2.append(_rec(4))
    s3 = j2.seal()
    j2.append(_rec(5))
    s4 = j2.seal()
    monkeypatch.setattr(Journal, "sealed", lambda self: [s3, s4])
    os.unlink(s4)
    assert _names(j2.records()) == []
    for x in (j, other, j2):
        x.close()


def test_a_checksum_table_cut_short_by_a_lockless_read_is_not_kept(make_store):
    """try_read reads a checksum table with RWF_NOWAIT, which stops where
    the page cache does: such a table is not kept (a batched flush writes
    a kept table's entries back, so zeros there would be written over the
    real checksums)."""
    d, s = make_store(k=4, m=2, chunk_size=4096)
    KC, N = 4 * 4096, 2048          # 2048 pages a shard: tables of two pages
    data = bytearray(os.urandom(N * KC))
    s.write_full("img", bytes(data))
    s.read("img", 0, KC)
    extra = os.urandom(KC)
    s.write("img", N * KC, extra)   # the kept tables are forgotten, the fds kept
    data += extra
    for j in range(4):
        fd = os.open(shard_paths(d, "img", j)[1], os.O_RDONLY)
        try:        # only the tables' first page stays in the page cache
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            os.pread(fd, 8192, 0)
        finally:
            os.close(fd)
    s.try_read("img", 5 * KC, KC)
    st = s.states.pin("img", s.osdmap.generation)
    try:
        for j, t in st.crcs.items():
            assert t.all(), f"shard {j}: a kept table has zeros over written pages"
    finally:
        s.states.unpin(st)
    batch = []
    for j in range(3):
        for stripe in (5 + j, 1500 + j):
            off = stripe * KC + j * 4096
            b = os.urandom(4096)
            batch.append((off, b))
            data[off:off + 4096] = b
    s.write_extents("img", batch)
    s.close()
    check_parity(d)
    s2 = ObjectStore(d)
    try:
        assert s2.read("img", 0, len(data)) == bytes(data)
    finally:
        s2.close()


def test_a_seal_removes_the_link_a_cut_short_seal_left(tmp_path):
    path = str(tmp_path / "journal.log")
    j = Journal(path)
    j.append(_rec(1))
    os.link(path, path + ".%020d" % 5)      # a seal cut short
    seg = j.seal()
    j.append(_rec(2))
    assert j.sealed() == [seg] and sorted(os.listdir(tmp_path)) == sorted(
        ["journal.log", os.path.basename(seg)])
    assert _names(j.records()) == ["obj1", "obj2"]
    j.close()


def test_a_journal_of_an_older_format_is_renewed_only_by_a_process_alone(tmp_path):
    """An older ecfs still running would append to a file a seal renames:
    a format-2 journal is kept as it is (and never sealed) while another
    process has the store open, and renewed by one alone with it."""
    d = str(tmp_path / "store")
    create_store(d, k=K, m=M, chunk_size=4096)
    jp = os.path.join(d, "journal.log")
    with open(jp, "wb") as f:
        f.write(_FILE_HDR.pack(MAGIC, 2))
    first = ObjectStore(d)              # alone at open: renews it
    assert first.journal.format == FORMAT
    with open(jp, "r+b") as f:          # as if an older ecfs had made it, and runs
        f.write(_FILE_HDR.pack(MAGIC, 2))
    second = ObjectStore(d)             # not alone: keeps format 2
    try:
        assert second.journal.format == 2
        second.write_full("o", os.urandom(8192))
        second.rotate()                 # no seal of a format-2 journal: the gated way
        assert second.journal.sealed() == [] and second.counters.snapshot()["journal_seals"] == 0
        with open(jp, "rb") as f:
            assert _FILE_HDR.unpack(f.read(16))[1] == 2
    finally:
        second.close()
        first.close()


def test_under_the_stripe_cache_the_checkpoint_runs_beside_the_flushes(make_store, monkeypatch):
    """A flush thread never waits for an OSD sync: under the stripe cache
    the routine checkpoint runs in a thread of its own."""
    d, s = make_store(k=K, m=M, chunk_size=4096)
    monkeypatch.setattr(objectstore, "JOURNAL_LIMIT", 64 << 10)
    where = _watch_syncfs(monkeypatch, lambda: threading.current_thread().name)
    c = StripeCache(s, 4 << 20, max_age=3600)
    c.set_writeback("o", True)
    data = {f"o{i}": os.urandom(100 << 10) for i in range(6)}
    try:
        for n, b in data.items():
            c.write(n, 0, b)
            c.flush("o")
        wait_for(lambda: s.counters.snapshot()["journal_seals"] >= 1 and
                 (s._bg is None or not s._bg.is_alive()), what="a background seal")
        assert where and set(where) == {"ecfs-journal"}, where
    finally:
        monkeypatch.undo()
        c.close()
    _reads_back(d, data)


def test_with_an_osd_down_a_sealed_segment_is_settled_the_gated_way(make_store, monkeypatch):
    """An OSD down may have lost what the records wrote to it before it
    went: the settle goes the gated way (which logs its objects as missed,
    where no 'osd up' runs meanwhile), and the journal ends empty."""
    d, s = make_store(k=K, m=M, chunk_size=4096)
    monkeypatch.setattr(objectstore, "JOURNAL_LIMIT", 64 << 10)
    s.write_full("a", os.urandom(20 << 10))
    s.osdmap.mark_down(5, "test")
    gated = _watch_syncfs(monkeypatch, lambda: not _gate_free(d))
    s.write_full("b", os.urandom(100 << 10))        # past the limit: sealed, then settled
    assert s.counters.snapshot()["journal_seals"] == 1
    assert any(gated), "the settle with an OSD down did not take the gate"
    assert s.journal.sealed() == [] and s.journal.size() == _FILE_HDR.size
    assert {"a", "b"} <= set(s.missed.read(5)[0])
    monkeypatch.undo()
    s.close()

"""Journal segments (format 3): the routine checkpoint seals journal.log
under the gate and syncs with no gate held; replay reads sealed segments
first; another process's next append follows the seal."""
import fcntl
import os
import signal
import subprocess
import sys

import pytest

from backend import objectstore
from backend.journal import (FORMAT, MAGIC, OP_WRITE, _FILE_HDR, FileOp, Journal, Record,
                             encode_record)
from backend.objectstore import ObjectStore
from backend.pool import create_store

from .util import check_parity

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
K, M = 4, 2


def _rec(i):
    return Record(f"obj{i}", i, [FileOp(OP_WRITE, 0, f"objects/ab/obj{i}.s0", 0, bytes([i]) * 100)],
                  version=i)


def _names(recs):
    return [r.name for r in recs]


def test_sealed_segments_are_read_first_then_dropped(tmp_path):
    j = Journal(str(tmp_path / "journal.log"))
    j.append(_rec(1))
    seg1 = j.seal()
    j.append(_rec(2))
    seg2 = j.seal()
    j.append(_rec(3))
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
    real = objectstore.syncfs
    gated = []

    def watching(fd):
        gated.append(not _gate_free(d))
        real(fd)

    monkeypatch.setattr(objectstore, "syncfs", watching)
    data = {f"o{i}": os.urandom(100 << 10) for i in range(12)}
    for n, b in data.items():
        s.write_full(n, b)
    c = s.counters.snapshot()
    assert c["journal_seals"] >= 3
    assert gated and not any(gated), "a syncfs ran under the exclusive gate"
    assert s.journal.sealed() == [], "a synced segment was kept"
    assert s.journal.size() <= (256 << 10) + (200 << 10)
    monkeypatch.setattr(objectstore, "syncfs", real)
    s.close()
    s2 = ObjectStore(d)
    try:
        assert {n: s2.read(n, 0, 1 << 20) for n in data} == data
    finally:
        s2.close()
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
from backend import objectstore
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
    s2 = ObjectStore(d)
    try:
        assert s2.read("x", 0, 1 << 20) == new
    finally:
        s2.close()
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

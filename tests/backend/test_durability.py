"""Acknowledged writes survive failing disks, failing syncs and a damaged
journal: the data-loss defects found by review and fault probes.

Faults are injected at the OS boundary (syncfs, a shard pwrite, the
journal bytes on disk); the store under test is the real one."""
import errno
import os
import shutil
import signal
import subprocess
import sys
import threading

import pytest

from backend import objectstore
from backend import shardfile as sf
from backend.errors import DataUnavailable, NotFound, StoreError
from backend.journal import OP_WRITE, FileOp, Record
from backend.locks import ALL_STRIPES, slot_of
from backend.missed import MissedLog
from backend.objectstore import ObjectStore
from backend.pool import create_store
from backend.recovery import recover_osd

from .util import check_parity, die_before_apply, osd_of, osd_paths, shard_paths

K, M = 4, 2
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _other_osds(d, name, shard, n):
    """n OSDs holding shards of ``name`` other than ``shard``."""
    mine = osd_of(d, name, shard)
    return [osd_of(d, name, j) for j in range(K + M) if osd_of(d, name, j) != mine][:n]


def test_a_failed_shard_write_is_logged_missed_before_the_write_returns(make_store, monkeypatch):
    """A shard write that fails (EIO) marks its OSD down and logs the object
    as missed there, so 'osd up' rebuilds it: losing M other OSDs after the
    OSD's return leaves every byte readable."""
    d, s = make_store(k=K, m=M, chunk_size=4096)
    s.write_full("obj", os.urandom(64 << 10))
    victim = osd_of(d, "obj", 1)
    vpath = osd_paths(d)[victim]
    real = objectstore._write_shard

    def failing(path, fd, data, off):
        if path.startswith(vpath + "/") and not path.endswith(".meta"):
            raise OSError(errno.EIO, "injected")
        return real(path, fd, data, off)

    new = os.urandom(64 << 10)
    monkeypatch.setattr(objectstore, "_write_shard", failing)
    s.write("obj", 0, new)
    monkeypatch.setattr(objectstore, "_write_shard", real)
    assert not s.osdmap.is_up(victim)
    assert "obj" in s.missed.read(victim)[0]
    recover_osd(s, victim)
    for osd in _other_osds(d, "obj", 1, M):
        s.osdmap.mark_down(osd, "test")
    assert s.read("obj", 0, 64 << 10) == new


def test_the_missed_log_is_not_fooled_by_a_reused_inode(tmp_path):
    """'osd up' (another process) deletes a log and a new one is made, maybe
    with the freed inode number: a name logged before must be logged again."""
    log = MissedLog(str(tmp_path))
    log.record(3, "a")
    for _ in range(20):      # give the file system every chance to reuse the inode
        other = MissedLog(str(tmp_path))
        other.clear(3)
        other.record(3, "b")
        other.close()
        log.record(3, "a")
        assert "a" in log.read(3)[0], "a name was skipped in a log that never held it"
    log.close()


def test_a_failed_syncfs_is_retried_then_the_osd_is_marked_down_and_logged(
        tmp_path, monkeypatch):
    """One OSD on its own file system whose syncfs keeps failing: the
    checkpoint writes its pages again, and when syncing still fails marks
    it down and logs every journaled object it holds as missed, before the
    journal is emptied. Its return rebuilds them."""
    fs = tmp_path / "fs5"
    fs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(fs)], check=True)
    try:
        d = str(tmp_path / "store")
        dirs = [str(tmp_path / f"osd{i}") for i in range(5)] + [str(fs / "osd5")]
        create_store(d, k=K, m=M, osd_dirs=dirs, chunk_size=4096)
        s = ObjectStore(d)
        bad_dev = os.stat(fs).st_dev
        calls = []
        real = objectstore.syncfs

        def failing(fd):
            if os.fstat(fd).st_dev == bad_dev:
                calls.append(fd)
                raise OSError(errno.EIO, "injected")
            real(fd)

        data = {f"o{i}": os.urandom(40 << 10) for i in range(6)}
        for n, b in data.items():
            s.write_full(n, b)
        monkeypatch.setattr(objectstore, "syncfs", failing)
        s.checkpoint()
        monkeypatch.setattr(objectstore, "syncfs", real)
        assert len(calls) == 2, "a failed syncfs is retried once after writing again"
        assert not s.osdmap.is_up(5)
        assert "writeback failed" in s.osdmap.states[5].reason
        assert set(s.missed.read(5)[0]) == set(data)
        assert s.journal.size() == 16
        recover_osd(s, 5)
        for n, b in data.items():
            for osd in _other_osds(d, n, [j for j in range(K + M) if osd_of(d, n, j) == 5][0], M):
                s.osdmap.mark_down(osd, "test")
            assert s.read(n, 0, len(b)) == b
            for osd in range(5):
                if not s.osdmap.is_up(osd):
                    s.osdmap.mark_up(osd)
        s.close()
    finally:
        subprocess.run(["umount", "-l", str(fs)], check=False)


def test_a_syncfs_failing_on_every_osd_keeps_the_journal(make_store, monkeypatch):
    """All OSDs on one file system and its sync fails: no OSD can be trusted,
    so the journal (the only durable copy) is kept and the error raised."""
    d, s = make_store(k=K, m=M, chunk_size=4096)
    s.write_full("obj", os.urandom(40 << 10))
    size = s.journal.size()

    def failing(fd):
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(objectstore, "syncfs", failing)
    with pytest.raises(StoreError, match="journal is kept"):
        s.checkpoint()
    assert s.journal.size() == size
    assert all(s.osdmap.is_up(i) for i in range(K + M)), "nothing could rebuild them"
    monkeypatch.undo()


def test_replay_never_rolls_back_an_applied_write_whose_record_is_lost(tmp_path):
    """A then B written over the same bytes, the process SIGKILLed (the
    journal keeps both), B's record cut off the journal: replay must leave
    B (it is on the shards, newer than anything the journal holds) and
    count the damage, never put A back."""
    d = str(tmp_path / "store")
    create_store(d, k=K, m=M, chunk_size=4096)
    child = (
        "import os, sys\n"
        "from backend.objectstore import ObjectStore\n"
        "s = ObjectStore(sys.argv[1])\n"
        "s.write('obj', 0, b'A' * 65536)\n"
        "print(os.path.getsize(s.journal.path), flush=True)\n"
        "s.write('obj', 0, b'B' * 65536)\n"
        "os.kill(os.getpid(), 9)\n")
    p = subprocess.run([sys.executable, "-c", child, d], cwd=ROOT, capture_output=True,
                       text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=60)
    assert p.returncode == -signal.SIGKILL, p.stderr
    cut = int(p.stdout.split()[0])
    jpath = os.path.join(d, "journal.log")
    assert os.path.getsize(jpath) > cut
    os.truncate(jpath, cut)
    s = ObjectStore(d)
    try:
        assert s.read("obj", 0, 65536) == b"B" * 65536
        assert s.counters.snapshot()["journal_damaged"] == 1
    finally:
        s.close()
    check_parity(d)


def test_replay_logs_the_ops_of_an_osd_down_at_replay_as_missed(tmp_path):
    """A writer dies between journal and apply; at the replay one OSD's disk
    is late (its directory missing): the ops it skips are logged as missed,
    so when the disk is back its stale shard is rebuilt."""
    d = str(tmp_path / "store")
    create_store(d, k=K, m=M, chunk_size=4096)
    s = ObjectStore(d)
    s.write_full("obj", os.urandom(64 << 10))
    s.close()
    new = os.urandom(64 << 10)
    die_before_apply(d, "obj", 0, new)
    victim = osd_of(d, "obj", 1)
    vdir = osd_paths(d)[victim]
    shutil.move(vdir, vdir + ".late")
    s = ObjectStore(d)           # alone: replays the journal without the late disk
    try:
        assert "obj" in s.missed.read(victim)[0]
        shutil.move(vdir + ".late", vdir)
        s.osdmap.refresh()
        recover_osd(s, victim)
        for osd in _other_osds(d, "obj", 1, M):
            s.osdmap.mark_down(osd, "test")
        assert s.read("obj", 0, 64 << 10) == new
    finally:
        s.close()


def test_a_dead_writers_slot_is_replayed_under_the_slots_locks(make_store):
    """The checkpoint finishes a dead writer's transaction only once it holds
    every lock of the slot: while another holder has the slot's stripes, it
    waits (before, it rewrote them under that holder's feet)."""
    d, s = make_store(k=K, m=M, chunk_size=4096)
    s.write_full("obj", b"x" * 8192)
    slot = slot_of("obj")
    rd, _ = sf.rel_paths("obj", 1)
    osd = osd_of(d, "obj", 1)
    # a record journaled by a writer that died before applying it
    s.journal.wait_durable(s.journal.append(
        Record("obj", slot, [FileOp(OP_WRITE, osd, rd, 0, b"y" * 4096)],
               s.stat("obj").version))[0])
    s.locks.set_inflight(slot, True)
    held, release = threading.Event(), threading.Event()

    def holder():
        with s.locks.stripes(slot, *ALL_STRIPES):
            held.set()
            release.wait(30)

    t = threading.Thread(target=holder)
    t.start()
    assert held.wait(30)
    ck = threading.Thread(target=s.checkpoint)
    ck.start()
    ck.join(0.5)
    assert ck.is_alive(), "replayed while another holder had the slot's stripes"
    release.set()
    t.join(30)
    ck.join(30)
    assert not ck.is_alive() and not s.locks.inflight(slot)
    with open(shard_paths(d, "obj", 1)[0], "rb") as f:
        assert f.read(4096) == b"y" * 4096


def test_an_object_whose_info_shards_are_all_down_is_unavailable_not_absent(make_store):
    """With every OSD holding an info shard down, nothing can tell whether
    the object exists: reads and stat say unavailable (EIO in the mount),
    never 'does not exist' (zeros in an image); with one of them up and
    the shard absent there, it does not exist."""
    d, s = make_store(k=K, m=M, chunk_size=4096)
    s.write_full("obj", os.urandom(40 << 10))
    for j in s.info_shards:
        s.osdmap.mark_down(osd_of(d, "obj", j), "test")
    for fn in (lambda: s.read("obj", 0, 4096), lambda: s.stat("obj"),
               lambda: s.exists("obj"), lambda: s.write("obj", 0, b"z")):
        with pytest.raises(DataUnavailable, match="unavailable"):
            fn()
    s.osdmap.mark_up(osd_of(d, "obj", K))
    assert s.exists("obj") and len(s.read("obj", 0, 40 << 10)) == 40 << 10
    s.remove("obj")
    with pytest.raises(NotFound):
        s.read("obj", 0, 1)


def test_a_directory_mounted_over_an_osd_is_never_written_into(make_store, tmp_path):
    """An empty directory bind-mounted over osd.N under a live store: the
    next write marks osd.N down (it is not the directory that was opened)
    and logs what it misses, instead of writing into the stranger; once the
    real directory is back and 'osd up' has run, any M others may fail."""
    d, s = make_store(k=K, m=M, chunk_size=4096)
    s.write_full("obj", os.urandom(64 << 10))
    victim = osd_of(d, "obj", 2)
    vdir = osd_paths(d)[victim]
    empty = tmp_path / "empty"
    (empty / "objects").mkdir(parents=True)     # looks like an OSD, has no osd.json
    subprocess.run(["mount", "--bind", str(empty), vdir], check=True)
    try:
        new = os.urandom(64 << 10)
        s.write("obj", 0, new)
        assert not s.osdmap.is_up(victim)
        assert "directory replaced" in s.osdmap.states[victim].reason
        assert os.listdir(empty / "objects") == [], "wrote into the stranger"
        assert "obj" in s.missed.read(victim)[0]
    finally:
        subprocess.run(["umount", vdir], check=True)
    recover_osd(s, victim)
    for osd in _other_osds(d, "obj", 2, M):
        s.osdmap.mark_down(osd, "test")
    assert s.read("obj", 0, 64 << 10) == new


def test_a_checkpoint_does_not_log_an_osd_marked_up_meanwhile_as_behind(make_store):
    """A mount (a) wrote while osd.N was down; another process brought N
    back ('osd up'). a's next checkpoint must judge N by the map as it is
    now: up, with nothing to log (before, its stale view logged every
    journaled object again, and N was behind right after 'osd up')."""
    d, a = make_store(k=K, m=M, chunk_size=4096)
    b = ObjectStore(d)
    try:
        victim = osd_of(d, "x", 1)
        a.write_full("x", os.urandom(40 << 10))
        a.osdmap.mark_down(victim, "test")
        a.write("x", 0, os.urandom(8192))
        b.osdmap.refresh()
        recover_osd(b, victim)
        a.checkpoint()
        assert MissedLog(d).behind() == {}, "osd.N is behind right after osd up"
        a.osdmap.refresh()
        assert a.osdmap.is_up(victim)
    finally:
        b.close()


def test_a_write_planned_while_an_osd_was_down_is_planned_again_if_it_came_up(
        make_store, monkeypatch):
    """osd.N is brought up (by 'osd up' elsewhere) between a write's plan,
    which left N's shard out, and its commit: the write is planned again
    and reaches N, instead of logging N as missed (behind again right
    after 'osd up')."""
    from contextlib import contextmanager
    d, s = make_store(k=K, m=M, chunk_size=4096)
    other = ObjectStore(d)
    try:
        victim = osd_of(d, "x", 1)
        s.write_full("x", os.urandom(40 << 10))
        s.osdmap.mark_down(victim, "test")
        real = s.locks.commit_gate
        flipped = []

        @contextmanager
        def gate():
            if not flipped:
                flipped.append(1)
                other.osdmap.refresh()
                other.osdmap.mark_up(victim)       # the race: up after the plan
            with real():
                yield

        monkeypatch.setattr(s.locks, "commit_gate", gate)
        new = os.urandom(8192)
        s.write("x", 0, new)
        monkeypatch.undo()
        assert flipped and MissedLog(d).behind() == {}, "osd.N logged behind after coming up"
        for osd in [osd_of(d, "x", j) for j in (0, 2)]:
            s.osdmap.mark_down(osd, "test")
        assert s.read("x", 0, 8192) == new
    finally:
        other.close()


def test_a_sync_error_seen_before_the_gate_outlives_a_failed_checkpoint(make_store, monkeypatch):
    """The checkpoint's first sync (before its gate) sees an error, then the
    checkpoint fails for another reason: a later syncfs would succeed (an
    error is reported once), so the next checkpoint must still write the
    journal's pages again before it empties the journal."""
    d, s = make_store(k=K, m=M, chunk_size=4096)
    s.write_full("obj", os.urandom(40 << 10))
    real_sync, calls = objectstore.syncfs, []

    def failing_once(fd):
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(errno.EIO, "injected")
        real_sync(fd)

    def unreadable():
        raise StoreError("journal unreadable (injected)")

    monkeypatch.setattr(objectstore, "syncfs", failing_once)
    monkeypatch.setattr(s.journal, "records", unreadable)
    with pytest.raises(StoreError, match="injected"):
        s.checkpoint()
    monkeypatch.undo()
    reapplied, real_reapply = [], s._reapply
    monkeypatch.setattr(s, "_reapply",
                        lambda recs, osds: (reapplied.append(set(osds)), real_reapply(recs, osds)))
    s.checkpoint()
    assert reapplied == [set(range(K + M))], reapplied      # one file system: all six
    assert s.journal.size() == 16
    assert all(s.osdmap.is_up(i) for i in range(K + M))     # written again and synced: current
    assert s.read("obj", 0, 1) != b""


"""Images through the Python API: create/list/remove/rename, I/O, the head
object map and the exclusive lock."""
import os
import subprocess
import sys
import textwrap

import pytest

from backend.errors import Busy, Exists, InvalidArgument, NotFound, ReadOnly
from rbdlike.exclusive_lock import Fenced, break_lock, owner
from rbdlike.image import Image
from rbdlike.objectmap import EXISTS, NONEXISTENT, ObjectMap
from rbdlike.rbd import RBD, object_map_check, object_map_rebuild

from ..waiting import wait_for

MiB = 1 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_create_list_rename_remove(store):
    r = RBD()
    r.create(store, "a", 10 * MiB)
    r.create(store, "b", 1 * MiB, object_size=64 << 10)
    assert r.list(store) == ["a", "b"]
    with pytest.raises(Exists):
        r.create(store, "a", MiB)
    for bad in ("", "x/y", "x@y", ".snap", "n" * 251, ".", ".."):
        with pytest.raises(InvalidArgument):
            r.create(store, bad, MiB)
    for bad in (".", ".."):      # directory entries in the mount, as snapshots too
        with pytest.raises(InvalidArgument):
            r.rename(store, "a", bad)
        with Image(store, "a") as img, pytest.raises(InvalidArgument):
            img.create_snap(bad)
    assert r.list(store) == ["a", "b"]
    assert Image(store, "a", read_only=True).list_snaps() == []
    for osz in (1000, 3 << 20, 64 << 20, 2048):
        with pytest.raises(InvalidArgument):
            r.create(store, "c", MiB, object_size=osz)
    r.rename(store, "a", "c")
    assert r.list(store) == ["b", "c"]
    with pytest.raises(NotFound):
        r.rename(store, "a", "d")
    with pytest.raises(Exists):
        r.rename(store, "b", "c")
    with Image(store, "c") as img:
        img.write(b"x" * 5000, 4 * MiB - 100)
    c_id = _id(store, "c")
    r.remove(store, "c")
    assert r.list(store) == ["b"]
    assert not [n for n in store.list() if n.startswith("rbd_data.")]
    # and nothing of it is left in the store's lock and watch files
    rbd = os.path.join(store.store, "rbd")
    assert not [f for f in os.listdir(os.path.join(rbd, "locks")) if f.startswith(c_id)]
    assert not os.path.exists(os.path.join(rbd, "watch", c_id))
    with pytest.raises(NotFound):
        Image(store, "c")


def test_io_round_trip_and_bounds(store):
    RBD().create(store, "img", 10 * MiB + 5)
    model = bytearray(10 * MiB + 5)
    with Image(store, "img") as img:
        for off, n in ((0, 1), (4 * MiB - 3, 10), (5 * MiB, 3 * MiB), (10 * MiB, 5)):
            data = os.urandom(n)
            img.write(data, off)
            model[off:off + n] = data
        with pytest.raises(InvalidArgument):
            img.write(b"12", 10 * MiB + 4)
        assert img.read(0, len(model) + 100) == bytes(model)
        img.discard(4 * MiB, 4 * MiB)            # whole object 1 + part of 2
        model[4 * MiB:8 * MiB] = bytes(4 * MiB)
        img.discard(100, 10)
        model[100:110] = bytes(10)
        assert img.read(0, len(model)) == bytes(model)
    with Image(store, "img", read_only=True) as ro:
        assert ro.read(0, len(model)) == bytes(model)
        with pytest.raises(ReadOnly):
            ro.write(b"x", 0)


def test_object_map_states_and_zero_io_reads(store):
    RBD().create(store, "m", 16 * MiB)
    with Image(store, "m") as img:
        img.write(b"a" * 4096, 4 * MiB + 8192)
        m = ObjectMap(store, img.id)
        assert m.load(4) and m.states.tolist() == [NONEXISTENT, EXISTS, NONEXISTENT, NONEXISTENT]
        # repeat writes to an EXISTS object do not touch the map again
        before = store.counters.snapshot()
        img.write(b"b" * 4096, 4 * MiB)
        after = store.counters.snapshot()
        assert after["client_write_ops"] - before["client_write_ops"] == 1
        # reading a NONEXISTENT object costs no backend I/O at all
        before = store.counters.snapshot()
        assert img.read(8 * MiB, 4 * MiB) == bytes(4 * MiB)
        after = store.counters.snapshot()
        assert {k: after[k] - before[k] for k in after if after[k] != before[k]} == {}
        img.discard(4 * MiB, 4 * MiB)
        assert ObjectMap(store, img.id).load(4)
        m.load(4)
        assert m.states.tolist() == [0, 0, 0, 0]
    assert object_map_check(store, "m") == []


def test_damaged_map_is_ignored_until_rebuilt(store):
    RBD().create(store, "d", 8 * MiB)
    with Image(store, "d") as img:
        img.write(b"z" * 100, 5 * MiB)
        image_id = img.id
    store.write_full(f"rbd_object_map.{image_id}", b"garbage")
    with Image(store, "d") as img:
        img.write(b"y", 0)          # becomes the writer: the map is found bad
        assert img.read(5 * MiB, 100) == b"z" * 100
        assert img.header.object_map_invalid
    assert object_map_check(store, "d")
    assert object_map_rebuild(store, "d") == 2
    assert object_map_check(store, "d") == []
    with Image(store, "d") as img:
        img.write(b"w", 1)
        assert not img.header.object_map_invalid
        assert img.read(0, 2) == b"yw" and img.read(5 * MiB, 100) == b"z" * 100


def test_resize(store):
    RBD().create(store, "r", 9 * MiB)
    with Image(store, "r") as img:
        img.write(os.urandom(9 * MiB), 0)
        with pytest.raises(InvalidArgument):
            img.resize(MiB, allow_shrink=False)
        head = img.read(0, 5 * MiB)
        img.resize(5 * MiB)
        assert img.size() == 5 * MiB
        img.resize(12 * MiB)
        assert img.read(0, 12 * MiB) == head + bytes(7 * MiB)
        ids = img.id
    names = [n for n in store.list() if n.startswith(f"rbd_data.{ids}.")]
    assert len(names) == 2
    assert object_map_check(store, "r") == []


def _holder(store_dir, image, ready, exclusive=False):
    """A child process that takes the image's lock and waits."""
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {ROOT!r})
        from backend.objectstore import ObjectStore
        from rbdlike.image import Image
        s = ObjectStore({store_dir!r})
        img = Image(s, {image!r})
        img.acquire_lock(exclusive={exclusive!r})
        img.write(b"child", 0)
        open({ready!r}, "w").close()
        sys.stdin.read()
    """)
    return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE)


def test_exclusive_holder_blocks_a_writer_and_dead_owner_frees_it(store, tmp_path):
    RBD().create(store, "l", 4 * MiB)
    ready = str(tmp_path / "ready")
    p = _holder(store.store, "l", ready, exclusive=True)
    try:
        wait_for(lambda: os.path.exists(ready))
        o = owner(store, _id(store, "l"))
        assert o is not None and o.pid == p.pid and o.exclusive and o.address
        with Image(store, "l") as img:
            with pytest.raises(Busy):
                img.write(b"x", 0)
            p.kill()
            p.wait()
            img.write(b"parent", 0)     # the dead owner's lock is free at once
            assert img.read(0, 6) == b"parent"
    finally:
        p.kill()
        p.wait()


def test_holder_hands_the_lock_over_on_request(store, tmp_path):
    RBD().create(store, "h", 4 * MiB)
    ready = str(tmp_path / "ready")
    p = _holder(store.store, "h", ready)
    try:
        wait_for(lambda: os.path.exists(ready))
        assert owner(store, _id(store, "h")).pid == p.pid
        with Image(store, "h") as img:
            img.write(b"PARENT", 0)     # asks the child, which flushes and releases
            assert owner(store, _id(store, "h")).pid == os.getpid()
            assert img.read(0, 6) == b"PARENT"
        assert p.poll() is None         # the child lives on, without the lock
    finally:
        p.kill()
        p.wait()


def test_lock_break_fences_the_old_owner(store):
    RBD().create(store, "f", 4 * MiB)
    old = Image(store, "f")
    old.write(b"old", 0)
    # same process, so break and re-lock by hand as a second client would
    prev = break_lock(store, old.id)
    assert prev is not None
    with pytest.raises(Fenced):
        old.write(b"late", 0)
    with Image(store, "f") as new:
        new.write(b"new", 0)
    with Image(store, "f", read_only=True) as ro:
        assert ro.read(0, 3) == b"new"
    # its close flushes nothing (fenced) and still gives everything up
    try:
        old.close()
    except Fenced:
        pass
    assert old.lock_owner() is None


def _id(store, name):
    from rbdlike import directory
    return directory.lookup(store, name)


def test_modify_and_access_timestamps_move_at_most_once_an_interval(store, monkeypatch):
    """As librbd's modify_timestamp / access_timestamp: a write moves the
    image's mtime and a read (by the mount's own image) its atime, but only
    once they are TIMESTAMP_INTERVAL old, so I/O stays cheap."""
    import time

    import rbdlike.image as image_mod
    from rbdlike.image import load_header
    RBD().create(store, "t", 1 << 20)
    with Image(store, "t", watch=True) as img:
        img.write(b"x" * 4096, 0)          # created just now: within the interval
        assert "mtime_ns" not in load_header(store, img.id).attrs
        monkeypatch.setattr(image_mod, "TIMESTAMP_INTERVAL", 0)
        t0 = time.time_ns()
        img.write(b"y" * 4096, 0)
        m = load_header(store, img.id).attrs["mtime_ns"]
        assert m >= t0
        img.read(0, 4096)
        assert load_header(store, img.id).attrs["atime_ns"] >= m
        monkeypatch.setattr(image_mod, "TIMESTAMP_INTERVAL", 3600)
        img.write(b"z" * 4096, 0)
        assert load_header(store, img.id).attrs["mtime_ns"] == m, "moved within the interval"


def test_the_lock_owner_moves_through_its_states(store):
    """rbdlike/lock_owner.py's table: the first write locks, release
    unlocks, the next write locks again, close ends it; a request record
    makes the header format 2, and a header without one stays format 1."""
    import json

    from rbdlike import lock_owner
    from rbdlike.header import header_object
    RBD().create(store, "st", 4 * MiB)
    img = Image(store, "st")
    assert img._owner.state == lock_owner.UNLOCKED and img.lock_owner() is None
    img.write(b"x", 0)
    assert img._owner.state == lock_owner.LOCKED and img.lock_owner().pid == os.getpid()
    img.release_lock()
    assert img._owner.state == lock_owner.UNLOCKED and img.lock_owner() is None
    img.create_snap("s")              # run here, for itself: no record
    raw = json.loads(store.read(header_object(img.id), 0, 1 << 20))
    assert raw["format_version"] == 1 and "requests" not in raw
    img.close()
    assert img._owner.state == lock_owner.CLOSED and img.lock_owner() is None
    with pytest.raises(InvalidArgument):
        img.write(b"y", 0)

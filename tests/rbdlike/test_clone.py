"""Clones (layering) through the Python API: reads through the parent,
copy-up, flatten, children, clone chains, and the protection rules."""
import os

import pytest

from backend.errors import Busy, InvalidArgument
from rbdlike.header import data_object
from rbdlike.image import Image
from rbdlike.objectmap import EXISTS, EXISTS_CLEAN, NONEXISTENT
from rbdlike.rbd import RBD

MiB = 1 << 20


def _parent(store, name="p", size=12 * MiB):
    RBD().create(store, name, size)
    data = bytearray(size)
    with Image(store, name) as img:
        for off in (0, 5 * MiB, 9 * MiB):
            chunk = os.urandom(MiB)
            img.write(chunk, off)
            data[off:off + MiB] = chunk
        img.create_snap("s")
        img.protect_snap("s")
    return bytes(data)


def test_clone_reads_parent_then_copies_up(store):
    base = _parent(store)
    RBD().clone(store, "p", "s", "c")
    with Image(store, "c") as c:
        assert c.parent_info().overlap == 12 * MiB
        assert c.read(0, 12 * MiB) == base
        assert not store.exists(data_object(c.id, 0))
        c.write(b"W" * 10, 100)
        # the copy-up brought the whole parent object, then the write applied
        want = bytearray(base)
        want[100:110] = b"W" * 10
        assert c.read(0, 12 * MiB) == bytes(want)
        assert c.head_map_states().tolist() == [EXISTS, NONEXISTENT, NONEXISTENT]
        # a whole-object discard inside the overlap zeroes, never re-exposes the parent
        c.discard(4 * MiB, 4 * MiB)
        want[4 * MiB:8 * MiB] = bytes(4 * MiB)
        assert c.read(0, 12 * MiB) == bytes(want)
    # the parent head may change: the clone reads the snapshot
    with Image(store, "p") as p:
        p.write(b"P" * MiB, 9 * MiB)
    with Image(store, "c", read_only=True) as c:
        assert c.read(0, 12 * MiB) == bytes(want)


def test_clone_rules(store):
    _parent(store)
    with Image(store, "p") as img:
        img.create_snap("u")             # not protected
    with pytest.raises(InvalidArgument):
        RBD().clone(store, "p", "u", "x")
    RBD().clone(store, "p", "s", "c1")
    RBD().clone(store, "p", "s", "c2")
    assert RBD().children(store, "p", "s") == ["c1", "c2"]
    with Image(store, "p") as img:
        with pytest.raises(Busy):
            img.unprotect_snap("s")
        with pytest.raises(Busy):
            img.remove_snap("s")
    RBD().remove(store, "c2")
    with Image(store, "c1") as c:
        c.flatten()
        assert c.parent_info() is None
        with pytest.raises(InvalidArgument):
            c.flatten()
    assert RBD().children(store, "p", "s") == []
    with Image(store, "p") as img:
        img.unprotect_snap("s")
        img.remove_snap("s")


def test_flatten_copies_everything_and_detaches(store):
    base = _parent(store)
    RBD().clone(store, "p", "s", "f")
    with Image(store, "f") as c:
        c.write(b"Z" * 4096, 9 * MiB + 4096)
        c.create_snap("before")
        c.flatten()
        want = bytearray(base)
        want[9 * MiB + 4096:9 * MiB + 8192] = b"Z" * 4096
        assert c.read(0, 12 * MiB) == bytes(want)
        assert c.head_map_states().tolist() == [EXISTS, EXISTS, EXISTS_CLEAN]   # 2 was there before the snapshot
    # the child's snapshot from before the flatten still reads through the parent link
    with Image(store, "f", snapshot="before") as v:
        assert v.read(0, 12 * MiB) == bytes(want)
    assert RBD().children(store, "p", "s") == ["f"]
    # no longer reading the parent: its data can change and the clone does not see it
    with Image(store, "f") as c:
        c.remove_snap("before")
    assert RBD().children(store, "p", "s") == []
    with Image(store, "p") as img:
        img.unprotect_snap("s")
        img.remove_snap("s")
    RBD().remove(store, "p")
    with Image(store, "f", read_only=True) as c:
        assert c.read(0, 12 * MiB) == bytes(want)


def test_clone_of_clone_follows_the_chain(store):
    base = _parent(store)
    RBD().clone(store, "p", "s", "c")
    with Image(store, "c") as c:
        c.write(b"C" * 10, 5 * MiB)
        c.create_snap("cs")
        c.protect_snap("cs")
    RBD().clone(store, "c", "cs", "g")
    want = bytearray(base)
    want[5 * MiB:5 * MiB + 10] = b"C" * 10
    # the grandparent's head and the parent's head change: the grandchild reads its snapshots
    with Image(store, "p") as p:
        p.write(b"X" * MiB, 0)
    with Image(store, "c") as c:
        c.write(b"Y" * MiB, 9 * MiB)
    with Image(store, "g") as g:
        assert g.read(0, 12 * MiB) == bytes(want)
        g.write(b"G", 1)
        want[1:2] = b"G"
        assert g.read(0, 12 * MiB) == bytes(want)


def test_shrink_cuts_the_overlap(store):
    base = _parent(store)
    RBD().clone(store, "p", "s", "k")
    with Image(store, "k") as c:
        c.resize(6 * MiB)
        assert c.parent_info().overlap == 6 * MiB
        c.resize(12 * MiB)
        got = c.read(0, 12 * MiB)
        assert got[:6 * MiB] == base[:6 * MiB]
        assert got[6 * MiB:] == bytes(6 * MiB)       # not the parent's bytes again


def test_many_threads_first_writes_keep_the_map_right(store, monkeypatch):
    """Threads that start writing while the first one is still taking the
    lock must wait for the map: a write that slipped past it would leave an
    object the map calls nonexistent (and flatten would then copy the
    parent over it). A slow map load (injected) widens the window."""
    import threading
    import time
    from rbdlike.objectmap import ObjectMap
    from rbdlike.rbd import object_map_check
    real_load = ObjectMap.load

    def slow_load(self, n):
        time.sleep(0.05)                 # fault injection: a slow disk, not a wait
        return real_load(self, n)
    monkeypatch.setattr(ObjectMap, "load", slow_load)
    base = _parent(store, size=40 * MiB)
    RBD().clone(store, "p", "s", "t")
    want = bytearray(base)
    barrier = threading.Barrier(10)       # nine writers + the first one's helper
    errors = []
    with Image(store, "t") as c:
        def work(i):
            try:
                # the first writer releases the others as it starts taking the
                # lock, so they arrive while it loads the (slow) map: started
                # together they would all queue for the lock before it began
                if i:
                    barrier.wait()
                else:
                    threading.Thread(target=barrier.wait, daemon=True).start()
                data = bytes([i + 1]) * 4096
                c.write(data, i * 4 * MiB + 8192)
            except BaseException as e:     # reported below
                errors.append(e)
        threads = [threading.Thread(target=work, args=(i,)) for i in range(10)]
        threads[0].start()
        for t in threads[1:]:
            t.start()
        for t in threads:
            t.join()
        assert not errors
    monkeypatch.setattr(ObjectMap, "load", real_load)
    for i in range(10):
        want[i * 4 * MiB + 8192:i * 4 * MiB + 12288] = bytes([i + 1]) * 4096
    assert object_map_check(store, "t") == []
    with Image(store, "t") as c:
        c.flatten()
        assert c.read(0, 40 * MiB) == bytes(want)

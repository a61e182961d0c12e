"""Races and sequences a second review found: zero detection against
concurrent writes and rollbacks, clones kept for removed snapshots, and a
close meeting a lock request."""
import sys
import threading

import pytest

from rbdlike.image import Image
from rbdlike.rbd import RBD, object_map_rebuild

KiB, MiB = 1 << 10, 1 << 20


@pytest.fixture
def fast_switching():
    """Thread switches as often as the interpreter allows: races show."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def test_zeros_never_discard_a_concurrent_data_write(store, fast_switching):
    osz, nobj, block = 64 * KiB, 60, 4096
    RBD().create(store, "z", osz * nobj, object_size=osz)
    threads_n = 8
    barrier = threading.Barrier(threads_n)
    errors = []
    with Image(store, "z") as img:
        def worker(i):
            try:
                for obj in range(nobj):
                    base = obj * osz
                    if i == 0:
                        img.write(bytes(block), base)
                        barrier.wait()
                        img.write(b"\x07" * block, base)    # data: must survive
                    else:
                        barrier.wait()
                        for b in range(1 + (i - 1) * 2, 1 + (i - 1) * 2 + 2):
                            img.write(bytes(block), base + b * block)
                        if i == threads_n - 1:
                            img.write(bytes(block), base + 15 * block)
            except BaseException as e:
                errors.append(e)
                barrier.abort()
        ts = [threading.Thread(target=worker, args=(i,)) for i in range(threads_n)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert not errors, errors
        got = img.read(0, osz * nobj)
    lost = [o for o in range(nobj) if got[o * osz:o * osz + block] != b"\x07" * block]
    assert lost == []


def test_a_zero_write_after_a_rollback_touches_only_itself(store):
    RBD().create(store, "r", 8 * MiB)
    with Image(store, "r") as img:
        img.write(b"D" * 4 * MiB, 0)
        img.create_snap("s")
        for off in range(0, 4 * MiB, 128 * KiB):      # zeros over the object, FUSE-sized
            img.write(bytes(128 * KiB), off)
        img.rollback_to_snap("s")
        assert img.read(MiB, 2) == b"DD"
        img.write(bytes(4096), 0)
        assert img.read(0, 4 * MiB) == bytes(4096) + b"D" * (4 * MiB - 4096)


def test_clone_kept_for_a_removed_snapshot_still_serves_the_older_one(store):
    RBD().create(store, "k", 8 * MiB, object_size=MiB)
    with Image(store, "k") as img:
        img.write(b"AAAA", 0)
        img.create_snap("s1")
        img.create_snap("s2")
        img.write(b"BBBB", 0)          # clone .2 serves s1 and s2
        img.remove_snap("s2")          # kept for s1
    object_map_rebuild(store, "k")     # the rebuilt map must not ask for a new copy
    with Image(store, "k") as img:
        img.write(b"CCCC", 0)
    with Image(store, "k", snapshot="s1") as v:
        assert v.read(0, 4) == b"AAAA"
    # and without a map at all
    RBD().create(store, "n", 8 * MiB, object_size=MiB, features=["layering"])
    with Image(store, "n") as img:
        img.write(b"AAAA", 0)
        img.create_snap("s1")
        img.create_snap("s2")
        img.write(b"BBBB", 0)
        img.remove_snap("s2")
        img.write(b"CCCC", 0)
    with Image(store, "n", snapshot="s1") as v:
        assert v.read(0, 4) == b"AAAA"


def test_closing_while_a_peer_asks_for_the_lock(store):
    """Two writers of one image in one process, each opening, writing and
    closing in a loop: every hand-over meets a close now and then."""
    RBD().create(store, "h", 4 * MiB)
    errors = []

    def loop(tag: bytes):
        try:
            for i in range(40):
                with Image(store, "h") as img:
                    img.write(tag + bytes([i]), 0 if tag == b"a" else 4096)
        except BaseException as e:
            errors.append(e)
    ts = [threading.Thread(target=loop, args=(t,)) for t in (b"a", b"b")]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors
    with Image(store, "h", read_only=True) as img:
        assert img.read(0, 2) == b"a" + bytes([39]) and img.read(4096, 2) == b"b" + bytes([39])


def test_asking_who_owns_a_lock_never_makes_an_acquire_fail(store):
    """owner() (rbd status, lock ls, the error texts) asks whether the
    holder lives without taking the lock: a writer acquiring at the moment
    another process asks about a killed holder's leftover record is never
    refused, and a live holder is still seen."""
    import json
    from dataclasses import asdict

    from rbdlike.exclusive_lock import ExclusiveLock, Owner, _owner_path, owner, read_epoch
    RBD().create(store, "o", MiB)
    with Image(store, "o") as img:
        image_id = img.id
    # the probe in another process, so it runs while this one acquires
    import os
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    probe = subprocess.Popen(
        [sys.executable, "-c",
         "import sys\n"
         "from backend.objectstore import ObjectStore\n"
         "from rbdlike.exclusive_lock import owner\n"
         "s = ObjectStore(sys.argv[1])\n"
         "print('go', flush=True)\n"
         "while True: owner(s, sys.argv[2])\n", store.store, image_id],
        cwd=root, env=dict(os.environ, PYTHONPATH=root), stdout=subprocess.PIPE, text=True)
    refused = 0
    try:
        assert probe.stdout.readline().strip() == "go"
        for _ in range(1000):
            # a killed holder's record stays behind: the probe keeps asking
            with open(_owner_path(store, image_id), "w") as f:
                json.dump(asdict(Owner(999999999, "h", "dead", read_epoch(store, image_id),
                                       0.0)), f)
            lock = ExclusiveLock(store, image_id, "o")
            if not lock.try_acquire():
                refused += 1
                continue
            assert owner(store, image_id) is not None, "a live holder was not seen"
            lock.release()
    finally:
        probe.kill()
        probe.wait(30)
    assert refused == 0, f"{refused} of 1000 acquires refused by a mere owner() probe"

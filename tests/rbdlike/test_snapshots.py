"""Snapshots through the Python API: copy-on-write, snapshot views,
remove, rollback, protect, and a seeded model test over random operations."""
import contextlib
import random

import numpy as np
import pytest

from backend.errors import Busy, Exists, InvalidArgument, NotFound, ReadOnly
from backend.stripecache import StripeCache
from rbdlike.header import clone_object, data_object
from rbdlike.image import Image
from rbdlike.objectmap import EXISTS, EXISTS_CLEAN, NONEXISTENT, ObjectMap
from rbdlike.rbd import RBD

KiB, MiB = 1 << 10, 1 << 20


def _delta(store, before):
    after = store.counters.snapshot()
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def test_snapshot_view_keeps_old_data_while_head_changes(store):
    RBD().create(store, "a", 12 * MiB)
    with Image(store, "a") as img:
        img.write(b"1" * MiB, 0)
        img.write(b"2" * MiB, 5 * MiB)
        sid = img.create_snap("s1")
        assert sid == 1
        img.write(b"3" * 4096, 0)
        img.discard(4 * MiB, 4 * MiB)
        img.write(b"4" * 4096, 9 * MiB)
        with Image(store, "a", snapshot="s1") as snap:
            assert snap.read_only
            got = snap.read(0, 12 * MiB)
            assert got[:MiB] == b"1" * MiB
            assert got[5 * MiB:6 * MiB] == b"2" * MiB
            assert got[9 * MiB:9 * MiB + 4096] == bytes(4096)
            with pytest.raises(ReadOnly):
                snap.write(b"x", 0)
        head = img.read(0, 12 * MiB)
        assert head[:4096] == b"3" * 4096 and head[4096:MiB] == b"1" * (MiB - 4096)
        assert head[4 * MiB:8 * MiB] == bytes(4 * MiB)
        assert head[9 * MiB:9 * MiB + 4096] == b"4" * 4096


def test_copy_on_write_happens_once_per_object_per_snapshot(store):
    RBD().create(store, "c", 8 * MiB)
    with Image(store, "c") as img:
        img.write(b"a" * 8192, 0)
        img.create_snap("s1")
        m = img._map
        assert m.states.tolist() == [EXISTS_CLEAN, NONEXISTENT]
        assert ObjectMap(store, img.id, 1).load(2)
        img.write(b"b" * 4096, 0)
        assert store.exists(clone_object(img.id, 0, 1))
        assert m.states.tolist() == [EXISTS, NONEXISTENT]
        # the next write to the object costs one client write, no copy, no map update
        before = store.counters.snapshot()
        img.write(b"c" * 4096, 4096)
        assert _delta(store, before)["client_write_ops"] == 1
        # an object absent at the snapshot needs no copy (the snapshot map says absent)
        img.write(b"d", 5 * MiB)
        assert not store.exists(clone_object(img.id, 1, 1))
        with Image(store, "c", snapshot="s1") as snap:
            assert snap.read(0, 8192) == b"a" * 8192
            assert snap.read(5 * MiB, 1) == b"\0"


def test_snapshot_reads_of_absent_objects_cost_no_io(store):
    RBD().create(store, "z", 16 * MiB)
    with Image(store, "z") as img:
        img.write(b"q" * 100, 0)
        img.create_snap("s")
    with Image(store, "z", snapshot="s") as snap:
        snap.read(0, 1)                  # loads the snapshot map
        before = store.counters.snapshot()
        assert snap.read(4 * MiB, 12 * MiB) == bytes(12 * MiB)
        assert _delta(store, before) == {}


def test_snapshot_errors(store):
    RBD().create(store, "e", 4 * MiB)
    with Image(store, "e") as img:
        img.create_snap("s")
        with pytest.raises(Exists):
            img.create_snap("s")
        for bad in ("", "a@b", "a/b", ".snap"):
            with pytest.raises(InvalidArgument):
                img.create_snap(bad)
        with pytest.raises(NotFound):
            img.remove_snap("nope")
        img.protect_snap("s")
        with pytest.raises(Busy):                # as rbd: EBUSY
            img.protect_snap("s")
        with pytest.raises(Busy):
            img.remove_snap("s")
        img.unprotect_snap("s")
    with pytest.raises(Busy):
        RBD().remove(store, "e")
    with pytest.raises(NotFound):
        Image(store, "e", snapshot="nope")
    with Image(store, "e") as img:
        img.remove_snap("s")
    RBD().remove(store, "e")
    assert not [n for n in store.list() if n.startswith("rbd_")
                and not n.startswith("rbd_directory")]


def test_remove_snapshot_keeps_clones_older_snapshots_need(store):
    RBD().create(store, "r", 4 * MiB)
    with Image(store, "r") as img:
        img.write(b"A" * 4096, 0)
        img.create_snap("s1")
        img.create_snap("s2")            # no write between: s1 and s2 share one clone
        img.write(b"B" * 4096, 0)        # clone .2 serves s1 and s2
        img.create_snap("s3")
        img.write(b"C" * 4096, 0)        # clone .3 serves s3
        img.remove_snap("s2")
        assert store.exists(clone_object(img.id, 0, 2))      # s1 still reads it
        assert img.header.clone_ids == [2]
        with Image(store, "r", snapshot="s1") as v:
            assert v.read(0, 4096) == b"A" * 4096
        img.remove_snap("s1")
        assert not store.exists(clone_object(img.id, 0, 2))
        assert img.header.clone_ids == []
        with Image(store, "r", snapshot="s3") as v:
            assert v.read(0, 4096) == b"B" * 4096
        img.remove_snap("s3")
        assert [n for n in store.list(f"rbd_data.{img.id}.")] == [data_object(img.id, 0)]
        assert img.read(0, 4096) == b"C" * 4096


def test_rollback(store):
    RBD().create(store, "b", 10 * MiB)
    with Image(store, "b") as img:
        img.write(b"x" * MiB, MiB)
        img.create_snap("s")
        img.write(b"y" * MiB, MiB)
        img.write(b"z" * 100, 9 * MiB)
        img.resize(20 * MiB)
        img.write(b"w" * 10, 15 * MiB)
        img.rollback_to_snap("s")
        assert img.size() == 10 * MiB
        got = img.read(0, 10 * MiB)
        assert got == bytes(MiB) + b"x" * MiB + bytes(8 * MiB)
        # the snapshot itself is unchanged and still usable
        with Image(store, "b", snapshot="s") as v:
            assert v.read(0, 10 * MiB) == got
        img.write(b"n", 0)
        with Image(store, "b", snapshot="s") as v:
            assert v.read(0, 1) == b"\0"


def test_snapshot_of_image_without_object_map(store):
    """No map: clones are found by name, absent objects get a whiteout."""
    RBD().create(store, "n", 8 * MiB, features=["layering"])
    with Image(store, "n") as img:
        img.write(b"a" * 10, 0)
        img.create_snap("s")
        img.write(b"b" * 10, 0)
        img.write(b"c" * 10, 4 * MiB)        # absent at s: whiteout
        assert store.stat(clone_object(img.id, 1, 1)).size == 0
        img.create_snap("t")
        img.write(b"d" * 10, 4 * MiB)
        with Image(store, "n", snapshot="s") as v:
            assert v.read(0, 10) == b"a" * 10
            assert v.read(4 * MiB, 10) == bytes(10)
        with Image(store, "n", snapshot="t") as v:
            assert v.read(4 * MiB, 10) == b"c" * 10


def test_crash_between_snapshot_halves_is_finished_by_next_writer(store):
    RBD().create(store, "p", 4 * MiB)
    with Image(store, "p") as img:
        img.write(b"k" * 10, 0)
        img._finish_snap_orig = img._finish_snap
        img._finish_snap = lambda: None             # "dies" after the first half
        img.create_snap("s")
        assert img.header.snap_pending is not None
        assert [s.name for s in img.header.snapshots] == []
    with Image(store, "p") as img:
        img.write(b"j" * 10, 0)                     # the new writer finishes it first
        assert [s.name for s in img.header.snapshots] == ["s"]
        assert img.header.snap_pending is None
    with Image(store, "p", snapshot="s") as v:
        assert v.read(0, 10) == b"k" * 10


class _Model:
    """The image and its snapshots as plain byte arrays."""

    def __init__(self, size):
        self.head = bytearray(size)
        self.snaps: dict[str, bytes] = {}


@pytest.mark.parametrize("cache", [False, True], ids=["through", "cached"])
@pytest.mark.parametrize("features", [None, ["layering", "exclusive-lock"], ["layering"]],
                         ids=["object-map", "no-map", "no-lock"])
def test_seeded_random_snapshot_model(store, features, cache):
    """With ``cache``: the image's writes wait in a small stripe cache with
    an eager flusher, a second image handle (as another process would)
    takes the lock over at random points (or, without the lock feature,
    writes beside it), and flushes come at random."""
    rnd = random.Random(20261201)
    osz = 64 * KiB
    size = 16 * osz + 5000
    RBD().create(store, "m", size, object_size=osz, features=features)
    model = _Model(size)
    names = iter(f"s{i}" for i in range(1000))
    front = StripeCache(store, 256 * KiB, max_age=0.02) if cache else store
    other = StripeCache(store, 256 * KiB, max_age=0.02) if cache else None
    try:
        with Image(front, "m", watch=cache) as img, \
                (Image(other, "m", watch=True) if cache else contextlib.nullcontext()) as img2:
            for step in range(160):
                op = rnd.choices(["write", "discard", "snap", "rm", "rollback", "resize",
                                  "other", "flush"], [50, 12, 10, 6, 4, 4, 8 * cache, 6 * cache])[0]
                cur = len(model.head)
                if op == "other" and cur:
                    # the lock moves to the other handle (ours flushes and hands
                    # it over) and back at our next write
                    off = rnd.randrange(cur)
                    n = min(rnd.choice([1, 4096, osz + 7]), cur - off)
                    data = rnd.randbytes(n)
                    img2.write(data, off)
                    model.head[off:off + n] = data
                elif op == "flush":
                    img.flush()
                elif op == "write" and cur:
                    off = rnd.choice([0, osz - 1, osz, rnd.randrange(cur)])
                    off = min(off, cur - 1)
                    n = min(rnd.choice([1, 4096, osz, 2 * osz + 3, rnd.randrange(1, 3 * osz)]),
                            cur - off)
                    data = np.random.default_rng(step).integers(1, 255, n, dtype=np.uint8).tobytes()
                    img.write(data, off)
                    model.head[off:off + n] = data
                elif op == "discard" and cur:
                    off = rnd.randrange(cur)
                    n = min(rnd.choice([osz, 3 * osz, 100]), cur - off)
                    img.discard(off, n)
                    model.head[off:off + n] = bytes(n)
                elif op == "snap":
                    name = next(names)
                    img.create_snap(name)
                    model.snaps[name] = bytes(model.head)
                elif op == "rm" and model.snaps:
                    name = rnd.choice(sorted(model.snaps))
                    img.remove_snap(name)
                    del model.snaps[name]
                elif op == "rollback" and model.snaps:
                    name = rnd.choice(sorted(model.snaps))
                    img.rollback_to_snap(name)
                    model.head = bytearray(model.snaps[name])
                elif op == "resize":
                    new = rnd.choice([8 * osz + 17, 16 * osz + 5000, 20 * osz])
                    img.resize(new)
                    if new < cur:
                        del model.head[new:]
                    else:
                        model.head += bytes(new - cur)
                assert img.size() == len(model.head)
                if step % 8 == 7 or op in ("rm", "rollback"):
                    assert img.read(0, len(model.head)) == bytes(model.head), f"head, step {step}"
                    for name, want in model.snaps.items():
                        with Image(front, "m", snapshot=name) as v:
                            assert v.read(0, len(want)) == want, f"{name}, step {step} ({op})"
            for name in sorted(model.snaps):
                img.remove_snap(name)
            assert img.read(0, len(model.head)) == bytes(model.head)
    finally:
        if cache:
            other.close(close_lower=False)
            front.close(close_lower=False)
    if cache:
        # write-back needs the exclusive lock (without, other writers could
        # not see our cached bytes)
        assert (store.counters.snapshot()["cache_writes"] > 0) == (features != ["layering"])
    with Image(store, "m") as img:
        assert img.read(0, len(model.head)) == bytes(model.head)     # all on the OSDs
    # every clone is gone with the last snapshot
    assert not [n for n in store.list("rbd_data.") if len(n.split(".")) > 3]


def test_disabling_the_object_map_keeps_snapshots_right(store):
    """Without a map a snapshot cannot tell "absent then" from "unchanged
    since": disabling the map must leave whiteouts behind (and enabling it
    again must rebuild the snapshot maps from them)."""
    from rbdlike.rbd import update_features
    RBD().create(store, "o", 12 * MiB)
    with Image(store, "o") as img:
        img.write(b"a" * 4096, 0)
        img.create_snap("s1")
        img.write(b"b" * 4096, 4 * MiB)          # object 1: absent at s1
        img.create_snap("s2")
        img.write(b"c" * 4096, 8 * MiB)          # object 2: absent at s1 and s2
        img.write(b"d" * 4096, 0)
    s1 = bytearray(12 * MiB)                     # the model, written out
    s1[:4096] = b"a" * 4096
    s2 = bytearray(s1)
    s2[4 * MiB:4 * MiB + 4096] = b"b" * 4096
    want = {"s1": bytes(s1), "s2": bytes(s2)}
    for sn in ("s1", "s2"):
        with Image(store, "o", snapshot=sn) as v:
            assert v.read(0, 12 * MiB) == want[sn], sn
    update_features(store, "o", ["fast-diff", "object-map"], enable=False)
    for sn in ("s1", "s2"):
        with Image(store, "o", snapshot=sn) as v:
            assert v.read(0, 12 * MiB) == want[sn], sn
    with Image(store, "o") as img:               # map-less writes keep them right
        img.write(b"e" * 4096, 4 * MiB)
        img.write(b"f" * 4096, 8 * MiB + 4096)
    update_features(store, "o", ["object-map", "fast-diff"], enable=True)
    for sn in ("s1", "s2"):
        with Image(store, "o", snapshot=sn) as v:
            assert v.read(0, 12 * MiB) == want[sn], sn
    with Image(store, "o") as img:
        got = img.read(0, 12 * MiB)
    assert got[:4096] == b"d" * 4096 and got[4 * MiB:4 * MiB + 4096] == b"e" * 4096
    assert got[8 * MiB:8 * MiB + 8192] == b"c" * 4096 + b"f" * 4096


# seeds 15, 27, 30 and 35 failed before the fixes of tests/rbdlike/test_races.py
@pytest.mark.parametrize("seed", [1, 2, 3, 15, 27, 30, 35, 56])
def test_seeded_model_with_map_toggles_rebuilds_and_clones(store, seed):
    """Random writes, zeros, discards, snapshots, removals, rollbacks,
    resizes, object-map toggles and rebuilds, and clones, against a model
    of the head, every snapshot and every clone."""
    from rbdlike.rbd import object_map_rebuild, update_features
    rnd = random.Random(seed)
    osz, nobj = 64 * KiB, 12
    RBD().create(store, "a", osz * nobj, object_size=osz)
    head = bytearray(osz * nobj)
    snaps: dict[str, bytes] = {}
    clones: dict[str, tuple[str, bytes]] = {}
    mapped, n_snap = True, 0

    def verify(step):
        with Image(store, "a", read_only=True) as v:
            assert v.read(0, len(head)) == bytes(head), f"head at step {step}"
        for name, want in snaps.items():
            with Image(store, "a", snapshot=name) as v:
                assert v.read(0, len(want)) == want, f"a@{name} at step {step}"
        for child, (_, want) in clones.items():
            with Image(store, child, read_only=True) as v:
                assert v.read(0, len(want)) == want, f"clone {child} at step {step}"

    img = Image(store, "a")
    try:
        for step in range(50):
            op = rnd.choice(["w", "w", "w", "z", "d", "snap", "snap", "rm", "toggle",
                             "rebuild", "rollback", "resize", "clone"])
            size = len(head)
            if op in ("w", "z"):
                off = rnd.randrange(size)
                n = min(rnd.choice([1, 4096, osz, 2 * osz, rnd.randrange(1, 3 * osz)]),
                        size - off)
                if op == "z" and rnd.random() < 0.5:
                    off = off // osz * osz
                    n = min(osz, size - off)
                data = bytes(n) if op == "z" else bytes([rnd.randrange(1, 256)]) * n
                img.write(data, off)
                head[off:off + n] = data
            elif op == "d":
                off = rnd.randrange(size)
                n = min(rnd.choice([osz, 2 * osz, 4096, 777]), size - off)
                img.discard(off, n)
                head[off:off + n] = bytes(n)
            elif op == "snap":
                n_snap += 1
                img.create_snap(f"s{n_snap}")
                snaps[f"s{n_snap}"] = bytes(head)
            elif op == "rm":
                free = [s for s in snaps if all(c[0] != s for c in clones.values())]
                if free:
                    name = rnd.choice(free)
                    if img.is_protected_snap(name):
                        img.unprotect_snap(name)
                    img.remove_snap(name)
                    del snaps[name]
            elif op == "rollback" and snaps:
                name = rnd.choice(sorted(snaps))
                img.rollback_to_snap(name)
                head = bytearray(snaps[name])
            elif op == "resize":
                new = rnd.randrange(1, nobj + 4) * osz - rnd.choice([0, 100])
                img.resize(new)
                head = head[:new] if new < len(head) else head + bytes(new - len(head))
            elif op in ("toggle", "rebuild", "clone"):
                img.close()
                if op == "toggle":
                    feats = ["fast-diff", "object-map"] if mapped else ["object-map", "fast-diff"]
                    update_features(store, "a", feats, enable=not mapped)
                    mapped = not mapped
                elif op == "rebuild" and mapped:
                    object_map_rebuild(store, "a")
                elif op == "clone" and snaps and len(clones) < 3:
                    name = rnd.choice(sorted(snaps))
                    with Image(store, "a") as tmp:
                        if not tmp.is_protected_snap(name):
                            tmp.protect_snap(name)
                    child = f"c{len(clones)}"
                    RBD().clone(store, "a", name, child)
                    clones[child] = (name, snaps[name])
                img = Image(store, "a")
            if step % 5 == 4:
                verify(step)
        verify("end")
    finally:
        img.close()

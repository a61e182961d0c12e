"""diff_iterate: exact extents, object granularity from the maps alone,
map-less fallbacks, and diffs that replay to the same bytes."""
import random

import numpy as np
import pytest

from rbdlike.diff import diff_extents
from rbdlike.image import Image
from rbdlike.rbd import RBD

KiB, MiB = 1 << 10, 1 << 20


def _diff(img, frm=None, whole=False):
    out = []
    img.diff_iterate(0, img.size(), frm, lambda o, n, e: out.append((o, n, e)),
                     whole_object=whole)
    return out


def _reads(store, before):
    after = store.counters.snapshot()
    return after["client_read_ops"] - before["client_read_ops"], \
        after["shard_reads"] - before["shard_reads"]


def test_exact_extents_since_a_snapshot(store):
    RBD().create(store, "d", 12 * MiB)
    with Image(store, "d") as img:
        img.write(b"a" * MiB, 0)
        img.write(b"b" * MiB, 5 * MiB)
        assert _diff(img) == [(0, MiB, True), (5 * MiB, MiB, True)]
        img.create_snap("s1")
        assert _diff(img, "s1") == []
        img.write(b"c" * 4096, 8192)
        img.discard(4 * MiB, 4 * MiB)
        img.write(b"d" * 10, 9 * MiB + 5)
        assert _diff(img, "s1") == [(8192, 4096, True), (5 * MiB, MiB, False),
                                    (9 * MiB, 4096, True)]
        assert _diff(img, "s1", whole=True) == [(0, 4 * MiB, True), (4 * MiB, 4 * MiB, False),
                                                (8 * MiB, 4 * MiB, True)]
        img.create_snap("s2")
        img.write(b"e" * 4096, 0)
        with Image(store, "d", snapshot="s2") as v:
            assert _diff(v, "s1") == [(8192, 4096, True), (5 * MiB, MiB, False),
                                      (9 * MiB, 4096, True)]
        assert _diff(img, "s2") == [(0, 4096, True)]


def test_whole_object_diff_and_du_use_the_maps_alone(store):
    RBD().create(store, "w", 64 * MiB)
    with Image(store, "w") as img:
        for i in range(0, 16, 3):
            img.write(b"x" * 4096, i * 4 * MiB)
        img.create_snap("s")
        img.write(b"y" * 4096, 4 * MiB)
        img.write(b"y" * 4096, 3 * 4 * MiB)
    with Image(store, "w", read_only=True) as img:
        before = store.counters.snapshot()
        got = _diff(img, "s", whole=True)
        assert got == [(4 * MiB, 4 * MiB, True), (12 * MiB, 4 * MiB, True)]
        # three small reads, no data object: the snapshot view's header, the
        # snapshot's map and the head map (one shard read each)
        assert _reads(store, before) == (3, 3)
        before = store.counters.snapshot()
        _diff(img, "s", whole=False)          # exact extents: the changed objects are read
        assert _reads(store, before)[0] > 3


def test_diff_of_a_clone_includes_the_parent_unless_from_a_snapshot(store):
    RBD().create(store, "p", 8 * MiB)
    with Image(store, "p") as p:
        p.write(b"p" * 4096, 4 * MiB)
        p.create_snap("s")
        p.protect_snap("s")
    RBD().clone(store, "p", "s", "c")
    with Image(store, "c") as c:
        assert _diff(c) == [(4 * MiB, 4096, True)]
        c.create_snap("cs")
        c.write(b"c" * 4096, 0)
        assert _diff(c, "cs") == [(0, 4096, True)]


@pytest.mark.parametrize("features", [None, ["layering"]], ids=["fast-diff", "no-map"])
def test_random_diffs_replay_to_the_same_bytes(store, features):
    """Apply diff(s_i -> s_{i+1}) to a copy of s_i: it must become s_{i+1}."""
    rnd = random.Random(7)
    osz = 64 * KiB
    size = 12 * osz + 300
    RBD().create(store, "r", size, object_size=osz, features=features)
    snaps = []
    with Image(store, "r") as img:
        for i in range(6):
            for _ in range(rnd.randrange(1, 8)):
                off = rnd.randrange(size)
                n = min(rnd.choice([1, 4096, osz, 3 * osz]), size - off)
                if rnd.random() < 0.25:
                    img.discard(off, n)
                else:
                    img.write(np.random.default_rng(rnd.randrange(1 << 30)).integers(
                        0, 256, n, dtype=np.uint8).tobytes(), off)
            img.create_snap(f"s{i}")
            snaps.append(f"s{i}")
        prev = bytes(size)
        prev_name = None
        for name in snaps:
            with Image(store, "r", snapshot=name) as v:
                want = v.read(0, size)
                replay = bytearray(prev)
                for off, n, exists, data in diff_extents(v, prev_name, 0, size, want_data=True):
                    replay[off:off + n] = data if exists else bytes(n)
                assert bytes(replay) == want, name
            prev, prev_name = want, name

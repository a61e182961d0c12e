"""An OSD that comes back recovers exactly what it missed (backend/recovery.py)."""
import os
import random

import pytest

from backend.errors import DataUnavailable, StoreError
from backend.recovery import recover_osd

from .iogen import IOGen, Model, run_op, verify_all
from .util import check_parity, osd_of, shard_paths
from ..waiting import wait_for

K, M = 4, 2


def _fill(s, names, size=200_000, seed=1):
    rng = random.Random(seed)
    model = Model()
    for n in names:
        data = rng.randbytes(size)
        s.write_full(n, data)
        model.objs[n] = bytearray(data)
    return model


@pytest.mark.parametrize("mode", ["delta", "full"])
def test_up_rebuilds_only_what_changed_then_any_m_others_may_fail(make_store, mode):
    d, s = make_store(k=K, m=M, chunk_size="auto", write_mode=mode)
    names = [f"o{i}" for i in range(12)]
    model = _fill(s, names)
    victim = 3
    s.osdmap.mark_down(victim, "test")
    gen = IOGen(7, k=K, names=("o0", "o1", "o2", "new1", "new2"), max_size=1 << 20)
    ops = list(gen.ops(50))
    for op in ops:
        run_op(s, op, model)
    logged = set(s.missed.read(victim)[0])
    changed = {op.name for op in ops if op.mutates}
    touching = {n for n in changed if victim in _osds(d, n)}
    assert logged == touching, "the missed log must list exactly the objects changed on the OSD"
    assert check_parity(d, allow_stale=True).stale_shards > 0

    before = s.counters.snapshot()
    res = recover_osd(s, victim)
    after = s.counters.snapshot()
    assert s.osdmap.is_up(victim)
    assert res.objects == len(logged)
    assert s.missed.behind() == {}
    # untouched objects cost nothing: at most K shard reads per rebuilt page row
    assert after["recovery_shard_writes"] - before["recovery_shard_writes"] > 0
    rep = check_parity(d)          # every shard current, parity right, crcs right
    assert rep.stale_shards == 0

    # now any M *other* OSDs may go: the returned OSD's shards must be current
    for others in ([o for o in range(6) if o != victim][:M], [o for o in range(6) if o != victim][-M:]):
        for o in others:
            s.osdmap.mark_down(o, "test")
        verify_all(s, model)
        for o in others:
            s.osdmap.mark_up(o)


def test_shard_zero_alone_changed_then_parity_osds_fail(make_store):
    """The reviewer's case: a write that changes only data shard 0 (an info
    shard) and the parity while shard 0's OSD is away; after 'osd up' the
    OSDs of both parity shards fail: the read must return the new bytes."""
    d, s = make_store(k=K, m=M, chunk_size=4096)
    old = os.urandom(4 * 4096)
    s.write_full("x", old)
    x0 = osd_of(d, "x", 0)
    s.osdmap.mark_down(x0, "test")
    s.write("x", 100, b"N" * 50)
    recover_osd(s, x0)
    for j in (K, K + 1):
        s.osdmap.mark_down(osd_of(d, "x", j), "test")
    want = old[:100] + b"N" * 50 + old[150:]
    assert s.read("x", 0, len(old)) == want


def test_remove_while_down_stays_removed(make_store):
    d, s = make_store(k=K, m=M, chunk_size=4096)
    s.write_full("x", os.urandom(40000))
    o = osd_of(d, "x", 0)
    s.osdmap.mark_down(o, "test")
    s.remove("x")
    assert s.list() == [] and not s.exists("x")
    res = recover_osd(s, o)
    assert res.removed == 1
    assert s.list() == [] and not s.exists("x")
    assert not any(os.path.exists(p) for p in shard_paths(d, "x", 0))


def test_recreated_while_down_and_sparse(make_store):
    """An object removed and written anew (with a hole where the returning
    OSD's shard is) while that OSD was away: its old shard is dropped, the
    rebuilt shard is sparse."""
    d, s = make_store(k=K, m=M, chunk_size=4096)
    s.write_full("y", os.urandom(16 * 4096))
    o = osd_of(d, "y", 1)
    s.osdmap.mark_down(o, "test")
    s.remove("y")
    s.write("y", 0, b"a" * 4096)
    s.write("y", 3 * 4096, b"d" * 4096)
    recover_osd(s, o)
    data, _ = shard_paths(d, "y", 1)
    assert not os.path.exists(data) or os.path.getsize(data) == 0
    check_parity(d)
    want = b"a" * 4096 + bytes(8192) + b"d" * 4096
    assert s.read("y", 0, 1 << 20) == want


def test_up_is_idempotent_and_refuses_a_missing_directory(make_store):
    d, s = make_store(k=K, m=M, chunk_size=4096)
    s.write_full("z", os.urandom(30000))
    o = osd_of(d, "z", 2)
    s.osdmap.mark_down(o, "test")
    s.write("z", 2 * 4096 + 7, b"q" * 10)      # lands in shard 2
    path = s.osdmap.paths[o]
    os.rename(path, path + ".away")
    with pytest.raises(StoreError, match="missing"):
        recover_osd(s, o)
    assert not s.osdmap.is_up(o) and s.missed.pending(o) == 1
    os.rename(path + ".away", path)
    assert recover_osd(s, o).rebuilt == 1
    assert recover_osd(s, o).objects == 0
    check_parity(d)


def test_recovery_needs_k_other_shards(make_store):
    d, s = make_store(k=K, m=M, chunk_size=4096)
    s.write_full("w", os.urandom(30000))
    o = osd_of(d, "w", 1)
    s.osdmap.mark_down(o, "test")
    s.write("w", 5000, b"r" * 10)
    for j in (0, 2):
        s.osdmap.mark_down(osd_of(d, "w", j), "test")
    with pytest.raises(DataUnavailable):
        recover_osd(s, o)
    assert not s.osdmap.is_up(o) and s.missed.pending(o) == 1


def test_writes_and_removes_need_k_shards(make_store):
    d, s = make_store(k=K, m=M, chunk_size=4096)
    s.write_full("v", os.urandom(30000))
    for j in range(M + 1):
        s.osdmap.mark_down(osd_of(d, "v", j), "test")
    with pytest.raises(DataUnavailable):
        s.write("v", 0, b"x")
    with pytest.raises(DataUnavailable):
        s.remove("v")
    for j in range(M + 1):
        s.osdmap.mark_up(osd_of(d, "v", j))
    assert s.exists("v")


def _osds(d, name):
    return {osd_of(d, name, j) for j in range(K + M)}


def test_a_long_running_process_follows_osd_down_and_up_from_another(make_store):
    """A mount keeps its store open for days: 'ecfs osd down/up' in another
    process must reach it without a reopen."""
    from backend.objectstore import ObjectStore
    d, mount = make_store(chunk_size=4096)
    mount.write("obj", 0, b"a" * 20000)
    victim = osd_of(d, "obj", 1)
    admin = ObjectStore(d)
    try:
        admin.osdmap.mark_down(victim, "marked down")
        mount.write("obj", 0, b"b" * 20000)           # skips the down OSD, logs the miss
        assert not mount.osdmap.is_up(victim)
        assert os.path.getsize(os.path.join(d, "missed", f"osd.{victim}")) > 0
        recover_osd(admin, victim)
        assert mount.read("obj", 0, 20000) == b"b" * 20000
        assert mount.osdmap.is_up(victim)
    finally:
        admin.close()
    assert check_parity(d).stale_shards == 0     # asserts parity and crcs itself


def test_an_object_written_again_after_its_recovery_is_recovered_again(make_store):
    """A mount (w) writes X while osd.N is down (X is logged), 'osd up'
    (r, another opener) recovers X, then w writes X again before the OSD
    is up: w does not log a name twice, so recovery must see from X's shard
    version that it is stale again, and rebuild it before marking up."""
    from backend.objectstore import ObjectStore
    d, r = make_store(k=K, m=M, chunk_size=4096)
    w = ObjectStore(d)
    try:
        victim = osd_of(d, "x", 1)
        w.write_full("x", os.urandom(40 << 10))
        w.osdmap.mark_down(victim, "test")
        w.write("x", 0, os.urandom(8192))
        last = os.urandom(8192)
        wrote = []

        def after_each(done, total):
            if not wrote:
                wrote.append(1)
                w.write("x", 4096, last)

        r.osdmap.refresh()
        recover_osd(r, victim, progress=after_each)
        assert wrote and r.osdmap.is_up(victim)
        for osd in [osd_of(d, "x", j) for j in (0, 2)]:
            r.osdmap.mark_down(osd, "test")
        assert r.read("x", 4096, 8192) == last
    finally:
        w.close()


def test_osd_up_ends_while_another_process_keeps_writing_every_object(make_store):
    """A writer touching every object faster than recovery rebuilds them
    kept 'osd up' going for ever: the recovering OSD now takes the writes
    to its current shards, so what was rebuilt stays current."""
    import subprocess
    import sys
    import textwrap
    import threading

    from .util import check_parity
    d, s = make_store()
    names = [f"o{i}" for i in range(8)]
    for n in names:
        s.write_full(n, os.urandom(256 << 10))
    s.osdmap.mark_down(2, "test")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = textwrap.dedent(f"""
        import os, random, sys
        sys.path.insert(0, {root!r})
        from backend.objectstore import ObjectStore
        s = ObjectStore({d!r})
        r = random.Random(7)
        print("writing", flush=True)
        while sys.stdin.readable():
            for n in {names!r}:
                s.write(n, r.randrange(64) * 4096, os.urandom(4096))
            if os.path.exists({d!r} + "/stop"):
                break
        s.close()
        print("stopped", flush=True)
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "writing"
        out = {}
        t = threading.Thread(target=lambda: out.setdefault("res", recover_osd(s, 2)),
                             daemon=True)
        t.start()
        t.join(120)
        ended = not t.is_alive()
        open(os.path.join(d, "stop"), "w").close()
        assert p.stdout.readline().strip() == "stopped"
        p.wait(60)
        t.join(120)
        assert ended, "osd up never ended under the writer"
        assert s.osdmap.is_up(2) and not s.osdmap.is_recovering(2)
        # each object rebuilt about once (it was thousands of times: each
        # pass found every object written again)
        assert out["res"].objects <= 2 * len(names), out["res"]
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    check_parity(d)              # osd.2's shards current, parity agreeing


def test_a_write_rebuilds_a_stale_shard_it_finds_on_an_up_osd(make_store):
    """A shard file deleted by hand on an up OSD: no missed record covers
    it (its OSD never went down), so the write that has to leave it out
    rebuilds it afterwards instead of leaving it behind until a repair."""
    from backend.objectstore import ObjectStore
    d, s = make_store()
    data = bytearray(os.urandom(256 << 10))
    s.write_full("x", bytes(data))
    for p in shard_paths(d, "x", 1):
        os.unlink(p)
    s2 = ObjectStore(d)          # another process: nothing of "x" kept
    try:
        before = s2.counters.snapshot().get("stale_healed", 0)
        s2.write("x", 0, b"y" * 4096)
        data[:4096] = b"y" * 4096
        assert s2.counters.snapshot().get("stale_healed", 0) == before + 1
        check_parity(d)          # no stale shard left
        for o in {osd_of(d, "x", i) for i in (0, 4)}:
            s2.osdmap.mark_down(o, "test")      # shard 1 must now carry its weight
        assert s2.read("x", 0, len(data)) == bytes(data)
    finally:
        s2.close()


def _writer(d, names):
    """Another process writing 4K pages of ``names`` until STORE/stop exists;
    its stdout says each write it completed."""
    import subprocess
    import sys
    import textwrap
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {root!r})
        from backend.objectstore import ObjectStore
        s = ObjectStore({d!r})
        print("writing", flush=True)
        i = 0
        while not os.path.exists({d!r} + "/stop"):
            n = {names!r}[i % {len(names)}]
            s.write(n, (i % 32) * 4096, bytes([200 + i % 50]) * 4096)
            print(n, i, flush=True)
            i += 1
        s.close()
    """)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"
    return p


def _stop_writer(d, p):
    open(os.path.join(d, "stop"), "w").close()
    writes = [line.split() for line in p.stdout]
    assert p.wait(60) == 0 and writes
    return writes


def _expected(names, writes, size=128 << 10):
    want = {n: bytearray(bytes([1 + names.index(n)]) * size) for n in names}
    for n, i in writes:
        i = int(i)
        want[n][(i % 32) * 4096:(i % 32 + 1) * 4096] = bytes([200 + i % 50]) * 4096
    return want


def _all_placed(s):
    """Every shard file sits where placement puts it."""
    from backend import shardfile as sf
    for o, root in s.osdmap.paths.items():
        for dp, _, files in os.walk(os.path.join(root, "objects")):
            for f in files:
                name, shard = sf.parse_shard_filename(f[:-5] if f.endswith(".meta") else f)
                assert s.osdmap.place(sf.unescape_name(name), s.width)[shard] == o, (o, f)


def _filled(make_store, prefix, osds):
    """A store of ``osds`` OSDs with 24 objects of 128 KiB, and where
    placement puts their shards now."""
    from backend.placement import place
    d, s = make_store(osds=osds, min_size=5)
    names = [f"{prefix}{i}" for i in range(24)]
    for n in names:
        s.write_full(n, bytes([1 + names.index(n)]) * (128 << 10))
    return d, s, names, {n: place(n, 6, tuple(range(osds))) for n in names}


def _check_whole(d, s, names, writes):
    """Every shard where placement puts it, parity right, and every byte
    the writer wrote readable with two OSDs gone."""
    from backend.objectstore import ObjectStore
    _all_placed(s)
    want = _expected(names, writes)
    check_parity(d)
    s2 = ObjectStore(d)
    try:
        for o in (0, 1):
            s2.osdmap.mark_down(o, "test")
        for n in names:
            assert s2.read(n, 0, 128 << 10) == bytes(want[n]), n
    finally:
        s2.close()


def test_removed_osds_drain_while_another_process_writes(make_store):
    """osd rm, twice, under a writer in another process: exactly the removed
    OSD's shards move (each copied before the switch, so no object is ever
    short of one), nothing is lost, and two more OSDs may then fail."""
    from backend.placement import place
    from backend.rebalance import rm_osd
    d, s, names, before = _filled(make_store, "r", 8)
    p = _writer(d, names)
    try:
        res = rm_osd(s, 3)
        assert s.osdmap.ids == (0, 1, 2, 4, 5, 6, 7) and s.osdmap.removed == (3,)
        after = {n: place(n, 6, s.osdmap.ids, (3,)) for n in names}
        on3 = sum(before[n].count(3) for n in names)
        assert res.shards >= on3 > 0 and res.objects == on3
        for n in names:
            assert [b for a, b in zip(before[n], after[n]) if a != b] == \
                [b for a, b in zip(before[n], after[n]) if a == 3]
        res2 = rm_osd(s, 6)
        assert res2.objects > 0 and s.osdmap.removed == (3, 6)
        writes = _stop_writer(d, p)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert not os.path.exists(os.path.join(d, "osd.3")) and not os.path.exists(
        os.path.join(d, "osd.6"))
    from backend.pool import load_pool
    assert load_pool(d).format_version == 2
    _check_whole(d, s, names, writes)


def test_rm_refuses_below_k_plus_m_and_with_an_osd_down(make_store):
    from backend.errors import InvalidArgument
    from backend.rebalance import rm_osd
    d, s = make_store(osds=7)
    s.write_full("x", b"x" * 100_000)
    s.osdmap.mark_down(2, "test")
    with pytest.raises(InvalidArgument, match="every OSD up"):
        rm_osd(s, 0)
    s.osdmap.mark_up(2)
    rm_osd(s, 6)
    with pytest.raises(InvalidArgument, match="K\\+M=6 needs that many"):
        rm_osd(s, 1)
    assert s.read("x", 0, 100_000) == b"x" * 100_000
    from backend.rebalance import add_osd
    assert add_osd(s).osd == 7                # a removed OSD's id is never reused
    assert s.osdmap.ids == (0, 1, 2, 3, 4, 5, 7) and s.osdmap.removed == (6,)
    assert s.read("x", 0, 100_000) == b"x" * 100_000
    check_parity(d)


def test_a_pool_listing_removed_osds_needs_format_2(make_store):
    import json
    from backend.pool import load_pool
    d, s = make_store(osds=7)
    s.close()
    p = os.path.join(d, "pool.json")
    raw = json.load(open(p))
    raw["osds"] = raw["osds"][:6]
    raw["removed"] = [6]
    json.dump(raw, open(p, "w"))
    with pytest.raises(StoreError, match="removed OSDs need format_version 2"):
        load_pool(d)
    raw["format_version"] = 3
    json.dump(raw, open(p, "w"))
    with pytest.raises(StoreError, match="newer than this ecfs supports"):
        load_pool(d)


def test_an_added_osd_takes_its_shards_while_another_process_writes(make_store, tmp_path):
    """osd add: placement moves about 1/(N+1) of the shards, all to the new
    OSD, each copied before the switch; another process writing throughout
    loses nothing, no shard is left where placement no longer puts it, and
    the new OSD carries its weight when two others are gone."""
    from backend.placement import place
    from backend.rebalance import add_osd
    d, s, names, before = _filled(make_store, "g", 6)
    p = _writer(d, names)
    try:
        res = add_osd(s, str(tmp_path / "osd6"))
        writes = _stop_writer(d, p)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert res.osd == 6 and s.osdmap.is_up(6)
    after = {n: place(n, 6, tuple(range(7))) for n in names}
    moved = sum(a != b for n in names for a, b in zip(before[n], after[n]))
    assert 0 < moved < len(names) * 6 // 2 and moved <= res.shards
    assert all(b == a or b == 6 for n in names for a, b in zip(before[n], after[n]))
    assert moved <= res.misplaced <= 2 * moved   # each moved shard's sidecar, and its data file
    _check_whole(d, s, names, writes)


_PAUSED_WRITER = """
import os, sys, time
sys.path.insert(0, {root!r})
from backend.objectstore import ObjectStore
s = ObjectStore({d!r})
s.read("p", 0, 4096)
plan = s._stripe_ops

def paused(*a, **k):
    # planned on the map of now; committed after the switch
    out = plan(*a, **k)
    open({sig!r} + "/planned", "w").close()
    deadline = time.monotonic() + 60
    while not os.path.exists({sig!r} + "/switched") and time.monotonic() < deadline:
        time.sleep(0.01)
    return out

s._stripe_ops = paused
deadline = time.monotonic() + 60
while not os.path.exists({sig!r} + "/start") and time.monotonic() < deadline:
    time.sleep(0.01)
s.write("p", 0, b"B" * 4096)
s.close()
print("acknowledged", flush=True)
"""


@pytest.mark.parametrize("op", ["add", "rm"])
def test_a_write_planned_before_the_switch_is_planned_again(make_store, tmp_path, op):
    """A writer of some stripes plans on the old map, then commits after an
    add or rm switched placement: it must plan again, not write the old
    homes (which the clean-up then removes: an acknowledged write lost)."""
    import subprocess
    import sys
    from backend.rebalance import add_osd, rm_osd
    d, s = make_store(osds=6 if op == "add" else 7)
    old = os.urandom(65536)
    s.write_full("p", old)
    sig = tmp_path / "sig"
    sig.mkdir()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p = subprocess.Popen([sys.executable, "-c", _PAUSED_WRITER.format(root=root, d=d,
                                                                       sig=str(sig))],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoint = s.checkpoint

    def switch_while_planned(then=None):
        # the copy is done: let the writer plan on the old map, then switch
        if then is None:
            return checkpoint()
        (sig / "start").touch()
        wait_for(lambda: (sig / "planned").exists() or p.poll() is not None, 60)
        assert p.poll() is None, p.stderr.read()
        checkpoint(then=then)
        (sig / "switched").touch()

    s.checkpoint = switch_while_planned
    try:
        moved = add_osd(s) if op == "add" else rm_osd(s, s.osdmap.place("p", 6)[0])
        assert (sig / "switched").exists() and moved.objects == 1
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0 and "acknowledged" in out, err
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert s.read("p", 0, 65536) == b"B" * 4096 + old[4096:]
    check_parity(d)


def test_a_process_that_missed_an_rm_cannot_poison_the_osd_map(make_store):
    """A reader whose view predates an rm meets the removed OSD's files gone
    and marks it down: that must not name an OSD the pool no longer has
    (every process would then refuse the store)."""
    import json
    from backend.objectstore import ObjectStore
    from backend.osdmap import OsdMap
    from backend.pool import load_pool
    from backend.rebalance import rm_osd
    d, s = make_store(osds=7)
    s.write_full("x", b"x" * 100_000)
    stale = OsdMap(d, load_pool(d))           # loaded before the rm
    rm_osd(s, 2)
    stale.mark_down(2, "directory missing")
    s2 = ObjectStore(d)
    try:
        assert 2 not in s2.osdmap.states and s2.read("x", 0, 100_000) == b"x" * 100_000
    finally:
        s2.close()
    # and an osdmap.json an older view wrote naming it is read as not naming it
    with open(os.path.join(d, "osdmap.json"), "w") as f:
        json.dump({"down": [2], "reasons": {"2": "directory missing"}}, f)
    s3 = ObjectStore(d)
    try:
        assert all(st.up for st in s3.osdmap.states.values())
    finally:
        s3.close()


def test_two_commands_moving_osds_never_run_at_once(make_store):
    """A rebuild beside an add or rm would delete the copies it makes."""
    from backend.backfill import rebuild_osd
    from backend.errors import Busy
    from backend.locks import maintenance
    from backend.rebalance import add_osd, rm_osd
    d, s = make_store(osds=7)
    s.write_full("x", b"x" * 100_000)
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; sys.path.insert(0, %r)\n"
         "from backend.locks import maintenance\n"
         "with maintenance(%r, 'osd rm 3'):\n"
         "    print('held', flush=True); sys.stdin.read()" % (root, d)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for run in (lambda: rebuild_osd(s, 1), lambda: add_osd(s), lambda: rm_osd(s, 4)):
            with pytest.raises(Busy, match=r"another command is moving or rebuilding OSDs "
                                           r"of this store \(pid \d+: ecfs osd rm 3\)"):
                run()
    finally:
        holder.stdin.close()
        holder.wait(30)
    with maintenance(d, "outer"):             # re-entrant in one process
        assert rm_osd(s, 4).objects >= 0
    assert s.read("x", 0, 100_000) == b"x" * 100_000


def test_a_view_planned_on_an_older_map_meets_no_missing_key(make_store):
    """Another thread's refresh may publish a map without an OSD a plan in
    flight still names (or with one it does not know yet): that OSD reads
    as down, its files as gone; nothing raises KeyError."""
    from backend.rebalance import rm_osd
    d, s = make_store(osds=7)
    s.write_full("v", b"v" * 200_000)
    old = s._load("v")
    gone = old.loc[0]
    rm_osd(s, gone)
    s.osdmap.refresh()
    assert not s.osdmap.is_up(gone) and not s.osdmap.writable(gone)
    assert not s.osdmap.is_recovering(gone)
    with pytest.raises(FileNotFoundError):
        s._abs(old, 0)
    assert s.osdmap.place("v", 6) != old.loc and gone not in s.osdmap.place("v", 6)
    assert s.read("v", 0, 200_000) == b"v" * 200_000

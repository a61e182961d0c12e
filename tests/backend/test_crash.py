"""SIGKILL at many points of the journal/apply path: after recovery every
completed write is there, the write in flight is wholly old or wholly new,
and every stripe's parity matches its data."""
import json
import os
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from backend.objectstore import ObjectStore
from backend.pool import create_store

from .crash_child import gen
from .iogen import Model
from .util import check_parity

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOPS = 30

PROFILES = {
    # name: (k, m, chunk_size, max_size, seed, crash points)
    "2+1-auto": (2, 1, "auto", 200 << 10, 11, 30),   # crosses the restripe threshold
    "4+2-4K": (4, 2, 4096, 96 << 10, 12, 52),
}


def _run_child(store, side, seed, k, max_size, crash_at=None, trace=None, cache=False):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("ECFS_CRASH_AT", None)
    if crash_at:
        env["ECFS_CRASH_AT"] = str(crash_at)
    args = [sys.executable, "-m", "tests.backend.crash_child", store, side, str(seed),
            str(NOPS), str(k), str(max_size)] + ([trace] if trace else []) + \
        (["--cache"] if cache else [])
    return subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)


def _phases(trace):
    """Label each crash point: before-append / before-fsync / before-apply /
    apply-first / apply-mid / apply-last / replay."""
    commit_lines = sorted({int(t.split(":")[1]) for t in trace if t.startswith("_commit_locked:")})
    assert len(commit_lines) == 3, commit_lines
    names = dict(zip(commit_lines, ("before-append", "before-fsync", "before-apply")))
    out = []
    for n, t in enumerate(trace):
        fn, line = t.split(":")
        if fn == "_commit_locked":
            out.append(names[int(line)])
        elif fn == "_apply_ops":
            prev = out[-1] if out else ""
            nxt = trace[n + 1] if n + 1 < len(trace) else "_commit_locked:0"
            last = not nxt.startswith("_apply_ops")
            out.append("apply-last" if last else
                       "apply-first" if prev == "before-apply" else "apply-mid")
        else:
            out.append(fn)
    return out


def _choose(phases, count, rng):
    """``count`` distinct crash points (1-based): a few from each phase, the
    rest spread evenly over the whole run."""
    by = {}
    for n, p in enumerate(phases, 1):
        by.setdefault(p, []).append(n)
    chosen = set()
    for p, ns in by.items():
        chosen |= set(rng.sample(ns, min(len(ns), 3)))
    total = len(phases)
    even = [1 + round(i * (total - 1) / (count - 1)) for i in range(count)]
    for n in even[::2] + even[1::2]:
        if len(chosen) >= count:
            break
        chosen.add(n)
    return sorted(chosen)


def _expected(seed, k, max_size, side):
    lines = open(side).read().split()
    started = [int(x) for w, x in zip(lines[::2], lines[1::2]) if w == "start"]
    done = {int(x) for w, x in zip(lines[::2], lines[1::2]) if w == "done"}
    assert all(i in done for i in started[:-1])
    inflight = started[-1] if started and started[-1] not in done else None
    old = Model()
    new = None
    for op in gen(seed, k, max_size).ops(NOPS):
        if op.index == inflight:
            new = old.copy()
            new.apply(op)
            break
        if op.index in done:
            old.apply(op)
        else:
            break
    return old, new, inflight


def _store_content(store):
    s = ObjectStore(store)
    try:
        return {n: s.read(n, 0, 1 << 30) for n in s.list()}
    finally:
        s.close()


def _one(tmp, profile, n):
    k, m, chunk, max_size, seed, _ = PROFILES[profile]
    store = os.path.join(tmp, f"{profile}-{n}")
    create_store(store, k=k, m=m, chunk_size=chunk, write_mode="mixed")
    side = store + ".side"
    r = _run_child(store, side, seed, k, max_size, crash_at=n)
    assert r.returncode == -9, (n, r.returncode, r.stderr[-2000:])
    old, new, inflight = _expected(seed, k, max_size, side)
    got = _store_content(store)        # opening replays the journal
    want_old = {n_: bytes(b) for n_, b in old.objs.items()}
    want_new = {n_: bytes(b) for n_, b in new.objs.items()} if new else None
    assert got == want_old or got == want_new, \
        f"crash at {n} (op {inflight}): content is neither before nor after the op in flight"
    check_parity(store)
    return "new" if got == want_new and got != want_old else "old"


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_crash_points(tmp_path, profile):
    k, m, chunk, max_size, seed, count = PROFILES[profile]
    # a dry run: where are the crash points, and which phase is each in
    dry = str(tmp_path / "dry")
    create_store(dry, k=k, m=m, chunk_size=chunk, write_mode="mixed")
    trace_file = str(tmp_path / "trace.json")
    r = _run_child(dry, dry + ".side", seed, k, max_size, trace=trace_file)
    assert r.returncode == 0, r.stderr[-3000:]
    phases = _phases(json.load(open(trace_file)))
    old, new, _ = _expected(seed, k, max_size, dry + ".side")
    assert new is None
    assert _store_content(dry) == {n: bytes(b) for n, b in old.objs.items()}
    check_parity(dry)

    points = _choose(phases, count, random.Random(seed))
    assert len(points) == count
    assert {phases[n - 1] for n in points} >= {"before-append", "before-fsync", "before-apply",
                                              "apply-first", "apply-mid", "apply-last",
                                              # the routine checkpoint: after the seal,
                                              # after the sync, before the drop
                                              "_rotate", "_settle_sealed"}
    with ThreadPoolExecutor(max_workers=2) as ex:
        outcomes = list(ex.map(lambda n: _one(str(tmp_path), profile, n), points))
    # both outcomes happen: crashes before the record is durable roll back,
    # crashes after it roll forward
    assert "old" in outcomes and "new" in outcomes


def test_crash_during_recovery(tmp_path):
    """A crash while replaying the journal is itself recovered from."""
    k, m, chunk, max_size, seed, _ = PROFILES["4+2-4K"]
    store = str(tmp_path / "s")
    create_store(store, k=k, m=m, chunk_size=chunk, write_mode="delta")
    side = store + ".side"
    # die after the 3rd op of some transaction's apply, with its record durable
    dry = str(tmp_path / "dry")
    create_store(dry, k=k, m=m, chunk_size=chunk, write_mode="delta")
    trace_file = str(tmp_path / "trace.json")
    assert _run_child(dry, dry + ".side", seed, k, max_size, trace=trace_file).returncode == 0
    phases = _phases(json.load(open(trace_file)))
    n = [i for i, p in enumerate(phases, 1) if p == "apply-first"][len(phases) // 40]
    r = _run_child(store, side, seed, k, max_size, crash_at=n + 2)
    assert r.returncode == -9
    old, new, inflight = _expected(seed, k, max_size, side)
    # the opener replays the journal: kill it at its 2nd and then 1st replayed op
    code = ("import sys; from backend.objectstore import ObjectStore; "
            "ObjectStore(sys.argv[1]).close()")
    for at in (2, 1):
        env = dict(os.environ, PYTHONPATH=ROOT, ECFS_CRASH_AT=str(at))
        r = subprocess.run([sys.executable, "-c", code, store], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == -9, r.stderr
    got = _store_content(store)
    assert got == {nm: bytes(b) for nm, b in new.objs.items()}
    check_parity(store)


def _check_cached(store, seed, k, max_size, side):
    """After a crash of a child writing through the stripe cache: every
    object holds what the model held at the last completed flush, except
    where an op after it touched (those bytes may be old or new)."""
    words = open(side).read().split()
    marks = list(zip(words[::2], words[1::2]))
    flushed = max((int(x) for w, x in marks if w == "flushed"), default=-1)
    started = max((int(x) for w, x in marks if w == "start"), default=-1)
    at_flush = Model()
    touched: dict[str, object] = {}          # name -> byte mask, or "all"
    for op in gen(seed, k, max_size).ops(NOPS):
        if op.index <= flushed:
            at_flush.apply(op)
        elif op.index <= started:
            if op.kind == "write":
                mask = touched.setdefault(op.name, bytearray())
                if mask != "all":
                    end = op.offset + op.length
                    if len(mask) < end:
                        mask.extend(bytes(end - len(mask)))
                    mask[op.offset:end] = b"\1" * op.length
            else:
                touched[op.name] = "all"
    got = _store_content(store)
    for name in set(got) | set(at_flush.objs):
        t = touched.get(name)
        if t == "all":
            continue
        want = at_flush.objs.get(name)
        have = got.get(name)
        if t is None:
            assert have == (bytes(want) if want is not None else None), \
                f"{name}: not as at the last flush (op {flushed})"
            continue
        assert have is not None or want is None, f"{name}: lost (flushed at op {flushed})"
        want, have = bytes(want or b""), have or b""
        n = min(len(want), len(have))
        keep = np.frombuffer(bytes(t[:n]).ljust(n, b"\0"), np.uint8) == 0
        a = np.frombuffer(have[:n], np.uint8)[keep]
        b = np.frombuffer(want[:n], np.uint8)[keep]
        assert (a == b).all(), f"{name}: bytes no later op touched changed (flushed at op {flushed})"
    check_parity(store)


def test_crash_points_through_the_stripe_cache(tmp_path):
    """SIGKILL at points spread over every phase of the flushes (journal
    append, fsync, apply): nothing a completed flush covered is lost, and
    no stripe is torn."""
    k, m, chunk, max_size, seed, _ = PROFILES["4+2-4K"]
    dry = str(tmp_path / "dry")
    create_store(dry, k=k, m=m, chunk_size=chunk, write_mode="mixed")
    trace_file = str(tmp_path / "trace.json")
    r = _run_child(dry, dry + ".side", seed, k, max_size, trace=trace_file, cache=True)
    assert r.returncode == 0, r.stderr[-3000:]
    trace = json.load(open(trace_file))
    assert "flushed" in open(dry + ".side").read()
    phases = _phases(trace)
    points = _choose(phases, 16, random.Random(seed))

    def one(n):
        store = str(tmp_path / f"c{n}")
        create_store(store, k=k, m=m, chunk_size=chunk, write_mode="mixed")
        r = _run_child(store, store + ".side", seed, k, max_size, crash_at=n, cache=True)
        assert r.returncode == -9, (n, r.returncode, r.stderr[-2000:])
        _check_cached(store, seed, k, max_size, store + ".side")
    with ThreadPoolExecutor(max_workers=2) as ex:
        list(ex.map(one, points))

"""Several threads writing disjoint and overlapping ranges of a few objects at
once: each write is atomic, the final content is the writes applied in the
order the store serialised them, and parity stays consistent."""
import threading

import numpy as np
import pytest

from backend.objectstore import ObjectStore

from .iogen import block_data
from .util import check_parity

THREADS = 6
WRITES = 25
NAMES = ("o1", "o2", "o3")
SIZE = 384 << 10


@pytest.mark.parametrize("mode,chunk", [("auto", "auto"), ("mixed", 4096), ("delta", 65536)])
def test_concurrent_writers(make_store, mode, chunk, monkeypatch):
    d, s = make_store(k=4, m=2, chunk_size=chunk, write_mode=mode)
    # record the order in which the store applies writes to each object (it
    # holds the locks of the stripes it writes for the whole of _write_locked)
    order = {n: [] for n in NAMES}
    orig = ObjectStore._write_locked

    def logged(self, obj, offset, data, **kw):
        if kw.get("new_size") is None and obj.name in order:
            order[obj.name].append((offset, bytes(data)))
        return orig(self, obj, offset, data, **kw)
    monkeypatch.setattr(ObjectStore, "_write_locked", logged)

    errors = []
    barrier = threading.Barrier(THREADS)

    def worker(t):
        rng = np.random.default_rng(t)
        try:
            barrier.wait()
            for w in range(WRITES):
                name = NAMES[int(rng.integers(len(NAMES)))]
                if w % 2 == 0:
                    # disjoint: this thread's own 64 KiB lane
                    base = t * 65536
                    off = base + int(rng.integers(0, 65536 - 4096))
                    n = int(rng.integers(1, base + 65536 - off + 1))
                else:
                    # overlapping: anywhere, across stripes
                    off = int(rng.integers(0, SIZE - 1))
                    n = int(rng.integers(1, min(SIZE - off, 200000) + 1))
                s.write(name, off, block_data(t, w, off, n))
                got = s.read(name, off, n)
                assert len(got) == n
        except BaseException as e:      # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    assert sum(len(v) for v in order.values()) == THREADS * WRITES
    for name in NAMES:
        model = bytearray()
        for off, data in order[name]:
            if len(model) < off + len(data):
                model.extend(bytes(off + len(data) - len(model)))
            model[off:off + len(data)] = data
        assert s.read(name, 0, SIZE * 2) == bytes(model), name
    s.close()
    check_parity(d)
    s2 = ObjectStore(d)
    try:
        for name in NAMES:
            assert s2.stat(name).size == max(off + len(dt) for off, dt in order[name])
    finally:
        s2.close()


def test_threads_on_one_object_disjoint_lanes(make_store):
    """Every thread owns a lane of one object: no lock ordering to model,
    every lane must hold exactly its thread's last write."""
    d, s = make_store(k=4, m=2, chunk_size=4096, write_mode="delta")
    lane = 3 * 4096 + 100                    # lanes straddle chunk and stripe edges
    s.write("one", 0, bytes(lane * THREADS))
    final = {}
    errors = []

    def worker(t):
        try:
            for w in range(30):
                data = block_data(100 + t, w, t * lane, lane)
                s.write("one", t * lane, data)
                final[t] = data
        except BaseException as e:      # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    got = s.read("one", 0, lane * THREADS)
    assert got == b"".join(final[t] for t in range(THREADS))
    s.close()
    check_parity(d)


def test_two_processes_share_a_store(make_store):
    """Two processes writing lanes of the same objects at once (object locks
    and the journal are shared through the store's files)."""
    import os
    import subprocess
    import sys

    d, s = make_store(k=4, m=2, chunk_size="auto", write_mode="auto")
    s.write("shared", 0, bytes(4096))          # exists before the children start
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = (
        "import sys\n"
        "from backend.objectstore import ObjectStore\n"
        "from tests.backend.iogen import block_data\n"
        "d, p = sys.argv[1], int(sys.argv[2])\n"
        "s = ObjectStore(d)\n"
        "lane = 3 * 4096 + 100\n"
        "for w in range(40):\n"
        "    for name in ('shared', 'other'):\n"
        "        off = (2 * (w % 5) + p) * lane\n"
        "        s.write(name, off, block_data(p, w, off, lane))\n"
        "s.close()\n")
    env = dict(os.environ, PYTHONPATH=root)
    env.pop("ECFS_CRASH_AT", None)
    procs = [subprocess.Popen([sys.executable, "-c", code, d, str(p)], env=env, cwd=root,
                              stderr=subprocess.PIPE, text=True) for p in (0, 1)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    lane = 3 * 4096 + 100
    for name in ("shared", "other"):
        want = bytearray(4096 if name == "shared" else 0)
        for w in range(40):
            for p in (0, 1):
                off = (2 * (w % 5) + p) * lane
                if len(want) < off + lane:
                    want.extend(bytes(off + lane - len(want)))
                want[off:off + lane] = block_data(p, w, off, lane)
        assert s.read(name, 0, 1 << 20) == bytes(want), name
    s.close()
    check_parity(d)


def test_disjoint_stripes_proceed_while_a_stripe_is_locked(make_store):
    """A writer of stripe 5 is not held up by a holder of stripe 0 of the same
    object; a writer of stripe 0 is, and goes on once it is released."""
    from backend.locks import slot_of
    d, s = make_store(k=4, m=2, chunk_size=4096, write_mode="delta")
    KC = 4 * 4096
    s.write("obj", 0, bytes(8 * KC))
    slot = slot_of("obj")
    done = {}

    def writer(stripe):
        s.write("obj", stripe * KC + 100, b"x" * 50)
        done[stripe] = True

    with s.locks.stripes(slot, 0, 1):
        t5 = threading.Thread(target=writer, args=(5,))
        t0 = threading.Thread(target=writer, args=(0,))
        t0.start()
        t5.start()
        t5.join(timeout=60)
        assert done.get(5), "a write to stripe 5 waited for the holder of stripe 0"
        assert not done.get(0)
    t0.join(timeout=60)
    assert done.get(0)
    got = s.read("obj", 0, 8 * KC)
    assert got[100:150] == b"x" * 50 and got[5 * KC + 100:5 * KC + 150] == b"x" * 50
    s.close()
    check_parity(d)

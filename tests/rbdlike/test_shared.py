"""``--image-shared``: several writer processes on one image at once.

A shared image has no exclusive lock and no object map; what keeps it safe
is the object store underneath, which locks stripes across processes
(backend/locks.py, fcntl byte ranges) and journals every write. Two child
processes open the same shared image and hammer disjoint 4 KiB blocks of the
same stripes; afterwards every block holds the last bytes its owner wrote
(neither process lost a write of the other) and every stripe's parity is a
fresh encode of its data.

Geometry (4+2, 4 MiB objects, so 64 KiB chunks and 256 KiB stripes): 4 KiB
block ``b`` of a stripe lies in data shard ``b // 16`` at page row ``b % 16``.
Plain even/odd blocks would put each parity page under one writer only
(consecutive blocks are consecutive rows of one chunk), so ownership is a
checkerboard, ``(shard + row) % 2``: blocks still alternate owners within a
chunk, and every parity page of every hammered row covers pages of both
writers, so their parity updates (deltas, in "delta" mode) hit the same
parity pages. In "full" mode every write re-reads and rewrites the whole
stripe, the other writer's pages included: a race there loses its writes.

The children start together (a "go" line on their stdin once both have
said "ready"); each reads back its block right after writing it, and the
parent checks that their writes really interleaved in time.
"""
import inspect
import json
import os
import select
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from backend.counters import totals
from backend.objectstore import ObjectStore
from backend.pool import create_store
from rbdlike.header import data_object
from rbdlike.image import Image
from rbdlike.rbd import RBD

from tests.backend.util import check_parity

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MiB = 1 << 20
DEADLINE = 60.0           # seconds for the children to get ready, then to finish


# --- shared with the children (sent as source, so both sides agree) -------
BLOCK = 4096
OBJECT_SIZE = 4 * MiB
IMAGE_SIZE = 8 * MiB
CHUNK = 64 << 10
STRIPE = 4 * CHUNK        # K = 4
STRIPES = 3               # the first STRIPES stripes of each object are hammered
PER_STRIPE = STRIPE // BLOCK
ITERATIONS = 800          # random writes per process after its first full pass


def block_offset(block):
    """Image offset of hammered block ``block`` (0 .. 2 * STRIPES * PER_STRIPE)."""
    objno, rest = divmod(block, STRIPES * PER_STRIPE)
    stripe, b = divmod(rest, PER_STRIPE)
    return objno * OBJECT_SIZE + stripe * STRIPE + b * BLOCK


def owner(block):
    """0 or 1: which process writes the block (checkerboard of shard x row)."""
    b = block % PER_STRIPE
    return (b // (CHUNK // BLOCK) + b % (CHUNK // BLOCK)) % 2


def schedule(seed, proc):
    """The (iteration, block) writes of process ``proc``: every owned block
    once in shuffled order, then ITERATIONS random picks among them."""
    import random
    rng = random.Random(seed * 1000 + proc)
    mine = [b for b in range(2 * STRIPES * PER_STRIPE) if owner(b) == proc]
    order = list(mine)
    rng.shuffle(order)
    order += [rng.choice(mine) for _ in range(ITERATIONS)]
    return list(enumerate(order))


def block_data(seed, block, it):
    import numpy as np
    return np.random.default_rng([seed, block, it]).integers(
        0, 256, BLOCK, dtype=np.uint8).tobytes()
# ---------------------------------------------------------------------------


def _shared_source():
    consts = "\n".join(f"{n} = {globals()[n]!r}" for n in (
        "BLOCK", "OBJECT_SIZE", "IMAGE_SIZE", "CHUNK", "STRIPE", "STRIPES", "PER_STRIPE",
        "ITERATIONS"))
    funcs = "\n".join(inspect.getsource(f) for f in (block_offset, owner, schedule, block_data))
    return consts + "\n" + funcs


CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
from backend.objectstore import ObjectStore
from rbdlike.image import Image
{shared}
store_dir, image, seed, proc, out = {store_dir!r}, {image!r}, {seed!r}, {proc!r}, {out!r}
s = ObjectStore(store_dir)
img = Image(s, image)
assert "shared" in img.header.features and not img.header.has("exclusive-lock")
print("ready", flush=True)
if sys.stdin.readline().strip() != "go":
    sys.exit(3)
times = []
for it, block in schedule(seed, proc):
    data = block_data(seed, block, it)
    off = block_offset(block)
    img.write(data, off)
    times.append(time.monotonic())
    got = img.read(off, BLOCK)
    if got != data:
        print(f"proc {{proc}}: block {{block}} (offset {{off}}) reads back other bytes "
              f"right after write {{it}}", file=sys.stderr, flush=True)
        sys.exit(1)
img.close()
s.close()
with open(out, "w") as f:
    json.dump({{"times": times}}, f)
"""


def _spawn(tmp_path, store_dir, image, seed, proc):
    out = str(tmp_path / f"child{proc}.json")
    code = CHILD.format(root=ROOT, shared=_shared_source(), store_dir=store_dir, image=image,
                        seed=seed, proc=proc, out=out)
    err = open(tmp_path / f"child{proc}.err", "w+")
    env = dict(os.environ)
    env.pop("ECFS_CRASH_AT", None)
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
    return p, err, out


def _stderr(err):
    err.seek(0)
    return err.read()


def _wait_ready(procs, deadline):
    """Each child prints "ready" once the store and the image are open."""
    for p, err, _ in procs:
        left = deadline - time.monotonic()
        r, _, _ = select.select([p.stdout], [], [], max(0.0, left))
        assert r, f"child {p.pid} not ready in time: {_stderr(err)}"
        line = p.stdout.readline()
        assert line == b"ready\n", f"child {p.pid} said {line!r}: {_stderr(err)}"


def _alternations(times):
    """How often consecutive writes (in time order) come from different processes."""
    merged = sorted((t, proc) for proc, ts in times.items() for t in ts)
    return sum(1 for (_, a), (_, b) in zip(merged, merged[1:]) if a != b)


@pytest.fixture(params=["auto", "delta", "full"])
def pool(request, tmp_path):
    """A 4+2 store: the rbdlike fixture's (write mode auto), or one whose pool
    forces parity-delta or full-stripe writes."""
    if request.param == "auto":
        return request.getfixturevalue("store")
    d = os.path.join(str(tmp_path), "store")
    create_store(d, k=4, m=2, osds=None, chunk_size="auto", write_mode=request.param,
                 plugin="isa_l_rs_vand")
    s = ObjectStore(d)
    request.addfinalizer(s.close)
    return s


def test_two_processes_write_one_shared_image(pool, tmp_path):
    store = pool
    mode = store.write_mode
    seed = 20240611
    image_id = RBD().create(store, "shared", IMAGE_SIZE, shared=True)
    with Image(store, "shared", read_only=True) as img:
        assert "shared" in img.header.features
        assert not img.header.has("exclusive-lock") and not img.header.has("object-map")
    # the data objects do not exist yet: the children race to create them too
    assert not [n for n in store.list() if n.startswith(f"rbd_data.{image_id}.")]

    procs = []
    try:
        for proc in (0, 1):
            procs.append(_spawn(tmp_path, store.store, "shared", seed, proc))
        _wait_ready(procs, time.monotonic() + DEADLINE)
        for p, _, _ in procs:          # both are open and waiting: start them together
            p.stdin.write(b"go\n")
            p.stdin.flush()
        deadline = time.monotonic() + DEADLINE
        for p, err, _ in procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"child {p.pid} did not finish in time: {_stderr(err)}")
            assert p.returncode == 0, f"child {p.pid} exited {p.returncode}: {_stderr(err)}"
    finally:
        for p, err, _ in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            for f in (p.stdin, p.stdout):
                try:
                    f.close()
                except OSError:
                    pass
            err.close()

    times = {}
    for proc, (_, _, out) in enumerate(procs):
        with open(out) as f:
            times[proc] = json.load(f)["times"]
        assert len(times[proc]) == len(schedule(seed, proc))
    # the two really wrote at the same time, not one after the other
    assert _alternations(times) >= 100, _alternations(times)

    # the expected image: the last write of each block, from either process
    expect = np.zeros(IMAGE_SIZE, dtype=np.uint8)
    last = {}
    for proc in (0, 1):
        for it, block in schedule(seed, proc):
            assert owner(block) == proc
            last[block] = (it, proc)
    nblocks = 2 * STRIPES * PER_STRIPE
    assert sorted(last) == list(range(nblocks))
    for block, (it, proc) in last.items():
        off = block_offset(block)
        expect[off:off + BLOCK] = np.frombuffer(block_data(seed, block, it), dtype=np.uint8)

    with Image(store, "shared", read_only=True) as img:
        got = np.frombuffer(img.read(0, IMAGE_SIZE), dtype=np.uint8)
    bad = {}
    for block, (it, proc) in last.items():
        off = block_offset(block)
        if not np.array_equal(got[off:off + BLOCK], expect[off:off + BLOCK]):
            bad.setdefault(proc, []).append(block)
    assert not bad, {f"proc {p} lost writes to blocks": b[:20] for p, b in bad.items()}
    assert np.array_equal(got, expect)        # and nothing else was written

    # layout as assumed above: 64 KiB chunks, objects as long as the hammered stripes
    for objno in (0, 1):
        st = store.stat(data_object(image_id, objno))
        assert st.chunk_size == CHUNK and st.size == STRIPES * STRIPE

    # the forced mode is what the children's writes used
    nwrites = sum(len(t) for t in times.values())
    if mode in ("delta", "full"):
        assert totals(store.store)[f"writes_{mode}"] >= nwrites

    rep = check_parity(store.store)
    assert rep.stale_shards == 0
    assert rep.objects >= 2 and rep.stripes >= 2 * STRIPES

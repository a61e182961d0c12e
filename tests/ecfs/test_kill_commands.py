"""Every long command killed with SIGKILL at a random point leaves a store
on which every following command works, and no lock blocks the next
writer (issue 13): import, export, export-diff, import-diff (into an image
and into a clone), flatten, resize --allow-shrink, rados put, and snap
create while a mount writes.

Kill points come from a seed (the test id names it), in two kinds:

* ``crash``: ``ECFS_CRASH_AT=N`` makes the command SIGKILL itself at the
  Nth crash point of the object store (backend/objectstore.py: before a
  transaction's journal append, before its fsync, before its apply, after
  each op applied). A dry run of the same command on a copy of the same
  store lists them (tests/ecfs/cli_child.py trace), so N is always inside
  the command's work and the kill is exactly reproducible; some kills are
  aimed at one window (a create's first records, a copy-up committed before
  its map update, a half-taken snapshot, a resize between header and map).
* ``time``: the test SIGKILLs the command a random time after it opened the
  store, up to the dry run's work time: instants between store operations
  too (output writes, the notify protocol). The checks hold wherever it
  landed, even after the command's end.

Then one batch of CLI commands (one interpreter for the module,
tests/ecfs/cli_child.py serve) checks, in order: fsck and scrub are clean
or report only what the command's contract allows; each image's object map
is right, or invalid and then never trusted (``rbd info`` says so) until
``object-map rebuild`` fixes it; ``rbd diff`` (and ``du``) match the bytes;
data that existed before reads the same, and what the command writes is
whole per page or object; the same command run again succeeds (or is
refused only because the killed run had finished; a killed import leaves
its image as far as it got, as rbd's does: ``rbd rm`` and import again);
the next writer (``rbd bench --io-type write``) takes the lock at once; a
final fsck is clean. No ``*.ecfs-tmp.*`` file is left beside an export's
target.

A copy-up killed before its map update (rbdlike/image.py ``_copy_up``)
leaves the map saying PENDING ("may exist"), which check accepts.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from ecfs.outfile import TMP_TAG

from ..waiting import wait_for
from .mountutil import mounted, need_root
from .util import EcfsServer, ecfs_json, ecfs_popen, ecfs_trace, holds_open

KiB, MiB = 1 << 10, 1 << 20
OBJ = 64 * KiB               # every image: 64 KiB objects
SIZE = 1 * MiB               # 16 objects
PAGE = 4096
OP = 4 * MiB                 # ecfs/cmd_rados.py OP_SIZE: a put's pieces
# the batch: a lock left behind would make the next writer wait this long, not 30 s
BATCH_ENV = {"ECFS_NOTIFY_TIMEOUT": "5"}
MAP_INVALID = ("object map is invalid", "object map is flagged invalid")


# ------------------------------------------------------------------ inputs
def _raw(seed: int, size: int = SIZE, holes=((9 * OBJ, OBJ), (3 * OBJ + 8192, PAGE))) -> bytes:
    """Random bytes with an all-zero object and an all-zero page (import
    skips the one, the other is a hole in a sparse export)."""
    b = bytearray(random.Random(seed).randbytes(size))
    for off, n in holes:
        b[off:off + n] = bytes(n)
    return bytes(b)


def _stream(size: int, records, from_snap: str | None = None, to_snap: str | None = None):
    """An rbd diff v1 stream: records (offset, bytes) write, (offset, n) zero."""
    out = b"rbd diff v1\n"
    for tag, name in ((b"f", from_snap), (b"t", to_snap)):
        if name is not None:
            out += tag + len(name).to_bytes(4, "little") + name.encode()
    out += b"s" + size.to_bytes(8, "little")
    for off, x in sorted(records, key=lambda r: r[0]):
        if isinstance(x, bytes):
            out += b"w" + off.to_bytes(8, "little") + len(x).to_bytes(8, "little") + x
        else:
            out += b"z" + off.to_bytes(8, "little") + x.to_bytes(8, "little")
    return out + b"e"


def _apply(base: bytes, records) -> bytes:
    b = bytearray(base)
    for off, x in records:
        if isinstance(x, bytes):
            b[off:off + len(x)] = x
        else:
            b[off:off + x] = bytes(x)
    return bytes(b)


def _pages_of(extents) -> set[int]:
    out = set()
    for e in extents:
        out.update(range(e["offset"] // PAGE, -(-(e["offset"] + e["length"]) // PAGE)))
    return out


def _differing_pages(a: bytes, b: bytes) -> set[int]:
    n = -(-max(len(a), len(b)) // PAGE) * PAGE
    x, y = np.zeros(n, np.uint8), np.zeros(n, np.uint8)
    x[:len(a)] = np.frombuffer(a, np.uint8)
    y[:len(b)] = np.frombuffer(b, np.uint8)
    return set(np.flatnonzero((x.reshape(-1, PAGE) != y.reshape(-1, PAGE)).any(axis=1)).tolist())


def _objects(b: bytes) -> list[bytes]:
    return [b[i:i + OBJ] for i in range(0, len(b), OBJ)]


# --------------------------------------------------------------- kill points
# A dry run's crash points are [function, object name, journaled]; each
# transaction's first point is the one before its journal append (not
# journaled): a kill there leaves nothing of it, a kill at any later one
# leaves all of it (the record is replayed).
_HEAD_DATA = re.compile(r"rbd_data\.[0-9a-f]{12}\.[0-9a-f]{16}$")
_HEAD_MAP = re.compile(r"rbd_object_map\.[0-9a-f]{12}$")


def _transactions(points) -> list[tuple[int, int, str]]:
    """(first, end, object name) of each transaction, 0-based, end exclusive."""
    starts = [i for i, p in enumerate(points) if not p[2]] + [len(points)]
    return [(a, b, points[a][1]) for a, b in zip(starts, starts[1:])]


def _window(points, txn, nxt) -> list[int]:
    """Points (1-based) from ``txn``'s journal append up to ``nxt``'s: the
    one will be there after the kill, the other not."""
    return [i + 1 for i in range(txn[0] + 1, txn[1])] + [nxt[0] + 1]


def _aim_any(points):
    return list(range(1, len(points) + 1))


def _aim_create(points):
    """Within the image's creation: its header, map and directory records,
    before the first data object's."""
    first_data = next(i for i, p in enumerate(points) if p[1].startswith("rbd_data."))
    return list(range(1, first_data + 1))


def _aim_copy_up(points):
    """A copy-up committed (a head data object written whole, the map
    update next), its map update not."""
    txns = _transactions(points)
    return [i for t, n in zip(txns, txns[1:]) if _HEAD_DATA.match(t[2]) and _HEAD_MAP.match(n[2])
            for i in _window(points, t, n)]


def _aim_snap_half(points):
    """A snapshot half taken: the head map's EXISTS -> EXISTS_CLEAN save
    (the last head-map transaction) committed, the header's snapshot
    record after it not."""
    txns = _transactions(points)
    k = max(i for i, t in enumerate(txns) if _HEAD_MAP.match(t[2]))
    assert txns[k + 1][2].startswith("rbd_header."), txns[k + 1]
    return _window(points, txns[k], txns[k + 1])


def _aim_resize_window(points):
    """The header's new size committed, the map's new length (next) not."""
    txns = _transactions(points)
    k = max(i for i, t in enumerate(txns) if t[2].startswith("rbd_header."))
    assert _HEAD_MAP.match(txns[k + 1][2]), txns[k + 1]
    return _window(points, txns[k], txns[k + 1])


AIMS = {"any": _aim_any, "create": _aim_create, "copy-up": _aim_copy_up,
        "snap-half": _aim_snap_half, "resize-window": _aim_resize_window}


# ---------------------------------------------------------------- scenarios
@dataclass
class Scenario:
    argv: list                       # {in}: the inputs, {out}: this run's output directory
    images: list                     # images whose map and diff are checked
    preserved: dict                  # spec -> input file it must still read as, after the kill
    final: dict                      # spec -> input file, after the re-run (what it writes)
    writer: str                      # image the next writer (rbd bench) writes
    outputs: dict = field(default_factory=dict)    # output file -> input file it must equal
    before_rerun: list = field(default_factory=list)  # [(argv, error it may end with)]
    refusals: tuple = ()             # errors a re-run may be refused with (the kill came late)
    # fsck findings a kill may leave (each has its fix); MAP_INVALID: the
    # command changes maps, which may be left invalid (never wrong)
    fsck_allows: tuple = MAP_INVALID
    extra: list = field(default_factory=list)    # [(label, argv)] run before the re-run
    after: list = field(default_factory=list)    # [(label, argv)] run after it
    check: object = None             # check(ctx, prep, results, images, x) after the kill
    check_after: object = None       # check_after(ctx, prep, results, x) after the re-run


def _setup_common(d: Path) -> list:
    (d / "a.raw").write_bytes(_raw(1))
    return [["init"], ["rbd", "import", d / "a.raw", "a", "--object-size", "64K"]]


def _check_import(ctx, prep, res, images, x):
    """A partial image, as rbd import leaves one: the first objects whole,
    the rest not written."""
    if "b" not in images:
        return
    got = _objects((x / "head-b").read_bytes())
    want = _objects((prep.inputs / "b.raw").read_bytes())
    k = next((i for i, (g, w) in enumerate(zip(got, want)) if g != w), len(want))
    assert all(g == bytes(len(g)) for g in got[k:]), f"{ctx}: b is not a prefix of b.raw"


def _setup_import(d):
    (d / "b.raw").write_bytes(_raw(2, holes=()))
    return _setup_common(d), Scenario(
        argv=["rbd", "import", "{in}/b.raw", "b", "--object-size", "64K"],
        images=["a", "b"], preserved={"a": "a.raw"}, final={"b": "b.raw"},
        writer="b", before_rerun=[(["rbd", "rm", "b"], "does not exist")], check=_check_import,
        # a create cut short leaves its first objects: fsck names them, --repair removes them
        fsck_allows=MAP_INVALID + ("belongs to no image",))


def _setup_export(d):
    return _setup_common(d), Scenario(
        argv=["rbd", "export", "a", "{out}/a.img"], images=["a"], preserved={"a": "a.raw"},
        final={"a": "a.raw"}, writer="a", outputs={"a.img": "a.raw"}, fsck_allows=())


def _setup_export_diff(d):
    return _setup_common(d), Scenario(
        argv=["rbd", "export-diff", "a", "{out}/a.diff"], images=["a"], preserved={"a": "a.raw"},
        final={"a": "a.raw"}, writer="a", outputs={"a.diff": "dry/a.diff"}, fsck_allows=())


# import-diff's changes: page-aligned writes into every object, a whole
# object discarded and one page zeroed
_CHANGES = [(o * OBJ + (o % 8) * PAGE, random.Random(o).randbytes(2 * PAGE))
            for o in range(16) if o not in (12, 14)] + [(12 * OBJ, OBJ), (14 * OBJ, PAGE)]


def _check_import_diff(ctx, prep, res, images, x):
    """Each page is old or new; diff and du from s0 see every change."""
    old = (prep.inputs / "a.raw").read_bytes()
    new = (prep.inputs / "a1.raw").read_bytes()
    head = (x / "head-t").read_bytes()
    for i in range(0, SIZE, PAGE):
        assert head[i:i + PAGE] in (old[i:i + PAGE], new[i:i + PAGE]), f"{ctx}: page {i} torn"
    r = res["diff-s0"]
    assert r["rc"] == 0, (ctx, r["stderr"])
    assert _pages_of(json.loads(r["stdout"])) == _differing_pages(old, head), \
        f"{ctx}: rbd diff t --from-snap s0 disagrees with the bytes"
    snaps = [s["name"] for s in json.loads(res["snaps"]["stdout"])]
    base = (x / "kill-t@s1").read_bytes() if "s1" in snaps else old
    # objects changed since then that hold data now: each is there, and counts
    # at least up to its last non-zero byte
    least = 0
    for o in {p * PAGE // OBJ for p in _differing_pages(base, head)}:
        nz = np.flatnonzero(np.frombuffer(head[o * OBJ:(o + 1) * OBJ], np.uint8))
        least += int(nz[-1]) + 1 if len(nz) else 0
    r = res["du"]
    assert r["rc"] == 0, (ctx, r["stderr"])
    used = next(r["used_size"] for r in json.loads(r["stdout"])["images"] if "snapshot" not in r)
    assert used >= least, f"{ctx}: rbd du says {used} bytes used since the last snapshot; " \
                          f"the objects changed since hold {least}"


def _setup_import_diff(d):
    (d / "ch1.diff").write_bytes(_stream(SIZE, _CHANGES))
    (d / "a1.raw").write_bytes(_apply(_raw(1), _CHANGES))
    cmds = _setup_common(d) + [
        ["rbd", "snap", "create", "a@s0"], ["rbd", "import-diff", d / "ch1.diff", "a"],
        ["rbd", "snap", "create", "a@s1"],
        ["rbd", "export-diff", "a@s0", d / "full.diff"],
        ["rbd", "export-diff", "a@s1", "--from-snap", "s0", d / "inc.diff"],
        ["rbd", "create", "t", "--size", "1M", "--object-size", "64K"],
        ["rbd", "import-diff", d / "full.diff", "t"]]
    return cmds, Scenario(
        argv=["rbd", "import-diff", "{in}/inc.diff", "t"], images=["t"],
        preserved={"t@s0": "a.raw", "a": "a1.raw", "a@s1": "a1.raw"},
        final={"t": "a1.raw", "t@s1": "a1.raw", "t@s0": "a.raw"}, writer="t",
        refusals=("end snapshot 's1' already exists",),
        extra=[("diff-s0", ["rbd", "diff", "t", "--from-snap", "s0", "--json"]),
               ("du", ["rbd", "du", "t", "--json"]),
               ("snaps", ["rbd", "snap", "ls", "t", "--json"]),
               ("kill-t@s1", ["rbd", "export", "t@s1", "{x}/kill-t@s1"])],
        check=_check_import_diff)


_CLONE_WRITES = [(1 * OBJ + PAGE, b"c" * PAGE), (6 * OBJ, b"d" * 3 * PAGE)]


def _check_flatten_after(ctx, prep, res, x):
    r = res["info-ch-final"]
    assert r["rc"] == 0 and json.loads(r["stdout"])["parent"] is None, (ctx, r)


def _setup_flatten(d):
    (d / "chw.diff").write_bytes(_stream(SIZE, _CLONE_WRITES))
    (d / "ch.raw").write_bytes(_apply(_raw(1), _CLONE_WRITES))
    cmds = _setup_common(d) + [
        ["rbd", "snap", "create", "a@s1"], ["rbd", "snap", "protect", "a@s1"],
        ["rbd", "clone", "a@s1", "ch"], ["rbd", "import-diff", d / "chw.diff", "ch"]]
    return cmds, Scenario(
        argv=["rbd", "flatten", "ch"], images=["ch", "a"],
        preserved={"a": "a.raw", "a@s1": "a.raw", "ch": "ch.raw"},
        final={"ch": "ch.raw"}, writer="ch",
        refusals=("has no parent",),
        after=[("info-ch-final", ["rbd", "info", "ch", "--json"])],
        check_after=_check_flatten_after)


# writes into a clone: each object's first copies it up from the parent
_INTO_CLONE = [(o * OBJ + PAGE, random.Random(100 + o).randbytes(PAGE)) for o in range(16)]


def _check_clone_write(ctx, prep, res, images, x):
    old = (prep.inputs / "a.raw").read_bytes()
    new = (prep.inputs / "cw.raw").read_bytes()
    head = (x / "head-cw").read_bytes()
    for i in range(0, SIZE, PAGE):
        assert head[i:i + PAGE] in (old[i:i + PAGE], new[i:i + PAGE]), f"{ctx}: page {i} torn"


def _setup_clone_write(d):
    (d / "into.diff").write_bytes(_stream(SIZE, _INTO_CLONE))
    (d / "cw.raw").write_bytes(_apply(_raw(1), _INTO_CLONE))
    cmds = _setup_common(d) + [
        ["rbd", "snap", "create", "a@s1"], ["rbd", "snap", "protect", "a@s1"],
        ["rbd", "clone", "a@s1", "cw"]]
    return cmds, Scenario(
        argv=["rbd", "import-diff", "{in}/into.diff", "cw"], images=["cw", "a"],
        preserved={"a": "a.raw", "a@s1": "a.raw"}, final={"cw": "cw.raw"}, writer="cw",
        check=_check_clone_write)


SHRUNK = 352 * KiB           # 5.5 objects: 10 removed (each preserved for s0), one cut


def _check_resize(ctx, prep, res, images, x):
    old = (prep.inputs / "a.raw").read_bytes()
    head = (x / "head-a").read_bytes()
    assert len(head) in (SIZE, SHRUNK), ctx
    assert head[:SHRUNK] == old[:SHRUNK], f"{ctx}: bytes below the new end changed"
    for o in range(SHRUNK // OBJ, len(head) // OBJ):      # removed from the end on, or cut
        lo = max(o * OBJ, SHRUNK)
        g, w = head[lo:(o + 1) * OBJ], old[lo:(o + 1) * OBJ]
        assert g in (w, bytes(len(w))), f"{ctx}: object {o} past the new end is torn"


def _setup_resize(d):
    (d / "a-shrunk.raw").write_bytes(_raw(1)[:SHRUNK])
    return _setup_common(d) + [["rbd", "snap", "create", "a@s0"]], Scenario(
        argv=["rbd", "resize", "a", "--size", "352K", "--allow-shrink"], images=["a"],
        preserved={"a@s0": "a.raw"}, final={"a": "a-shrunk.raw", "a@s0": "a.raw"}, writer="a",
        check=_check_resize)


def _check_put(ctx, prep, res, images, x):
    """The object is the old one, or the new one's first pieces (each put
    piece is atomic, the whole is not: as rados put)."""
    r = res["obj"]
    assert r["rc"] == 0, (ctx, r["stderr"])
    got = (x / "obj.got").read_bytes()
    old = (prep.inputs / "o1.raw").read_bytes()
    new = (prep.inputs / "o2.raw").read_bytes()
    pieces = {min(k * OP, len(new)) for k in range(1, -(-len(new) // OP) + 1)}
    ok = got == old or (len(got) in pieces and got == new[:len(got)])
    assert ok, f"{ctx}: the object is {len(got)} bytes, neither old nor a prefix of the new"


def _check_put_after(ctx, prep, res, x):
    r = res["obj-final"]
    assert r["rc"] == 0, (ctx, r["stderr"])
    assert (x / "obj.final").read_bytes() == (prep.inputs / "o2.raw").read_bytes(), ctx


def _setup_put(d):
    (d / "o1.raw").write_bytes(random.Random(3).randbytes(1 * MiB))
    (d / "o2.raw").write_bytes(random.Random(4).randbytes(9 * MiB))    # 3 pieces
    return _setup_common(d) + [["rados", "put", "obj", d / "o1.raw"]], Scenario(
        argv=["rados", "put", "obj", "{in}/o2.raw"], images=["a"], preserved={"a": "a.raw"},
        final={}, writer="a", fsck_allows=(),
        extra=[("obj", ["rados", "get", "obj", "{x}/obj.got"])],
        after=[("obj-final", ["rados", "get", "obj", "{x}/obj.final"])],
        check=_check_put, check_after=_check_put_after)


SETUPS = {"import": _setup_import, "export": _setup_export, "export-diff": _setup_export_diff,
          "import-diff": _setup_import_diff, "import-diff-clone": _setup_clone_write,
          "flatten": _setup_flatten, "resize": _setup_resize, "put": _setup_put}


@dataclass
class Prepared:
    scenario: Scenario
    template: Path
    inputs: Path
    points: list
    work: float


@pytest.fixture(scope="module")
def cli():
    """Batches of CLI commands, in one interpreter for the whole module."""
    server = EcfsServer(env=BATCH_ENV)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, cli):
    """name -> Prepared: a template store per command (built once), and a
    dry run of the command on a copy of it (its crash points, its time)."""
    done: dict[str, Prepared] = {}

    def get(name: str) -> Prepared:
        if name in done:
            return done[name]
        d = tmp_path_factory.mktemp(f"kill-{name}")
        cmds, sc = SETUPS[name](d)
        tpl = d / "tpl"
        res = cli.run(tpl, *cmds)
        for c, r in zip(cmds, res):
            assert r["rc"] == 0, (c, r["stderr"])
        dry = d / "dry"
        shutil.copytree(tpl, dry / "s")
        argv = _fill(sc.argv, d, dry)
        p = ecfs_trace(dry / "s", d / "trace.json", *argv)
        assert p.returncode == 0, p.stderr.decode()
        t = json.loads((d / "trace.json").read_text())
        done[name] = Prepared(sc, tpl, d, t["points"], t["work"])
        return done[name]

    return get


def _fill(argv, inputs: Path, out: Path, x: Path | None = None) -> list:
    return [str(a).replace("{in}", str(inputs)).replace("{out}", str(out))
            .replace("{x}", str(x)) for a in argv]


# --------------------------------------------------------------------- kill
def _opened(pid: int, path: str) -> bool:
    """Whether process ``pid`` has ``path`` open (an open store keeps its
    clients.lock open)."""
    return holds_open(pid, lambda target: target == path)


def _kill_after(store: Path, argv: list, delay: float, opened: bool) -> int:
    """Start the command, SIGKILL it ``delay`` s later (counted from its
    opening the store if ``opened``, else from its start) unless it ended;
    its return code (0: it had finished)."""
    p = ecfs_popen(store, *argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE)
    try:
        if opened:
            lock = os.path.realpath(store / "clients.lock")
            wait_for(lambda: p.poll() is not None or _opened(p.pid, lock),
                     what="the command opening the store", interval=0.001)
        try:
            p.wait(timeout=delay)       # the randomisation: it runs on until then
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
        err = p.communicate(timeout=60)[1].decode()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=60)
    assert p.returncode in (0, -signal.SIGKILL), f"{argv} failed by itself: {err}"
    return p.returncode


def _kill(store: Path, argv: list, kind: str, seed: int, points: list, work: float,
          startup: float = 0.0) -> str:
    """Run the command and SIGKILL it at the seed's point (``points``: the
    dry run's crash points, ``work``: its time from the store's opening to
    its end, ``startup``: its time until then); returns where. ``launch``:
    at a random instant from the second half of its start up to its end."""
    rng = random.Random(seed)
    if kind == "launch":
        delay = rng.uniform(startup / 2, startup + work)
        rc = _kill_after(store, argv, delay, opened=False)
        return f"SIGKILL {delay:.3f} s after its start ({startup:.3f} s to open the store)" + \
            (" (it had finished)" if rc == 0 else "")
    if kind == "time":
        delay = rng.uniform(0, work)
        rc = _kill_after(store, argv, delay, opened=True)
        return f"SIGKILL {delay:.3f} s after opening the store" + \
            (" (it had finished)" if rc == 0 else "")
    aim = kind.split(":", 1)[1] if ":" in kind else "any"
    cands = AIMS[aim](points)
    assert cands, f"no crash point to aim at ({aim})"
    n = rng.choice(cands)
    p = ecfs_popen(store, *argv, env={"ECFS_CRASH_AT": str(n)}, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        err = p.communicate(timeout=120)[1].decode()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=60)
    where = f"crash point {n} of {len(points)} ({aim}): {points[n - 1]}"
    assert p.returncode == -signal.SIGKILL, f"{argv} ended ({p.returncode}) before {where}: {err}"
    return where


# ------------------------------------------------------------------- checks
def _batch(cli: EcfsServer, store: Path, cmds: list) -> dict:
    """Run labelled commands in one batch; label -> result."""
    res = cli.run(store, *[c for _, c in cmds])
    return dict(zip([label for label, _ in cmds], res))


def _check_after_kill(cli: EcfsServer, name: str, kind: str, seed: int, prep: Prepared,
                      tmp_path: Path) -> None:
    sc = prep.scenario
    store = tmp_path / "s"
    shutil.copytree(prep.template, store)
    out, x = tmp_path / "out", tmp_path / "x"
    out.mkdir()
    x.mkdir()
    argv = _fill(sc.argv, prep.inputs, out, x)
    where = _kill(store, argv, kind, seed, prep.points, prep.work)
    ctx = f"{name} killed at {where}"

    # exports: the target is whole or absent, and nothing is left beside it
    left = [f for f in os.listdir(out) if TMP_TAG in f]
    assert not left, f"{ctx}: left {left}"
    for f, want in sc.outputs.items():
        if (out / f).exists():
            assert (out / f).read_bytes() == (prep.inputs / want).read_bytes(), \
                f"{ctx}: {f} is there but not whole"
            (out / f).unlink()          # rbd does not overwrite: the re-run writes it anew

    # one batch: the store as the kill left it, then the re-run and the next writer
    cmds: list[tuple[str, list]] = [("ls", ["rbd", "ls", "--json"]), ("fsck", ["fsck", "--json"]),
                                    ("scrub", ["scrub"])]
    for img in sc.images:
        cmds += [(f"check-{img}", ["rbd", "object-map", "check", img]),
                 (f"info-{img}", ["rbd", "info", img, "--json"]),
                 (f"diff-{img}", ["rbd", "diff", img, "--json"]),
                 (f"head-{img}", ["rbd", "export", img, x / f"head-{img}"])]
    for spec in sc.preserved:
        cmds.append((f"kept-{spec}", ["rbd", "export", spec, x / f"kept-{spec}"]))
    for label, c in sc.extra:
        cmds.append((label, _fill(c, prep.inputs, out, x)))
    for i, (c, _) in enumerate(sc.before_rerun):
        cmds.append((f"before-{i}", c))
    cmds.append(("rerun", argv))
    for spec in sc.final:
        cmds.append((f"final-{spec}", ["rbd", "export", spec, x / f"final-{spec}"]))
    for label, c in sc.after:
        cmds.append((label, _fill(c, prep.inputs, out, x)))
    cmds.append(("bench", ["rbd", "bench", sc.writer, "--io-type", "write", "--io-size", "4K",
                           "--io-total", "64K", "--io-threads", "4"]))
    cmds.append(("fsck-after", ["fsck", "--json"]))
    res = _batch(cli, store, cmds)

    def ok(label, r=None):
        r = r or res[label]
        assert r["rc"] == 0, f"{ctx}: {label}: {r['stderr']}{r['stdout']}"
        return r["stdout"]

    def allowed_findings(label):
        found = json.loads(res[label]["stdout"])["findings"]
        bad = [i for i in found if not any(a in i["what"] for a in sc.fsck_allows)]
        assert not bad, f"{ctx}: {label}: {bad}"
        return found

    images = json.loads(ok("ls"))
    allowed_findings("fsck")
    ok("scrub")
    invalid = []
    for img in sc.images:
        if img not in images:
            continue
        check, info = res[f"check-{img}"], json.loads(ok(f"info-{img}"))
        if check["rc"] != 0:
            first = check["stdout"].strip().splitlines()[0]
            assert set(MAP_INVALID) <= set(sc.fsck_allows), \
                f"{ctx}: the map of {img!r} (not changed by the command): {check['stdout']}"
            assert first.startswith(MAP_INVALID), \
                f"{ctx}: the map of {img!r} is wrong and not flagged invalid: {check['stdout']}"
            # diff, du and reads do not trust it (the same test as rbd info's)
            assert "object map invalid" in info["flags"], (ctx, info["flags"])
            invalid.append(img)
        else:
            assert info["flags"] == [], (ctx, info["flags"])
        ok(f"head-{img}")
        head = (x / f"head-{img}").read_bytes()
        got = _pages_of(json.loads(ok(f"diff-{img}")))
        assert got == _differing_pages(b"", head), f"{ctx}: rbd diff {img} disagrees with its bytes"
    for spec, f in sc.preserved.items():
        ok(f"kept-{spec}")
        assert (x / f"kept-{spec}").read_bytes() == (prep.inputs / f).read_bytes(), \
            f"{ctx}: {spec} changed"
    if sc.check is not None:
        sc.check(ctx, prep, res, images, x)

    for i, (c, allowed) in enumerate(sc.before_rerun):
        r = res[f"before-{i}"]
        assert r["rc"] == 0 or allowed in r["stderr"], f"{ctx}: {c}: {r['stderr']}"
    r = res["rerun"]
    assert r["rc"] == 0 or any(a in r["stderr"] for a in sc.refusals), \
        f"{ctx}: the re-run failed: {r['stderr']}"
    for spec, f in sc.final.items():
        ok(f"final-{spec}")
        assert (x / f"final-{spec}").read_bytes() == (prep.inputs / f).read_bytes(), \
            f"{ctx}: {spec} after the re-run"
    for f, want in sc.outputs.items():
        assert (out / f).read_bytes() == (prep.inputs / want).read_bytes(), (ctx, f)
    assert sorted(os.listdir(out)) == sorted(sc.outputs), (ctx, os.listdir(out))
    if sc.check_after is not None:
        sc.check_after(ctx, prep, res, x)
    bench = res["bench"]
    assert bench["rc"] == 0, f"{ctx}: the next writer: {bench['stderr']}"
    if res["fsck-after"]["rc"] == 0 and not invalid:
        return
    # what the kill may leave has its fix: object-map rebuild, fsck --repair
    found = allowed_findings("fsck-after")
    cmds = []
    for img in invalid:
        cmds += [(f"rebuild-{img}", ["rbd", "object-map", "rebuild", img]),
                 (f"recheck-{img}", ["rbd", "object-map", "check", img]),
                 (f"reinfo-{img}", ["rbd", "info", img, "--json"])]
    if any(not i["what"].startswith(MAP_INVALID) for i in found):
        cmds.append(("repair", ["fsck", "--repair"]))
    cmds.append(("fsck-final", ["fsck"]))
    res2 = _batch(cli, store, cmds)
    for label, _ in cmds:
        ok(label, res2[label])
    for img in invalid:
        assert json.loads(res2[f"reinfo-{img}"]["stdout"])["flags"] == [], ctx


CASES = [
    ("import", "crash", 1), ("import", "crash:create", 2), ("import", "time", 3),
    ("export", "time", 1), ("export", "time", 2),
    ("export-diff", "time", 1), ("export-diff", "time", 2),
    ("import-diff", "crash", 1), ("import-diff", "crash:snap-half", 2), ("import-diff", "time", 3),
    # a copy-up committed before its map says EXISTS (a writer's first write
    # to each object of a clone, and flatten): the map says PENDING there
    ("import-diff-clone", "crash:copy-up", 1),
    ("flatten", "crash:copy-up", 1), ("flatten", "crash:copy-up", 2), ("flatten", "time", 3),
    ("resize", "crash", 1), ("resize", "crash:resize-window", 2), ("resize", "time", 3),
    ("put", "crash", 1), ("put", "time", 2),
]


# ECFS_KILL_SEEDS=N adds N more seeds of each kind to every command (a longer
# sweep; a failure names its seed, which reproduces it)
_READ_ONLY = ("export", "export-diff")        # no store writes: no crash points
for _name in SETUPS:
    for _seed in range(100, 100 + int(os.environ.get("ECFS_KILL_SEEDS", "0"))):
        for _kind in ("time",) if _name in _READ_ONLY else ("crash", "time"):
            CASES.append((_name, _kind, _seed))


@pytest.mark.parametrize("name,kind,seed", CASES)
def test_killed_command_leaves_a_usable_store(cli, prepared, tmp_path, name, kind, seed):
    _check_after_kill(cli, name, kind, seed, prepared(name), tmp_path)


# ------------------------------------------------- snap create while a mount writes
_WRITER = r"""
import os, random, sys, threading
fd = os.open(sys.argv[1], os.O_RDWR)
lo, hi = int(sys.argv[2]), int(sys.argv[3])
st = {"n": 0, "err": None, "stop": False}

def loop():
    r = random.Random(0)
    while not st["stop"]:
        try:
            os.pwrite(fd, r.randbytes(4096), lo + r.randrange((hi - lo) // 4096) * 4096)
            st["n"] += 1
            if st["n"] % 32 == 0:
                os.fsync(fd)
        except OSError as e:
            st["err"] = e.errno
            return

t = threading.Thread(target=loop)
for line in sys.stdin:
    cmd, *a = line.split()
    if cmd == "put":             # bytes at an offset, made durable
        os.pwrite(fd, bytes.fromhex(a[1]), int(a[0]))
        os.fsync(fd)
    elif cmd == "go":
        t.start()
    elif cmd == "stop":
        st["stop"] = True
        t.join()
        os.fsync(fd)
    sys.stdout.write(f"{st['n']} {st['err']}\n")
    sys.stdout.flush()
"""


class _Writer:
    """A process writing an image file in the mount: ``put`` bytes (fsynced),
    then ``go``: 4 KiB writes at random into [lo, hi) until ``stop``."""

    def __init__(self, path, lo, hi):
        self.p = subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(lo), str(hi)],
                                  text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def _do(self, line) -> tuple[int, str]:
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        n, err = self.p.stdout.readline().split()
        return int(n), err

    def put(self, off, data):
        self._do(f"put {off} {data.hex()}")

    def go(self):
        self._do("go")

    def count(self) -> int:
        n, err = self._do("n")
        assert err == "None", f"a write in the mount failed: errno {err}"
        return n

    def stop(self) -> int:
        n, err = self._do("stop")
        assert err == "None", f"a write in the mount failed: errno {err}"
        return n

    def close(self):
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(timeout=60)


@pytest.mark.parametrize("seed", [1, 2] + list(range(100, 100 + int(os.environ.get(
    "ECFS_KILL_SEEDS", "0")))))
def test_killed_snap_create_while_a_mount_writes(cli, tmp_path, seed):
    """The mount runs the snapshot the CLI asks for (the lock owner does):
    killed at a random point, the CLI leaves a snapshot that exists whole
    (every write made durable before the command started is in it) or not
    at all; the mount writes on, and the next command works."""
    need_root()
    st, mnt = tmp_path / "s", tmp_path / "mnt"
    res = cli.run(st, ["init"], ["rbd", "create", "c", "--size", "1M", "--object-size", "64K"])
    assert [r["rc"] for r in res] == [0, 0], res
    before = random.Random(seed).randbytes(256 * KiB)
    with mounted(st, mnt):
        w = _Writer(mnt / "c", 512 * KiB, SIZE)
        try:
            w.put(0, before)                # durable before the snapshot is asked for
            w.go()
            wait_for(lambda: w.count() > 20, what="the mount writing")
            # a dry run: how long the CLI takes to open the store, and then to
            # have the snapshot taken
            t0 = time.monotonic()
            dry = ecfs_trace(st, tmp_path / "trace.json", "rbd", "snap", "create", "c@dry")
            took = time.monotonic() - t0
            assert dry.returncode == 0, dry.stderr.decode()
            work = json.loads((tmp_path / "trace.json").read_text())["work"]
            # odd seeds: once it opened the store (the request is sent within
            # milliseconds: the mount takes the snapshot); even: from its start
            # on, so some land before the request
            kind = "time" if seed % 2 else "launch"
            where = _kill(st, ["rbd", "snap", "create", "c@s1"], kind, seed, [], work,
                          startup=took - work)
            ctx = f"snap create killed at {where}"
            n = w.count()
            wait_for(lambda: w.count() > n + 20, what=f"{ctx}: the mount writing on")
            snaps = [x["name"] for x in ecfs_json(st, "rbd", "snap", "ls", "c")]
            cmds = [["rbd", "snap", "create", "c@s1"], ["rbd", "export", "c@s1", tmp_path / "s1"],
                    ["rbd", "info", "c@s1", "--json"], ["rbd", "object-map", "check", "c"]]
            if "s1" in snaps:       # whole: every durable write before the request is in it
                cmds.insert(0, ["rbd", "export", "c@s1", tmp_path / "s1-killed"])
            res = cli.run(st, *cmds)
            if "s1" in snaps:
                assert res[0]["rc"] == 0, (ctx, res[0]["stderr"])
                assert (tmp_path / "s1-killed").read_bytes()[:len(before)] == before, ctx
                res = res[1:]
            rerun, exp, info, check = res
            assert rerun["rc"] == 0 or ("s1" in snaps and "already exists" in rerun["stderr"]), \
                f"{ctx}: the re-run: {rerun['stderr']}"
            assert exp["rc"] == 0 and (tmp_path / "s1").read_bytes()[:len(before)] == before, \
                (ctx, exp["stderr"])
            assert json.loads(info["stdout"])["flags"] == [], (ctx, info["stdout"])
            assert check["rc"] == 0, (ctx, check["stdout"])
            w.count()
            w.stop()
        finally:
            w.close()
    # unmounted: the store is clean, the lock free, the head holds the durable bytes
    res = cli.run(st, ["fsck"], ["scrub"], ["rbd", "object-map", "check", "c"],
                  ["rbd", "export", "c", tmp_path / "head"],
                  ["rbd", "bench", "c", "--io-type", "write", "--io-size", "4K",
                   "--io-total", "64K", "--io-threads", "4"])
    for r in res:
        assert r["rc"] == 0, (ctx, r["stderr"], r["stdout"])
    assert (tmp_path / "head").read_bytes()[:len(before)] == before, ctx

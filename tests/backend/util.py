"""Helpers for backend tests that look at the store's files directly."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass

import numpy as np

from backend import shardfile as sf
from backend.codec import Codec
from backend.placement import place

PAGE = sf.PAGE


def counted(s, fn) -> dict[str, int]:
    """What the store ``s`` counted while ``fn()`` ran."""
    before = s.counters.snapshot()
    fn()
    after = s.counters.snapshot()
    return {k: after[k] - before[k] for k in after}


def pool_of(store_dir: str) -> dict:
    with open(os.path.join(store_dir, "pool.json")) as f:
        return json.load(f)


def osd_paths(store_dir: str) -> dict[int, str]:
    pool = pool_of(store_dir)
    return {o["id"]: o["path"] if os.path.isabs(o["path"]) else os.path.join(store_dir, o["path"])
            for o in pool["osds"]}


def shard_paths(store_dir: str, name: str, shard: int) -> tuple[str, str]:
    """(data, sidecar) absolute paths of a shard where placement puts it."""
    paths = osd_paths(store_dir)
    pool = pool_of(store_dir)
    loc = place(name, pool["k"] + pool["m"], tuple(sorted(paths)), tuple(pool.get("removed", ())))
    rd, rm = sf.rel_paths(name, shard)
    return os.path.join(paths[loc[shard]], rd), os.path.join(paths[loc[shard]], rm)


def flip_byte(path: str, at: int, mask: int = 0xFF) -> None:
    """Damage by hand: xor one byte of a file with ``mask``."""
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)[0]
        f.seek(at)
        f.write(bytes([b ^ mask]))


def osd_of(store_dir: str, name: str, shard: int) -> int:
    pool = pool_of(store_dir)
    return place(name, pool["k"] + pool["m"], tuple(sorted(osd_paths(store_dir))),
                 tuple(pool.get("removed", ())))[shard]


def read_header(meta_path: str) -> sf.ShardHeader | None:
    try:
        with open(meta_path, "rb") as f:
            return sf.ShardHeader.unpack(f.read(sf.HEADER_SIZE))
    except (FileNotFoundError, sf.CorruptHeader):
        return None


def object_names(store_dir: str) -> set[str]:
    """Names of every object some info shard on disk speaks for."""
    names = set()
    for p in osd_paths(store_dir).values():
        root = os.path.join(p, "objects")
        for dirpath, _, files in os.walk(root):
            for f in files:
                if f.endswith(".meta"):
                    h = read_header(os.path.join(dirpath, f))
                    if h is not None and h.info:
                        names.add(h.name)
    return names


def info_header(store_dir: str, name: str) -> sf.ShardHeader | None:
    """The newest info header of an object among its M+1 info shards."""
    pool = pool_of(store_dir)
    k, m = pool["k"], pool["m"]
    best = None
    for i in [0] + list(range(k, k + m)):
        h = read_header(shard_paths(store_dir, name, i)[1])
        if h is not None and h.info and (best is None or h.object_version > best.object_version):
            best = h
    return best


@dataclass
class ParityReport:
    objects: int = 0
    stripes: int = 0
    stale_shards: int = 0


def _read_file(path: str, n: int) -> np.ndarray:
    buf = np.zeros(n, dtype=np.uint8)
    try:
        with open(path, "rb") as f:
            raw = f.read(n)
    except FileNotFoundError:
        return buf
    buf[: len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    return buf


def check_parity(store_dir: str, *, allow_stale: bool = False, check_crcs: bool = True,
                 codec: Codec | None = None) -> ParityReport:
    """Read every object's shard files directly and assert that every stripe's
    parity equals a fresh encode of its data.

    Also asserts that each current shard's page checksums match its pages,
    that no shard file holds bytes past its extent's page, and that the
    bytes of the last stripe past the object's end are zero.

    A shard whose header version differs from the object's version vector
    is stale: an error unless ``allow_stale``, in which case the stripe is
    checked with the current shards only (they must agree among themselves).
    """
    pool = pool_of(store_dir)
    k, m = pool["k"], pool["m"]
    width = k + m
    codec = codec or Codec(pool["plugin"], k, m)
    rep = ParityReport()
    for name in sorted(object_names(store_dir)):
        info = info_header(store_dir, name)
        assert info is not None, name
        rep.objects += 1
        C, size = info.chunk_size, info.object_size
        KC = k * C
        nstripes = -(-size // KC)
        n = nstripes * C
        current = []
        shards = {}
        for i in range(width):
            dpath, mpath = shard_paths(store_dir, name, i)
            want = info.vector[i]
            h = read_header(mpath)
            if want == 0:
                # never written in this incarnation: reads as zeros
                ok = True
                buf = np.zeros(n, dtype=np.uint8)
            else:
                ok = h is not None and h.shard_version == want
                buf = _read_file(dpath, n) if ok else None
            if not ok:
                rep.stale_shards += 1
                assert allow_stale, f"{name}: shard {i} is stale or missing " \
                    f"(header {h and h.shard_version}, vector {want})"
                continue
            current.append(i)
            shards[i] = buf
            if want and check_crcs:
                pages = n // PAGE
                try:
                    with open(mpath, "rb") as f:
                        f.seek(sf.crc_offset(0))
                        raw = f.read(4 * pages)
                except FileNotFoundError:
                    raw = b""
                stored = np.zeros(pages, dtype=np.uint32)
                got = np.frombuffer(raw[: len(raw) // 4 * 4], dtype="<u4")
                stored[: len(got)] = got
                calc = sf.page_crcs(buf, pages)
                badp = np.flatnonzero(calc != stored)
                assert not len(badp), f"{name}: shard {i} pages {badp[:10].tolist()} fail their crc"
            if want:
                try:
                    fsize = os.path.getsize(dpath)
                except FileNotFoundError:
                    fsize = 0
                assert fsize <= max(n, 0), f"{name}: shard {i} file is {fsize} bytes, > {n}"
        assert len(current) >= k, f"{name}: only {len(current)} current shards"
        # data past the object's end (in its last stripe) must be zero
        if size % KC and all(i in shards for i in range(k)):
            view = np.stack([shards[i] for i in range(k)]).reshape(k, nstripes, C)
            last = view[:, -1, :].reshape(-1)
            assert not last[size % KC:].any(), f"{name}: bytes past the object's end are not zero"
        for s in range(nstripes):
            rows = {i: shards[i][s * C:(s + 1) * C] for i in current}
            if all(i in rows for i in range(k)):
                par = codec.encode([rows[i] for i in range(k)])
                for j in range(m):
                    if k + j in rows:
                        assert bytes(par[j]) == rows[k + j].tobytes(), \
                            f"{name}: stripe {s}: parity {j} differs from a fresh encode"
            else:
                have = {i: rows[i] for i in current[:k]}
                dec = codec.decode(have, range(width))
                for i in current[k:]:
                    assert bytes(dec[i]) == rows[i].tobytes(), \
                        f"{name}: stripe {s}: shard {i} disagrees with the others"
            rep.stripes += 1
    return rep


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_DIE_BEFORE_APPLY = (
    "import os, sys\n"
    "from backend.objectstore import ObjectStore\n"
    "s = ObjectStore(sys.argv[1])\n"
    "s._apply = lambda *a, **k: os.kill(os.getpid(), 9)\n"
    "s.write(sys.argv[2], int(sys.argv[3]), open(sys.argv[4], 'rb').read())\n")


def die_before_apply(store_dir: str, name: str, offset: int, data: bytes) -> None:
    """Another process writes ``data`` at ``offset`` of ``name`` and is
    SIGKILLed after its journal record is durable, before it applies it."""
    path = os.path.join(store_dir + ".die-data")
    with open(path, "wb") as f:
        f.write(data)
    try:
        p = subprocess.run([sys.executable, "-c", _DIE_BEFORE_APPLY, store_dir, name,
                            str(offset), path], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                           capture_output=True, timeout=60)
    finally:
        os.unlink(path)
    assert p.returncode == -signal.SIGKILL, p.stderr

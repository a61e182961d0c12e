"""Write a golden corpus: a store made by this version of ecfs from fixed
inputs, packed as one tar.gz with a manifest of what it must read back.

    python -m tests.golden.make_corpus tests/golden/store-v1.tar.gz
    python -m tests.golden.make_corpus --removed-osd tests/golden/store-v2-removed-osd.tar.gz
    python -m tests.golden.make_corpus --sealed tests/golden/store-v3-journal-segments.tar.gz

Every later version must read the committed corpora back unchanged
(tests/golden/test_golden.py), as Ceph's erasure-code non-regression
corpus does: a format change that breaks old stores then fails a test
instead of a user's store. Never regenerate a committed corpus; add a new
one when a format gains a version.

The store holds: 4+2 objects with 4 KiB and 64 KiB chunks, one sparse,
one overwritten in place (parity by delta), one written with zero pages
(holes, checksum 0); an image with an object map, a protected snapshot,
a clone with its own writes; and a journal that still holds a record
(the copy is taken while the store is open, after a write).
``--removed-osd``: 8 OSDs, and osd.3 removed (``ecfs osd rm``) after the
plain objects are written: pool.json format 2, placement with a removed
OSD. ``--sealed``: the journal (format 3) also has a sealed segment
holding the record of one more object."""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import tarfile
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from backend.objectstore import ObjectStore  # noqa: E402
from backend.pool import create_store  # noqa: E402
from rbdlike.image import Image  # noqa: E402
from rbdlike.rbd import RBD  # noqa: E402

MIB = 1 << 20


def content(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def build(d: str, snapshot_to: str, removed_osd: bool = False, sealed: bool = False) -> dict:
    create_store(d, k=4, m=2, chunk_size="auto", write_mode="auto",
                 osds=8 if removed_osd else None)
    objs: dict[str, bytes] = {}
    s = ObjectStore(d)
    objs["small"] = content(1, 10_000)
    s.write("small", 0, objs["small"])
    objs["large"] = content(2, 270_000)      # 64 KiB chunks (>= 4 x 64 KiB)
    s.write("large", 0, objs["large"])
    sparse = bytearray(3 * MIB + 4096)
    sparse[:4096] = content(3, 4096)
    sparse[3 * MIB:] = content(4, 4096)
    s.write("sparse", 0, bytes(sparse[:4096]))
    s.write("sparse", 3 * MIB, bytes(sparse[3 * MIB:]))
    objs["sparse"] = bytes(sparse)
    over = bytearray(content(5, 100_000))
    s.write("overwritten", 0, bytes(over))
    over[50_000:58_192] = content(6, 8192)
    s.write("overwritten", 50_000, bytes(over[50_000:58_192]))
    objs["overwritten"] = bytes(over)
    zeros = bytearray(content(7, 32 * 1024))
    zeros[8192:24576] = bytes(16384)
    s.write("zeros", 0, bytes(zeros))
    objs["zeros"] = bytes(zeros)
    if removed_osd:
        from backend.rebalance import rm_osd
        rm_osd(s, 3)
    s.close()

    images: dict[str, bytes] = {}
    s = ObjectStore(d)
    RBD().create(s, "img", 8 * MIB, object_size=MIB)
    img = Image(s, "img")
    v1 = bytearray(8 * MIB)
    for i, off in enumerate((0, 3 * MIB + 5000, 7 * MIB)):
        piece = content(10 + i, 30_000)
        img.write(piece, off)
        v1[off:off + len(piece)] = piece
    img.create_snap("s1")
    img.protect_snap("s1")
    v2 = bytearray(v1)
    piece = content(20, 60_000)
    img.write(piece, MIB)
    v2[MIB:MIB + len(piece)] = piece
    img.close()
    images["img@s1"], images["img"] = bytes(v1), bytes(v2)
    RBD().clone(s, "img", "s1", "child")
    child = Image(s, "child")
    c = bytearray(v1)
    piece = content(30, 20_000)
    child.write(piece, 3 * MIB)
    c[3 * MIB:3 * MIB + len(piece)] = piece
    child.close()
    images["child"] = bytes(c)
    s.close()

    s = ObjectStore(d)
    if sealed:
        objs["sealed"] = content(41, 9_000)
        s.write("sealed", 0, objs["sealed"])
        with s.locks.checkpoint_gate():
            s.journal.seal()
        assert len(s.journal.sealed()) == 1
    objs["journaled"] = content(40, 12_000)
    s.write("journaled", 0, objs["journaled"])
    assert s.journal.size() > 16, "the record must still be in the journal"
    shutil.copytree(d, snapshot_to, symlinks=True)
    s.close()
    return {"objects": {n: sha(b) for n, b in objs.items()},
            "sizes": {n: len(b) for n, b in objs.items()},
            "images": {n: sha(b) for n, b in images.items()},
            "image_sizes": {n: len(b) for n, b in images.items()}}


def main(out: str, removed_osd: bool = False, sealed: bool = False) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        made = build(os.path.join(tmp, "made"), os.path.join(tmp, "store"), removed_osd, sealed)
        with open(os.path.join(tmp, "store", "golden.json"), "w") as f:
            json.dump({"made_by": "ecfs " + _version(), **made}, f, indent=1, sort_keys=True)
        with tarfile.open(out, "w:gz") as t:
            t.add(os.path.join(tmp, "store"), arcname="store")


def _version() -> str:
    import ecfs
    return getattr(ecfs, "__version__", "?")


if __name__ == "__main__":
    args = sys.argv[1:]
    main(args[-1], removed_osd="--removed-osd" in args, sealed="--sealed" in args)

"""Scrub and repair: find what disagrees across an object's shards, name
the shard most likely at fault, and rewrite exactly that.

Three depths, as Ceph's scrub and deep scrub (plus a certain one):

* light (``scrub``): metadata only, no data read. Per shard: present where
  its version vector entry says it holds data, header readable and naming
  this object and shard, its version current (a stale shard missed writes),
  the info shards agreeing on the object's version, size and chunk size,
  no file longer than the shard's extent, no leftover files where the shard
  holds nothing in this incarnation; and whether a transaction on the
  object's slot was cut short (journal leftovers).
* deep (``--deep``): also every page of every shard is read and checked
  against its checksum, and each stripe is checked for consistency by its
  *XOR summaries*: shard j's summary of stripe s is the XOR of the 4 KiB
  pages of chunk j of s. The code is linear over GF(2^8) and works byte
  column by byte column, so the parity chunks' summaries are the encoding
  of the data chunks' summaries: one 4 KiB encode per stripe instead of a
  whole stripe's, and only summaries are compared across shards.
* full (``--full``): every stripe re-encoded and compared byte for byte.

Culprit analysis, for a stripe whose shards disagree: with M >= 2, leave
out each shard in turn; the one whose exclusion makes the others a
consistent codeword is named (then pairs, when M >= 3). With M = 1, or with
only K+1 shards readable, any one shard could be the wrong one, and the
report says so. A page failing its checksum names itself.

Repair rewrites exactly the shards found at fault (and damaged or missing
shard files, stale shards, leftovers), each rebuilt from the others under
the object's lock and journaled like any write (no write hole); a second
scrub then finds it clean.

Scrub holds each object's full lock while it looks at it, so writers of
that object (a mount) wait for it and never race it.
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field

import numpy as np

from . import shardfile as sf
from .errors import DataUnavailable, NotFound
from .journal import OP_TRUNCATE, OP_UNLINK, FileOp

PAGE = sf.PAGE
LEVELS = ("light", "deep", "full")
BATCH_BYTES = 4 << 20              # shard bytes read per batch of stripes


@dataclass
class Problem:
    object: str
    what: str                      # one line, for the operator
    shard: int | None = None
    osd: int | None = None
    stripe: int | None = None
    page: int | None = None
    fix: str = "rebuild"           # rebuild (the shard), remove (leftovers), none

    def line(self) -> str:
        where = [f"object {self.object!r}"]
        if self.stripe is not None:
            where.append(f"stripe {self.stripe}")
        if self.shard is not None:
            where.append(f"shard {self.shard} on osd.{self.osd}")
        return ": ".join(where + [self.what])

    def as_dict(self) -> dict:
        return {"object": self.object, "stripe": self.stripe, "shard": self.shard,
                "osd": self.osd, "page": self.page, "what": self.what, "fix": self.fix}


@dataclass
class ObjectReport:
    name: str
    stripes: int = 0
    unchecked_stripes: int = 0     # fewer than K+1 shards readable: cannot disagree
    problems: list[Problem] = field(default_factory=list)


def scrub_object(store, name: str, level: str = "light") -> ObjectReport:
    """Check one object (under its full lock)."""
    with store._locked(name) as obj:
        return _scrub_locked(store, obj, level)


def repair_object(store, name: str) -> tuple[ObjectReport, list[Problem]]:
    """Deep-scrub one object and rewrite what is at fault; returns the
    report of what was found and the problems fixed."""
    with store._locked(name) as obj:
        rep = _scrub_locked(store, obj, "deep")
        fixed = _repair_locked(store, obj, rep.problems)
        return rep, fixed


# ------------------------------------------------------------------ checks
def _scrub_locked(store, obj, level: str) -> ObjectReport:
    rep = ObjectReport(obj.name)
    if obj.info is None:
        if not obj.absent:
            rep.problems.append(Problem(obj.name, "no info shard readable: cannot be checked",
                                        fix="none"))
        return rep
    info = obj.info
    C = info.chunk_size
    ext = store._extents(info.object_size, C)
    if store.locks is not None and store.locks.inflight(obj.slot):
        rep.problems.append(Problem(obj.name, "a transaction on this object's slot was cut "
                                              "short (replayed at its next access)", fix="none"))
    usable = {}
    for j in range(store.width):
        usable[j] = _check_shard(store, obj, j, ext[j], rep)
    rep.stripes = -(-max(ext) // C) if max(ext) else 0
    if level != "light" and rep.stripes:
        _check_data(store, obj, usable, ext, level, rep)
    return rep


def _check_shard(store, obj, j: int, extent: int, rep: ObjectReport) -> str:
    """Light checks of shard j. Returns how deep checks may use it: "read"
    its pages, "zero" (it holds nothing in this incarnation: zeros), or ""
    (not at all: down, or found at fault already)."""
    info, osd = obj.info, obj.loc[j]
    if not store.osdmap.is_up(osd):
        return ""                 # down or behind: health reports it, recovery rebuilds it
    want = info.vector[j]
    data, meta = store._abs(obj, j)

    def problem(what, fix="rebuild"):
        rep.problems.append(Problem(obj.name, what, j, osd, fix=fix))

    hdr, why = _read_header(meta, obj.name, j)
    dsize = _size(data)
    if want == 0:
        # holds nothing in this incarnation (reads as zeros without I/O)
        if j in store.info_shards and (hdr is None or hdr.object_version < info.object_version):
            problem("info header " + (why or f"stale (version {hdr.object_version}, "
                                             f"the object is at {info.object_version})"))
        elif dsize:
            problem("leftover data of an earlier incarnation (the shard holds nothing now)",
                    fix="remove")
        return "zero"
    if hdr is None:
        problem(why)
        return ""
    if hdr.shard_version < want:
        problem(f"stale: holds version {hdr.shard_version}, the object is at {want} "
                f"(missed a write)")
        return ""
    if j in store.info_shards and hdr.object_version < info.object_version:
        problem(f"info header stale (version {hdr.object_version}, "
                f"the object is at {info.object_version})")
    elif j in store.info_shards and hdr.object_version == info.object_version and (
            hdr.object_size, hdr.chunk_size, hdr.vector) != (
            info.object_size, info.chunk_size, info.vector):
        problem("info header disagrees with the other info shards at the same version")
    if dsize is None:
        if _table_has_data(meta, extent):
            problem("data file missing")
            return ""
    elif dsize > extent:
        problem(f"data file longer than the shard's extent ({dsize} > {extent} bytes)")
    return "read"


def _read_header(meta: str, name: str, j: int):
    try:
        with open(meta, "rb") as f:
            hdr = sf.ShardHeader.unpack(f.read(sf.HEADER_SIZE))
    except FileNotFoundError:
        return None, "shard files missing"
    except sf.CorruptHeader as e:
        return None, f"damaged sidecar header ({e})"
    except OSError as e:
        return None, f"sidecar unreadable ({e.strerror or e})"
    if hdr.name != name or hdr.shard != j:
        return None, "sidecar header names another shard"
    return hdr, ""


def _size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return None


def _table_has_data(meta: str, extent: int) -> bool:
    try:
        with open(meta, "rb") as f:
            f.seek(sf.HEADER_AREA)
            raw = f.read(4 * -(-extent // PAGE))
    except OSError:
        return True
    return any(raw)


def _check_data(store, obj, usable: dict[int, str], ext: list[int], level: str,
                rep: ObjectReport) -> None:
    C = obj.info.chunk_size
    P = C // PAGE
    per_batch = max(1, BATCH_BYTES // C)
    for s0 in range(0, rep.stripes, per_batch):
        s1 = min(rep.stripes, s0 + per_batch)
        rows = (s1 - s0) * P
        bufs, good = {}, {}
        for j in range(store.width):
            if usable[j] == "zero":
                bufs[j], good[j] = np.zeros(rows * PAGE, np.uint8), np.ones(rows, bool)
                continue
            if usable[j] != "read":
                continue
            buf, ok = _read_checked(store, obj, j, s0 * P, rows, ext[j], rep)
            if buf is not None:
                bufs[j], good[j] = buf, ok
        for s in range(s0, s1):
            r0, r1 = (s - s0) * P, (s - s0 + 1) * P
            chunks = {j: b[r0 * PAGE:r1 * PAGE] for j, b in bufs.items() if good[j][r0:r1].all()}
            if len(chunks) <= store.k:
                rep.unchecked_stripes += 1
                continue
            if level == "deep":
                chunks = {j: np.bitwise_xor.reduce(c.reshape(P, PAGE), axis=0)
                          for j, c in chunks.items()}
            _judge_stripe(store, obj, s, chunks, rep)


def _read_checked(store, obj, j: int, p0: int, n: int, extent: int, rep: ObjectReport):
    """Shard j's pages [p0, p0+n) (zeros past its extent) and the mask of
    those that pass their checksum; failures are reported."""
    data, meta = store._abs(obj, j)
    buf = np.zeros(n * PAGE, dtype=np.uint8)
    lim = max(0, min(n, -(-extent // PAGE) - p0))
    try:
        with open(meta, "rb") as f:
            f.seek(sf.crc_offset(p0))
            raw = f.read(4 * lim)
        stored = np.zeros(lim, dtype=np.uint32)
        got = np.frombuffer(raw[: len(raw) // 4 * 4], dtype="<u4")
        stored[: len(got)] = got
        if lim:
            try:
                fd = os.open(data, os.O_RDONLY)
            except FileNotFoundError:
                fd = None
            if fd is not None:
                try:
                    os.preadv(fd, [buf[: lim * PAGE]], p0 * PAGE)
                finally:
                    os.close(fd)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return None, None
        rep.problems.append(Problem(obj.name, f"unreadable ({e.strerror or e})", j,
                                    obj.loc[j]))
        return None, None
    store.counters.add_many((("shard_reads", 1), ("shard_read_bytes", lim * PAGE),
                             ("meta_reads", 1)))
    ok = np.ones(n, dtype=bool)
    if lim:
        ok[:lim] = sf.page_crcs(buf[: lim * PAGE], lim) == stored
    C = obj.info.chunk_size
    for p in np.flatnonzero(~ok).tolist():
        page = p0 + p
        rep.problems.append(Problem(obj.name, f"page {page} fails its checksum (its data or "
                                              f"its checksum record is damaged)", j,
                                    obj.loc[j], stripe=page * PAGE // C, page=page))
    return buf, ok


def _judge_stripe(store, obj, s: int, chunks: dict[int, np.ndarray], rep: ObjectReport) -> None:
    if _consistent(store, chunks):
        return
    avail = sorted(chunks)
    for drop in (1, 2):
        if len(avail) - drop <= store.k or drop > store.m - 1:
            break
        found = [c for c in _subsets(avail, drop)
                 if _consistent(store, {j: chunks[j] for j in avail if j not in c})]
        if len(found) == 1:
            others = len(avail) - drop
            for j in found[0]:
                rep.problems.append(Problem(
                    obj.name, f"bytes disagree with the other {others} (dropped or torn write)",
                    j, obj.loc[j], stripe=s))
            return
    why = f"M={store.m}: any one shard could be the wrong one" if store.m == 1 else \
        f"only {len(avail)} shards readable" if len(avail) <= store.k + 1 else \
        "no single shard explains it"
    rep.problems.append(Problem(obj.name, f"shards disagree; the culprit cannot be told "
                                          f"apart ({why})", stripe=s, fix="none"))


def _subsets(items: list[int], n: int):
    if n == 1:
        return [(i,) for i in items]
    return [(a, b) for x, a in enumerate(items) for b in items[x + 1:]]


def _consistent(store, chunks: dict[int, np.ndarray]) -> bool:
    """Do these shards (more than K) form one codeword?"""
    base = sorted(chunks)[: store.k]
    rest = [j for j in chunks if j not in base]
    got = store.codec.decode({j: chunks[j] for j in base}, rest)
    return all(np.array_equal(np.frombuffer(got[j], dtype=np.uint8), chunks[j]) for j in rest)


# ------------------------------------------------------------------ repair
def _repair_locked(store, obj, problems: list[Problem]) -> list[Problem]:
    """Fix what scrub found, least destructive first: pages and torn stripes
    are rewritten in place (decoded from the others), whole shards rebuilt
    only when the shard itself is missing, stale or has a damaged header.
    One fix that cannot be made (too few good shards) is left reported;
    the others go on."""
    from .recovery import rebuild_shard, rewrite_pages
    P = obj.info.chunk_size // PAGE if obj.info else 1
    fixed = []
    whole = sorted({p.shard for p in problems if p.fix == "rebuild" and p.shard is not None
                    and p.stripe is None and p.page is None})
    for j in whole:
        obj.usable[j] = False           # never a helper for itself or another suspect
    for j in whole:
        try:
            rebuild_shard(store, obj, j, obj.loc[j], kind="repair")
        except DataUnavailable:
            continue
        fixed += [p for p in problems if p.shard == j and p.fix == "rebuild"]
    for p in problems:
        if p.fix != "rebuild" or p.shard is None or p.shard in whole:
            continue
        p0, p1 = (p.page, p.page + 1) if p.page is not None else \
            (p.stripe * P, (p.stripe + 1) * P)
        try:
            rewrite_pages(store, obj, p.shard, obj.loc[p.shard], p0, p1)
        except DataUnavailable:
            continue
        fixed.append(p)
    for p in problems:
        if p.fix == "remove" and p.shard is not None:
            rd, rm = sf.rel_paths(obj.name, p.shard)
            ops = [FileOp(OP_UNLINK, p.osd, rd)]
            if p.shard in store.info_shards:
                ops.append(FileOp(OP_TRUNCATE, p.osd, rm, sf.HEADER_AREA))
            else:
                ops.append(FileOp(OP_UNLINK, p.osd, rm))
            store._commit(obj, (ops, None), kind="repair")
            fixed.append(p)
    return fixed


def scrub_names(store, names, level: str, progress=None):
    """(reports, objects checked) over ``names``; an object gone meanwhile
    is skipped."""
    reports = []
    for i, name in enumerate(names):
        try:
            reports.append(scrub_object(store, name, level))
        except NotFound:
            pass
        except DataUnavailable as e:
            reports.append(ObjectReport(name, problems=[Problem(name, str(e), fix="none")]))
        if progress:
            progress(i + 1, len(names))
    return reports


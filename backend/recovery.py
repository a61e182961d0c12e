"""Bringing an OSD back: rebuild exactly what it missed while it was away.

``recover_osd`` reads the OSD's missed-writes log (backend/missed.py) and,
object by object under the object's full lock, makes the OSD's shard
current again:

* the object is gone (removed while the OSD was away): its shard files on
  the OSD are unlinked, so it cannot reappear;
* the shard should hold nothing in this incarnation (vector entry 0): its
  files are emptied, and an info shard gets the current header;
* the shard's data is current (own version equals its vector entry) but its
  header is not (an info shard that missed a size change): the header is
  rewritten;
* otherwise the shard is rebuilt stripe batch by stripe batch, decoded from
  K other shards, written sparse (all-zero pages are not written), each
  batch a journaled transaction, the header last (until it lands the shard
  stays stale by its vector, so a crash midway is harmless).

When the log holds nothing more, the log is deleted and the OSD marked up,
both under the checkpoint gate held exclusive: no other process's
transaction can slip between the last check and the flip.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

from . import shardfile as sf
from .errors import DataUnavailable, EcfsError, NotFound, StoreError
from .journal import OP_TRUNCATE, OP_UNLINK, OP_WRITE, FileOp
from .pool import OSD_FILE

PAGE = sf.PAGE
BATCH_BYTES = 4 << 20          # shard bytes rebuilt per transaction


@dataclass
class RecoveryResult:
    osd: int
    objects: int = 0           # objects looked at
    rebuilt: int = 0           # shards rebuilt from the others
    headers: int = 0           # shards whose header alone was rewritten
    removed: int = 0           # leftovers of removed objects unlinked


def recover_osd(store, osd: int, progress: Callable[[int, int], None] | None = None,
                backfill: bool = False) -> RecoveryResult:
    """Make ``osd`` current and mark it up. ``progress(done, total)`` is
    called after each object. ``backfill``: called by the backfill itself
    (else an OSD with a backfill under way is refused: it is not current)."""
    if osd not in store.osdmap.paths:
        raise NotFound(f"no such OSD: osd.{osd}")
    if not backfill and os.path.exists(os.path.join(store.store, "backfill", f"osd.{osd}")):
        raise StoreError(f"osd.{osd} is being backfilled (an 'osd rebuild' or 'osd replace' "
                         f"was interrupted): run 'ecfs osd rebuild {osd}' to finish it")
    _check_directory(store, osd)
    res = RecoveryResult(osd)
    done: set[str] = set()
    store.begin_recovery(osd)
    ended = False
    try:
        # other processes' writers write its current shards meanwhile, so
        # what this rebuilds stays current and the loop ends (backend/osdmap.py)
        recovering = not store.osdmap.is_up(osd)
        if recovering:
            store.osdmap.mark_recovering(osd)
        while True:
            names, _ = store.missed.read(osd)
            todo = [n for n in names if n not in done]
            if not todo:
                with store.locks.checkpoint_gate():
                    # No transaction is in flight now. An object recovered
                    # earlier may have been written again since: its name is
                    # in the log already, and a writer does not log a name
                    # twice, so only its shard's version can tell.
                    names, _ = store.missed.read(osd)
                    todo = [n for n in names if n not in done or not _current_on(store, n, osd)]
                    store.osdmap.maybe_refresh()
                    if recovering and not store.osdmap.is_recovering(osd):
                        # an I/O error elsewhere, or 'osd down': that says last
                        st = store.osdmap.states[osd]
                        raise StoreError(f"osd.{osd} was marked down while it recovered "
                                         f"({st.reason or 'down'}); not marked up")
                    if not todo:
                        store.missed.clear(osd)
                        store.osdmap.mark_up(osd)
                        ended = True
                        return res
            for name in todo:
                _recover_object(store, name, osd, res)
                done.add(name)
                res.objects += 1
                if progress:
                    progress(len(done), len(done) + len(todo) - todo.index(name) - 1)
    finally:
        store.end_recovery(osd)
        if not ended and store.osdmap.is_recovering(osd):
            try:
                store.osdmap.mark_recovering(osd, False)    # down, as before it
            except EcfsError:
                pass


def _check_directory(store, osd: int) -> None:
    path = store.osdmap.paths[osd]
    import json
    try:
        with open(os.path.join(path, OSD_FILE)) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise StoreError(f"osd.{osd}: {path} is missing or not an OSD directory "
                         f"(bring the disk back, or use 'ecfs osd replace {osd}')")
    except (OSError, ValueError) as e:
        raise StoreError(f"osd.{osd}: cannot read {os.path.join(path, OSD_FILE)}: {e}")
    if not isinstance(d, dict) or d.get("fsid") != store.pool.fsid or d.get("osd_id") != osd:
        raise StoreError(f"osd.{osd}: {path} belongs to another store or OSD")


def _recover_object(store, name: str, osd: int, res: RecoveryResult) -> None:
    with store._locked(name) as obj:
        js = [j for j in range(store.width) if obj.loc[j] == osd]
        if not js:
            return
        j = js[0]
        rd, rm = sf.rel_paths(name, j)
        if obj.info is None:
            others = [i for i in store.info_shards
                      if obj.loc[i] != osd and store.osdmap.is_up(obj.loc[i])]
            if not others or obj.bad_header:
                raise DataUnavailable(f"object {name!r}: no readable info shard to tell "
                                      f"whether it exists; osd.{osd} not recovered")
            store._commit(obj, ([FileOp(OP_UNLINK, osd, rd), FileOp(OP_UNLINK, osd, rm)], None),
                          kind="recovery")
            res.removed += 1
            return
        want = obj.info.vector[j]
        hdr = _current_header(store, obj, j)
        if want == 0:
            rebuild_shard(store, obj, j, osd)
            res.headers += 1
            return
        have = _header_on(store, obj, j)
        if have is not None and have.shard_version == want:
            if j in store.info_shards and have.pack() != hdr.pack():
                store._commit(obj, ([FileOp(OP_WRITE, osd, rm, 0, hdr.pack())], None),
                              kind="recovery")
                res.headers += 1
            return
        rebuild_shard(store, obj, j, osd)
        res.rebuilt += 1


def _current_on(store, name: str, osd: int) -> bool:
    """Every shard of ``name`` placed on ``osd`` holds what its vector asks
    (or the object is gone and nothing of it is left there)."""
    obj = store._load(name)
    for j in range(store.width):
        if obj.loc[j] != osd:
            continue
        if obj.info is None:
            if any(os.path.lexists(p) for p in store._abs(obj, j)):
                return False
            continue
        want = obj.info.vector[j]
        if want == 0:
            continue
        have = _header_on(store, obj, j)
        if have is None or have.shard_version < want or (
                j in store.info_shards and have.object_version < obj.info.object_version):
            return False
    return True


def _current_header(store, obj, j: int) -> sf.ShardHeader:
    info = obj.info
    return sf.ShardHeader(shard=j, k=store.k, m=store.m, name=obj.name,
                          shard_version=info.vector[j], info=j in store.info_shards,
                          object_version=info.object_version, object_size=info.object_size,
                          chunk_size=info.chunk_size, vector=list(info.vector))


def rebuild_shard(store, obj, j: int, osd: int, kind: str = "recovery") -> None:
    """Make shard j of ``obj`` (locked whole by the caller) current on
    ``osd``: its files emptied where it holds nothing in this incarnation,
    else every stripe decoded from K others (its own bytes are never used)
    and written sparse, the header last. The transaction that empties the
    shard also writes it a header claiming no version, so until the last
    step lands the shard is stale to every reader and a crash midway is
    harmless; with fewer than K other shards usable nothing is touched.
    Used by recovery (``osd up``), backfill and repair (backend/scrub.py)."""
    rd, rm = sf.rel_paths(obj.name, j)
    hdr = _current_header(store, obj, j)
    if obj.info.vector[j] == 0:
        ops = [FileOp(OP_UNLINK, osd, rd), FileOp(OP_UNLINK, osd, rm)]
        if j in store.info_shards:
            ops.append(FileOp(OP_WRITE, osd, rm, 0, hdr.pack()))
        store._commit(obj, (ops, None), kind=kind)
        return
    obj.usable[j] = False
    helpers = [i for i in range(store.width) if i != j and store._is_usable(obj, i)]
    if len(helpers) < store.k:
        raise DataUnavailable(f"object {obj.name!r}: only {len(helpers)} other shards usable "
                              f"(need {store.k}); shard {j} on osd.{osd} left as it is")
    _rebuild_data(store, obj, j, osd, kind, _stale_header(store, obj, j))
    store._commit(obj, ([FileOp(OP_WRITE, osd, rm, 0, hdr.pack())], None), kind=kind)


def rewrite_pages(store, obj, j: int, osd: int, p0: int, p1: int, kind: str = "repair") -> None:
    """Decode pages [p0, p1) of shard j from K others (shard j and every
    shard marked unusable in ``obj`` never help) and write them, with their
    checksums, in place: nothing else of the shard is touched, so a failure
    midway leaves it no worse (repair of a torn stripe or a bad page)."""
    from .objectstore import _Window
    C = obj.info.chunk_size
    P = C // PAGE
    ext = store._extents(obj.info.object_size, C)
    p1 = min(p1, -(-ext[j] // PAGE))
    if p1 <= p0:
        return
    was = obj.usable.get(j)
    obj.usable[j] = False
    try:
        win = _Window(store.width, store.k, C, p0 // P, (p1 - 1) // P)
        store._mark_known_zero(win, ext)
        store._fetch(obj, win, {j: [(p0, p1)]}, kind)
    finally:
        obj.usable[j] = was if was is not None else True
    buf = win.pages(j, p0, p1)
    stop = min(p1 * PAGE, ext[j])
    rd, rm = sf.rel_paths(obj.name, j)
    store._commit(obj, ([FileOp(OP_WRITE, osd, rd, p0 * PAGE, buf[: stop - p0 * PAGE].tobytes()),
                         FileOp(OP_WRITE, osd, rm, sf.crc_offset(p0),
                                sf.page_crcs(buf).astype("<u4").tobytes())], None), kind=kind)


def _stale_header(store, obj, j: int) -> bytes:
    """Shard j's header claiming no version: written with the truncation
    that starts a rebuild, so a rebuild cut short leaves a shard every
    reader takes for stale, never an empty one that claims to be current."""
    h = _current_header(store, obj, j)
    h.shard_version = 0
    return h.pack()


def _header_on(store, obj, j: int) -> sf.ShardHeader | None:
    _, meta = store._abs(obj, j)
    try:
        fd = os.open(meta, os.O_RDONLY)
        try:
            raw = os.pread(fd, sf.HEADER_SIZE, 0)
        finally:
            os.close(fd)
        store.counters.add("meta_reads")
        h = sf.ShardHeader.unpack(raw)
    except (OSError, sf.CorruptHeader):
        return None
    return h if h.name == obj.name and h.shard == j else None


def _rebuild_data(store, obj, j: int, osd: int, kind: str, stale_header: bytes) -> None:
    """Decode shard j of every stripe from the others and write it to
    ``osd``, sparse, in batches (the header is the caller's last step)."""
    from .objectstore import _Window, _runs
    C = obj.info.chunk_size
    P = C // PAGE
    ext = store._extents(obj.info.object_size, C)
    rd, rm = sf.rel_paths(obj.name, j)
    store._commit(obj, ([FileOp(OP_TRUNCATE, osd, rd, 0),
                         FileOp(OP_TRUNCATE, osd, rm, sf.crc_offset(0)),
                         FileOp(OP_WRITE, osd, rm, 0, stale_header)], None), kind=kind)
    last_page = -(-ext[j] // PAGE)
    per_batch = max(1, BATCH_BYTES // C)
    nstripes = -(-last_page // P)
    for s0 in range(0, nstripes, per_batch):
        s1 = min(nstripes, s0 + per_batch) - 1
        win = _Window(store.width, store.k, C, s0, s1)
        store._mark_known_zero(win, ext)
        p0, p1 = s0 * P, min((s1 + 1) * P, last_page)
        store._fetch(obj, win, {j: [(p0, p1)]}, kind)
        buf = win.pages(j, p0, p1)
        crcs = sf.page_crcs(buf)
        ops = []
        for a, b in _runs(p0 + np.flatnonzero(crcs)):
            stop = min(b * PAGE, ext[j])
            ops.append(FileOp(OP_WRITE, osd, rd, a * PAGE,
                              win.pages(j, a, b)[: stop - a * PAGE].tobytes()))
        if ops:
            ops.append(FileOp(OP_WRITE, osd, rm, sf.crc_offset(p0), crcs.astype("<u4").tobytes()))
            store._commit(obj, (ops, None), kind=kind)

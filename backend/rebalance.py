"""Growing the pool: ``ecfs osd add [--dir D]``.

Placement (backend/placement.py) is built for growth: with a new OSD of
the next id, a shard moves only where the new OSD takes its position,
about 1/(N+1) of all shards, each to the new OSD, none between old ones
(but that is one shard of most objects: each object has K+M of the N+1).
The steps, each safe to interrupt (``ecfs osd rebuild N`` finishes them):

1. The new directory gets this store's ``osd.json`` with the next id, but
   no ``objects/`` yet, so every process that sees it takes it for down.
2. Under the checkpoint gate held exclusive (no transaction of any process
   between its journal record and its apply; a checkpoint first replays
   what dead writers left), ``pool.json`` lists the OSD and ``osdmap.json``
   marks it down ("backfilling"). Every process reads ``pool.json`` again
   at its next object load (the OSD map's stamp), so placements change
   everywhere at once; a write planned on the old map is planned again at
   its commit (the map generation moved).
3. The backfill (backend/backfill.py) rebuilds every shard placement now
   gives the OSD from K others, resumable, then marks it up.
4. Shard files the old OSDs hold at positions placement no longer gives
   them are removed, each object locked (``remove_misplaced``; also run at
   the end of every backfill, so a rerun after an interruption cleans up).

Until step 3 ends, a moved shard's new home is being filled: those
objects have one shard fewer of redundancy (Ceph keeps the old copy
serving until the backfill is done; here it is rebuilt from the others
rather than copied, and the old copy is removed only at the end). So an
add starts only with every OSD up and current. Shrinking (``osd rm``) is
not supported yet.
"""
from __future__ import annotations

import json
import os
from typing import Callable

from . import shardfile as sf
from .backfill import REASON, _is_ours, progress_path, rebuild_osd, under_way
from .errors import InvalidArgument
from .pool import (FORMAT_VERSION, OSD_FILE, _check_layout, _listdir, _usable_dir, load_pool,
                   osd_abspath, pool_path, write_json_atomic)
from .placement import place


def add_osd(store, new_dir: str | None = None,
            progress: Callable[[int, int], None] | None = None,
            rate: int | None = None) -> tuple[int, int]:
    """Add an OSD on ``new_dir`` (default ``STORE/osd.N``), backfill it and
    clean up; returns (its id, misplaced shard files removed)."""
    pool = load_pool(store.store)
    osd = max(e.id for e in pool.osds) + 1
    path = os.path.abspath(new_dir) if new_dir else os.path.join(store.store, f"osd.{osd}")
    others = [osd_abspath(store.store, e) for e in pool.osds]
    _check_layout(store.store, others + [path])
    _usable_dir(path, "new OSD directory")
    # a rerun after a kill before step 2 finds only our osd.json there
    if os.path.isdir(path) and os.listdir(path) and not (
            os.listdir(path) == [OSD_FILE] and _is_ours(path, pool.fsid, osd)):
        raise InvalidArgument(f"{path} is not empty: an OSD starts on an empty directory")
    _check_healthy(store)
    os.makedirs(path, mode=0o700, exist_ok=True)
    write_json_atomic(os.path.join(path, OSD_FILE),
                      {"format_version": FORMAT_VERSION, "fsid": pool.fsid, "osd_id": osd})
    store.checkpoint()                       # dead writers' transactions: replayed now
    with store.locks.checkpoint_gate():
        with open(pool_path(store.store)) as f:
            raw = json.load(f)
        if any(e["id"] >= osd for e in raw["osds"]):
            raise InvalidArgument(f"another 'osd add' took osd.{osd} meanwhile")
        inside = path.startswith(os.path.realpath(store.store) + os.sep)
        raw["osds"].append({"id": osd,
                            "path": os.path.relpath(path, store.store) if inside else path})
        write_json_atomic(pool_path(store.store), raw)
        store.osdmap.refresh()
        store.osdmap.mark_down(osd, REASON.format(osd=osd))
        # the backfill's progress file before objects/: 'osd up' refuses an
        # OSD being filled, and a kill from here on is finished by a rebuild
        os.makedirs(os.path.dirname(progress_path(store.store, osd)), mode=0o700,
                    exist_ok=True)
        open(progress_path(store.store, osd), "ab").close()
        os.makedirs(os.path.join(path, "objects"), mode=0o700, exist_ok=True)
    res = rebuild_osd(store, osd, progress=progress, rate=rate)   # step 4 at its end
    return osd, res.misplaced


def _check_healthy(store) -> None:
    """Growth moves a shard of most objects (each object has K+M of the N
    OSDs; the new one takes a position in about (K+M)/(N+1) of them), and
    until the new OSD is filled those shards count as missing: start only
    with every OSD up and current, so each object keeps M-1 to spare."""
    store.osdmap.refresh()
    bad = [(i, st.reason or "down") for i, st in sorted(store.osdmap.states.items())
           if not st.up]
    if bad:
        i, why = bad[0]
        raise InvalidArgument(f"osd add needs every OSD up and current: osd.{i} is not "
                              f"({why})")
    filling = under_way(store.store)
    if filling:
        i = sorted(filling)[0]
        raise InvalidArgument(f"osd add needs every OSD current: osd.{i} is being backfilled "
                              f"(run 'ecfs osd rebuild {i}' to finish it)")


def remove_misplaced(store) -> int:
    """Unlink shard files that sit on an OSD placement no longer gives
    their shard (left behind by a growth); returns how many. Each object
    is locked while its files go, and only a file whose object's current
    placement puts that shard elsewhere is touched."""
    removed = 0
    width, ids = store.width, store.osdmap.ids
    for osd, root in sorted(store.osdmap.paths.items()):
        if not store.osdmap.is_up(osd):
            continue
        objects = os.path.join(root, "objects")
        for sub in sorted(_listdir(objects)):
            d = os.path.join(objects, sub)
            for f in sorted(_listdir(d)):
                found = sf.shard_file_object(d, f)
                if found is None or not 0 <= found[1] < width:
                    continue                   # not a shard file of ours: not touched
                name, shard = found
                if place(name, width, ids)[shard] == osd:
                    continue
                with store._locked(name):
                    try:
                        os.unlink(os.path.join(d, f))
                        removed += 1
                    except FileNotFoundError:
                        pass
    return removed

"""Backfill: make an OSD hold again every shard placement gives it
(``ecfs osd rebuild ID``, ``ecfs osd replace ID [--dir NEWDIR]``).

Where ``osd up`` (backend/recovery.py) rebuilds only what an OSD missed,
backfill trusts nothing on it: a disk that was wiped, swapped for a new
one, or whose contents are suspect. The steps, each safe to interrupt:

1. The OSD is marked down (persistently, reason "backfilling"), so nobody
   reads it and every write meanwhile is logged as missed by it.
2. First run only (no progress file yet): its ``objects/`` is emptied, so
   no shard of an object removed long ago can come back. ``replace`` first
   prepares the new directory (``osd.json`` naming this store and OSD id)
   and points the pool at it.
3. Every object of the store (listed from the other OSDs) is visited under
   its full lock: each of its shards placed on the OSD is rebuilt from K
   others, header last (recovery's ``rebuild_shard``). The name is then
   appended to ``STORE/backfill/osd.N`` (records ``NAME NUL``, as the
   missed log); a rerun skips the names there, so a killed backfill goes
   on where it stopped.
4. Then the missed log is drained and the OSD marked up exactly as
   ``osd up`` does (under the checkpoint gate), and the progress file is
   removed.

The mount keeps serving throughout: each object is locked only while its
shard is rebuilt. ``rate`` (bytes/s of shard writes) paces the work.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import Callable

from .errors import InvalidArgument, NotFound, StoreError
from .pool import (FORMAT_VERSION, OSD_FILE, _check_layout, _usable_dir, load_pool,
                   osd_abspath, pool_path, write_json_atomic)
from .recovery import rebuild_shard, recover_osd

REASON = "backfilling: shards being rebuilt (run 'ecfs osd rebuild {osd}' to go on)"


@dataclass
class BackfillResult:
    osd: int
    objects: int = 0           # objects visited this run
    shards: int = 0            # shards rebuilt this run
    skipped: int = 0           # objects already done by an earlier, interrupted run


def progress_path(store_dir: str, osd: int) -> str:
    return os.path.join(store_dir, "backfill", f"osd.{osd}")


def _done(store_dir: str, osd: int) -> set[str] | None:
    try:
        with open(progress_path(store_dir, osd), "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    end = raw.rfind(b"\0") + 1
    return {r.decode("utf-8", "replace") for r in raw[:end].split(b"\0") if r}


def prepare_replacement(store_dir: str, osd: int, new_dir: str | None) -> str:
    """Point osd.N at ``new_dir`` (default: its present path, now an empty
    disk), an empty directory given this store's osd.json; returns it."""
    pool = load_pool(store_dir)
    entry = next((e for e in pool.osds if e.id == osd), None)
    if entry is None:
        raise NotFound(f"no osd.{osd} in this store")
    path = os.path.abspath(new_dir) if new_dir else osd_abspath(store_dir, entry)
    others = [osd_abspath(store_dir, e) for e in pool.osds if e.id != osd]
    _check_layout(store_dir, others + [path])
    if not _is_ours(path, pool.fsid, osd):
        _usable_dir(path, "new OSD directory")
        os.makedirs(os.path.join(path, "objects"), mode=0o700, exist_ok=True)
        write_json_atomic(os.path.join(path, OSD_FILE),
                          {"format_version": FORMAT_VERSION, "fsid": pool.fsid, "osd_id": osd})
    if os.path.realpath(path) != os.path.realpath(osd_abspath(store_dir, entry)):
        with open(pool_path(store_dir)) as f:
            raw = json.load(f)
        inside = path.startswith(os.path.realpath(store_dir) + os.sep)
        for e in raw["osds"]:
            if e["id"] == osd:
                e["path"] = os.path.relpath(path, store_dir) if inside else path
        write_json_atomic(pool_path(store_dir), raw)
    return path


def _is_ours(path: str, fsid: str, osd: int) -> bool:
    try:
        with open(os.path.join(path, OSD_FILE)) as f:
            d = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and d.get("fsid") == fsid and d.get("osd_id") == osd


def rebuild_osd(store, osd: int, progress: Callable[[int, int], None] | None = None,
                rate: int | None = None) -> BackfillResult:
    """Backfill ``osd`` (see the module docstring) and mark it up."""
    if osd not in store.osdmap.paths:
        raise NotFound(f"no such OSD: osd.{osd}")
    store.osdmap.refresh()
    path = store.osdmap.paths[osd]
    why = store.osdmap.check_dir(osd, path)
    if why:
        raise StoreError(f"osd.{osd}: {path}: {why} (for a new or wiped disk use "
                         f"'ecfs osd replace {osd}')")
    done = _done(store.store, osd)
    reason = REASON.format(osd=osd)
    store.osdmap.mark_down(osd, reason)
    if done is None:
        _empty_objects(path)
        os.makedirs(os.path.dirname(progress_path(store.store, osd)), mode=0o700, exist_ok=True)
        open(progress_path(store.store, osd), "ab").close()
        done = set()
    res = BackfillResult(osd)
    names = store.list()              # from the other OSDs: this one is down
    todo = [n for n in names if n not in done]
    res.skipped = len(names) - len(todo)
    fd = os.open(progress_path(store.store, osd), os.O_WRONLY | os.O_APPEND)
    store.begin_recovery(osd)
    t0, written0 = time.monotonic(), store.counters.snapshot()["shard_write_bytes"]
    try:
        for i, name in enumerate(todo):
            with store._locked(name) as obj:
                if obj.info is not None:
                    for j in range(store.width):
                        if obj.loc[j] == osd:
                            rebuild_shard(store, obj, j, osd)
                            res.shards += 1
            os.write(fd, name.encode() + b"\0")
            res.objects += 1
            if progress:
                progress(res.skipped + i + 1, len(names))
            if rate:
                _pace(store, t0, written0, rate)
        os.fsync(fd)
    finally:
        os.close(fd)
        store.end_recovery(osd)
    recover_osd(store, osd)           # what was written meanwhile; marks it up
    try:
        os.unlink(progress_path(store.store, osd))
    except FileNotFoundError:
        pass
    return res


def _pace(store, t0: float, written0: int, rate: int) -> None:
    """Sleep so that the shard bytes written since t0 stay within ``rate``/s
    (a rate limit, not synchronisation)."""
    wrote = store.counters.snapshot()["shard_write_bytes"] - written0
    ahead = wrote / rate - (time.monotonic() - t0)
    if ahead > 0:
        time.sleep(min(ahead, 1.0))


def _empty_objects(path: str) -> None:
    root = os.path.join(path, "objects")
    for e in os.listdir(root):
        p = os.path.join(root, e)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        else:
            os.unlink(p)
    if not os.path.isdir(root):
        raise InvalidArgument(f"{root} is not a directory")

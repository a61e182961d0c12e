"""Backfill: make an OSD hold again every shard placement gives it
(``ecfs osd rebuild ID``, ``ecfs osd replace ID [--dir NEWDIR]``).

Where ``osd up`` (backend/recovery.py) rebuilds only what an OSD missed,
backfill trusts nothing on it: a disk that was wiped, swapped for a new
one, or whose contents are suspect. The steps, each safe to interrupt:

1. The OSD is marked down (persistently, reason "backfilling"), so nobody
   reads it and every write meanwhile is logged as missed by it.
   ``replace`` first prepares the new directory (``osd.json`` naming this
   store and OSD id) and points the pool at it.
2. Every object of the store (listed from the other OSDs) is visited under
   its full lock: each of its shards placed on the OSD is rebuilt from K
   others, header last (recovery's ``rebuild_shard``, which marks the shard
   stale in the same transaction that empties it, and touches nothing when
   fewer than K other shards are usable: nothing is dropped before its
   replacement exists, as in Ceph's backfill). The name is then appended to
   ``STORE/backfill/osd.N`` (records ``NAME NUL``, as the missed log); a
   rerun skips the names there, so a killed backfill goes on where it
   stopped. An object that cannot be rebuilt now is retried by the next run.
3. Shard files on the OSD of objects that no longer exist are removed.
4. Then the missed log is drained and the OSD marked up exactly as
   ``osd up`` does (under the checkpoint gate), and the progress file is
   removed. If any object could not be rebuilt the OSD stays down and the
   command fails, naming how many.

The mount keeps serving throughout: each object is locked only while its
shard is rebuilt. ``rate`` (bytes/s of shard writes) paces the work.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Callable

from . import shardfile as sf
from .errors import DataUnavailable, NotFound, StoreError
from .locks import maintenance
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
    misplaced: int = 0         # shard files removed from OSDs placement no longer gives them


def progress_path(store_dir: str, osd: int) -> str:
    return os.path.join(store_dir, "backfill", f"osd.{osd}")


def total_path(store_dir: str, osd: int) -> str:
    return progress_path(store_dir, osd) + ".total"


def under_way(store_dir: str) -> dict[int, tuple[int, int | None]]:
    """{osd: (objects done, objects the run visits or None if not known)}
    for every backfill under way or interrupted (``ecfs status``)."""
    out: dict[int, tuple[int, int | None]] = {}
    d = os.path.join(store_dir, "backfill")
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return out
    for f in names:
        if not (f.startswith("osd.") and f[4:].isdigit()):
            continue
        osd = int(f[4:])
        done = _done(store_dir, osd)
        if done is None:
            continue
        try:
            with open(total_path(store_dir, osd)) as t:
                total: int | None = int(t.read().strip())
        except (OSError, ValueError):
            total = None
        out[osd] = (len(done), total)
    return out


def _done(store_dir: str, osd: int) -> set[str] | None:
    try:
        with open(progress_path(store_dir, osd), "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    end = raw.rfind(b"\0") + 1
    return {r.decode("utf-8", "replace") for r in raw[:end].split(b"\0") if r}


def prepare_replacement(store_dir: str, osd: int, new_dir: str | None,
                        check_only: bool = False) -> str:
    """Point osd.N at ``new_dir`` (default: its present path, now an empty
    disk), an empty directory given this store's osd.json; returns it.
    ``check_only``: refuse a bad directory, change nothing."""
    pool = load_pool(store_dir)
    entry = next((e for e in pool.osds if e.id == osd), None)
    if entry is None:
        raise NotFound(f"no osd.{osd} in this store")
    path = os.path.abspath(new_dir) if new_dir else osd_abspath(store_dir, entry)
    others = [osd_abspath(store_dir, e) for e in pool.osds if e.id != osd]
    _check_layout(store_dir, others + [path])
    if not _is_ours(path, pool.fsid, osd):
        _usable_dir(path, "new OSD directory")
        if check_only:
            return path
        os.makedirs(os.path.join(path, "objects"), mode=0o700, exist_ok=True)
        write_json_atomic(os.path.join(path, OSD_FILE),
                          {"format_version": FORMAT_VERSION, "fsid": pool.fsid, "osd_id": osd})
    if check_only:
        return path
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
    with maintenance(store.store, f"osd rebuild {osd}"):
        return _rebuild_osd(store, osd, progress, rate)


def _rebuild_osd(store, osd: int, progress: Callable[[int, int], None] | None,
                 rate: int | None) -> BackfillResult:
    if osd not in store.osdmap.paths:
        raise NotFound(f"no such OSD: osd.{osd}")
    store.osdmap.refresh()
    path = store.osdmap.paths[osd]
    why = store.osdmap.check_dir(osd, path)
    if why == "objects/ missing" and _is_ours(path, store.pool.fsid, osd):
        # our osd.json, its objects/ gone (wiped, or an 'osd add' killed
        # before it made it): everything is rebuilt anyway
        os.makedirs(os.path.join(path, "objects"), mode=0o700, exist_ok=True)
        why = store.osdmap.check_dir(osd, path)
    if why:
        raise StoreError(f"osd.{osd}: {path}: {why} (for a new or wiped disk use "
                         f"'ecfs osd replace {osd}')")
    done = _done(store.store, osd)
    reason = REASON.format(osd=osd)
    store.osdmap.mark_down(osd, reason)
    if done is None:
        os.makedirs(os.path.dirname(progress_path(store.store, osd)), mode=0o700, exist_ok=True)
        open(progress_path(store.store, osd), "ab").close()
        done = set()
    res = BackfillResult(osd)
    names = store.list()              # from the other OSDs: this one is down
    write_json_atomic(total_path(store.store, osd), len(names))
    todo = [n for n in names if n not in done]
    res.skipped = len(names) - len(todo)
    fd = os.open(progress_path(store.store, osd), os.O_WRONLY | os.O_APPEND)
    store.begin_recovery(osd)
    t0, written0 = time.monotonic(), store.counters.snapshot()["shard_write_bytes"]
    failed = []
    try:
        for i, name in enumerate(todo):
            try:
                with store._locked(name) as obj:
                    if obj.info is not None:
                        for j in range(store.width):
                            if obj.loc[j] == osd:
                                rebuild_shard(store, obj, j, osd)
                                res.shards += 1
            except (DataUnavailable, NotFound) as e:
                if isinstance(e, DataUnavailable):
                    failed.append(name)
                continue
            os.write(fd, name.encode() + b"\0")
            res.objects += 1
            if progress:
                progress(res.skipped + i + 1, len(names))
            if rate:
                _pace(store, t0, written0, rate)
        os.fsync(fd)
        if not failed:
            _remove_leftovers(store, osd, set(names))
    finally:
        os.close(fd)
        store.end_recovery(osd)
    if failed:
        raise DataUnavailable(f"osd.{osd}: {len(failed)} objects could not be rebuilt (fewer "
                              f"than K of their other shards readable, e.g. {failed[0]!r}); "
                              f"it stays down: bring the other OSDs back and run "
                              f"'ecfs osd rebuild {osd}' again")
    recover_osd(store, osd, backfill=True)   # what was written meanwhile; marks it up
    from .rebalance import remove_misplaced
    # an 'osd add' moved them, and left them if it was interrupted (backend/rebalance.py)
    res.misplaced = remove_misplaced(store)
    for p in (progress_path(store.store, osd), total_path(store.store, osd)):
        try:
            os.unlink(p)
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


def _remove_leftovers(store, osd: int, names: set[str]) -> None:
    """Unlink the shard files on ``osd`` of objects the store no longer has
    (removed while the disk was away): they must never come back."""
    keep = names | set(store.missed.read(osd)[0])     # created meanwhile: recovery's
    root = os.path.join(store.osdmap.paths[osd], "objects")
    for sub in sorted(os.listdir(root)):
        d = os.path.join(root, sub)
        if not os.path.isdir(d):
            continue
        for f in sorted(os.listdir(d)):
            found = sf.shard_file_object(d, f)
            if found is None:
                continue
            if found[0] not in keep:
                try:
                    os.unlink(os.path.join(d, f))
                except FileNotFoundError:
                    pass

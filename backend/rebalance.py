"""Changing the OSD set: ``ecfs osd add [--dir D]`` and ``ecfs osd rm ID``.

Placement (backend/placement.py) moves little on either change: an added
OSD (the next id) takes about 1/(N+1) of all shards, each from an old OSD;
a first removal sends each of the OSD's shards to an OSD that holds no
other shard of the object, and nothing else moves (later changes may move
a few substitutes besides). Both run the same way, copy then switch, so no
object is ever short of a shard (as Ceph keeps the old copy serving until
the backfill is done):

1. Checks, under the store's maintenance lock (backend/locks.py: no other
   add, rm, rebuild or replace meanwhile, which would delete the copies):
   every OSD up and current, no backfill under way; ``rm`` leaves at least
   K+M OSDs. Shard files that a killed earlier run copied and never
   switched to are removed first (``remove_misplaced``), and so is
   whatever a new directory holds besides our ``osd.json``.
2. Copy, online: each object (listed from the OSDs) is locked whole while
   every shard whose home the new map changes is copied to it, file by
   file (data extents only: holes stay holes), under a temporary name,
   fsynced, then renamed. The source's fingerprint is kept: its sidecar
   header (a write to the shard moves its version) and the files' sizes,
   blocks, inodes and times. Writers go on meanwhile, under the old map.
3. Catch-up, online: objects created since the listing are copied, and the
   shards whose source changed (or whose copy went) are copied again,
   pass after pass until few are left (``SWITCH_LEFT``) or
   ``CATCH_UP_PASSES`` ran.
4. Switch, inside a checkpoint (backend/objectstore.py ``checkpoint``'s
   ``then``): the journal is empty and no transaction of any process is
   between its record and its apply, so the shard files are the whole
   truth and no record can later be replayed onto an old home. The last
   new objects and changed shards are copied (every writer waits for
   this: step 3 keeps it short, but the listing that finds new objects
   walks every OSD's directories), and ``pool.json`` is written with the
   new OSD set (format 2 when it lists removed OSDs: an older ecfs, which
   would place shards without them, refuses it). Every process takes the
   new map at its next object load (pool.json is part of the OSD map's
   stamp, and its generation moves). A write planned on the old map is
   planned again at its commit; a repair or recovery step planned on it
   writes nothing (``PlacementMoved``).
5. Clean up: the old copies are removed, each object locked; ``rm``
   empties the removed OSD's directory the same way (``osd.json`` last)
   and removes it if it is the store's own ``osd.N``.

``STORE/rebalance.json`` says what runs and how far ({"op", "osd", "pid",
"path", "phase", "done", "total"}; rewritten at most once a second) for
``ecfs status``. It stays behind a killed run, which status and fsck then
name. A kill before step 4 changes nothing anyone reads: the copies sit
where the map puts nothing (``list()`` and reads ignore them), and the
next add, rm or backfill removes them; an add's new directory is reused
by the next add. A kill after it leaves only step 5: ``osd rm ID`` run
again finishes it (an add needs nothing more: its old copies are
misplaced files). ``ecfs fsck --repair`` settles either.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable

from . import shardfile as sf
from .backfill import _is_ours, under_way
from .locks import maintenance
from .errors import InvalidArgument, NotFound, StoreError
from .placement import place
from .pool import (FORMAT_VERSION, OSD_FILE, _check_layout, _listdir, _usable_dir,
                   REMOVED_FORMAT, load_pool, osd_abspath, pool_path, validate_profile,
                   write_json_atomic)

Progress = Callable[[int, int], None]
CATCH_UP_PASSES = 10       # catch-up passes at most before the switch
SWITCH_LEFT = 16           # ... and when so few changed shards are left, no more


@dataclass
class Change:
    """What a rebalance moved."""
    osd: int
    objects: int = 0          # objects with a shard that moved
    shards: int = 0           # shards copied (a catch-up copy counts again)
    bytes: int = 0            # data bytes copied
    misplaced: int = 0        # old copies removed afterwards
    emptied: str | None = None    # rm: the removed OSD's directory, emptied
    already: bool = False     # rm: the OSD was out already (a rerun finishing one)


@dataclass
class _Plan:
    ids: tuple[int, ...]                  # live OSDs after the change
    removed: tuple[int, ...]
    paths: dict[int, str]                 # every OSD's directory, old and new
    # (object, shard) -> (the OSD it was copied from, to, the source's fingerprint then)
    copied: dict[tuple[str, int], tuple[int, int, tuple]] = field(default_factory=dict)


def add_osd(store, new_dir: str | None = None, progress: Progress | None = None,
            rate: int | None = None) -> Change:
    """Add an OSD on ``new_dir`` (default ``STORE/osd.N``), fill it by
    copying and switch to it."""
    with maintenance(store.store, "osd add"):
        pool = load_pool(store.store)
        osd = pool.next_id
        path = os.path.abspath(new_dir) if new_dir else os.path.join(store.store, f"osd.{osd}")
        others = [osd_abspath(store.store, e) for e in pool.osds]
        _check_layout(store.store, others + [path])
        if os.path.isdir(path) and _is_ours(path, pool.fsid, osd):
            # a killed earlier add: its copies were never switched to
            shutil.rmtree(os.path.join(path, "objects"), ignore_errors=True)
        else:
            _usable_dir(path, "new OSD directory")
        _check_healthy(store, "osd add")
        os.makedirs(os.path.join(path, "objects"), mode=0o700, exist_ok=True)
        write_json_atomic(os.path.join(path, OSD_FILE),
                          {"format_version": FORMAT_VERSION, "fsid": pool.fsid, "osd_id": osd})
        inside = os.path.realpath(path).startswith(os.path.realpath(store.store) + os.sep)
        entry = {"id": osd, "path": os.path.relpath(path, store.store) if inside else path}
        plan = _Plan(ids=tuple(sorted(store.osdmap.ids + (osd,))),
                     removed=store.osdmap.removed, paths={**store.osdmap.paths, osd: path})

        def edit(raw: dict) -> None:
            if any(e["id"] >= osd for e in raw["osds"]) or osd in raw.get("removed", []):
                raise InvalidArgument(f"another 'osd add' took osd.{osd} meanwhile")
            raw["osds"].append(entry)

        return _rebalance(store, plan, edit, Change(osd), progress, rate,
                          _State(store.store, "add", osd, path))


def rm_osd(store, osd: int, progress: Progress | None = None,
           rate: int | None = None) -> Change:
    """Drain ``osd`` (its shards copied to the OSDs the map gives them
    without it), take it out of the pool and empty its directory."""
    with maintenance(store.store, f"osd rm {osd}"):
        pool = load_pool(store.store)
        if osd in pool.removed:
            return _finish_rm(store, osd)       # a run killed after the switch, or done
        entry = next((e for e in pool.osds if e.id == osd), None)
        if entry is None:
            raise NotFound(f"no osd.{osd} in this store")
        try:
            validate_profile(pool.k, pool.m, len(pool.osds) - 1, pool.plugin, pool.chunk_size,
                             check_plugin=False)
        except InvalidArgument:
            raise InvalidArgument(f"cannot remove osd.{osd}: K+M={pool.k + pool.m} needs that "
                                  f"many OSDs and the pool has {len(pool.osds)} (add one "
                                  f"first)")
        _check_healthy(store, "osd rm")
        plan = _Plan(ids=tuple(i for i in store.osdmap.ids if i != osd),
                     removed=tuple(sorted(store.osdmap.removed + (osd,))),
                     paths=dict(store.osdmap.paths))

        def edit(raw: dict) -> None:
            if not any(e["id"] == osd for e in raw["osds"]):
                raise InvalidArgument(f"osd.{osd} was removed meanwhile")
            raw["osds"] = [e for e in raw["osds"] if e["id"] != osd]
            raw["removed"] = sorted(set(raw.get("removed", [])) | {osd})
            raw["format_version"] = max(raw["format_version"], REMOVED_FORMAT)
            # (osdmap.json names no up OSD, and switch() checked every OSD is up)

        path = plan.paths[osd]
        res = _rebalance(store, plan, edit, Change(osd), progress, rate,
                         _State(store.store, "rm", osd, path),
                         finish=lambda: _empty_removed(store, osd, path))
        res.emptied = path
        return res


def _finish_rm(store, osd: int) -> Change:
    """Step 5 of an rm whose switch is done: the old copies and the removed
    OSD's directory (named by the interrupted run's rebalance.json)."""
    res = Change(osd, already=True)
    res.misplaced = remove_misplaced(store)
    r = rebalance_state(store.store)
    mine = r is not None and r["op"] == "rm" and r["osd"] == osd and not r["running"]
    path = r.get("path") if mine else None
    res.emptied = _empty_removed(store, osd, path)
    if mine:
        state_clear(store.store)
    return res


def _rebalance(store, plan: _Plan, edit: Callable[[dict], None], res: Change,
               progress: Progress | None, rate: int | None, state: "_State",
               finish: Callable[[], None] | None = None) -> Change:
    """Steps 2 to 5 of the module docstring."""
    switched = []
    try:
        _run(store, plan, edit, res, progress, rate, state, switched)
        if finish is not None:
            finish()
    except Exception:
        if not switched:
            state.clear()     # failed before the switch: the error says what to do
        raise                 # (after it, status keeps naming the run to finish)
    state.clear()
    return res


def _run(store, plan: _Plan, edit: Callable[[dict], None], res: Change,
         progress: Progress | None, rate: int | None, state: "_State",
         switched: list) -> None:
    state.update("cleaning up an earlier run", 0, None, force=True)
    remove_misplaced(store)                  # a killed earlier run's copies
    names = set(store.list())
    t0 = time.monotonic()
    moved_objects = set()
    for i, name in enumerate(sorted(names)):
        if _copy_object(store, plan, name, res):
            moved_objects.add(name)
        state.update("copying", i + 1, len(names))
        if progress:
            progress(i + 1, len(names))
        if rate:
            ahead = res.bytes / rate - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(min(ahead, 1.0))    # a rate limit, not synchronisation
    state.update("catching up", len(names), len(names), force=True)
    store._crashpoint()
    # Catch up while writers go on, until little is left for the switch,
    # which runs with every writer of every process waiting
    for _ in range(CATCH_UP_PASSES):
        new = set(store.list()) - names
        changed = _changed(plan)
        for name in sorted(new):
            names.add(name)
            if _copy_object(store, plan, name, res):
                moved_objects.add(name)
        for key in changed:
            _copy_object(store, plan, key[0], res, only={key})
        if len(new) + len(changed) <= SWITCH_LEFT:
            break

    def switch() -> None:
        # under the gate, with the journal empty: what the files hold is all
        store.osdmap.refresh()
        if not all(st.up for st in store.osdmap.states.values()) or under_way(store.store):
            raise StoreError("an OSD went down or began a backfill during the change; "
                             "nothing switched (run the command again once all are up)")
        for name in sorted(set(store.list()) - names):          # created meanwhile
            if _copy_object(store, plan, name, res, locked=False):
                moved_objects.add(name)
        for key in _changed(plan):
            _copy_object(store, plan, key[0], res, only={key}, locked=False)
        with open(pool_path(store.store)) as f:
            raw = json.load(f)
        edit(raw)
        write_json_atomic(pool_path(store.store), raw)
        switched.append(True)
        store.osdmap.refresh()

    store.checkpoint(then=switch)
    state.update("switched; removing the old copies", len(names), len(names), force=True)
    store._crashpoint()
    res.objects = len(moved_objects)
    res.misplaced = remove_misplaced(store)


def state_path(store_dir: str) -> str:
    return os.path.join(store_dir, "rebalance.json")


class _State:
    """STORE/rebalance.json of a running add or rm (see the module docstring)."""

    def __init__(self, store_dir: str, op: str, osd: int, path: str):
        self.path = state_path(store_dir)
        # path: the new OSD's directory (add), or the one to empty (rm)
        self.doc = {"op": op, "osd": osd, "pid": os.getpid(), "path": path}
        self._last = 0.0

    def update(self, phase: str, done: int, total: int | None, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < 1.0:
            return
        self._last = now
        tmp = f"{self.path}.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump({**self.doc, "phase": phase, "done": done, "total": total}, f)
        os.replace(tmp, self.path)       # status only: no fsync needed

    def clear(self) -> None:
        _unlink(self.path)


def state_clear(store_dir: str) -> None:
    """Forget an interrupted add or rm (settled: ``ecfs fsck --repair``)."""
    _unlink(state_path(store_dir))


def rebalance_state(store_dir: str) -> dict | None:
    """The add or rm under way or interrupted: its rebalance.json, with
    "running" (its process still alive) and "next" (what to run if not)."""
    try:
        with open(state_path(store_dir)) as f:
            doc = json.load(f)
        pid, osd, op = int(doc["pid"]), int(doc["osd"]), doc["op"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(pid, 0)
        doc["running"] = True
    except ProcessLookupError:
        doc["running"] = False
    except PermissionError:
        doc["running"] = True
    if doc["running"]:
        doc["next"] = ""
    elif op == "rm":
        doc["next"] = f"run 'ecfs osd rm {osd}' again, or 'ecfs fsck --repair'"
    else:
        doc["next"] = ("run 'ecfs osd add' again (with the same --dir), or 'ecfs fsck "
                       "--repair' to drop what it copied")
    return doc


def _copy_object(store, plan: _Plan, name: str, res: Change, only: set | None = None,
                 locked: bool = True) -> bool:
    """Copy the shards of ``name`` whose home ``plan`` changes (``only``
    those keys), the object locked whole unless the caller holds the
    checkpoint gate (no writer anywhere); True if any shard moves."""
    old = store.osdmap.place(name, store.width)
    new = place(name, store.width, plan.ids, plan.removed)
    keys = [(name, j) for j in range(store.width) if old[j] != new[j]]
    if only is not None:
        keys = [k for k in keys if k in only]
    if not keys:
        return False
    if locked:
        with store._locked(name):
            for key in keys:
                _copy_shard(plan, key, old[key[1]], new[key[1]], res)
    else:
        for key in keys:
            _copy_shard(plan, key, old[key[1]], new[key[1]], res)
    return True


def _copy_shard(plan: _Plan, key: tuple[str, int], src_osd: int, dst_osd: int,
                res: Change) -> None:
    src_root, dst_root = plan.paths[src_osd], plan.paths[dst_osd]
    fp = _fingerprint(src_root, key)
    for rel in sf.rel_paths(*key):
        dst = os.path.join(dst_root, rel)
        src = os.path.join(src_root, rel)
        if not os.path.exists(src):
            try:
                os.unlink(dst)             # removed since an earlier copy
            except FileNotFoundError:
                pass
            continue
        os.makedirs(os.path.dirname(dst), mode=0o700, exist_ok=True)
        res.bytes += _copy_file(src, dst)
    res.shards += 1
    plan.copied[key] = (src_osd, dst_osd, fp)


def _copy_file(src: str, dst: str) -> int:
    """Copy ``src`` to ``dst`` durably, data extents only; returns bytes."""
    tmp = dst + ".copy"
    copied = 0
    with open(src, "rb") as fi, open(tmp, "wb") as fo:
        size = os.fstat(fi.fileno()).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fi.fileno(), pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                break                                   # only a hole is left
            end = os.lseek(fi.fileno(), start, os.SEEK_HOLE)
            off = start
            while off < end:
                n = _copy_range(fi.fileno(), fo.fileno(), end - off, off)
                if n == 0:
                    break
                off += n
            copied += end - start
            pos = end
        os.ftruncate(fo.fileno(), size)
        os.fsync(fo.fileno())
    os.replace(tmp, dst)
    dfd = os.open(os.path.dirname(dst), os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return copied


def _copy_range(fi: int, fo: int, n: int, off: int) -> int:
    n = min(n, 8 << 20)
    try:
        return os.copy_file_range(fi, fo, n, off, off)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise
    buf = os.pread(fi, n, off)
    return os.pwrite(fo, buf, off)


def _fingerprint(root: str, key: tuple[str, int]) -> tuple:
    """What moves when the shard is written (its header: the shard's
    version), resized, punched or replaced."""
    data, meta = (os.path.join(root, r) for r in sf.rel_paths(*key))
    out: list = []
    for p in (data, meta):
        try:
            st = os.stat(p)
            out.append((st.st_ino, st.st_size, st.st_blocks, st.st_mtime_ns, st.st_ctime_ns))
        except FileNotFoundError:
            out.append(None)
    try:
        with open(meta, "rb") as f:
            out.append(f.read(sf.HEADER_SIZE))
    except FileNotFoundError:
        out.append(None)
    return tuple(out)


def _changed(plan: _Plan) -> list[tuple[str, int]]:
    """The copied shards whose source changed since their copy (the old
    map's home: every copy in a plan is from its present home), or whose
    copy is gone."""
    return sorted(key for key, (src, dst, fp) in plan.copied.items()
                  if _fingerprint(plan.paths[src], key) != fp
                  or (fp[1] is not None and not os.path.exists(
                      os.path.join(plan.paths[dst], sf.rel_paths(*key)[1]))))


def _check_healthy(store, what: str) -> None:
    """A change moves shards of many objects: start only with every OSD up
    and current (the copies come from the shards' present homes)."""
    store.osdmap.refresh()
    bad = [(i, st.reason or "down") for i, st in sorted(store.osdmap.states.items())
           if not st.up]
    if bad:
        i, why = bad[0]
        raise InvalidArgument(f"{what} needs every OSD up and current: osd.{i} is not "
                              f"({why})")
    filling = under_way(store.store)
    if filling:
        i = sorted(filling)[0]
        raise InvalidArgument(f"{what} needs every OSD current: osd.{i} is being backfilled "
                              f"(run 'ecfs osd rebuild {i}' to finish it)")


def _empty_removed(store, osd: int, path: str | None = None) -> str | None:
    """Remove ecfs's files from a removed OSD's directory, each shard file
    under its object's lock (a reader that loaded the object before the
    switch finishes first), ``osd.json`` last so that a kill in between
    leaves it recognisable; the directory itself goes if it is the
    store's own ``osd.N``. Returns the directory, or None if it held no
    OSD of ours (already emptied)."""
    if path is None:
        path = os.path.join(store.store, f"osd.{osd}")
    if not _is_ours(path, store.pool.fsid, osd):
        return None
    _drop_osd_dir(store, osd, path, store.width)
    return path


def _drop_osd_dir(store, osd: int, path: str, width: int | None) -> None:
    """Empty an OSD directory of ours (``_remove_tree``), ``osd.json`` last,
    and remove it if it is the store's own ``osd.N``."""
    _remove_tree(store, os.path.join(path, "objects"), width)
    os.unlink(os.path.join(path, OSD_FILE))
    if os.path.realpath(path) == os.path.realpath(os.path.join(store.store, f"osd.{osd}")):
        try:
            os.rmdir(path)
        except OSError:
            pass


def _remove_tree(store, objects: str, width: int | None) -> None:
    """Unlink an OSD's ``objects/`` tree; with ``width``, each shard file
    of ours under its object's lock."""
    for sub in sorted(_listdir(objects)):
        d = os.path.join(objects, sub)
        for f in sorted(_listdir(d)):
            found = sf.shard_file_object(d, f) if width else None
            if found is not None and 0 <= found[1] < width:
                with store._locked(found[0]):
                    _unlink(os.path.join(d, f))
            else:
                _unlink(os.path.join(d, f))
        try:
            os.rmdir(d)
        except OSError:
            pass
    try:
        os.rmdir(objects)
    except OSError:
        pass


def finish_rm(store, osd: int) -> bool:
    """``ecfs fsck --repair`` of an interrupted 'osd rm': finish it if its
    switch was done (True); if not (False), the pool is as before and its
    copies are misplaced files (``remove_misplaced`` drops them)."""
    if osd not in load_pool(store.store).removed:
        return False
    _finish_rm(store, osd)
    return True


def drop_unswitched_add(store, r: dict) -> bool:
    """``ecfs fsck --repair`` of an interrupted 'osd add': killed before
    its switch, its directory (not in the pool) holds copies nobody reads:
    empty it (False). After the switch (True) only old copies are left,
    misplaced files that ``remove_misplaced`` drops."""
    osd, path = r["osd"], r.get("path")
    pool = load_pool(store.store)
    if any(e.id == osd for e in pool.osds):
        return True
    if path and _is_ours(path, pool.fsid, osd):
        _drop_osd_dir(store, osd, path, None)     # not in the pool: nobody reads it
    return False


def remove_misplaced(store, dry_run: bool = False) -> int:
    """Unlink shard files that sit on an OSD placement does not give their
    shard (old copies after an add or rm, or copies a killed one made);
    returns how many (``dry_run``: only count them). Each object is locked
    while its files go, and only a file whose object's current placement
    puts that shard elsewhere is touched."""
    removed = 0
    width = store.width
    store.osdmap.refresh()
    for osd, root in sorted(store.osdmap.paths.items()):
        if not store.osdmap.is_up(osd):
            continue
        objects = os.path.join(root, "objects")
        for sub in sorted(_listdir(objects)):
            d = os.path.join(objects, sub)
            for f in sorted(_listdir(d)):
                if f.endswith(".copy"):                  # a copy killed half way
                    removed += dry_run or _unlink(os.path.join(d, f))
                    continue
                found = sf.shard_file_object(d, f)
                if found is None or not 0 <= found[1] < width:
                    continue                   # not a shard file of ours: not touched
                name, shard = found
                if store.osdmap.place(name, width)[shard] == osd:
                    continue
                if dry_run:
                    removed += 1
                    continue
                with store._locked(name):
                    if store.osdmap.place(name, width)[shard] != osd and \
                            _unlink(os.path.join(d, f)):
                        removed += 1
    return removed


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False

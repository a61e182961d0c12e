"""OSD directories and their up/down state.

An OSD is down when the admin marked it down (``osdmap.json``), when its
directory, its ``osd.json`` or its ``objects/`` is missing or damaged, or
names another store, or when an I/O call on it failed (then it is marked
down in ``osdmap.json`` too, so it stays down until ``ecfs osd up``). Reads
and writes skip down OSDs; the shards they hold are rebuilt from the others.

``osdmap.json`` is ``{"down": [ids], "reasons": {"id": "why"},
"recovering": [ids]}``. A missing file means no OSD is marked down; a
damaged one (not JSON, another shape, unknown OSD ids) is a StoreError
naming it, never read as "all up".

Recovering: ``ecfs osd up N`` marks the OSD recovering while it rebuilds
what N missed. It is not up (nothing counts on it, and a shard of it is
read only if its header says it is current), but it is *writable*: every
process's writes go to each shard of it that is current, like an up
OSD's, and log the stale ones as missed. So an object recovered stays
current under a writer that keeps writing it, and the recovery ends
(without this, a writer touching objects faster than they are rebuilt
kept ``osd up`` going for ever). An I/O error or ``osd down`` ends it.

The OSD set itself follows pool.json ('ecfs osd add', 'rm', 'replace' by
any process; it is part of the change stamp). A refresh computes the
paths, the placement ids (live and removed) and the states of one
pool.json, publishes them together as new objects (never changed in
place: other threads iterate them) and moves the generation last. A view
loaded before it is stale by its generation; until it notices, an id its
plan names that the map no longer has (or does not have yet) reads as
down. osdmap.json never names an OSD outside the pool: ids of removed
OSDs in it (written by a process whose map predated the rm) are ignored.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import threading
import time
import weakref
from dataclasses import dataclass

from .errors import EcfsError, StoreError
from .missed import MissedLog
from .placement import place
from .pool import OSD_FILE, PoolConfig, load_pool, osd_abspath, write_json_atomic


# maybe_refresh trusts a directory's unchanged mtime once it is this old
QUICK_TRUST_NS = 100_000_000


def _trusted(quick: tuple) -> bool:
    """Whether the directories' mtimes are old enough that a change now
    would move them. An mtime of whole seconds says the file system keeps
    no finer ones (ext4 with small inodes, FAT, some network file systems):
    a second change in the same second would not show, so it is never
    trusted (the stat calls run every time, as before)."""
    now = time.time_ns()
    return all(m % 1_000_000_000 and now - m > QUICK_TRUST_NS for m, _ in quick)


def _mtimes(fds: tuple[int, ...]) -> tuple | None:
    if not fds:
        return None
    try:
        return tuple((st.st_mtime_ns, st.st_size) for st in map(os.fstat, fds))
    except OSError:
        return None


def _close_all(fds: list[int]) -> None:
    while fds:
        try:
            os.close(fds.pop())
        except OSError:
            pass


@dataclass
class OsdState:
    id: int
    path: str
    up: bool
    reason: str = ""
    recovering: bool = False     # not up, but writable (see the module docstring)


class OsdMap:
    def __init__(self, store: str, pool: PoolConfig):
        self.store = store
        self.pool = pool
        self._lock = threading.Lock()
        self.paths = {e.id: osd_abspath(store, e) for e in pool.osds}
        self._stamp_paths = (self._mapfile(), os.path.join(store, "missed"),
                             os.path.join(store, "pool.json"))
        # (live ids, removed ids): one attribute, so placement never pairs
        # the ids of one pool.json with the removed ids of another
        self._layout = (tuple(sorted(self.paths)), tuple(pool.removed))
        self.generation = 0      # counts changes of the states (a write planned on an
        self.states = {}         # older generation is planned again: objectstore)
        self._dir_fds: tuple[int, ...] = ()     # maybe_refresh's quick check
        self._all_fds: list[int] = []
        self._quick_seen: tuple | None = None
        weakref.finalize(self, _close_all, self._all_fds)
        self.refresh()

    def _mapfile(self) -> str:
        return os.path.join(self.store, "osdmap.json")

    @property
    def ids(self) -> tuple[int, ...]:
        return self._layout[0]

    @property
    def removed(self) -> tuple[int, ...]:
        return self._layout[1]

    def _read_map(self, live=None, removed=None) -> tuple[set[int], dict[str, str], set[int]]:
        """(ids marked down, reasons, ids recovering) from osdmap.json,
        checked against the pool's ``live`` and ``removed`` ids (default:
        this map's)."""
        live = set(self.paths) if live is None else set(live)
        gone = set(self.removed if removed is None else removed)
        path = self._mapfile()
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError:
            return set(), {}, set()
        except PermissionError:
            raise StoreError(f"cannot read {path}: permission denied")
        except (OSError, ValueError) as e:
            raise StoreError(f"{path} is damaged ({getattr(e, 'strerror', None) or e}); "
                             f"expected {{\"down\": [ids], \"reasons\": {{...}}}}")
        down = d.get("down", []) if isinstance(d, dict) else None
        reasons = d.get("reasons", {}) if isinstance(d, dict) else None
        rec = d.get("recovering", []) if isinstance(d, dict) else None
        if not isinstance(down, list) or not isinstance(reasons, dict) \
                or not isinstance(rec, list) \
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in down + rec) \
                or not all(isinstance(k, str) and k.isdigit() and isinstance(v, str)
                           for k, v in reasons.items()):
            raise StoreError(f"{path} is damaged: expected "
                             f"{{\"down\": [ids], \"reasons\": {{\"id\": \"why\"}}}}")
        # a process whose map predates an 'osd rm' may have marked the
        # removed OSD down: that entry means nothing now
        down, rec = [i for i in down if i not in gone], [i for i in rec if i not in gone]
        reasons = {k: v for k, v in reasons.items() if int(k) not in gone}
        unknown = sorted((set(down) | set(rec) | {int(k) for k in reasons}) - live)
        if unknown:
            raise StoreError(f"{path} is damaged: it names osd.{unknown[0]}, "
                             f"which this store does not have")
        return set(down), dict(reasons), set(rec)

    def _admin_down(self, live, removed) -> tuple[dict[int, str], set[int]]:
        down, reasons, rec = self._read_map(live, removed)
        return {int(k): v for k, v in reasons.items()} | \
            {i: reasons.get(str(i), "marked down") for i in down}, rec

    def _stamp(self) -> tuple:
        """What changes when another process marks an OSD down or up, or an
        OSD starts or stops missing writes: the map file and the missed-log
        directory (files appear and go there)."""
        out = []
        for p in self._stamp_paths:
            try:
                st = os.stat(p)
                out.append((st.st_mtime_ns, st.st_ino, st.st_size))
            except OSError:
                out.append(None)
        return tuple(out)

    def maybe_refresh(self) -> None:
        """Refresh if another process changed the map, so a long-running
        process (a mount) follows 'ecfs osd down/up'.

        Called on every fast read and every commit, so it first asks the
        two directories the stamp's files live in: pool.json and
        osdmap.json are only ever replaced by a rename (write_json_atomic),
        which moves the store directory's mtime, and missed logs appear
        (never go: the directory stays) in missed/. Two fstat calls on kept
        fds (0.9 us) say nothing changed, where the stamp's three stat
        calls took 2.3 us. A directory's mtime comes from the kernel's
        coarse clock (a tick late, up to 10 ms), so it is trusted only once
        it is QUICK_TRUST_NS old: a second change within the same tick
        would show the same mtime (and never on a file system of whole-
        second mtimes: ``_trusted``)."""
        fds = self._dir_fds
        quick = _mtimes(fds)
        if quick is not None and quick == self._quick_seen:
            return
        if self._stamp() != self._seen:
            self.refresh()
        if len(fds) < 2 and self._open_dirs() != fds:
            # fds opened after the stamp was taken: their mtimes are no
            # baseline (a change in between would pass for seen)
            self._quick_seen = None
            return
        self._quick_seen = quick if quick is not None and _trusted(quick) else None

    def _open_dirs(self) -> tuple[int, ...]:
        """Open the store directory and missed/ (once it is there: its
        making moves the store directory's mtime) for the quick check; the
        fds stay open until this map goes (threads fstat them lock-free)."""
        with self._lock:
            fds = self._dir_fds
            try:
                for p in (self.store, self._stamp_paths[1])[len(fds):]:
                    fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY)
                    self._all_fds.append(fd)
                    fds += (fd,)
            except OSError:
                pass            # missed/ not there yet (or no fd left: stat calls)
            self._dir_fds = fds
            return fds

    def refresh(self) -> None:
        """Read the map again. Everything is computed first and then
        published together, the generation last: a reader that took the
        generation before sees its view go stale; one that took it after
        sees paths, placement and states of the same pool.json."""
        self._seen = self._stamp()
        paths, layout = self._load_paths()
        admin, recovering = self._admin_down(paths, layout[1])
        states = {}
        for i, p in paths.items():
            why = self.check_dir(i, p) if i not in admin or i in recovering else ""
            if i in recovering and not why:
                states[i] = OsdState(i, p, False, f"recovering ('ecfs osd up {i}' under way)",
                                     recovering=True)
            elif i in admin:
                states[i] = OsdState(i, p, False, admin[i])
            else:
                states[i] = OsdState(i, p, not why, why)
        # an OSD that missed writes stays out until 'osd up' rebuilt them,
        # even if its directory is back (backend/missed.py)
        for i in MissedLog(self.store).behind():
            if i in states and states[i].up:
                states[i] = OsdState(i, states[i].path, False,
                                     f"behind: missed writes to recover (run 'ecfs osd up {i}')")
        with self._lock:
            changed = states != self.states or layout != self._layout
            # new dicts, never ones changed in place: other threads iterate them
            self.paths, self._layout, self.states = paths, layout, states
            if changed:
                self.generation += 1

    def _load_paths(self) -> tuple[dict[int, str], tuple]:
        """The pool's OSD directories and (live ids, removed ids) as
        pool.json has them now ('ecfs osd replace', 'add' and 'rm' by
        another process), without publishing them."""
        try:
            pool = load_pool(self.store)
        except EcfsError:
            return self.paths, self._layout   # damaged now: the next open says so
        paths = {e.id: osd_abspath(self.store, e) for e in pool.osds}
        return paths, (tuple(sorted(paths)), tuple(pool.removed))

    def place(self, name: str, width: int) -> list[int]:
        """The OSD of each shard of ``name`` on this map (backend/placement.py)."""
        ids, removed = self._layout
        return place(name, width, ids, removed)

    def check_dir(self, i: int, p: str) -> str:
        """Why OSD directory ``p`` cannot serve as osd.i ('' if it can)."""
        if not os.path.isdir(p):
            return "directory missing" if not os.path.lexists(p) else "not a directory"
        try:
            with open(os.path.join(p, OSD_FILE)) as f:
                d = json.load(f)
        except FileNotFoundError:
            return f"{OSD_FILE} missing"
        except PermissionError:
            return f"{OSD_FILE} unreadable: permission denied"
        except OSError as e:
            return f"{OSD_FILE} unreadable: {e.strerror or e}"
        except ValueError:
            return f"{OSD_FILE} damaged"
        if not isinstance(d, dict):
            return f"{OSD_FILE} damaged"
        if d.get("fsid") != self.pool.fsid:
            return "directory belongs to another store"
        if d.get("osd_id") != i:
            return "directory belongs to another OSD"
        if not os.path.isdir(os.path.join(p, "objects")):
            return "objects/ missing"
        return ""

    # An id this map no longer has ('osd rm'), or not yet (a view planned
    # on another thread's newer map), is down: a read decodes around it and
    # a write planned with it plans again at its commit.
    def is_up(self, osd: int) -> bool:
        st = self.states.get(osd)
        return st is not None and st.up

    def is_recovering(self, osd: int) -> bool:
        st = self.states.get(osd)
        return st is not None and st.recovering

    def writable(self, osd: int) -> bool:
        """Up, or recovering: writes go to its current shards."""
        st = self.states.get(osd)
        return st is not None and (st.up or st.recovering)

    def up_ids(self) -> list[int]:
        return [i for i, s in self.states.items() if s.up]

    def mark_down(self, osd: int, reason: str) -> None:
        """Persistently mark an OSD down (admin command or I/O failure)."""
        with self._lock:
            st = self.states.get(osd)
            if st is None:
                return             # taken out by 'osd rm' since this view was loaded
            if not st.up and st.reason == reason:
                return
            self.states[osd] = OsdState(osd, st.path, False, reason)
            self.generation += 1
        self._edit(lambda down, reasons, rec: (down | {osd}, reasons | {str(osd): reason},
                                               rec - {osd}))

    def mark_up(self, osd: int) -> None:
        self._edit(lambda down, reasons, rec: (
            down - {osd}, {k: v for k, v in reasons.items() if k != str(osd)}, rec - {osd}))
        self.refresh()

    def mark_recovering(self, osd: int, on: bool = True) -> None:
        """``osd up`` starts (or gives up) rebuilding a down OSD: writers
        include its current shards meanwhile. It stays marked down."""
        self._edit(lambda down, reasons, rec: (down, reasons,
                                               rec | {osd} if on else rec - {osd}))
        self.refresh()

    def _edit(self, fn) -> None:
        path = self._mapfile()
        try:
            lfd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise StoreError(f"cannot update {path}: {e.strerror or e}")
        try:
            fcntl.flock(lfd, fcntl.LOCK_EX)
            paths, (ids, removed) = self._load_paths()
            down, reasons, rec = fn(*self._read_map(ids, removed))
            live = set(ids)                 # never name an OSD 'osd rm' took out
            down, rec = {i for i in down if i in live}, {i for i in rec if i in live}
            reasons = {k: v for k, v in reasons.items() if int(k) in live}
            doc = {"down": sorted(down), "reasons": reasons}
            if rec:
                doc["recovering"] = sorted(rec)
            write_json_atomic(path, doc)
        except OSError as e:
            raise StoreError(f"cannot update {path}: {e.strerror or e}")
        finally:
            os.close(lfd)

    def usage(self, osd: int) -> int:
        """Bytes the OSD's shard files occupy on disk."""
        total = 0
        root = os.path.join(self.paths[osd], "objects")
        for dirpath, _, files in os.walk(root):
            for f in files:
                try:
                    total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
                except OSError:
                    pass
        return total

    def free_bytes(self) -> dict[int, tuple[int, int]]:
        """{st_dev: (free, total)} over the OSDs' distinct file systems."""
        out = {}
        for i, p in self.paths.items():
            try:
                st = os.stat(p)
                du = shutil.disk_usage(p)
                out[st.st_dev] = (du.free, du.total)
            except OSError:
                pass
        return out

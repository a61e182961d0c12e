"""OSD directories and their up/down state.

An OSD is down when the admin marked it down (``osdmap.json``), when its
directory or its ``osd.json`` is missing or names another store, or when an
I/O call on it failed (then it is marked down in ``osdmap.json`` too, so it
stays down until ``ecfs osd up``). Reads and writes skip down OSDs; the
shards they hold are rebuilt from the others.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import threading
from dataclasses import dataclass

from .pool import OSD_FILE, PoolConfig, osd_abspath, write_json_atomic


@dataclass
class OsdState:
    id: int
    path: str
    up: bool
    reason: str = ""


class OsdMap:
    def __init__(self, store: str, pool: PoolConfig):
        self.store = store
        self.pool = pool
        self._lock = threading.Lock()
        self.paths = {e.id: osd_abspath(store, e) for e in pool.osds}
        self.ids = tuple(sorted(self.paths))
        self.refresh()

    def _mapfile(self) -> str:
        return os.path.join(self.store, "osdmap.json")

    def _admin_down(self) -> dict[int, str]:
        try:
            with open(self._mapfile()) as f:
                d = json.load(f)
            return {int(k): v for k, v in d.get("reasons", {}).items()} | \
                {int(i): d.get("reasons", {}).get(str(i), "marked down")
                 for i in d.get("down", [])}
        except (OSError, ValueError):
            return {}

    def refresh(self) -> None:
        admin = self._admin_down()
        states = {}
        for i, p in self.paths.items():
            if i in admin:
                states[i] = OsdState(i, p, False, admin[i])
                continue
            try:
                with open(os.path.join(p, OSD_FILE)) as f:
                    d = json.load(f)
                if d.get("fsid") != self.pool.fsid or d.get("osd_id") != i:
                    states[i] = OsdState(i, p, False, "directory belongs to another OSD")
                else:
                    states[i] = OsdState(i, p, True)
            except FileNotFoundError:
                states[i] = OsdState(i, p, False, "directory missing")
            except (OSError, ValueError) as e:
                states[i] = OsdState(i, p, False, f"unreadable: {e}")
        with self._lock:
            self.states = states

    def is_up(self, osd: int) -> bool:
        return self.states[osd].up

    def up_ids(self) -> list[int]:
        return [i for i, s in self.states.items() if s.up]

    def mark_down(self, osd: int, reason: str) -> None:
        """Persistently mark an OSD down (admin command or I/O failure)."""
        with self._lock:
            if not self.states[osd].up and self.states[osd].reason == reason:
                return
            self.states[osd] = OsdState(osd, self.paths[osd], False, reason)
        self._edit(lambda down, reasons: (down | {osd}, reasons | {str(osd): reason}))

    def mark_up(self, osd: int) -> None:
        self._edit(lambda down, reasons: (down - {osd},
                                          {k: v for k, v in reasons.items() if k != str(osd)}))
        self.refresh()

    def _edit(self, fn) -> None:
        path = self._mapfile()
        lfd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lfd, fcntl.LOCK_EX)
            try:
                with open(path) as f:
                    d = json.load(f)
            except (OSError, ValueError):
                d = {}
            down, reasons = fn(set(d.get("down", [])), dict(d.get("reasons", {})))
            write_json_atomic(path, {"down": sorted(down), "reasons": reasons})
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

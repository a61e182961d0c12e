"""Full OSDs: writes are refused before they start, reads go on.

Ceph stops writing to an OSD past its full ratio (``mon_osd_full_ratio``,
0.95) and keeps serving reads; it never takes a full OSD out. Here the same
rule is applied per transaction, before it is journaled: an OSD whose file
system is into its reserve is *full*, and a transaction putting bytes on it
is refused with NoSpace, nothing changed. So is one whose bytes would not
fit in what is left (less ``SLACK`` for file system metadata). Running into
ENOSPC in the middle of applying a journaled transaction (which would leave
one shard behind) then only happens when something else fills the disk
faster than the estimate below.

The reserve of a file system is ``(1 - FULL_RATIO)`` of its size, at least
``MIN_RESERVE``. Transactions that free space (removals, discards, shrinks)
go through on a full OSD while their bytes fit, as Ceph lets deletes
through on a full cluster.

Free space is read with statvfs at most every ``REFRESH`` seconds per file
system; in between, the bytes this process wrote there are subtracted from
the last reading.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Callable

from .errors import NoSpace

FULL_RATIO = float(os.environ.get("ECFS_FULL_RATIO", "0.97"))
NEARFULL_RATIO = 0.85      # status warns from here on (Ceph's mon_osd_nearfull_ratio)
MIN_RESERVE = 1 << 20
SLACK = 256 << 10
REFRESH = 0.5


@dataclass
class FsSpace:
    free: int           # bytes available to this process (f_bavail)
    total: int
    at: float           # when free was read
    written: int = 0    # bytes written here since

    @property
    def reserve(self) -> int:
        return max(MIN_RESERVE, int(self.total * (1 - FULL_RATIO)))


class SpaceGuard:
    def __init__(self, paths: Callable[[], dict[int, str]]):
        self._paths = paths       # the OSD map's present {id: directory}
        self._lock = threading.Lock()
        self._dev: dict[int, int] = {}
        self._fs: dict[int, FsSpace] = {}

    def _space(self, osd: int, now: float) -> FsSpace | None:
        dev = self._dev.get(osd)
        if dev is None:
            try:
                dev = self._dev[osd] = os.stat(self._paths()[osd]).st_dev
            except (OSError, KeyError):     # KeyError: taken out by 'osd rm'
                return None       # unreachable: the I/O itself will tell
        fs = self._fs.get(dev)
        if fs is None or now - fs.at > REFRESH:
            try:
                st = os.statvfs(self._paths()[osd])
            except (OSError, KeyError):
                return None
            fs = self._fs[dev] = FsSpace(st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize, now)
        return fs

    def check(self, needs: dict[int, int], frees: bool) -> None:
        """Refuse (NoSpace) a transaction putting ``needs[osd]`` bytes on
        each OSD if any of their file systems is into its reserve already
        (full), or the bytes would not fit in what is left less SLACK; a
        transaction that ``frees`` space is refused only if it does not fit
        at all. Else count the bytes against them."""
        now = time.monotonic()
        with self._lock:
            per_fs: dict[int, tuple[FsSpace, int, list[int]]] = {}
            for osd, n in needs.items():
                fs = self._space(osd, now)
                if fs is None or n <= 0:
                    continue
                _, tot, osds = per_fs.get(id(fs), (fs, 0, []))
                per_fs[id(fs)] = (fs, tot + n, osds + [osd])
            for fs, n, osds in per_fs.values():
                before = fs.free - fs.written
                full = before < fs.reserve or before - n < SLACK
                if full if not frees else before - n < 0:
                    names = ", ".join(f"osd.{o}" for o in sorted(osds))
                    what = "full" if before < fs.reserve else \
                        f"nearly full, too little room for this write ({_mib(n)})"
                    raise NoSpace(
                        f"{names} {what}: {_mib(before)} free of {_mib(fs.total)} "
                        f"(reserve {_mib(fs.reserve)}); writes are refused until space is "
                        f"freed there or OSDs are added; reads go on")
            for fs, n, _ in per_fs.values():
                fs.written += n

    def forget(self) -> None:
        """Read free space afresh at the next check (e.g. after ENOSPC)."""
        with self._lock:
            self._fs.clear()
            self._dev.clear()     # an OSD may have moved to another disk (osd replace)


def full_osds(paths: dict[int, str]) -> dict[int, tuple[str, str]]:
    """{osd: (level, why)}, level "full" for an OSD whose file system is into
    its reserve (writes refused), "nearfull" past NEARFULL_RATIO."""
    out = {}
    for osd, p in paths.items():
        try:
            st = os.statvfs(p)
        except OSError:
            continue
        fs = FsSpace(st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize, 0.0)
        used = 1 - fs.free / fs.total if fs.total else 1.0
        level = "full" if fs.free < fs.reserve else "nearfull" if used >= NEARFULL_RATIO else ""
        if level:
            out[osd] = (level, f"{level}: {used:.0%} used, {_mib(fs.free)} free "
                               f"of {_mib(fs.total)}")
    return out


def _mib(n: int) -> str:
    return f"{max(n, 0) / (1 << 20):.1f} MiB"

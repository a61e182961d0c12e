"""Which ecfs mounts are live: the kernel's mount table and a small
registry of mount processes. Mount points are given resolved (callers use
``resolve``); nothing here touches the mount point itself.

Each mount process writes ``RUNDIR/mounts/<sha1 of the mount point>.json``
(JSON: pid, mountpoint, store, read_only, exclusive, started), where RUNDIR
is ``/run/ecfs`` for root, else ``$XDG_RUNTIME_DIR/ecfs`` or
``/tmp/ecfs-UID``. ``ecfs umount`` finds the process to stop there; ``rbd
map`` finds "the one live mount of this store" there. A record whose
process is gone, or whose mount point is no longer an ecfs mount, is stale
and ignored (and removed when seen).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass

from backend.procs import pid_alive

FSTYPE = "fuse.ecfs"


def rundir() -> str:
    if os.geteuid() == 0:
        base = "/run/ecfs"
    elif os.environ.get("XDG_RUNTIME_DIR"):
        base = os.path.join(os.environ["XDG_RUNTIME_DIR"], "ecfs")
    else:
        base = f"/tmp/ecfs-{os.getuid()}"
    d = os.path.join(base, "mounts")
    os.makedirs(d, mode=0o700, exist_ok=True)
    return d


@dataclass
class MountRecord:
    pid: int
    mountpoint: str
    store: str
    read_only: bool = False
    exclusive: bool = False
    started: float = 0.0


def _path(mountpoint: str) -> str:
    # never stat the mount point here: the mount process itself calls this,
    # and a stat of its own mount before (or after) it serves would hang
    h = hashlib.sha1(os.path.abspath(mountpoint).encode()).hexdigest()
    return os.path.join(rundir(), f"{h}.json")


def register(rec: MountRecord) -> None:
    p = _path(rec.mountpoint)
    tmp = f"{p}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(asdict(rec), f)
    os.replace(tmp, p)


def unregister(mountpoint: str, pid: int) -> None:
    rec = lookup(mountpoint, live_only=False)
    if rec is not None and rec.pid == pid:
        try:
            os.unlink(_path(mountpoint))
        except FileNotFoundError:
            pass


def lookup(mountpoint: str, live_only: bool = True) -> MountRecord | None:
    try:
        with open(_path(mountpoint)) as f:
            rec = MountRecord(**json.load(f))
    except (OSError, ValueError, TypeError):
        return None
    if live_only and not (pid_alive(rec.pid) and fstype(rec.mountpoint) == FSTYPE):
        return None
    return rec


def live_mounts(store: str | None = None) -> list[MountRecord]:
    out = []
    d = rundir()
    for f in sorted(os.listdir(d)):
        if not f.endswith(".json"):
            continue
        try:
            with open(os.path.join(d, f)) as fh:
                rec = MountRecord(**json.load(fh))
        except (OSError, ValueError, TypeError):
            continue
        if not (pid_alive(rec.pid) and fstype(rec.mountpoint) == FSTYPE):
            try:
                os.unlink(os.path.join(d, f))
            except OSError:
                pass
            continue
        if store is None or os.path.abspath(rec.store) == os.path.abspath(store):
            out.append(rec)
    return out


def resolve(mountpoint: str) -> str:
    """The mount point without symlinks (a stale FUSE mount answers the
    lstat with ENOTCONN, which realpath passes over)."""
    return os.path.realpath(mountpoint)


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n") \
        .replace("\\134", "\\")


def fstype(mountpoint: str) -> str | None:
    """The file system type mounted at ``mountpoint`` (an absolute path with
    no symlinks; the top mount there), or None. Reads the mount table only."""
    want = os.path.abspath(mountpoint)
    found = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split()
                sep = parts.index("-")
                if _unescape(parts[4]) == want:
                    found = parts[sep + 1]
    except (OSError, ValueError):
        return None
    return found


def is_stale(mountpoint: str) -> bool:
    """A FUSE mount whose daemon is gone: the kernel answers ENOTCONN."""
    try:
        os.stat(mountpoint)
    except OSError as e:
        return e.errno in (107, 103)      # ENOTCONN, ECONNABORTED
    return False


def ecfs_mount_points(store: str) -> list[str]:
    """Mount points of fuse.ecfs mounts of ``store`` in the mount table,
    live or stale (the mount's source is ``ecfs:STORE``)."""
    want = "ecfs:" + os.path.abspath(store)
    out = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split()
                sep = parts.index("-")
                if parts[sep + 1] == FSTYPE and _unescape(parts[sep + 2]) == want:
                    out.append(_unescape(parts[4]))
    except (OSError, ValueError, IndexError):
        pass
    return out

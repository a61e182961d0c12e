"""Real mounts for tests: mount with the CLI, always clean up (unmount,
kill the mount process by pid) even when the test fails."""
from __future__ import annotations

import os
import signal
import subprocess
from contextlib import contextmanager

import pytest

from ecfs import mounts

from ..waiting import wait_for
from .util import ecfs


def mount_pid(mnt) -> int | None:
    rec = mounts.lookup(mounts.resolve(str(mnt)))
    return rec.pid if rec else None


def force_unmount(mnt) -> None:
    mnt = str(mnt)
    if mounts.fstype(mounts.resolve(mnt)) is not None:
        subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
    if mounts.fstype(mounts.resolve(mnt)) is not None:
        subprocess.run(["umount", "-l", mnt], capture_output=True)


@contextmanager
def mounted(store, mnt, *opts, env=None):
    """``ecfs mount MNT OPTS`` (daemonized) for the block's duration."""
    os.makedirs(mnt, exist_ok=True)
    pid = None
    try:
        ecfs(store, "mount", mnt, *opts, env=env)
        assert mounts.fstype(mounts.resolve(str(mnt))) == mounts.FSTYPE
        pid = mount_pid(mnt)
        assert pid is not None
        yield pid
    finally:
        if pid is not None and mounts.pid_alive(pid):
            ecfs(store, "umount", mnt, check=False)
        force_unmount(mnt)
        if pid is not None and mounts.pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: not mounts.pid_alive(pid), what="mount process gone")


def need_root():
    if os.geteuid() != 0:
        pytest.skip("mount tests need root (FUSE, loop devices)")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")


def losetup_detach_all_for(path_prefix: str) -> None:
    """Detach loop devices whose backing file lies under path_prefix."""
    import json
    p = subprocess.run(["losetup", "--list", "--json", "--output", "NAME,BACK-FILE"],
                       capture_output=True, text=True)
    if p.returncode != 0 or not p.stdout.strip():
        return
    for dev in json.loads(p.stdout).get("loopdevices", []):
        if (dev.get("back-file") or "").startswith(path_prefix):
            subprocess.run(["losetup", "-d", dev["name"]], capture_output=True)

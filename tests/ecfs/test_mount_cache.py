"""The stripe cache through a real mount: writes wait in it, fsync makes
them durable, CLI readers and snapshots see them, a SIGKILL loses only
what no fsync covered, a broken lock drops them and fails the fsync."""
import errno
import os
import signal
import subprocess
import sys

import pytest

from backend import counters
from ecfs import mounts

from ..backend.util import check_parity
from .mountutil import mounted, need_root, wait_for
from .util import ecfs

MiB = 1 << 20


@pytest.fixture
def store(tmp_path):
    need_root()
    st = tmp_path / "s"
    ecfs(st, "init")
    ecfs(st, "rbd", "create", "c", "--size", "16")
    yield st


def _counters(store):
    # read in this process: a child (ecfs status) would inherit the open
    # image fd, and its exit would close it: a FUSE flush
    return counters.totals(str(store))


def _export(store, tmp_path, spec="c"):
    out = tmp_path / f"exp{len(os.listdir(tmp_path))}"
    ecfs(store, "rbd", "export", spec, str(out), "--no-progress")
    return out.read_bytes()


_WRITER = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
for line in sys.stdin:
    op, *a = line.split()
    try:
        if op == "w":
            os.pwrite(fd, bytes.fromhex(a[1]), int(a[0]))
        elif op == "r":
            sys.stdout.write(os.pread(fd, int(a[1]), int(a[0])).hex())
        elif op == "f":
            os.fsync(fd)
        sys.stdout.write("ok\n")
    except OSError as e:
        sys.stdout.write(f"err {e.errno}\n")
    sys.stdout.flush()
"""


class Writer:
    """A process holding the image open: the test's own children (ecfs
    export, snap create) then hold no copy of its fd, whose close alone
    would flush (FUSE flush on every close)."""

    def __init__(self, path):
        self.p = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], text=True,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def _do(self, line):
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        out = self.p.stdout.readline()
        if out.startswith("err "):
            raise OSError(int(out.split()[1]), line)
        assert out.endswith("ok\n"), out
        return out[:-3]

    def write(self, off, data):
        self._do(f"w {off} {data.hex()}")

    def read(self, off, n):
        return bytes.fromhex(self._do(f"r {off} {n}"))

    def fsync(self):
        self._do("f")

    def close(self):
        self.p.kill()
        self.p.wait()


def test_writes_wait_in_the_cache_until_fsync_and_cli_readers_see_them(store, tmp_path):
    mnt = tmp_path / "mnt"
    with mounted(store, mnt):
        w = Writer(mnt / "c")
        try:
            a = os.urandom(4096)
            before = _counters(store)
            w.write(4 * MiB + 8192, a)       # object 1: prepared by its first write
            w.write(4 * MiB + 12288, a)      # then cached on the loop
            c = _counters(store)
            assert c["cache_writes"] - before["cache_writes"] == 2
            assert c["cache_dirty_bytes"] == 8192
            out = ecfs(store, "status").stdout.decode()
            assert "cache:   8 KiB dirty now; 2 writes absorbed" in out, out
            assert w.read(4 * MiB + 8192, 8192) == a + a                 # a hit
            # an export asks the mount to flush first
            img = _export(store, tmp_path)
            assert img[4 * MiB + 8192:4 * MiB + 16384] == a + a
            assert _counters(store)["cache_dirty_bytes"] == 0
            w.write(4 * MiB + 50, b"x" * 100)
            assert _counters(store)["cache_dirty_bytes"] == 100
            w.fsync()
            assert _counters(store)["cache_dirty_bytes"] == 0
            # a snapshot from the CLI holds every write that returned
            w.write(4 * MiB, b"y" * 4096)
            assert _counters(store)["cache_dirty_bytes"] == 4096
            ecfs(store, "rbd", "snap", "create", "c@s1")
            assert _export(store, tmp_path, "c@s1")[4 * MiB:4 * MiB + 4096] == b"y" * 4096
            w.write(4 * MiB, b"v" * 4096)
            assert w.read(4 * MiB, 4096) == b"v" * 4096
            assert _export(store, tmp_path, "c@s1")[4 * MiB:4 * MiB + 4096] == b"y" * 4096
        finally:
            w.close()
    check_parity(str(store))


def test_sigkill_keeps_every_fsynced_write(store, tmp_path):
    mnt = tmp_path / "mnt"
    synced = os.urandom(MiB)
    with mounted(store, mnt) as pid:
        fd = os.open(mnt / "c", os.O_RDWR)
        try:
            for off in range(0, MiB, 4096):
                os.pwrite(fd, synced[off:off + 4096], 2 * MiB + off)
            os.fsync(fd)
            for off in range(0, MiB, 4096):        # these may be lost
                os.pwrite(fd, b"z" * 4096, 8 * MiB + off)
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: not mounts.pid_alive(pid), what="mount killed")
        finally:
            try:
                os.close(fd)
            except OSError:
                pass
    img = _export(store, tmp_path)
    assert img[2 * MiB:3 * MiB] == synced
    tail = img[8 * MiB:9 * MiB]
    # never torn inside a page: each 4K write is all there or not at all
    for off in range(0, MiB, 4096):
        assert tail[off:off + 4096] in (bytes(4096), b"z" * 4096)
    check_parity(str(store))


def test_a_broken_lock_drops_cached_writes_and_fails_the_fsync(store, tmp_path):
    mnt = tmp_path / "mnt"
    with mounted(store, mnt):
        w = Writer(mnt / "c")
        try:
            w.write(0, b"a" * 4096)
            w.fsync()
            w.write(0, b"b" * 4096)
            assert _counters(store)["cache_dirty_bytes"] == 4096
            ecfs(store, "rbd", "lock", "rm", "c")
            with pytest.raises(OSError) as e:
                w.fsync()
            assert e.value.errno == errno.EIO
        finally:
            w.close()
    # the old owner's cached bytes never reached the store
    assert _export(store, tmp_path)[:4096] == b"a" * 4096


def test_cache_size_0_writes_through(store, tmp_path):
    mnt = tmp_path / "mnt"
    with mounted(store, mnt, "--cache-size", "0"):
        before = _counters(store)
        with open(mnt / "c", "r+b", buffering=0) as f:
            f.write(b"q" * 8192)
            after = _counters(store)
            assert after["cache_writes"] == before["cache_writes"]
            assert after["client_write_ops"] > before["client_write_ops"]


def test_fio_verify_through_the_cache(store, tmp_path):
    mnt = tmp_path / "mnt"
    with mounted(store, mnt):
        p = subprocess.run(["fio", "--name=v", f"--filename={mnt / 'c'}", "--size=12M",
                            "--rw=randwrite", "--bs=4k", "--ioengine=psync", "--direct=1",
                            "--verify=crc32c", "--do_verify=1", "--randseed=5"],
                           capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert p.returncode == 0 and "err= 0" in p.stdout, p.stdout + p.stderr
        assert _counters(store)["cache_writes"] > 0
    check_parity(str(store))

"""pyfuse3 built with patches/pyfuse3-3.5.0-fallocate.patch: fallocate(2) on a
real mount reaches Operations.fallocate with the right mode/offset/length,
FUSEError errnos come back to the caller, and a file system that does not
override fallocate answers "Operation not supported" instead of crashing.

The file system under test is a tiny pyfuse3 one (one 64 KiB file backed by a
bytearray) run in a subprocess with this interpreter; it appends one JSON line
[mode, off, length] per fallocate call to a log file outside the mount."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest

pyfuse3 = pytest.importorskip("pyfuse3")

if not hasattr(pyfuse3.Operations, "fallocate"):
    pytest.skip("pyfuse3 lacks Operations.fallocate (stock pyfuse3; "
                "scripts/build-pyfuse3 VENV builds the patched one)", allow_module_level=True)

KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE = 0x01, 0x02, 0x10
SIZE = 64 * 1024
FILL = 0xAB

FS_SOURCE = r'''
import errno, json, stat, sys, time
import pyfuse3, trio
from pyfuse3 import FUSEError

MNT, LOG, KIND = sys.argv[1:4]
FILE_INO = pyfuse3.ROOT_INODE + 1
KEEP_SIZE, PUNCH_HOLE, ZERO_RANGE = 0x01, 0x02, 0x10


class Base(pyfuse3.Operations):
    def __init__(self):
        super().__init__()
        self.data = bytearray(b"\xab" * 65536)

    async def getattr(self, inode, ctx=None):
        e = pyfuse3.EntryAttributes()
        if inode == pyfuse3.ROOT_INODE:
            e.st_mode, e.st_nlink, e.st_size = stat.S_IFDIR | 0o755, 2, 0
        elif inode == FILE_INO:
            e.st_mode, e.st_nlink, e.st_size = stat.S_IFREG | 0o644, 1, len(self.data)
        else:
            raise FUSEError(errno.ENOENT)
        e.st_ino = inode
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = time.time_ns()
        e.attr_timeout = e.entry_timeout = 0
        return e

    async def lookup(self, parent, name, ctx=None):
        if parent == pyfuse3.ROOT_INODE and name == b"file":
            return await self.getattr(FILE_INO)
        raise FUSEError(errno.ENOENT)

    async def open(self, inode, flags, ctx):
        if inode != FILE_INO:
            raise FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=inode, direct_io=True)   # reads always reach us

    async def read(self, fh, off, size):
        return bytes(self.data[off:off + size])

    async def write(self, fh, off, buf):
        if off + len(buf) > len(self.data):
            self.data.extend(bytes(off + len(buf) - len(self.data)))
        self.data[off:off + len(buf)] = buf
        return len(buf)


class WithFallocate(Base):
    async def fallocate(self, fh, mode, off, length):
        assert fh == FILE_INO
        with open(LOG, "a") as f:
            f.write(json.dumps([mode, off, length]) + "\n")
        if mode & ~(KEEP_SIZE | PUNCH_HOLE | ZERO_RANGE):
            raise FUSEError(errno.EOPNOTSUPP)
        if not mode & (PUNCH_HOLE | ZERO_RANGE):
            raise FUSEError(errno.ENOSPC)       # plain allocation: "disk full"
        end = off + length
        if end > len(self.data) and not mode & KEEP_SIZE:
            self.data.extend(bytes(end - len(self.data)))
        end = min(end, len(self.data))
        self.data[off:end] = bytes(max(0, end - off))


ops = WithFallocate() if KIND == "fallocate" else Base()
pyfuse3.init(ops, MNT, {"fsname=fallocate_test"})
try:
    trio.run(pyfuse3.main)
finally:
    pyfuse3.close(unmount=False)
'''


def _need_tools():
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    for tool in ("fusermount3", "fallocate"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")


@contextmanager
def mounted(tmp_path, kind, timeout=30.0):
    """Mount the test file system (kind "fallocate" or "default"); yield
    (mount point, log path, process)."""
    _need_tools()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = tmp_path / "fallocate.log"
    log.touch()
    script = tmp_path / "fs.py"
    script.write_text(FS_SOURCE)
    with open(tmp_path / "fs.stderr", "w+") as errf:
        proc = subprocess.Popen([sys.executable, str(script), str(mnt), str(log), kind],
                                stdin=subprocess.DEVNULL, stdout=errf, stderr=errf)
        try:
            deadline = time.monotonic() + timeout
            while not os.path.ismount(mnt):
                try:
                    proc.wait(timeout=0.05)        # the poll interval; returns only if it died
                except subprocess.TimeoutExpired:
                    pass
                else:
                    errf.seek(0)
                    pytest.fail(f"file system process exited with {proc.returncode} "
                                f"before mounting:\n{errf.read()}")
                if time.monotonic() > deadline:
                    pytest.fail(f"{mnt} not mounted within {timeout} s")
            yield mnt, log, proc
        finally:
            if os.path.ismount(mnt):
                subprocess.run(["fusermount3", "-u", str(mnt)], check=False,
                               capture_output=True)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
            if os.path.ismount(mnt):           # killed while still mounted
                subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False,
                               capture_output=True)


def fallocate(*args):
    return subprocess.run(["fallocate", *map(str, args)], check=False, capture_output=True,
                          text=True, timeout=30)


def calls(log):
    return [tuple(json.loads(line)) for line in log.read_text().splitlines()]


def test_punch_hole_and_zero_range_reach_the_handler(tmp_path):
    with mounted(tmp_path, "fallocate") as (mnt, log, proc):
        f = mnt / "file"
        assert f.read_bytes() == bytes([FILL]) * SIZE

        r = fallocate("--punch-hole", "--keep-size", "-o", 4096, "-l", 8192, f)
        assert r.returncode == 0, r.stderr
        assert calls(log) == [(PUNCH_HOLE | KEEP_SIZE, 4096, 8192)]
        want = bytearray([FILL]) * SIZE
        want[4096:12288] = bytes(8192)
        assert f.read_bytes() == want
        assert os.stat(f).st_size == SIZE

        r = fallocate("--zero-range", "-o", 20000, "-l", 5000, f)
        assert r.returncode == 0, r.stderr
        assert calls(log)[1:] == [(ZERO_RANGE, 20000, 5000)]
        want[20000:25000] = bytes(5000)
        assert f.read_bytes() == want

        r = fallocate("--zero-range", "--keep-size", "-o", 60000, "-l", 10000, f)
        assert r.returncode == 0, r.stderr
        assert calls(log)[2:] == [(ZERO_RANGE | KEEP_SIZE, 60000, 10000)]
        want[60000:] = bytes(SIZE - 60000)
        assert f.read_bytes() == want
        assert os.stat(f).st_size == SIZE

        # A FUSEError from the handler reaches the caller with its errno.
        r = fallocate("-o", 0, "-l", 4096, f)
        assert r.returncode != 0
        assert "No space left on device" in r.stderr, r.stderr
        assert calls(log)[3:] == [(0, 0, 4096)]
        assert proc.poll() is None


def test_default_operations_answer_not_supported(tmp_path):
    with mounted(tmp_path, "default") as (mnt, log, proc):
        f = mnt / "file"
        # ENOSYS from pyfuse3 becomes EOPNOTSUPP in the kernel (which then stops
        # asking). util-linux words EOPNOTSUPP with --keep-size (always part of
        # --punch-hole) as "keep size mode is unsupported".
        for _ in range(2):
            r = fallocate("--punch-hole", "--keep-size", "-o", 4096, "-l", 8192, f)
            assert r.returncode == 1
            assert "keep size mode is unsupported" in r.stderr, r.stderr
            r = fallocate("--zero-range", "-o", 4096, "-l", 8192, f)
            assert r.returncode == 1
            assert "fallocate failed: Operation not supported" in r.stderr, r.stderr
        assert calls(log) == []
        assert proc.poll() is None                      # the mount survived
        assert f.read_bytes() == bytes([FILL]) * SIZE   # and still serves, unchanged

"""New output files that appear whole or not at all (rbd export, export-diff).

The bytes go to an unnamed file (O_TMPFILE) in FILE's directory, linked
in as FILE once complete, so a killed export leaves nothing behind. Where
the file system has no O_TMPFILE (FUSE, NFS, old kernels) they go to
``FILE.ecfs-tmp.PID``, renamed to FILE at the end; such a file left by a
run that was killed (its pid gone) is removed by the next run writing
FILE, since nothing else ever would.
"""
from __future__ import annotations

import errno
import os
import sys
from contextlib import contextmanager
from typing import BinaryIO, Iterator

from backend.errors import Exists, OutputError
from backend.procs import pid_alive

TMP_TAG = ".ecfs-tmp."
# what open(O_TMPFILE) fails with where the file system or kernel lacks it
_NO_TMPFILE = (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL)


@contextmanager
def output(path: str | None, in_place: bool) -> Iterator[BinaryIO]:
    """Where an export writes: stdout (``path`` None), a device or FIFO
    written in place, else a new file (new_file). The caller's file is
    never closed (stdout); the others are."""
    if path is None:
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
    elif in_place:
        try:
            f = open(path, "wb")
        except OSError as e:
            raise OutputError(f"cannot write {path}: {e.strerror}")
        with f:
            yield f
    else:
        with new_file(path) as f:
            yield f


@contextmanager
def new_file(path: str) -> Iterator[BinaryIO]:
    """A file to write, which becomes ``path`` when the block succeeds
    (and nothing when it fails). ``path`` must not exist; the caller checks
    that first, as rbd refuses to overwrite."""
    remove_stale(path)
    fd = _open_unnamed(os.path.dirname(os.path.abspath(path)), path)
    if fd is not None:
        with os.fdopen(fd, "wb") as f:       # a failure closes it: the kernel frees it
            yield f
            f.flush()
            _link(fd, path)
        return
    tmp = f"{path}{TMP_TAG}{os.getpid()}"
    try:
        f = open(tmp, "wb")
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror}")
    try:
        with f:
            yield f
        try:
            os.replace(tmp, path)
        except OSError as e:
            raise OutputError(f"cannot write {path}: {e.strerror}")
    except BaseException:
        _unlink(tmp)
        raise


def remove_stale(path: str) -> None:
    """Remove ``PATH.ecfs-tmp.PID`` files whose writer is gone. Our own pid
    counts as gone: a killed run's pid can come round again, and this
    process has not started writing."""
    d = os.path.dirname(os.path.abspath(path))
    prefix = os.path.basename(path) + TMP_TAG
    try:
        names = os.listdir(d)
    except OSError:
        return
    for n in names:
        pid = n[len(prefix):]
        if not n.startswith(prefix) or not (pid.isascii() and pid.isdigit()):
            continue
        if int(pid) == os.getpid() or not pid_alive(int(pid)):
            _unlink(os.path.join(d, n))


def _open_unnamed(d: str, path: str) -> int | None:
    """An unnamed file in directory ``d``; None where O_TMPFILE is not
    supported (or /proc, which linking it in goes through, is missing)."""
    flag = getattr(os, "O_TMPFILE", None)
    if flag is None or not os.path.isdir("/proc/self/fd"):
        return None
    try:
        return os.open(d, flag | os.O_WRONLY | os.O_CLOEXEC, 0o666)
    except OSError as e:
        if e.errno in _NO_TMPFILE:
            return None
        raise OutputError(f"cannot write {path}: {e.strerror}")


def _link(fd: int, path: str) -> None:
    """Give the unnamed file ``fd`` the name ``path``: linkat(2) of
    /proc/self/fd/FD with AT_SYMLINK_FOLLOW, as open(2) describes for
    O_TMPFILE. os.link calls plain link(2), which links the /proc symlink
    itself (EXDEV), unless given a dir fd: hence the directory's."""
    try:
        d = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.link(f"/proc/self/fd/{fd}", os.path.basename(path), src_dir_fd=d, dst_dir_fd=d,
                    follow_symlinks=True)
        finally:
            os.close(d)
    except FileExistsError:
        raise Exists(f"{path} already exists (made while exporting; it is left as it is)")
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror}")


def _unlink(p: str) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass

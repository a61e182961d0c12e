"""An image's exclusive lock: one writer at a time, dead owners never block.

The lock is an flock on ``STORE/rbd/locks/ID.E.lock`` where E is the image's
lock epoch (``STORE/rbd/locks/ID.epoch``, a decimal number rewritten in
place). The kernel drops an flock when its process dies, so a SIGKILLed
owner's lock is free at once. Beside it the owner record ``ID.owner`` (JSON:
pid, host, cookie, epoch, acquired, the address of its watch socket, and
whether it holds the lock exclusively) says who holds it and where to ask
for it (rbdlike.notify; the hand-over itself is rbdlike.image's).

Whether a recorded owner is alive is asked without taking the lock: the
holder also holds an OFD write lock (fcntl F_OFD_SETLK) on the lock file,
and others test for it with F_OFD_GETLK, which never acquires anything.
(Probing with a non-blocking flock would hold the lock for an instant, and
a writer trying to acquire it at that instant would be refused.) OFD locks
belong to the open file like flocks, so they too vanish with the process.

Breaking the lock (``lock rm``) must also stop a live but paused owner from
writing later (fencing). The breaker raises the epoch while holding the
store's checkpoint gate exclusive, which waits for every transaction in
flight and holds back new ones; every transaction of an owner checks, under
the gate, that the epoch is still its own (ObjectStore guards, see
``guard``). So once ``break_lock`` returns, the old owner's next commit
fails with ``Fenced``, and the next writer locks the new epoch's file,
which the old owner does not hold.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import struct
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from backend.errors import Busy
from backend.errors import Fenced as Fenced   # re-exported: raised by guard()

from .directory import header_lock, rbd_dir




@dataclass
class Owner:
    pid: int
    host: str
    cookie: str
    epoch: int
    acquired: float
    address: str = ""          # its watch socket (rbdlike.notify), for requests
    exclusive: bool = False    # it refuses to hand the lock over (mount --exclusive)


def _locks_dir(store) -> str:
    d = os.path.join(rbd_dir(store), "locks")
    os.makedirs(d, mode=0o700, exist_ok=True)
    return d


def _epoch_path(store, image_id: str) -> str:
    return os.path.join(_locks_dir(store), f"{image_id}.epoch")


def _owner_path(store, image_id: str) -> str:
    return os.path.join(_locks_dir(store), f"{image_id}.owner")


def _lock_path(store, image_id: str, epoch: int) -> str:
    return os.path.join(_locks_dir(store), f"{image_id}.{epoch}.lock")


def read_epoch(store, image_id: str) -> int:
    try:
        with open(_epoch_path(store, image_id)) as f:
            return int(f.read().strip() or 0)
    except FileNotFoundError:
        return 0
    except ValueError:
        return 0


def _write_epoch(store, image_id: str, epoch: int) -> None:
    fd = os.open(_epoch_path(store, image_id), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, f"{epoch:020d}\n".encode(), 0)
        os.fsync(fd)
    finally:
        os.close(fd)


def owner(store, image_id: str) -> Owner | None:
    """The current owner, or None if nobody holds the lock (a dead owner's
    leftover record is not an owner)."""
    try:
        with open(_owner_path(store, image_id)) as f:
            o = Owner(**json.load(f))
    except (FileNotFoundError, ValueError, TypeError):
        return None
    if o.epoch != read_epoch(store, image_id):
        return None
    try:
        fd = os.open(_lock_path(store, image_id, o.epoch), os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        return o if _ofd_held(fd) else None
    finally:
        os.close(fd)


# struct flock: l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks)
_FLOCK = struct.Struct("hhqqi4x")


def _ofd_lock(fd: int) -> None:
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))


def _ofd_held(fd: int) -> bool:
    """Someone holds the OFD write lock of the file (asked, not taken)."""
    got = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _FLOCK.pack(fcntl.F_RDLCK, os.SEEK_SET, 0, 0, 0))
    return _FLOCK.unpack(got)[0] != fcntl.F_UNLCK


class ExclusiveLock:
    """This process's hold of one image's lock."""

    def __init__(self, store, image_id: str, image_name: str, address: str = "",
                 exclusive: bool = False):
        self.store = store
        self.image_id = image_id
        self.image_name = image_name
        self.address = address
        self.exclusive = exclusive
        self.epoch = -1
        self._fd: int | None = None
        self._epoch_fd: int | None = None
        self.cookie = uuid.uuid4().hex[:16]
        self._release_lock = threading.Lock()

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        if self._fd is not None:
            return True
        for _ in range(100):
            epoch = read_epoch(self.store, self.image_id)
            fd = os.open(_lock_path(self.store, self.image_id, epoch), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            if read_epoch(self.store, self.image_id) != epoch:
                os.close(fd)          # broken meanwhile: try the new epoch
                continue
            _ofd_lock(fd)             # what owner() asks about (never conflicts: we hold it)
            self._fd, self.epoch = fd, epoch
            self._epoch_fd = os.open(_epoch_path(self.store, self.image_id),
                                     os.O_RDWR | os.O_CREAT, 0o600)
            rec = Owner(os.getpid(), socket.gethostname(), self.cookie, epoch, time.time(),
                        self.address, self.exclusive)
            tmp = _owner_path(self.store, self.image_id) + f".{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(asdict(rec), f)
            os.replace(tmp, _owner_path(self.store, self.image_id))
            return True
        return False

    def acquire(self) -> None:
        if not self.try_acquire():
            o = owner(self.store, self.image_id)
            who = f"pid {o.pid} on {o.host}" if o else "another process"
            raise Busy(f"image {self.image_name!r} is locked by {who} "
                       f"(see 'ecfs rbd lock ls {self.image_name}')")

    def guard(self) -> None:
        """Raise Fenced if the lock was broken (called before each commit).
        Under the release lock: a release closing the epoch fd meanwhile
        would make this read a closed fd (EBADF), or one reused by another
        open."""
        with self._release_lock:
            if self._epoch_fd is None:
                raise Fenced(f"image {self.image_name!r}: exclusive lock not held")
            raw = os.pread(self._epoch_fd, 32, 0)
        if int(raw.strip() or 0) != self.epoch:
            raise Fenced(f"image {self.image_name!r}: the exclusive lock was broken; "
                         f"this client may not write any more")

    def release(self) -> None:
        """Give the lock up (idempotent; safe from several threads)."""
        with self._release_lock:
            if self._fd is None:
                return
            try:
                o = owner(self.store, self.image_id)
                if o is not None and o.cookie == self.cookie:
                    os.unlink(_owner_path(self.store, self.image_id))
            except OSError:
                pass
            fd, efd = self._fd, self._epoch_fd
            self._fd = self._epoch_fd = None
            os.close(fd)
            if efd is not None:
                os.close(efd)


def break_lock(store, image_id: str) -> Owner | None:
    """Take the lock away from its owner and fence it (``rbd lock rm``).
    Under the image's header lock too: an owner that checks its lock under
    that lock before a header write (a size it grew ahead) is never broken
    between the check and the write."""
    o = owner(store, image_id)
    with header_lock(store, image_id), store.locks.checkpoint_gate():
        epoch = read_epoch(store, image_id)
        _write_epoch(store, image_id, epoch + 1)
    try:
        os.unlink(_owner_path(store, image_id))
    except FileNotFoundError:
        pass
    try:
        os.unlink(_lock_path(store, image_id, epoch))
    except FileNotFoundError:
        pass
    return o


def lock_or_busy(store, image_id: str, image_name: str, why: str = "") -> ExclusiveLock:
    """Take the lock of an image nobody may have open (rm, feature changes),
    or raise Busy naming who holds it."""
    lock = ExclusiveLock(store, image_id, image_name)
    if not lock.try_acquire():
        o = owner(store, image_id)
        who = f"pid {o.pid}" if o else "another process"
        raise Busy(f"image {image_name!r} is in use by {who}{why}")
    return lock


def forget(store, image_id: str) -> None:
    """Remove an image's lock files (after the image itself is gone)."""
    import glob
    for p in glob.glob(os.path.join(_locks_dir(store), f"{image_id}.*")):
        try:
            os.unlink(p)
        except OSError:
            pass

"""The missed-writes log: which objects changed while an OSD was away.

Ceph's OSDs keep a PG log so a returning OSD recovers only the objects it
missed. Here the store keeps one append-only file per OSD,
``STORE/missed/osd.N``: every transaction committed while OSD N is down
(or behind) first appends the object's name there, durably, before the
transaction reaches the journal. ``ecfs osd up N`` rebuilds exactly those
objects' shards on N, then deletes the file. An OSD with a non-empty log is
behind: the OSD map keeps it out of reads and writes even if its directory
is back, so a stale shard is never served.

Format (docs/formats.md, "Missed-writes log"): a sequence of records
``NAME NUL`` (UTF-8 object name; names never contain NUL). A torn last
record (no NUL) is ignored. Duplicates are allowed: recovery is idempotent.
"""
from __future__ import annotations

import os
import threading

_SEEN_LIMIT = 100_000     # names remembered per OSD to skip repeat appends


class MissedLog:
    """Appends to the logs, skipping names this process already appended.

    The skip is only sound for the very file those names went into: once
    ``osd up`` deletes a log, a new one may get the same inode number, so
    "same inode as before" proves nothing by itself. This process therefore
    keeps each log it appended to open: an open file's inode cannot be
    reused, so a path whose inode still equals the open file's is that file."""

    def __init__(self, store_dir: str):
        self.dir = os.path.join(store_dir, "missed")
        self._lock = threading.Lock()
        # osd -> (fd of its log, names this process appended through that fd)
        self._open: dict[int, tuple[int, set[str]]] = {}

    def path(self, osd: int) -> str:
        return os.path.join(self.dir, f"osd.{osd}")

    def record(self, osd: int, name: str) -> None:
        """Durably note that ``name`` changes while ``osd`` is away."""
        p = self.path(osd)
        with self._lock:
            cur = self._open.get(osd)
            if cur is not None and not _same_file(cur[0], p):
                os.close(cur[0])
                del self._open[osd]
                cur = None
            if cur is not None and name in cur[1]:
                return
            if cur is None:
                created = not os.path.exists(p)
                if created:
                    os.makedirs(self.dir, mode=0o700, exist_ok=True)
                fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                cur = self._open[osd] = (fd, set())
                if created:
                    fsync_dir(self.dir)
            fd, names = cur
            os.write(fd, name.encode("utf-8") + b"\0")
            os.fdatasync(fd)
            if len(names) > _SEEN_LIMIT:
                names.clear()
            names.add(name)

    def close(self) -> None:
        with self._lock:
            for fd, _ in self._open.values():
                os.close(fd)
            self._open.clear()

    def read(self, osd: int) -> tuple[list[str], int]:
        """(distinct names in first-seen order, bytes of whole records)."""
        try:
            with open(self.path(osd), "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return [], 0
        end = raw.rfind(b"\0") + 1
        names = dict.fromkeys(r.decode("utf-8", "replace") for r in raw[:end].split(b"\0")[:-1] if r)
        return list(names), end

    def size(self, osd: int) -> int:
        try:
            return os.stat(self.path(osd)).st_size
        except FileNotFoundError:
            return 0

    def behind(self) -> dict[int, int]:
        """{osd: log bytes} of every OSD with a non-empty log."""
        out = {}
        try:
            entries = os.listdir(self.dir)
        except FileNotFoundError:
            return out
        for e in entries:
            if e.startswith("osd.") and e[4:].isdigit():
                n = self.size(int(e[4:]))
                if n:
                    out[int(e[4:])] = n
        return out

    def pending(self, osd: int) -> int:
        """How many distinct objects wait for recovery on ``osd``."""
        return len(self.read(osd)[0])

    def clear(self, osd: int) -> None:
        with self._lock:
            try:
                os.unlink(self.path(osd))
            except FileNotFoundError:
                return
            cur = self._open.pop(osd, None)
            if cur is not None:
                os.close(cur[0])
            fsync_dir(self.dir)


def _same_file(fd: int, path: str) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    fs = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fs.st_dev, fs.st_ino)


def fsync_dir(path: str) -> None:
    """Make a directory's entries durable (names created, renamed, unlinked)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

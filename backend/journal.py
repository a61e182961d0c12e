"""The store's redo journal: what makes a multi-shard write atomic.

One append-only file, ``STORE/journal.log``, shared by every process that
writes the store (and sealed segments of it waiting to be dropped: see
"Segments" below). A write (a transaction) is made of file operations on
shard files (pwrite, truncate, unlink); before any of them touches a shard
file, all of them are appended to the journal as one record and the record
is made durable (fdatasync, shared by concurrent writers: group commit).
Only then are they applied in place. So at any instant each transaction is
either absent from the journal (and nothing of it was applied) or complete
in it (and replaying it, in journal order, finishes whatever the crash cut
short). Records hold whole page images, so replay is idempotent.

Record format (docs/formats.md, "Journal")::

    file header  "ECFSJRNL" u8 format (3)  7x pad                  (16 bytes)
    record       "JREC" u32 payload_len u32 crc32c(payload) u32 object_slot
                 payload: u64 version, u16 name_len, name, u16 n_ops, then per op
                   u8 type (1 write, 2 truncate, 3 unlink, 4 punch) u16 osd
                   u16 path_len u64 offset u32 data_len, path, data

``version`` is the object version the record brings the object to (the
version its shard headers say once applied; a removal counts as one more
version): replay compares it with the shards' headers so it never writes an
older page image over a newer one (objectstore). Format 1 had no version;
a format-1 journal is still read (its records replay unconditionally, as
format 1 did) and is rewritten in this format by the next checkpoint.
Format 3 has format 2's records and adds sealed segments: an ecfs that
knows only format 2 would not read them, so it refuses a format-3 journal
("newer than this ecfs knows") rather than replay half of one. An older
journal is renewed as format 3 only by a process alone with the store
(``upgrade``): an older ecfs still running would go on appending to a
file a seal renames. Until then it is written as it is (format 2 has the
same records) and emptied the gated way, never sealed.

A torn or corrupt record (normally the tail; in the middle when a process
died while appending and others appended after it, or when the file was
damaged) is skipped; ``damaged`` counts the skipped spans that valid
records follow, which a torn tail never is.

Segments (format 3). The journal is emptied by a checkpoint
(``objectstore``), in one of two ways:

* seal (the routine one, when the journal outgrows its limit): under the
  exclusive gate, with no transaction between append and apply anywhere,
  ``journal.log`` is linked to a sealed segment ``journal.log.SEQ`` and a
  new empty file renamed over it (a create, a link, a rename and their
  fsyncs: about a millisecond here, where the gated sync it replaces took
  40-80 ms). Every record of a sealed segment is applied; what is left is
  to make the OSD file systems durable (syncfs), done with no gate held
  while writers append to the new segment, and then to unlink the
  segment. A process notices the seal before its next append (the path
  names another inode) and reopens.
* reset (at open after a crash, before an OSD set switch, at close, and
  whenever a seal's sync is not clean): with no write in flight, sync the
  OSD file systems, then unlink every sealed segment, oldest first, and
  only then truncate ``journal.log`` to its header.

Sealed segments are read before ``journal.log``, oldest (lowest SEQ)
first: replay sees records in the order they were appended. SEQ is a
nanosecond time made larger than every segment's present, so a name is
never used twice (a settler unlinks only the segments it listed before
its sync began). A reader opens them newest first and none older than
one already gone, so drops by another process's settle (oldest first)
leave it a suffix of the journal. A seal or a reset meanwhile would not:
every reader of the whole journal holds the exclusive gate, is alone
with the store, or replays a slot whose in-flight marker is set, which
holds off every seal and reset until the replay clears it.

Failure: an fdatasync that fails makes the journal *failed* for the rest
of this process's use of it. Every waiter whose record the failed call
covered gets the error, and so does every later append and wait: after a
writeback error the kernel may have dropped the dirty pages, and a later
fdatasync that succeeds says nothing about them (the "fsyncgate" lesson),
so nothing appended here can be called durable until the store is
reopened and the journal is read back from disk.
"""
from __future__ import annotations

import os
import struct
import threading
import time
from dataclasses import dataclass
from typing import Iterator

import crc32c as _crc32c

from .errors import StoreError
from .missed import fsync_dir as _fsync_dir

MAGIC = b"ECFSJRNL"
FORMAT = 3
_FILE_HDR = struct.Struct("<8sB7x")
_REC = struct.Struct("<4sIII")
_OP = struct.Struct("<BHHQI")
_NAME = struct.Struct("<H")
_VERSION = struct.Struct("<Q")

OP_WRITE, OP_TRUNCATE, OP_UNLINK, OP_PUNCH = 1, 2, 3, 4
_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024
PUNCH_LEN = struct.Struct("<Q")     # OP_PUNCH data: the length of the hole


@dataclass
class FileOp:
    type: int
    osd: int
    path: str          # relative to the OSD directory
    offset: int = 0    # write offset, or truncate length
    data: bytes | memoryview = b""


@dataclass
class Record:
    name: str
    slot: int
    ops: list[FileOp]
    version: int | None = None    # None: read from a format-1 journal


def record_parts(rec: Record) -> list:
    """The record's bytes as a list of buffers, its header first: written
    with one writev, never joined (a flush's record holds every page it
    writes: joining was a copy of all of them)."""
    nb = rec.name.encode()
    parts = [_VERSION.pack(rec.version or 0), _NAME.pack(len(nb)), nb,
             _NAME.pack(len(rec.ops))]
    for op in rec.ops:
        pb = op.path.encode()
        # (the op's header and path as one part: a part is a checksum call)
        parts.append(_OP.pack(op.type, op.osd, len(pb), op.offset, len(op.data)) + pb)
        parts.append(op.data)
    crc = 0
    for p in parts:
        crc = _crc32c.crc32c(p, crc)
    return [_REC.pack(b"JREC", sum(map(len, parts)), crc, rec.slot)] + parts


def encode_record(rec: Record) -> bytes:
    return b"".join(record_parts(rec))


def decode_payload(slot: int, payload: memoryview, fmt: int = FORMAT) -> Record:
    version, pos = None, 0
    if fmt >= 2:
        (version,) = _VERSION.unpack_from(payload, 0)
        pos = _VERSION.size
    (nl,) = _NAME.unpack_from(payload, pos)
    pos += 2
    name = bytes(payload[pos:pos + nl]).decode()
    pos += nl
    (nops,) = _NAME.unpack_from(payload, pos)
    pos += 2
    ops = []
    for _ in range(nops):
        t, osd, pl, off, dl = _OP.unpack_from(payload, pos)
        pos += _OP.size
        path = bytes(payload[pos:pos + pl]).decode()
        pos += pl
        ops.append(FileOp(t, osd, path, off, payload[pos:pos + dl]))
        pos += dl
    return Record(name, slot, ops, version)


class Journal:
    def __init__(self, path: str, readonly: bool = False):
        self.path = path
        self.readonly = readonly
        self._fd_lock = threading.Lock()
        self._open()
        self.damaged = 0       # corrupt spans skipped by the last records() scan
        self._cond = threading.Condition()
        self._appended = 0     # records appended by this process
        self._synced = 0       # records known durable
        self._syncing = False
        self._failed: OSError | None = None   # the fdatasync error, once one failed

    def _open(self) -> None:
        """Open ``journal.log`` (the active segment; created if missing)."""
        flags = os.O_RDONLY if self.readonly else (os.O_RDWR | os.O_CREAT | os.O_APPEND)
        fd = os.open(self.path, flags, 0o600)
        try:
            st = os.fstat(fd)
            if not self.readonly and st.st_size == 0:
                _write_header(fd)
            fmt = _check_header(fd, self.path)
        except BaseException:
            os.close(fd)
            raise
        self.fd, self._ino, self.format = fd, (st.st_dev, st.st_ino), fmt

    def upgrade(self) -> None:
        """An older ecfs's empty journal starts over in this format. Only
        for a process alone with the store: an older ecfs still running
        would go on appending to a file that a seal renames (it does not
        know segments), so a journal in an older format is never sealed."""
        if self.format < FORMAT and os.fstat(self.fd).st_size <= _FILE_HDR.size:
            # (O_APPEND: truncate first, then the write lands at 0)
            os.ftruncate(self.fd, 0)
            _write_header(self.fd)
            self.format = FORMAT

    def _current_fd(self) -> int:
        """The fd of the active segment, reopened if another process
        sealed it since (the caller holds the commit gate shared, so no
        seal happens until it is done with the fd)."""
        with self._fd_lock:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) != self._ino:
                old = self.fd
                self._open()
                os.close(old)
            return self.fd

    def append(self, rec: Record) -> tuple[int, int]:
        """Append a record; returns (ticket for wait_durable, bytes written)."""
        self._check_failed()
        fd = self._current_fd()
        if self.format < 2:
            raise StoreError(f"journal {self.path} is format {self.format}, older than this "
                             f"ecfs writes: open the store alone once (no other ecfs using "
                             f"it) to replay and renew it")
        parts = record_parts(rec)
        size = sum(map(len, parts))
        # One write call with O_APPEND: the kernel places it whole at the
        # end, even with other processes appending.
        if len(parts) <= _IOV_MAX:
            n = os.writev(fd, parts)
        else:
            n = os.write(fd, b"".join(parts))
        if n != size:
            raise OSError("journal: short write")
        with self._cond:
            self._appended += 1
            return self._appended, n

    def wait_durable(self, ticket: int) -> bool:
        """Block until record ``ticket`` is on stable storage. Returns True if
        this caller issued the fdatasync (for the fsync counter)."""
        with self._cond:
            while True:
                self._check_failed()
                if self._synced >= ticket:
                    return False
                if not self._syncing:
                    self._syncing = True
                    target = self._appended
                    break
                self._cond.wait()
        try:
            os.fdatasync(self.fd)
        except OSError as e:
            with self._cond:
                self._syncing = False
                self._failed = e
                self._cond.notify_all()
            self._check_failed()
        with self._cond:
            self._syncing = False
            self._synced = max(self._synced, target)
            self._cond.notify_all()
        return True

    @property
    def failed(self) -> bool:
        return self._failed is not None

    def _check_failed(self) -> None:
        e = self._failed
        if e is not None:
            raise StoreError(f"journal {self.path}: fdatasync failed "
                             f"({e.strerror or e}); nothing since is durable: "
                             f"reopen the store")

    def size(self) -> int:
        """Bytes in journal.log, the active segment (this process's fd may
        still be on one another process sealed since)."""
        return os.stat(self.path).st_size

    def sealed(self) -> list[str]:
        """The sealed segments, oldest first. (A segment that is a hard
        link of journal.log is a seal cut short by a crash: the same
        records, not a segment of its own.)"""
        try:
            active = os.stat(self.path)
        except FileNotFoundError:
            active = None
        out = []
        for p in self._segment_files():
            try:
                st = os.stat(p)
            except FileNotFoundError:
                continue        # dropped by another process meanwhile
            if active is None or (st.st_dev, st.st_ino) != (active.st_dev, active.st_ino):
                out.append(p)
        return out

    def _segment_files(self) -> list[str]:
        """Paths named journal.log.SEQ, lowest SEQ first."""
        d, base = os.path.split(self.path)
        segs = []
        for f in os.listdir(d or "."):
            tail = f[len(base) + 1:]
            if f.startswith(base + ".") and tail.isdigit():
                segs.append((int(tail), os.path.join(d, f)))
        return [p for _, p in sorted(segs)]

    def records(self, segments: list[str] | None = None) -> Iterator[Record]:
        """Every valid record, in order: of the sealed segments (or of
        ``segments`` only), then of journal.log (not with ``segments``).

        A torn record is normally the tail, but a process killed in the
        middle of its append leaves one that other processes then append
        after: past a torn or corrupt record, the next valid record is
        found by scanning for its magic (its crc rules out chance matches)."""
        self.damaged = 0
        files = self.sealed() + [self.path] if segments is None else segments
        # Opened newest first, and none older than one found gone: a
        # settle in another process drops segments oldest first, so what
        # is read is always a suffix of the journal (records of an old
        # segment without those of a newer one could bring back an object
        # the newer removed). An open file stays readable when dropped.
        opened = []
        try:
            for p in reversed(files):
                try:
                    opened.append((p, open(p, "rb")))
                except FileNotFoundError:
                    if p == self.path:
                        raise
                    break
            for p, f in reversed(opened):
                raw = f.read()
                yield from self._scan(raw, p)
        finally:
            for _, f in opened:
                f.close()

    def _scan(self, raw: bytes, path: str) -> Iterator[Record]:
        if len(raw) < _FILE_HDR.size:
            return
        fmt = _header_format(raw[:_FILE_HDR.size], path)
        data = memoryview(raw)
        pos = _FILE_HDR.size
        skipped = False
        while pos + _REC.size <= len(data):
            magic, plen, crc, slot = _REC.unpack_from(data, pos)
            body = data[pos + _REC.size: pos + _REC.size + plen]
            if magic != b"JREC" or len(body) < plen or _crc32c.crc32c(body) != crc:
                skipped = True
                pos = raw.find(b"JREC", pos + 1)
                if pos < 0:
                    return
                continue
            if skipped:
                self.damaged += 1
                skipped = False
            yield decode_payload(slot, body, fmt)
            pos += _REC.size + plen

    def seal(self) -> str:
        """Make journal.log a sealed segment and start a new, empty one in
        its place (the caller holds the checkpoint gate exclusive:
        every record in it is applied). journal.log never goes missing:
        the segment's name is linked first, then the new file renamed over
        journal.log. Returns the segment's path."""
        self._check_failed()
        if self.format != FORMAT:
            raise StoreError(f"journal {self.path} is format {self.format}: not sealed")
        d = os.path.dirname(self.path) or "."
        active = os.stat(self.path)
        last = 0
        for p in self._segment_files():
            last = max(last, int(p.rsplit(".", 1)[1]))
            try:
                st = os.stat(p)
            except FileNotFoundError:
                continue            # dropped by another process's settle meanwhile
            if (st.st_dev, st.st_ino) == (active.st_dev, active.st_ino):
                os.unlink(p)        # a seal cut short: one name of journal.log is enough
        seg = f"{self.path}.{max(time.time_ns(), last + 1):020d}"
        tmp = self.path + ".new"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        try:
            _write_header(fd)
            os.link(self.path, seg)
            _fsync_dir(d)           # the segment's name, before journal.log moves off it
            os.rename(tmp, self.path)
            _fsync_dir(d)           # before any record in the new file is called durable
        except BaseException:
            os.close(fd)
            raise
        with self._fd_lock:
            old, self.fd, self.format = self.fd, fd, FORMAT
            st = os.fstat(fd)
            self._ino = (st.st_dev, st.st_ino)
        os.close(old)
        return seg

    def drop(self, segments: list[str]) -> None:
        """Unlink sealed segments whose records are durable on the OSDs."""
        for p in segments:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        if segments:
            _fsync_dir(os.path.dirname(self.path) or ".")

    def reset(self) -> None:
        """Drop every record, sealed segments too (caller guarantees they
        are applied and synced, with no transaction between append and
        apply anywhere)."""
        self._check_failed()
        # the sealed segments go first, oldest first, journal.log last: a
        # crash in between leaves newer records without older ones (their
        # replay ends where the journal did), never the reverse
        self.drop(self._segment_files())
        fd = self._current_fd()
        os.ftruncate(fd, _FILE_HDR.size)      # (its format stays: see upgrade)
        os.fsync(fd)

    def close(self) -> None:
        os.close(self.fd)


def _write_header(fd: int) -> None:
    """A journal file's header in this format, durable (an empty file)."""
    os.write(fd, _FILE_HDR.pack(MAGIC, FORMAT))
    os.fsync(fd)


def _header_format(hdr: bytes, path: str) -> int:
    magic, fmt = _FILE_HDR.unpack(hdr)
    if magic != MAGIC:
        raise ValueError(f"journal {path}: bad magic")
    if fmt > FORMAT:
        raise ValueError(f"journal {path}: format {fmt} is newer than this ecfs knows")
    if fmt < 1:
        raise ValueError(f"journal {path}: unknown format {fmt}")
    return fmt


def _check_header(fd: int, path: str) -> int:
    hdr = os.pread(fd, _FILE_HDR.size, 0)
    if len(hdr) < _FILE_HDR.size:
        return FORMAT
    return _header_format(hdr, path)

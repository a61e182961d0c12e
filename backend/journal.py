"""The store's redo journal: what makes a multi-shard write atomic.

One append-only file, ``STORE/journal.log``, shared by every process that
writes the store. A write (a transaction) is made of file operations on
shard files (pwrite, truncate, unlink); before any of them touches a shard
file, all of them are appended to the journal as one record and the record
is made durable (fdatasync, shared by concurrent writers: group commit).
Only then are they applied in place. So at any instant each transaction is
either absent from the journal (and nothing of it was applied) or complete
in it (and replaying it, in journal order, finishes whatever the crash cut
short). Records hold whole page images, so replay is idempotent.

Record format (docs/formats.md, "Journal")::

    file header  "ECFSJRNL" u8 format (2)  7x pad                  (16 bytes)
    record       "JREC" u32 payload_len u32 crc32c(payload) u32 object_slot
                 payload: u64 version, u16 name_len, name, u16 n_ops, then per op
                   u8 type (1 write, 2 truncate, 3 unlink, 4 punch) u16 osd
                   u16 path_len u64 offset u32 data_len, path, data

``version`` is the object version the record brings the object to (the
version its shard headers say once applied; a removal counts as one more
version): replay compares it with the shards' headers so it never writes an
older page image over a newer one (objectstore). Format 1 had no version;
a format-1 journal is still read (its records replay unconditionally, as
format 1 did) and is rewritten as format 2 by the next checkpoint.

A torn or corrupt record (normally the tail; in the middle when a process
died while appending and others appended after it, or when the file was
damaged) is skipped; ``damaged`` counts the skipped spans that valid
records follow, which a torn tail never is.

The journal is emptied by a checkpoint (``objectstore``): with no write in
flight, sync the OSD file systems, then truncate it to its header.

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
from dataclasses import dataclass
from typing import Iterator

import crc32c as _crc32c

from .errors import StoreError

MAGIC = b"ECFSJRNL"
FORMAT = 2
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
        parts.append(_OP.pack(op.type, op.osd, len(pb), op.offset, len(op.data)))
        parts.append(pb)
        parts.append(op.data)
    crc, n = 0, 0
    for p in parts:
        crc = _crc32c.crc32c(p, crc)
        n += len(p)
    return [_REC.pack(b"JREC", n, crc, rec.slot)] + parts


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
        flags = os.O_RDONLY if readonly else (os.O_RDWR | os.O_CREAT | os.O_APPEND)
        self.fd = os.open(path, flags, 0o600)
        if not readonly and os.fstat(self.fd).st_size == 0:
            os.write(self.fd, _FILE_HDR.pack(MAGIC, FORMAT))
            os.fsync(self.fd)
        self.format = self._check_header()
        if not readonly and self.format < FORMAT and os.fstat(self.fd).st_size <= _FILE_HDR.size:
            # an older ecfs's empty journal: start it over in this format
            # (O_APPEND: truncate first, then the write lands at 0)
            os.ftruncate(self.fd, 0)
            os.write(self.fd, _FILE_HDR.pack(MAGIC, FORMAT))
            os.fsync(self.fd)
            self.format = FORMAT
        self.damaged = 0       # corrupt spans skipped by the last records() scan
        self._cond = threading.Condition()
        self._appended = 0     # records appended by this process
        self._synced = 0       # records known durable
        self._syncing = False
        self._failed: OSError | None = None   # the fdatasync error, once one failed

    def _check_header(self) -> int:
        hdr = os.pread(self.fd, _FILE_HDR.size, 0)
        if len(hdr) < _FILE_HDR.size:
            return FORMAT
        magic, fmt = _FILE_HDR.unpack(hdr)
        if magic != MAGIC:
            raise ValueError("journal: bad magic")
        if fmt > FORMAT:
            raise ValueError(f"journal format {fmt} is newer than this ecfs knows")
        if fmt < 1:
            raise ValueError(f"journal: unknown format {fmt}")
        return fmt

    def append(self, rec: Record) -> tuple[int, int]:
        """Append a record; returns (ticket for wait_durable, bytes written)."""
        self._check_failed()
        if self.format != FORMAT:
            raise StoreError(f"journal {self.path} is format {self.format} with records "
                             f"still in it: open the store alone once to replay it")
        parts = record_parts(rec)
        size = sum(len(p) for p in parts)
        # One write call with O_APPEND: the kernel places it whole at the
        # end, even with other processes appending.
        if len(parts) <= _IOV_MAX:
            n = os.writev(self.fd, parts)
        else:
            n = os.write(self.fd, b"".join(parts))
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
        return os.fstat(self.fd).st_size

    def records(self) -> Iterator[Record]:
        """Every valid record, in order.

        A torn record is normally the tail, but a process killed in the
        middle of its append leaves one that other processes then append
        after: past a torn or corrupt record, the next valid record is
        found by scanning for its magic (its crc rules out chance matches)."""
        with open(self.path, "rb") as f:
            raw = f.read()
        data = memoryview(raw)
        pos = _FILE_HDR.size
        self.damaged = 0
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
            yield decode_payload(slot, body, self.format)
            pos += _REC.size + plen

    def reset(self) -> None:
        """Drop every record (caller guarantees they are applied and synced)."""
        self._check_failed()
        if self.format != FORMAT:
            os.ftruncate(self.fd, 0)
            os.write(self.fd, _FILE_HDR.pack(MAGIC, FORMAT))
            self.format = FORMAT
        else:
            os.ftruncate(self.fd, _FILE_HDR.size)
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)

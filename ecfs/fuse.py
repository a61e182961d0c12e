"""The FUSE face: images as files (pyfuse3 + trio).

Layout of a mount (SPEC.md, Mount)::

    MNT/NAME               image NAME, a regular file of the image's size
    MNT/.snap/NAME/SNAP    read-only view of snapshot SNAP of image NAME

Each handler is a few lines translating to an rbdlike call, run in a
worker thread (``trio.to_thread.run_sync`` under one CapacityLimiter: the
store's I/O blocks), except a write the stripe cache can take at once
(``Image.try_write``): that is copied on the trio loop, with no thread
hop (about 50 us each, as much as the rest of a cached write). Only
``FUSEError`` leaves a handler: ``EcfsError``s carry their errno
(backend/errors.py), anything else is logged with its traceback and
answered EIO, so no request can kill the mount.

Images are keyed by id, so an inode survives a rename. One ``Image`` per
image is kept while handles are open on it; it watches the image, so
header changes made elsewhere (a resize, a snapshot) reach it. Opening for
writing takes the exclusive lock (a peer holding it hands it over, unless
it holds it exclusively: EBUSY at open); the last close of a written
image flushes and hands the lock back, so the CLI can then work on the
image directly. Snapshot files are read-only views.

Writes to an image whose lock this mount holds wait in the stripe cache
(backend/stripecache.py, ``ecfs mount --cache-size``) until an fsync, a
close, the flusher (dirty for 5 s, or the cache half full), a hand-over
or maintenance op writes them out. After ``lock rm`` broke our lock the
cached bytes are dropped and the next fsync or close fails with EIO.

Kernel caching: entries and attributes are cached for ``ATTR_TIMEOUT``
seconds; file pages are not kept across opens (``keep_cache`` off),
since other processes may change an image. An open image's file is
invalidated at once (``pyfuse3.invalidate_inode``: attributes and pages)
when the image changes elsewhere: a header update (resize, snapshot), a
maintenance op a peer had this mount run, a peer taking or giving up the
lock. It runs in a thread of its own (``_Invalidator``): the kernel may
hold pages locked until we answer a request in flight, so a FUSE worker
or a watch thread that called it could wait for itself.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
import threading
import time
import traceback
from dataclasses import dataclass

import pyfuse3
import trio

from backend.errors import Busy, EcfsError, Fenced, NotFound
from rbdlike import directory
from rbdlike.header import MAX_IMAGE_SIZE, MAX_NAME, validate_image_name
from rbdlike.image import Image, flush_owner, load_header
from rbdlike.objectmap import NONEXISTENT, ObjectMap
from rbdlike.rbd import RBD, update_attrs

log = logging.getLogger("ecfs.mount")

ROOT = pyfuse3.ROOT_INODE
SNAPROOT = ROOT + 1
SNAPDIR = ".snap"
ATTR_TIMEOUT = 1.0


class _Invalidator:
    """Drops the kernel's attributes and pages of inodes, from a thread of
    its own. ``pyfuse3.invalidate_inode`` may wait for pages the kernel
    holds locked until we answer a request (a buffered write in flight),
    so it is never called from a FUSE request's worker or from a watch
    thread a peer is waiting on: they queue the inode and go on. Inodes
    queued again before their turn are dropped once."""

    def __init__(self):
        self._c = threading.Condition()
        self._todo: dict[int, None] = {}
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="ecfs-invalidate", daemon=True)
        self._thread.start()

    def queue(self, ino: int) -> None:
        with self._c:
            self._todo[ino] = None
            self._c.notify()

    def _run(self) -> None:
        while True:
            with self._c:
                while not self._todo and not self._stop:
                    self._c.wait()
                if self._stop:
                    return
                ino = next(iter(self._todo))
                del self._todo[ino]
            try:
                pyfuse3.invalidate_inode(ino, attr_only=False)
            except OSError as e:    # ENOENT: the kernel forgot it; EINVAL: no session
                if e.errno not in (errno.ENOENT, errno.EBADF, errno.EINVAL):
                    log.info("invalidating inode %d: %s", ino, e)

    def stop(self) -> None:
        with self._c:
            self._stop = True
            self._c.notify()


FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
HAS_FALLOCATE = hasattr(pyfuse3.Operations, "fallocate")


@dataclass
class Handle:
    ino: int
    key: tuple
    image: Image
    writable: bool
    wrote: bool = False


def _within_max(end: int) -> None:
    """EFBIG for a write or fallocate ending past the largest image."""
    if end > MAX_IMAGE_SIZE:
        raise pyfuse3.FUSEError(errno.EFBIG)


class EcfsFS(pyfuse3.Operations):
    enable_writeback_cache = False     # measured: loses where it does not fit the page cache (docs/design.md)

    def __init__(self, store, *, read_only: bool = False, exclusive: bool = False,
                 threads: int = 16):
        super().__init__()
        self.store = store
        self.read_only = read_only
        self.exclusive = exclusive
        self.limiter = trio.CapacityLimiter(threads)
        self.uid, self.gid = os.getuid(), os.getgid()
        self.started = time.time_ns()
        self._ino_of: dict[tuple, int] = {}
        self._key_of: dict[int, tuple] = {ROOT: ("root",), SNAPROOT: ("snaproot",)}
        self._next_ino = SNAPROOT + 1
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1
        self._images: dict[tuple, list] = {}     # key -> [Image, open count]
        self._lock = threading.Lock()
        self._invalidator = _Invalidator()

    # ------------------------------------------------------------ plumbing
    async def _run(self, fn, *args):
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)
        except pyfuse3.FUSEError:
            raise
        except EcfsError as e:
            if not isinstance(e, (NotFound, Busy)):
                log.info("%s: %s", type(e).__name__, e)
            raise pyfuse3.FUSEError(e.errno) from None
        except Exception:
            log.error("unexpected error in a FUSE request:\n%s", traceback.format_exc())
            raise pyfuse3.FUSEError(errno.EIO) from None

    def _ino(self, key: tuple) -> int:
        with self._lock:
            ino = self._ino_of.get(key)
            if ino is None:
                ino = self._next_ino
                self._next_ino += 1
                self._ino_of[key] = ino
                self._key_of[ino] = key
            return ino

    def _key(self, ino: int) -> tuple:
        key = self._key_of.get(ino)
        if key is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return key

    def _names(self) -> dict[str, str]:
        return directory.load(self.store)

    def _name_of(self, image_id: str) -> str:
        for n, i in self._names().items():
            if i == image_id:
                return n
        raise NotFound("image gone")

    def _hold_image(self, key: tuple) -> Image:
        """The shared Image for an open key (kind, id[, snap]), its open
        count raised. A new one is built outside ``self._lock`` (store
        reads, a socket bind, a thread): lookups and readdirs, which need
        that lock for inode numbers, never wait behind a slow open. Two
        opens racing to build one keep the first; the other is closed."""
        with self._lock:
            ent = self._images.get(key)
            if ent is not None:
                ent[1] += 1
                return ent[0]
        if key[0] == "img":
            new = Image(self.store, self._name_of(key[1]), read_only=self.read_only, watch=True)
            ino = self._ino(key)
            new.on_peer_change = lambda: self._invalidator.queue(ino)
        else:
            new = Image(self.store, self._name_of(key[1]), snapshot=key[2])
        with self._lock:
            ent = self._images.get(key)
            if ent is None:
                ent = self._images[key] = [new, 0]
                new = None
            ent[1] += 1
            img = ent[0]
        if new is not None:
            new.close()
        return img

    # ------------------------------------------------------------ attributes
    def _dir_attr(self, ino: int) -> pyfuse3.EntryAttributes:
        a = self._base_attr(ino)
        a.st_mode = stat.S_IFDIR | 0o755
        a.st_nlink = 2
        a.st_size = 0
        return a

    def _base_attr(self, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.entry_timeout = ATTR_TIMEOUT
        a.attr_timeout = ATTR_TIMEOUT
        a.st_uid, a.st_gid = self.uid, self.gid
        a.st_blksize = 4096
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self.started
        return a

    def _file_attr(self, ino: int, key: tuple, hdr=None) -> pyfuse3.EntryAttributes:
        """Attributes of an image or snapshot file; ``hdr``: the header when
        the caller has just read it (readdir of a snapshot directory)."""
        ent = self._images.get(key)
        if ent is not None:
            img = ent[0]
            hdr, size = img.header, img.size()
        else:
            if hdr is None:
                hdr = load_header(self.store, key[1])     # NotFound once removed
            size = hdr.size if key[0] == "img" else hdr.snap(key[2]).size
        a = self._base_attr(ino)
        ro = key[0] == "snap" or self.read_only
        attrs = hdr.attrs if key[0] == "img" else {}
        mode = attrs.get("mode", 0o644) & (0o7444 if ro else 0o7777)
        a.st_mode = stat.S_IFREG | (0o444 if key[0] == "snap" else mode)
        a.st_uid = attrs.get("uid", self.uid)
        a.st_gid = attrs.get("gid", self.gid)
        a.st_nlink = 1
        a.st_size = size
        a.st_blocks = self._allocated(key, hdr, size, ent[0] if ent else None) // 512
        a.st_mtime_ns = a.st_ctime_ns = attrs.get("mtime_ns", int(hdr.created * 1e9))
        a.st_atime_ns = attrs.get("atime_ns", a.st_mtime_ns)
        return a

    def _allocated(self, key, hdr, size, img) -> int:
        """Bytes of the objects the map says exist (``du``), else the size."""
        if not hdr.has("object-map") or hdr.object_map_invalid:
            return size
        if img is not None and key[0] == "img":
            held = img.allocated_bytes()
            if held is not None:
                return held
        nobj = -(-size // hdr.object_size)
        m = ObjectMap(self.store, key[1], None if key[0] == "img" else hdr.snap(key[2]).id)
        if not m.load(nobj):
            return size
        return min(int((m.states[:nobj] != NONEXISTENT).sum()) * hdr.object_size, size)

    def _getattr(self, ino: int) -> pyfuse3.EntryAttributes:
        key = self._key(ino)
        if key[0] in ("root", "snaproot", "snapdir"):
            return self._dir_attr(ino)
        return self._file_attr(ino, key)

    async def getattr(self, inode, ctx=None):
        return await self._run(self._getattr, inode)

    def _lookup(self, parent: int, name: str) -> pyfuse3.EntryAttributes:
        pkey = self._key(parent)
        if pkey[0] == "root":
            if name == SNAPDIR:
                return self._dir_attr(SNAPROOT)
            image_id = self._names().get(name)
            if image_id is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._getattr(self._ino(("img", image_id)))
        if pkey[0] == "snaproot":
            image_id = self._names().get(name)
            if image_id is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._dir_attr(self._ino(("snapdir", image_id)))
        if pkey[0] == "snapdir":
            hdr = load_header(self.store, pkey[1])
            if not any(s.name == name for s in hdr.snapshots):
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._getattr(self._ino(("snap", pkey[1], name)))
        raise pyfuse3.FUSEError(errno.ENOTDIR)

    async def lookup(self, parent_inode, name, ctx=None):
        return await self._run(self._lookup, parent_inode, os.fsdecode(name))

    async def setattr(self, inode, attr, fields, fh, ctx):
        return await self._run(self._setattr, inode, attr, fields)

    def _setattr(self, inode, attr, fields):
        key = self._key(inode)
        changes = {}
        if fields.update_mode:
            if key[0] != "img":
                raise pyfuse3.FUSEError(errno.EROFS if key[0] == "snap" else errno.EPERM)
            if attr.st_mode & 0o111:
                raise pyfuse3.FUSEError(errno.EPERM)     # an image is never executable
            changes["mode"] = stat.S_IMODE(attr.st_mode)
        if fields.update_uid or fields.update_gid:
            if os.getuid() != 0:
                raise pyfuse3.FUSEError(errno.EPERM)
            if key[0] != "img":
                raise pyfuse3.FUSEError(errno.EROFS if key[0] == "snap" else errno.EPERM)
            if fields.update_uid:
                changes["uid"] = attr.st_uid
            if fields.update_gid:
                changes["gid"] = attr.st_gid
        if fields.update_mtime and key[0] == "img":
            changes["mtime_ns"] = attr.st_mtime_ns
        if fields.update_atime and key[0] == "img":
            changes["atime_ns"] = attr.st_atime_ns
        if changes:
            if self.read_only:
                raise pyfuse3.FUSEError(errno.EROFS)
            update_attrs(self.store, key[1], changes)
            ent = self._images.get(key)
            if ent is not None:
                ent[0].reload_header(notify=False)   # the kernel asked: it knows
        if fields.update_size:
            if key[0] != "img":
                raise pyfuse3.FUSEError(errno.EROFS if key[0] == "snap" else errno.EISDIR)
            if self.read_only:
                raise pyfuse3.FUSEError(errno.EROFS)
            if attr.st_size > MAX_IMAGE_SIZE:
                raise pyfuse3.FUSEError(errno.EFBIG)
            self._with_image(key, lambda img: img.resize(attr.st_size, allow_shrink=True))
        return self._getattr(inode)

    def _with_image(self, key, fn):
        """Run fn(Image) on an image, open or not (not: opened for the call)."""
        ent = self._images.get(key)
        if ent is not None:
            return fn(ent[0])
        with Image(self.store, self._name_of(key[1])) as img:
            return fn(img)

    # ------------------------------------------------------------ directories
    async def opendir(self, inode, ctx):
        key = self._key(inode)
        if key[0] not in ("root", "snaproot", "snapdir"):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        entries = await self._run(self._entries, fh)
        for i, (name, attr) in enumerate(entries[start_id:], start_id):
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attr, i + 1):
                break

    def _entries(self, ino: int) -> list:
        key = self._key(ino)
        parent = {"root": ROOT, "snaproot": ROOT, "snapdir": SNAPROOT}[key[0]]
        out = [(".", self._dir_attr(ino)), ("..", self._dir_attr(parent))]   # as ls -a shows
        if key[0] == "root":
            out.append((SNAPDIR, self._dir_attr(SNAPROOT)))
            for name, image_id in sorted(self._names().items()):
                try:
                    out.append((name, self._getattr(self._ino(("img", image_id)))))
                except (EcfsError, pyfuse3.FUSEError):
                    continue        # removed or damaged meanwhile: not listed
        elif key[0] == "snaproot":
            for name, image_id in sorted(self._names().items()):
                out.append((name, self._dir_attr(self._ino(("snapdir", image_id)))))
        elif key[0] == "snapdir":
            hdr = load_header(self.store, key[1])
            for s in sorted(hdr.snapshots, key=lambda s: s.id):
                skey = ("snap", key[1], s.name)
                out.append((s.name, self._file_attr(self._ino(skey), skey, hdr)))
        return out

    async def releasedir(self, fh):
        pass

    # ------------------------------------------------------------ files
    async def open(self, inode, flags, ctx):
        return await self._run(self._open, inode, flags)

    def _open(self, inode: int, flags: int) -> pyfuse3.FileInfo:
        key = self._key(inode)
        if key[0] not in ("img", "snap"):
            raise pyfuse3.FUSEError(errno.EISDIR)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        if writable and (key[0] == "snap" or self.read_only):
            raise pyfuse3.FUSEError(errno.EROFS)
        if key[0] == "img" and not writable:
            # close-to-open: what another mount wrote before this open is
            # seen (its cache flushed), as the CLI's readers see it
            flush_owner(self.store, key[1], strict=False)
        img = self._hold_image(key)
        try:
            if writable:
                # at open, not at the first write: a write-back error would
                # only surface later, as EIO
                img.acquire_lock(exclusive=self.exclusive)
            if flags & os.O_TRUNC and writable:
                img.resize(0)
        except BaseException:
            self._drop(key)
            raise
        with self._lock:
            fh = self._next_fh
            self._next_fh += 1
            self._handles[fh] = Handle(inode, key, img, writable)
        return pyfuse3.FileInfo(fh=fh, keep_cache=False)

    async def create(self, parent_inode, name, mode, flags, ctx):
        return await self._run(self._create, parent_inode, os.fsdecode(name), mode, flags)

    def _create(self, parent: int, name: str, mode: int, flags: int):
        if self._key(parent)[0] != "root":
            raise pyfuse3.FUSEError(errno.EROFS if parent != ROOT else errno.EPERM)
        if self.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        if name == SNAPDIR:
            raise pyfuse3.FUSEError(errno.EEXIST)
        if len(os.fsencode(name)) > MAX_NAME:
            raise pyfuse3.FUSEError(errno.ENAMETOOLONG)
        validate_image_name(name)
        RBD().create(self.store, name, 0)
        ino = self._ino(("img", directory.lookup(self.store, name)))
        fi = self._open(ino, flags | os.O_RDWR)
        return fi, self._getattr(ino)

    @staticmethod
    def _fast(fn, *args):
        """A request's fast path, run on this loop (no thread hop): its
        answer, or None for the worker path (which also says what is wrong
        when the fast path failed unexpectedly)."""
        try:
            return fn(*args)
        except Exception:
            log.error("unexpected error on a fast path:\n%s", traceback.format_exc())
            return None

    async def read(self, fh, off, size):
        h = self._handles[fh]
        got = self._fast(h.image.try_read, off, size)     # from memory when it can be
        if got is not None:
            return got
        return await self._run(h.image.read, off, size)

    async def write(self, fh, off, buf):
        h = self._handles[fh]
        if not h.writable:
            raise pyfuse3.FUSEError(errno.EBADF)
        n = self._fast(h.image.try_write, buf, off)       # into the stripe cache
        if n is not None:
            h.wrote = True
            return n
        return await self._run(self._write, h, off, buf)

    def _write(self, h: Handle, off: int, buf: bytes) -> int:
        h.wrote = True
        _within_max(off + len(buf))
        return h.image.write_growing(buf, off)

    def _grow(self, img: Image, end: int) -> None:
        """An fallocate past the end grows the image (never shrinks it);
        writes grow it in Image.write_growing."""
        _within_max(end)
        img.grow_for_write(end)

    async def fallocate(self, fh, mode, off, length):
        h = self._handles[fh]
        if not h.writable:
            raise pyfuse3.FUSEError(errno.EBADF)
        return await self._run(self._fallocate, h, mode, off, length)

    def _fallocate(self, h: Handle, mode: int, off: int, length: int) -> None:
        img = h.image
        known = FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE
        if mode & ~known or (mode & FALLOC_FL_PUNCH_HOLE and not mode & FALLOC_FL_KEEP_SIZE):
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        h.wrote = True
        if not mode & FALLOC_FL_KEEP_SIZE:
            self._grow(img, off + length)
        if mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            img.discard(off, length)

    async def flush(self, fh):
        h = self._handles[fh]
        if h.writable:
            await self._run(self._flush, h)

    async def fsync(self, fh, datasync):
        h = self._handles[fh]
        await self._run(self._flush, h)

    def _flush(self, h: Handle) -> None:
        """close(2) and fsync(2): the image's cached writes are durable,
        or EIO (as a kernel block device says a write-back failed)."""
        try:
            h.image.flush()
        except Fenced as e:
            log.warning("%s", e)
            raise pyfuse3.FUSEError(errno.EIO) from None

    async def release(self, fh):
        h = self._handles.pop(fh)
        await self._run(self._release, h)

    def _release(self, h: Handle) -> None:
        try:
            if h.writable:
                h.image.flush()
        finally:
            # even when the flush failed: else the image is never closed and
            # its lock never handed back
            self._drop(h.key)

    def _drop(self, key: tuple) -> None:
        with self._lock:
            ent = self._images.get(key)
            if ent is None:
                return
            ent[1] -= 1
            if ent[1] > 0:
                return
            del self._images[key]
        ent[0].close()              # flushes and hands the lock back

    # ------------------------------------------------------------ namespace
    async def unlink(self, parent_inode, name, ctx):
        await self._run(self._unlink, parent_inode, os.fsdecode(name))

    def _unlink(self, parent: int, name: str) -> None:
        if self._key(parent)[0] != "root" or name == SNAPDIR:
            raise pyfuse3.FUSEError(errno.EROFS if parent != ROOT else errno.EPERM)
        if self.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        image_id = directory.lookup(self.store, name)
        if ("img", image_id) in self._images:
            raise pyfuse3.FUSEError(errno.EBUSY)
        RBD().remove(self.store, name)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        await self._run(self._rename, parent_inode_old, os.fsdecode(name_old),
                        parent_inode_new, os.fsdecode(name_new), flags)

    def _rename(self, pold, old, pnew, new, flags) -> None:
        if self._key(pold)[0] != "root" or self._key(pnew)[0] != "root":
            # snapshots are read-only views: EROFS, not EXDEV (which would make
            # mv copy a snapshot into a new image and then fail to remove it)
            raise pyfuse3.FUSEError(errno.EROFS)
        if self.read_only:
            raise pyfuse3.FUSEError(errno.EROFS)
        if SNAPDIR in (old, new):
            raise pyfuse3.FUSEError(errno.EPERM)
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise pyfuse3.FUSEError(errno.EINVAL)
        names = self._names()
        if new in names and new != old:
            if flags & pyfuse3.RENAME_NOREPLACE:
                raise pyfuse3.FUSEError(errno.EEXIST)
            self._unlink(ROOT, new)          # mv over an image replaces it, as for files
        RBD().rename(self.store, old, new)
        for key, ent in list(self._images.items()):
            if key[1] == names.get(old):
                ent[0].name = new

    async def mkdir(self, parent_inode, name, mode, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def rmdir(self, parent_inode, name, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def symlink(self, parent_inode, name, target, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def link(self, inode, new_parent_inode, new_name, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def readlink(self, inode, ctx):
        raise pyfuse3.FUSEError(errno.EINVAL)

    async def setxattr(self, inode, name, value, ctx):
        raise pyfuse3.FUSEError(errno.ENOTSUP)

    async def getxattr(self, inode, name, ctx):
        # ENOSYS, not ENODATA: the kernel then stops asking (a getxattr of
        # security.capability came before every write: a second request
        # per write); userspace sees EOPNOTSUPP, as on a file system
        # without xattrs
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def listxattr(self, inode, ctx):
        return []

    async def removexattr(self, inode, name, ctx):
        raise pyfuse3.FUSEError(errno.ENODATA)

    async def forget(self, inode_list):
        pass            # inodes are cheap and stable for the mount's life

    async def statfs(self, ctx):
        return await self._run(self._statfs)

    def _statfs(self) -> pyfuse3.StatvfsData:
        """Usable capacity: free space of the OSDs' distinct file systems,
        times K/(K+M)."""
        s = pyfuse3.StatvfsData()
        seen = {}
        for osd, path in self.store.osdmap.paths.items():
            try:
                v = os.statvfs(path)
                st = os.stat(path)
            except OSError:
                continue
            seen[st.st_dev] = v
        k, m = self.store.k, self.store.width - self.store.k
        bs = 4096
        total = sum(v.f_blocks * v.f_frsize for v in seen.values())
        free = sum(v.f_bavail * v.f_frsize for v in seen.values())
        s.f_bsize = s.f_frsize = bs
        s.f_blocks = total * k // (k + m) // bs
        s.f_bfree = s.f_bavail = free * k // (k + m) // bs
        n = len(self._names())
        s.f_files = n + 1000000
        s.f_ffree = s.f_favail = 1000000
        s.f_namemax = 250
        return s

    # ------------------------------------------------------------ shutdown
    def close_all(self) -> None:
        """Flush and close every image (unmount, SIGTERM)."""
        self._invalidator.stop()
        for key, ent in list(self._images.items()):
            try:
                ent[0].close()
            except Exception:
                log.error("closing %s:\n%s", key, traceback.format_exc())
        self._images.clear()
        self._handles.clear()

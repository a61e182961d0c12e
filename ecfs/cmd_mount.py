"""``ecfs mount`` and ``ecfs umount``: serve the store's images through FUSE.

``ecfs mount MNT`` checks its arguments, forks, and returns once the child
serves the mount (the child reports "ready" or its error through a pipe);
``--foreground`` serves in this process (systemd, debugging) and tells
systemd READY=1 when the mount is live and STOPPING=1 when it stops.
SIGTERM and SIGINT stop serving, flush, unmount and exit 0; after an
outside ``fusermount3 -u`` the process flushes everything it holds and
exits. A mount point left over by a killed mount (the kernel answers
ENOTCONN) is cleared by the next ``ecfs mount``. ``ecfs umount MNT``
unmounts (refused, as umount(8) refuses, while an image is open or mapped)
and returns once the mount process has flushed and exited.
"""
from __future__ import annotations

import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time

from backend.errors import Busy, InvalidArgument, StoreError

from . import mounts
from .units import format_size, parse_size

OPTIONS = ("ro", "rw", "allow_other", "allow_root", "default_permissions")
UMOUNT_WAIT = 120.0     # seconds ecfs umount waits for the mount process to flush and exit


def register(sub) -> None:
    p = sub.add_parser("mount", help="serve the store's images as files at MOUNTPOINT")
    p.add_argument("mountpoint")
    p.add_argument("--foreground", "-f", action="store_true",
                   help="stay in the foreground (systemd, debugging); log to stderr")
    p.add_argument("--cache-size", default="64M",
                   help="write-back stripe cache size (default 64M; 0: every write is "
                        "durable before it returns)")
    p.add_argument("--exclusive", action="store_true",
                   help="keep the lock of every image opened for writing: other writers "
                        "get EBUSY instead of a hand-over")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPT[,OPT]",
                   help="mount options: ro, allow_other")
    p.set_defaults(func=cmd_mount)
    q = sub.add_parser("umount", help="flush and unmount MOUNTPOINT")
    q.add_argument("mountpoint")
    q.set_defaults(func=cmd_umount)


def _options(values: list[str]) -> set[str]:
    out = set()
    for v in values:
        for o in v.split(","):
            o = o.strip()
            if not o:
                continue
            if o not in OPTIONS:
                raise InvalidArgument(f"unknown mount option {o!r} (known: {', '.join(OPTIONS)})")
            out.add(o)
    if {"ro", "rw"} <= out:
        raise InvalidArgument("mount options ro and rw contradict each other")
    return out


def _check_mountpoint(mnt: str) -> None:
    """Refuse a mount point in use; clear a stale ecfs one."""
    kind = mounts.fstype(mnt)
    if kind is not None:
        if kind == mounts.FSTYPE and (mounts.is_stale(mnt) or mounts.lookup(mnt) is None):
            _lazy_unmount(mnt)
            logging.getLogger("ecfs.mount").info("cleared a stale mount at %s", mnt)
        else:
            raise Busy(f"{mnt} is already mounted ({kind})")
    if not os.path.isdir(mnt):
        raise InvalidArgument(f"mount point {mnt} is not a directory" if os.path.exists(mnt)
                              else f"mount point {mnt} does not exist")


def _lazy_unmount(mnt: str) -> None:
    p = subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True, text=True)
    if p.returncode != 0 and mounts.fstype(mnt) is not None:
        p = subprocess.run(["umount", "-l", mnt], capture_output=True, text=True)
        if p.returncode != 0:
            raise Busy(f"cannot clear the stale mount at {mnt}: "
                       f"{(p.stderr or '').strip().splitlines()[-1:] or ['umount failed']}")


def _check_apart(mnt: str, store_dir: str) -> None:
    """Refuse a mount point that is, holds, or lies inside the store, an
    OSD directory or the journal: the mount process would reach its own
    store through its own mount, and every access there would hang in the
    kernel (D state) until the process is killed."""
    from backend.pool import load_pool, osd_abspath
    store = os.path.realpath(store_dir)
    # the most specific first: an OSD directory inside the store is named as such
    places = {f"osd.{e.id}": os.path.realpath(osd_abspath(store, e)) for e in load_pool(store).osds}
    places |= {"the journal": os.path.join(store, "journal.log"), "the store": store}
    real = os.path.realpath(mnt)
    above = real.rstrip("/") + "/"
    found = [("is", w, p) for w, p in places.items() if real == p] + \
        [("lies inside", w, p) for w, p in places.items() if real.startswith(p + "/")] + \
        [("holds", w, p) for w, p in reversed(places.items()) if p.startswith(above)]
    if found:
        rel, what, p = found[0]
        raise InvalidArgument(f"mount point {mnt} {rel} {what} ({p}); mount it "
                              f"somewhere outside the store and its OSD directories")


def cache_size(text: str) -> int:
    """--cache-size, at most half of physical memory: the stripe cache is
    RAM (write-back), and the rest of the host needs the other half. Half
    is also the default bound of Linux's ZFS ARC, the nearest such cache."""
    n = parse_size(text, what="cache size")
    limit = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    if n > limit:
        raise InvalidArgument(f"cache size {text!r} is more than half of the physical memory "
                              f"({format_size(limit)} of {format_size(2 * limit)}); the stripe "
                              f"cache lives in RAM")
    return n


def cmd_mount(args) -> int:
    opts = _options(args.options)
    cache = cache_size(args.cache_size)
    if not args.mountpoint:
        raise InvalidArgument("the mount point must not be empty")
    mnt = mounts.resolve(os.path.abspath(args.mountpoint))
    store_dir = args.store
    # check the store before forking, so a bad one is one error line here
    from backend.objectstore import ObjectStore
    ObjectStore(store_dir).close()
    _check_apart(mnt, store_dir)
    if args.foreground:
        _setup_logging(None)          # first: clearing a stale mount is worth a log line
    _check_mountpoint(mnt)
    if args.foreground:
        return serve(store_dir, mnt, opts, args.exclusive, ready=lambda: sd_notify("READY=1"),
                     cache=cache)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                  # the mount process
        os.close(r)
        os.setsid()
        rc = 1
        try:
            _setup_logging(os.path.join(store_dir, "mount.log"))
            _detach_stdio()
            rc = serve(store_dir, mnt, opts, args.exclusive,
                       ready=lambda: (os.write(w, b"ok\n"), os.close(w)), cache=cache)
        except BaseException as e:       # report to the parent, then go
            msg = str(e) if isinstance(e, (StoreError, InvalidArgument, Busy)) or \
                hasattr(e, "errno") else f"{type(e).__name__}: {e}"
            try:
                os.write(w, ("error " + msg.replace("\n", " ") + "\n").encode())
            except OSError:
                pass
            logging.getLogger("ecfs.mount").exception("mount failed")
        finally:
            os._exit(rc)
    os.close(w)
    got = b""
    while True:
        chunk = os.read(r, 4096)
        if not chunk:
            break
        got += chunk
    os.close(r)
    line = got.decode(errors="replace").strip()
    if line == "ok":
        return 0
    os.waitpid(pid, 0)
    raise Busy(line[len("error "):] if line.startswith("error ") else
               "the mount process failed (see STORE/mount.log)")


def _setup_logging(path: str | None) -> None:
    kw = {"filename": path} if path else {"stream": sys.stderr}
    logging.basicConfig(level=logging.INFO, force=True,
                        format="%(asctime)s ecfs[%(process)d] %(levelname)s %(message)s", **kw)


def _detach_stdio() -> None:
    fd = os.open(os.devnull, os.O_RDWR)
    for i in (0, 1, 2):
        os.dup2(fd, i)
    os.close(fd)


def sd_notify(msg: str) -> None:
    """Tell systemd (Type=notify) how we are; nothing without NOTIFY_SOCKET."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(msg.encode())
    except OSError as e:
        logging.getLogger("ecfs.mount").warning("sd_notify %s: %s", msg, e)


def _raise_fd_limit(log) -> None:
    """The store keeps shard files open (backend/objstate.py, a quarter of
    the fd limit): raise the soft limit to the hard one (capped), as a
    server does, so the default 1,024 does not make it reopen them."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1 << 16 if hard == resource.RLIM_INFINITY else min(hard, 1 << 16)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError) as e:
            log.info("cannot raise the open file limit from %d: %s", soft, e)


def serve(store_dir: str, mnt: str, opts: set[str], exclusive: bool, ready,
          cache: int = 0) -> int:
    """Mount, serve until unmounted or signalled, flush, exit status."""
    import pyfuse3
    import trio

    from backend.objectstore import ObjectStore

    from .fuse import HAS_FALLOCATE, EcfsFS
    log = logging.getLogger("ecfs.mount")
    # SIGTERM/SIGINT stay blocked until trio listens for them: a stop right
    # after READY=1 must still flush and unmount, not kill us mid-way
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    _raise_fd_limit(log)
    store = ObjectStore(store_dir)
    if cache and "ro" not in opts:
        from backend.stripecache import StripeCache
        store = StripeCache(store, cache)
    fs = EcfsFS(store, read_only="ro" in opts, exclusive=exclusive)
    fuse_opts = set(pyfuse3.default_options) | {f"fsname=ecfs:{os.path.abspath(store_dir)}",
                                                "subtype=ecfs"}
    fuse_opts |= {o for o in opts if o in ("ro", "allow_other", "allow_root")}
    try:
        pyfuse3.init(fs, mnt, fuse_opts)
    except BaseException:
        store.close()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)
        raise
    mounts.register(mounts.MountRecord(os.getpid(), mnt, os.path.abspath(store_dir),
                                       "ro" in opts, exclusive, time.time()))
    log.info("serving %s at %s%s%s", store_dir, mnt, " (read-only)" if "ro" in opts else "",
             "" if HAS_FALLOCATE else "; discard unsupported (stock pyfuse3: no fallocate)")
    try:
        async def main():
            async with trio.open_nursery() as nursery:
                async def on_signal(task_status=trio.TASK_STATUS_IGNORED):
                    with trio.open_signal_receiver(*stop_signals) as sigs:
                        task_status.started()
                        async for s in sigs:
                            log.info("signal %d: flushing and unmounting", s)
                            nursery.cancel_scope.cancel()
                            return
                await nursery.start(on_signal)
                # listening now: a signal that came meanwhile is delivered here
                signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)
                ready()
                await pyfuse3.main()
                log.info("unmounted from outside: flushing")
                nursery.cancel_scope.cancel()

        trio.run(main)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stop_signals)
        sd_notify("STOPPING=1")
        try:
            fs.close_all()
            store.close()
        finally:
            mounts.unregister(mnt, os.getpid())
            pyfuse3.close(unmount=True)
    log.info("stopped")
    return 0


def cmd_umount(args) -> int:
    mnt = mounts.resolve(os.path.abspath(args.mountpoint))
    rec = mounts.lookup(mnt)
    if rec is None:
        if mounts.fstype(mnt) == mounts.FSTYPE:
            _lazy_unmount(mnt)                 # stale: its process is gone
            return 0
        kind = mounts.fstype(mnt)
        raise InvalidArgument(f"{mnt} is not an ecfs mount" + (f" ({kind})" if kind else
                                                              " (nothing is mounted there)"))
    try:
        pidfd = os.pidfd_open(rec.pid)
    except ProcessLookupError:
        pidfd = None
    # As umount(8): the kernel refuses while files are open or a loop device
    # is attached to an image, and then nothing changes. Once unmounted, the
    # mount process flushes and exits by itself.
    p = subprocess.run(["fusermount3", "-u", mnt], capture_output=True, text=True)
    if p.returncode != 0:
        if pidfd is not None:
            os.close(pidfd)
        err = (p.stderr or "").strip()
        if "busy" in err.lower():
            raise Busy(f"{mnt}: target is busy (an image is open or mapped; see "
                       f"'ecfs rbd showmapped' and 'fuser -m {mnt}')")
        raise Busy(f"cannot unmount {mnt}: {err.splitlines()[-1] if err else 'fusermount3 failed'}")
    if pidfd is not None:
        try:
            ready, _, _ = select.select([pidfd], [], [], UMOUNT_WAIT)
        finally:
            os.close(pidfd)
        if not ready:
            raise Busy(f"the mount process (pid {rec.pid}) did not exit within "
                       f"{UMOUNT_WAIT:g} s; it may still be flushing")
    if mounts.fstype(mnt) == mounts.FSTYPE:
        _lazy_unmount(mnt)
    return 0

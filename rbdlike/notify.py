"""Watch/notify between the processes that have an image open (librbd's
ImageWatcher over local sockets).

Every process that watches an image (its lock owner always does) listens
on a Unix socket in the abstract namespace and registers it in
``STORE/rbd/watch/ID/COOKIE`` (JSON: pid, host, address, cookie, since).
Messages are JSON lines. A request is one line; the answer is zero or more
``{"progress": [done, total]}`` lines and then one final line, either
``{"ok": true, "result": ...}`` or ``{"error": {"type", "message"}}``
(an EcfsError class name from backend.errors or rbdlike, re-raised on the
requesting side). Requests (the "op" key):

==================  =========================================================
``request_lock``    a peer wants to write: the owner flushes and releases
                    the exclusive lock, unless it holds it exclusively (then
                    the answer is Busy)
``header_update``   the header changed (size, snapshots): reload it
``lock_acquired``,  a peer took or gave up the lock: a mount invalidates its
``lock_released``   kernel cache of the image's file
maintenance ops     ``snap_create``, ``snap_rm``, ``snap_rollback``,
                    ``snap_protect``, ``snap_unprotect``, ``resize``,
                    ``flatten``, ``object_map_rebuild``, ``sparsify``: run by
                    the lock owner on the requester's behalf (the owner
                    flushes its cache first), with progress for long ones
==================  =========================================================

A maintenance request carries a ``deadline`` (Unix time): an owner that
gets to it later refuses it, so a requester that gave up (the owner did
not answer in time) never sees its operation happen after all. It also
carries a ``request_id`` that its retries reuse: the op runs once
(rbdlike/lock_owner.py). An owner that is closing or handed the lock
over answers NotOwner, and the requester asks the next holder.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import traceback
import uuid

from backend import errors as _errors
from backend.errors import EcfsError
# the errors of this protocol, re-exported for callers (defined with the rest)
from backend.errors import NotOwner as NotOwner, TimedOut as TimedOut
from backend.errors import Unreachable as Unreachable
from backend.procs import pid_alive

from .directory import rbd_dir

_log = logging.getLogger("ecfs.notify")

DEFAULT_TIMEOUT = 30.0      # seconds without any answer before a request gives up


def timeout() -> float:
    """ECFS_NOTIFY_TIMEOUT (seconds) overrides the default, e.g. for tests."""
    try:
        return float(os.environ.get("ECFS_NOTIFY_TIMEOUT", DEFAULT_TIMEOUT))
    except ValueError:
        return DEFAULT_TIMEOUT


def _watch_dir(store, image_id: str) -> str:
    d = os.path.join(rbd_dir(store), "watch", image_id)
    os.makedirs(d, mode=0o700, exist_ok=True)
    return d


def watchers(store, image_id: str) -> list[dict]:
    """The live watchers of an image (stale registrations are removed)."""
    d = _watch_dir(store, image_id)
    out = []
    for f in sorted(os.listdir(d)):
        p = os.path.join(d, f)
        try:
            with open(p) as fh:
                w = json.load(fh)
        except (OSError, ValueError):
            continue
        if not isinstance(w, dict) or not pid_alive(int(w.get("pid", 0))):
            try:
                os.unlink(p)
            except OSError:
                pass
            continue
        out.append(w)
    return out


def _error_class(name: str):
    """The EcfsError class a peer named (backend/errors.py holds them all)."""
    c = getattr(_errors, name, None)
    if isinstance(c, type) and issubclass(c, EcfsError):
        return c
    return EcfsError


def _connect(address: str, wait: float) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(wait)
    try:
        s.connect("\0" + address)
    except OSError:
        s.close()
        raise
    return s


def request(address: str, msg: dict, on_progress=None, wait: float | None = None):
    """Send one request and return the final result; raise the error the
    peer answered with, TimedOut when it is silent for ``wait`` seconds, or
    Busy when nobody listens at ``address``."""
    wait = timeout() if wait is None else wait
    try:
        s = _connect(address, wait)
    except OSError as e:
        raise Unreachable(f"the lock owner cannot be reached ({e.strerror or e})") from None
    op = msg.get("op")
    try:
        f = s.makefile("rb")
        while True:
            try:
                if msg is not None:
                    s.sendall((json.dumps(msg) + "\n").encode())
                    msg = None
                line = f.readline()
            except socket.timeout:
                raise TimedOut(f"the lock owner did not answer {op!r} within "
                               f"{wait:g} s") from None
            except OSError as e:          # reset, broken pipe: it went away
                raise Unreachable(f"the lock owner went away during {op!r} "
                                  f"({e.strerror or e})") from None
            if not line:
                raise Unreachable(f"the lock owner went away during {op!r}")
            ans = json.loads(line)
            if "progress" in ans:
                if on_progress is not None:
                    on_progress(*ans["progress"])
                continue
            if "error" in ans:
                err = ans["error"]
                raise _error_class(err.get("type", ""))(err.get("message", "error"))
            return ans.get("result")
    finally:
        s.close()


def broadcast(store, image_id: str, msg: dict, skip_cookie: str = "") -> None:
    """Tell every other watcher (best effort, short wait, no retries)."""
    for w in watchers(store, image_id):
        if w.get("cookie") == skip_cookie:
            continue
        try:
            request(w["address"], msg, wait=min(2.0, timeout()))
        except EcfsError:
            pass


class Watch:
    """This process's watch on one image: a listening socket whose requests
    go to ``handler(msg, progress) -> result`` (it raises EcfsError to
    answer an error), one thread per connection."""

    def __init__(self, store, image_id: str, handler):
        self.store = store
        self.image_id = image_id
        self.handler = handler
        self.cookie = uuid.uuid4().hex[:16]
        self.address = f"ecfs.{os.getpid()}.{image_id}.{self.cookie}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind("\0" + self.address)
        self._sock.listen(16)
        self._closed = False
        self._reg = os.path.join(_watch_dir(store, image_id), self.cookie)
        tmp = self._reg + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                       "address": self.address, "cookie": self.cookie,
                       "since": time.time()}, f)
        os.replace(tmp, self._reg)
        self._thread = threading.Thread(target=self._accept, name=f"watch-{image_id}",
                                         daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                line = conn.makefile("rb").readline()
                msg = json.loads(line)
                if not isinstance(msg, dict):
                    raise ValueError("not an object")
            except (OSError, ValueError):
                return
            lock = threading.Lock()

            def send(obj) -> None:
                with lock:
                    try:
                        conn.sendall((json.dumps(obj) + "\n").encode())
                    except OSError:
                        pass

            try:
                result = self.handler(msg, lambda done, total: send({"progress": [done, total]}))
                send({"ok": True, "result": result})
            except EcfsError as e:
                send({"error": {"type": type(e).__name__, "message": str(e)}})
            except Exception as e:     # never let a peer's request kill the process
                _log.error("request %r from a peer failed:\n%s", msg.get("op"),
                           traceback.format_exc())
                send({"error": {"type": "EcfsError",
                                "message": f"internal error in the lock owner (pid "
                                           f"{os.getpid()}): {type(e).__name__}: {e}"}})

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            os.unlink(self._reg)
        except OSError:
            pass
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()


def forget(store, image_id: str) -> None:
    """Remove an image's watch directory (after the image itself is gone)."""
    d = _watch_dir(store, image_id)
    for f in os.listdir(d):
        try:
            os.unlink(os.path.join(d, f))
        except OSError:
            pass
    try:
        os.rmdir(d)
    except OSError:
        pass

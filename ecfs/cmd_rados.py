"""``ecfs rados ...``: objects, as the ``rados`` tool handles them."""
from __future__ import annotations

import math
import os
import random
import socket
import stat
import sys
import threading
import time

from backend.errors import Busy, InvalidArgument, NotFound, OutputError, StoreError, TooBig
from backend.objectstore import ObjectStore, validate_name
from backend.pool import MAX_OBJECT_SIZE

from .cli import add_json, wants_json
from . import progress
from .output import print_json
from .units import parse_int, parse_size

BENCH_META = "benchmark_last_metadata"


OP_SIZE = 4 << 20      # bytes per I/O call of put/get, as rados's default op size
MAX_THREADS = 1024     # rados bench -t limit


def register(sub) -> None:
    p = sub.add_parser("rados", help="objects (like the rados tool)")
    rs = p.add_subparsers(dest="rados_cmd", metavar="put|get|write|read|ls|stat|rm|bench",
                          parser_class=p.__class__)
    rs.required = True
    q = rs.add_parser("put", help="store FILE (or - for stdin) as object NAME")
    q.add_argument("name")
    q.add_argument("file")
    q.set_defaults(func=cmd_put)
    q = rs.add_parser("get", help="write object NAME to FILE (or - for stdout)")
    q.add_argument("name")
    q.add_argument("file")
    q.set_defaults(func=cmd_get)
    q = rs.add_parser("write", help="write FILE (or - for stdin) into object NAME at --offset")
    q.add_argument("name")
    q.add_argument("file")
    q.add_argument("--offset", default="0", help="byte offset (units K, M, ... allowed)")
    q.set_defaults(func=cmd_write)
    q = rs.add_parser("read", help="read --length bytes at --offset of object NAME "
                                   "to FILE (default stdout)")
    q.add_argument("name")
    q.add_argument("file", nargs="?", default="-")
    q.add_argument("--offset", default="0", help="byte offset (units K, M, ... allowed)")
    q.add_argument("--length", required=True, help="bytes to read (units K, M, ... allowed)")
    q.set_defaults(func=cmd_read, late_file=True)
    q = rs.add_parser("ls", help="list objects")
    add_json(q)
    q.set_defaults(func=cmd_ls)
    q = rs.add_parser("stat", help="size and mtime of an object")
    q.add_argument("name")
    add_json(q)
    q.set_defaults(func=cmd_stat)
    q = rs.add_parser("rm", help="remove objects (all must exist, else none is removed)")
    q.add_argument("names", nargs="+", metavar="name")
    q.set_defaults(func=cmd_rm)
    q = rs.add_parser("bench", help="benchmark the store, as rados bench")
    q.add_argument("seconds", type=_seconds)
    q.add_argument("mode", choices=["write", "seq", "rand"])
    q.add_argument("--block-size", "-b", default="4M", help="bytes per object (write; default 4M)")
    q.add_argument("--threads", "-t", type=_threads, default=16,
                   help=f"concurrent operations (default 16, at most {MAX_THREADS})")
    q.add_argument("--no-cleanup", action="store_true",
                   help="keep the objects written (for seq/rand)")
    add_json(q)
    q.set_defaults(func=cmd_bench)


def _positive_int(text: str, what: str) -> int:
    v = parse_int(text, what)
    if v <= 0:
        raise InvalidArgument(f"{what} must be positive (got {text!r})")
    return v


def _seconds(text: str) -> int:
    return _positive_int(text, "seconds")


def _threads(text: str) -> int:
    v = _positive_int(text, "--threads")
    if v > MAX_THREADS:
        raise InvalidArgument(f"--threads must be at most {MAX_THREADS} (got {v})")
    return v


def _offset(text: str, what: str = "offset") -> int:
    v = parse_size(text, what=what)
    if v > MAX_OBJECT_SIZE:
        raise InvalidArgument(f"{what} {text} is past the object size limit ({MAX_OBJECT_SIZE})")
    return v


# ------------------------------------------------ files named on the command line
# Both are checked before the store is opened, so a bad path costs no I/O.
def _check_input(path: str, limit: int) -> None:
    if path == "-":
        return
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NotFound(f"no such file: {path}")
    except OSError as e:
        raise InvalidArgument(f"cannot read {path}: {e.strerror}")
    if stat.S_ISDIR(st.st_mode):
        raise InvalidArgument(f"{path} is a directory")
    if not os.access(path, os.R_OK):
        raise InvalidArgument(f"cannot read {path}: permission denied")
    if stat.S_ISREG(st.st_mode) and st.st_size > limit:
        raise TooBig(f"{path} is larger than the object size limit ({limit} bytes)")


def _check_output(path: str) -> None:
    """FILE can be written: not a directory, in an existing writable
    directory (or itself writable)."""
    if path == "-":
        return
    if os.path.isdir(path):
        raise InvalidArgument(f"cannot write {path}: it is a directory")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise NotFound(f"cannot write {path}: no such directory {parent}")
    if os.path.exists(path):
        if not os.access(path, os.W_OK):
            raise InvalidArgument(f"cannot write {path}: permission denied")
    elif not os.access(parent, os.W_OK | os.X_OK):
        raise InvalidArgument(f"cannot write {path}: permission denied on {parent}")


def _read_input(path: str, limit: int) -> bytes:
    """The whole of FILE or stdin, refusing more than ``limit`` bytes."""
    _check_input(path, limit)
    if path == "-":
        data = sys.stdin.buffer.read(limit + 1)
    else:
        try:
            with open(path, "rb") as f:
                data = f.read(limit + 1)
        except OSError as e:
            raise InvalidArgument(f"cannot read {path}: {e.strerror}")
    if len(data) > limit:
        raise TooBig(f"input is larger than the limit ({limit} bytes)")
    return data


def _write_output(path: str, data: bytes) -> None:
    if path == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    existed = os.path.lexists(path)
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError as e:
        if not existed:       # leave no half-written file behind
            try:
                os.unlink(path)
            except OSError:
                pass
        raise OutputError(f"cannot write {path}: {e.strerror}")


def _open(args) -> ObjectStore:
    return ObjectStore(args.store)


# ------------------------------------------------------------------ verbs
def cmd_put(args) -> int:
    """Whole object from FILE. Above OP_SIZE it is written in OP_SIZE
    operations (the first replaces the object, the others append), as
    ``rados put`` does, so the progress bar moves; each is atomic, the
    whole is not."""
    validate_name(args.name)
    _check_input(args.file, MAX_OBJECT_SIZE)
    with _open(args) as st:   # the store must exist before stdin is consumed
        data = memoryview(_read_input(args.file, MAX_OBJECT_SIZE))
        KC = st.k * st.pool.chunk_for(len(data))
        op = max(KC, OP_SIZE // KC * KC)      # whole stripes: no reads at the seams
        with progress.bar(args, len(data), f"put {args.name}") as bar:
            st.write_full(args.name, data[:op])
            bar.update(min(op, len(data)))
            for off in range(op, len(data), op):
                piece = data[off:off + op]
                st.write(args.name, off, piece, size_hint=len(data))
                bar.update(len(piece))
    return 0


def cmd_get(args) -> int:
    validate_name(args.name)
    _check_output(args.file)
    with _open(args) as st:
        data = _read_whole(st, args)
    _write_output(args.file, data)
    return 0


def _read_whole(st: ObjectStore, args) -> bytes:
    """The object, read in OP_SIZE operations (one for most objects), as
    ``rados get`` does. Read in several, it is read again if a writer
    changed it meanwhile."""
    for _ in range(5):
        s = st.stat(args.name)
        with progress.bar(args, s.size, f"get {args.name}") as bar:
            parts = []
            for off in range(0, max(s.size, 1), OP_SIZE):
                parts.append(st.read(args.name, off, min(OP_SIZE, s.size - off)))
                bar.update(len(parts[-1]))
        data = b"".join(parts)
        if s.size <= OP_SIZE:
            return data
        s2 = st.stat(args.name)
        if (s2.version, s2.size) == (s.version, len(data)):
            return data
    raise Busy(f"object {args.name!r} kept changing while it was read; try again")


def cmd_write(args) -> int:
    validate_name(args.name)
    off = _offset(args.offset)
    _check_input(args.file, MAX_OBJECT_SIZE)
    with _open(args) as st:
        data = _read_input(args.file, MAX_OBJECT_SIZE)
        if off + len(data) > MAX_OBJECT_SIZE:
            raise TooBig(f"write would end past the object size limit ({MAX_OBJECT_SIZE} bytes)")
        st.write(args.name, off, data)
    return 0


def cmd_read(args) -> int:
    validate_name(args.name)
    off = _offset(args.offset)
    length = _offset(args.length, "length")
    _check_output(args.file)
    with _open(args) as st:
        data = st.read(args.name, off, length)
    _write_output(args.file, data)
    return 0


def cmd_ls(args) -> int:
    with _open(args) as st:
        names = st.list()
    if wants_json(args):
        print_json(names)
    else:
        for n in names:
            print(n)
    return 0


def cmd_stat(args) -> int:
    validate_name(args.name)
    with _open(args) as st:
        s = st.stat(args.name)
    mtime = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(s.mtime))
    if wants_json(args):
        print_json({"name": s.name, "size": s.size, "mtime": mtime, "version": s.version,
                    "chunk_size": s.chunk_size})
    else:
        print(f"{s.name} mtime {mtime}, size {s.size}")
    return 0


def cmd_rm(args) -> int:
    names = list(dict.fromkeys(args.names))     # a name given twice goes once
    for n in names:
        validate_name(n)
    with _open(args) as st:
        # All must exist before any goes. A read-only view counts no I/O,
        # so a refused rm leaves the counters as they were.
        with ObjectStore(args.store, readonly=True) as ro:
            missing = [n for n in names if not ro.exists(n)]
        if missing:
            raise NotFound(f"object {missing[0]!r} does not exist; nothing removed")
        for n in names:
            st.remove(n)
    return 0


# ---------------------------------------------------------------- bench
# Output as ``rados bench`` prints it: the same header, per-second rows and
# summary lines (bandwidth in MiB/s, as rados computes "MB/sec"), then the
# shard I/O per operation that only ecfs can tell.
ROW_HEADER = ("  sec Cur ops   started  finished  avg MB/s  cur MB/s "
              "last lat(s)  avg lat(s)")
MB = 1 << 20


def cmd_bench(args) -> int:
    bs = parse_size(args.block_size, what="block size")
    if not 1 <= bs <= MAX_OBJECT_SIZE:
        raise InvalidArgument(f"block size must be within 1..{MAX_OBJECT_SIZE}")
    with _open(args) as st:
        if args.mode == "write":
            return _bench_write(st, args, bs)
        return _bench_read(st, args)


class _Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.started = self.finished = 0
        self.bytes = 0
        self.lat: list[float] = []


def _bench_loop(args, stats: _Stats, op, label: str, bs: int, stop_after=None) -> dict:
    t0 = time.monotonic()
    deadline = t0 + args.seconds    # so a run lasts at least until its last row
    errors: list[BaseException] = []

    def worker():
        while time.monotonic() < deadline and not errors:
            with stats.lock:
                if stop_after is not None and stats.started >= stop_after:
                    return
                n = stats.started
                stats.started += 1
            s = time.monotonic()
            try:
                op(n)
            except BaseException as e:  # report once, stop everyone
                errors.append(e)
                return
            e = time.monotonic() - s
            with stats.lock:
                stats.finished += 1
                stats.bytes += bs
                stats.lat.append(e)

    quiet = wants_json(args)
    bw_hist: list[float] = []      # MiB/s of each whole second
    iops_hist: list[int] = []
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.threads)]
    for t in threads:
        t.start()
    with progress.bar(args, args.seconds, f"bench {label}", unit="s") as bar:
        def row(sec: int, last_fin: int) -> int:
            with stats.lock:
                b, fin, started = stats.bytes, stats.finished, stats.started
                last = f"{stats.lat[-1]:.6g}" if stats.lat else "-"
                avg = sum(stats.lat) / len(stats.lat) if stats.lat else 0.0
            el = max(1e-9, time.monotonic() - t0)
            cur = (fin - last_fin) * bs / MB
            if sec:
                bw_hist.append(cur)
                iops_hist.append(fin - last_fin)
            if not quiet:
                if sec and sec % 20 == 0:
                    bar.print(ROW_HEADER)
                bar.print(f"{sec:>5} {started - fin:>7} {started:>9} {fin:>9} "
                          f"{b / el / MB:>9.5g} {cur:>9.5g} {last:>11} {avg:>11.6g}")
            bar.note(f"{fin} ops")
            return fin

        if not quiet:
            bar.print(ROW_HEADER)
        last_fin = row(0, 0)
        sec = 0
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(timeout=max(0.0, t0 + sec + 1 - time.monotonic()))
                if time.monotonic() >= t0 + sec + 1:
                    break
            if time.monotonic() < t0 + sec + 1:
                break             # all done before the second was up
            sec += 1
            bar.update(1 if sec <= args.seconds else 0)
            last_fin = row(sec, last_fin)
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    el = time.monotonic() - t0
    if not bw_hist:           # done within the first second: that run is the sample
        bw_hist.append(stats.bytes / el / MB)
        iops_hist.append(stats.finished)
    lat = sorted(stats.lat) or [0.0]
    return {"mode": label, "total_time_run": el, "ops": stats.finished, "op_size": bs,
            "object_size": bs,
            "bandwidth_MBps": stats.bytes / el / MB,
            "stddev_bandwidth": _stddev(bw_hist),
            "max_bandwidth_MBps": max(bw_hist, default=0.0),
            "min_bandwidth_MBps": min(bw_hist, default=0.0),
            "iops": stats.finished / el, "stddev_iops": _stddev(iops_hist),
            "max_iops": max(iops_hist, default=0), "min_iops": min(iops_hist, default=0),
            "avg_latency_s": sum(lat) / len(lat), "stddev_latency_s": _stddev(lat),
            "max_latency_s": lat[-1], "min_latency_s": lat[0]}


def _stddev(xs) -> float:
    """Sample standard deviation, as rados bench reports it."""
    if len(xs) < 2:
        return 0.0
    mean = sum(xs) / len(xs)
    return math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))


def _obj_name(n: int, prefix: str) -> str:
    return f"{prefix}_object{n}"


def _print_summary(args, res: dict, st: ObjectStore, c0: dict) -> None:
    c1 = st.counters.snapshot()
    d = {k: c1[k] - c0[k] for k in c1}
    ops = max(1, res["ops"])
    res["shard_reads_per_op"] = d["shard_reads"] / ops
    res["shard_writes_per_op"] = d["shard_writes"] / ops
    if wants_json(args):
        return
    mode = res["mode"]
    lines = [
        ("Total time run:", f"{res['total_time_run']:.4f}"),
        (f"Total {mode}s made:", res["ops"]),
        (f"{mode.capitalize()} size:", res["op_size"]),
        ("Object size:", res["object_size"]),
        ("Bandwidth (MB/sec):", f"{res['bandwidth_MBps']:.6g}"),
        ("Stddev Bandwidth:", f"{res['stddev_bandwidth']:.6g}"),
        ("Max bandwidth (MB/sec):", f"{res['max_bandwidth_MBps']:.6g}"),
        ("Min bandwidth (MB/sec):", f"{res['min_bandwidth_MBps']:.6g}"),
        ("Average IOPS:", int(res["iops"])),
        ("Stddev IOPS:", f"{res['stddev_iops']:.6g}"),
        ("Max IOPS:", res["max_iops"]),
        ("Min IOPS:", res["min_iops"]),
        ("Average Latency(s):", f"{res['avg_latency_s']:.6g}"),
        ("Stddev Latency(s):", f"{res['stddev_latency_s']:.6g}"),
        ("Max latency(s):", f"{res['max_latency_s']:.6g}"),
        ("Min latency(s):", f"{res['min_latency_s']:.6g}"),
        ("Shard reads per op:", f"{res['shard_reads_per_op']:.2f}"),
        ("Shard writes per op:", f"{res['shard_writes_per_op']:.2f}"),
    ]
    for k, v in lines:
        print(f"{k:<24}{v}")


def _bench_write(st: ObjectStore, args, bs: int) -> int:
    prefix = f"benchmark_data_{socket.gethostname()}_{os.getpid()}"
    payload = os.urandom(bs)
    quiet = wants_json(args)
    if not quiet:
        print(f"Maintaining {args.threads} concurrent writes of {bs} bytes to objects of "
              f"size {bs} for up to {args.seconds} seconds or 0 objects")
        print(f"Object prefix: {prefix}", flush=True)
    c0 = st.counters.snapshot()
    stats = _Stats()
    res = _bench_loop(args, stats, lambda n: st.write_full(_obj_name(n, prefix), payload),
                      "write", bs)
    _print_summary(args, res, st, c0)
    if args.no_cleanup:
        st.write_full(BENCH_META, f"{prefix}\n{stats.finished}\n{bs}\n".encode())
    else:
        t = time.monotonic()
        if not quiet:
            print("Cleaning up (deleting benchmark objects)", flush=True)
        removed = 0
        for n in range(stats.started):
            try:
                st.remove(_obj_name(n, prefix))
                removed += 1
            except NotFound:
                pass
        res["cleanup_time"] = time.monotonic() - t
        if not quiet:
            print(f"Removed {removed} object{'s' if removed != 1 else ''}")
            print(f"Clean up completed and total clean up time :{res['cleanup_time']:.6g}")
    if quiet:
        print_json(res)
    return 0


def _bench_read(st: ObjectStore, args) -> int:
    try:
        prefix, count, bs = st.read(BENCH_META, 0, 4096).decode().split()
        count, bs = int(count), int(bs)
    except NotFound:
        raise NotFound("no benchmark objects: run 'ecfs rados bench SECONDS write --no-cleanup' first")
    except ValueError:
        raise StoreError(f"object {BENCH_META!r} is not benchmark metadata; remove it and "
                         f"run 'ecfs rados bench SECONDS write --no-cleanup' again")
    if count == 0:
        raise NotFound("the last write benchmark left no objects")
    rng = random.Random()
    c0 = st.counters.snapshot()
    stats = _Stats()
    if args.mode == "seq":
        op = lambda n: st.read(_obj_name(n, prefix), 0, bs)  # noqa: E731
        res = _bench_loop(args, stats, op, "read", bs, stop_after=count)
    else:
        op = lambda n: st.read(_obj_name(rng.randrange(count), prefix), 0, bs)  # noqa: E731
        res = _bench_loop(args, stats, op, "read", bs)
    _print_summary(args, res, st, c0)
    if wants_json(args):
        print_json(res)
    return 0

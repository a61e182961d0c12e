"""``ecfs rados ...``: objects, as the ``rados`` tool handles them."""
from __future__ import annotations

import os
import random
import socket
import sys
import threading
import time

from backend.errors import InvalidArgument, NotFound, TooBig
from backend.objectstore import ObjectStore, validate_name
from backend.pool import MAX_OBJECT_SIZE

from .cli import add_json, wants_json
from .output import print_json, progress
from .units import parse_size

BENCH_META = "benchmark_last_metadata"


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
    q = rs.add_parser("write", help="write FILE into object NAME at --offset")
    q.add_argument("name")
    q.add_argument("file")
    q.add_argument("--offset", default="0")
    q.set_defaults(func=cmd_write)
    q = rs.add_parser("read", help="read --length bytes at --offset")
    q.add_argument("name")
    q.add_argument("file", nargs="?", default="-")
    q.add_argument("--offset", default="0")
    q.add_argument("--length", required=True)
    q.set_defaults(func=cmd_read, late_file=True)
    q = rs.add_parser("ls", help="list objects")
    add_json(q)
    q.set_defaults(func=cmd_ls)
    q = rs.add_parser("stat", help="size and mtime of an object")
    q.add_argument("name")
    add_json(q)
    q.set_defaults(func=cmd_stat)
    q = rs.add_parser("rm", help="remove objects")
    q.add_argument("names", nargs="+", metavar="name")
    q.set_defaults(func=cmd_rm)
    q = rs.add_parser("bench", help="benchmark, as rados bench")
    q.add_argument("seconds", type=_positive_int)
    q.add_argument("mode", choices=["write", "seq", "rand"])
    q.add_argument("--block-size", "-b", default="4M")
    q.add_argument("--threads", "-t", type=_positive_int, default=16)
    q.add_argument("--no-cleanup", action="store_true")
    add_json(q)
    q.set_defaults(func=cmd_bench)


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise InvalidArgument(f"not a whole number: {text!r}")
    if v <= 0:
        raise InvalidArgument(f"must be positive: {text!r}")
    return v


def _offset(text: str, what: str = "offset") -> int:
    v = parse_size(text, what=what)
    if v > MAX_OBJECT_SIZE:
        raise InvalidArgument(f"{what} {text} is past the object size limit ({MAX_OBJECT_SIZE})")
    return v


def _read_input(path: str, limit: int) -> bytes:
    """The whole of FILE or stdin, refusing more than ``limit`` bytes."""
    if path == "-":
        data = sys.stdin.buffer.read(limit + 1)
    else:
        try:
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size > limit:
                    raise TooBig(f"{path} is larger than the object size limit ({limit} bytes)")
                data = f.read(limit + 1)
        except FileNotFoundError:
            raise NotFound(f"no such file: {path}")
        except IsADirectoryError:
            raise InvalidArgument(f"{path} is a directory")
        except PermissionError:
            raise InvalidArgument(f"cannot read {path}: permission denied")
    if len(data) > limit:
        raise TooBig(f"input is larger than the limit ({limit} bytes)")
    return data


def _write_output(path: str, data: bytes) -> None:
    if path == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError as e:
        raise InvalidArgument(f"cannot write {path}: {e.strerror}")


def _open(args) -> ObjectStore:
    return ObjectStore(args.store)


def cmd_put(args) -> int:
    validate_name(args.name)
    with _open(args) as st:   # the store must exist before stdin is consumed
        data = _read_input(args.file, MAX_OBJECT_SIZE)
        st.write_full(args.name, data)
    return 0


def cmd_get(args) -> int:
    validate_name(args.name)
    with _open(args) as st:
        size = st.stat(args.name).size
        bar = progress(size, args.name, args.progress)
        data = st.read(args.name, 0, size)
        bar.update(len(data))
        bar.close()
    _write_output(args.file, data)
    return 0


def cmd_write(args) -> int:
    validate_name(args.name)
    off = _offset(args.offset)
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
    for n in args.names:
        validate_name(n)
    with _open(args) as st:
        for n in args.names:      # all must exist before any goes
            st.stat(n)
        for n in args.names:
            st.remove(n)
    return 0


# ---------------------------------------------------------------- bench
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
    deadline = time.monotonic() + args.seconds
    t0 = time.monotonic()
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

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.threads)]
    for t in threads:
        t.start()
    quiet = wants_json(args)
    if not quiet:
        print(f"{'sec':>5} {'Cur ops':>8} {'started':>8} {'finished':>9} {'avg MB/s':>9} "
              f"{'cur MB/s':>9} {'last lat(s)':>12} {'avg lat(s)':>11}")
    last_bytes, sec = 0, 0
    while any(t.is_alive() for t in threads):
        for t in threads:
            t.join(timeout=max(0.0, t0 + sec + 1 - time.monotonic()))
            if time.monotonic() >= t0 + sec + 1:
                break
        sec += 1
        with stats.lock:
            b, fin, started = stats.bytes, stats.finished, stats.started
            last = stats.lat[-1] if stats.lat else 0.0
            avg = sum(stats.lat) / len(stats.lat) if stats.lat else 0.0
        if not quiet and sec <= args.seconds + 60:
            el = max(1e-9, time.monotonic() - t0)
            print(f"{sec - 1:>5} {started - fin:>8} {started:>8} {fin:>9} "
                  f"{b / el / 1e6:>9.3f} {(b - last_bytes) / 1e6:>9.3f} {last:>12.6f} {avg:>11.6f}",
                  flush=True)
        last_bytes = b
    if errors:
        raise errors[0]
    el = time.monotonic() - t0
    lat = sorted(stats.lat) or [0.0]
    return {"mode": label, "total_time_run": el, "ops": stats.finished, "op_size": bs,
            "bandwidth_MBps": stats.bytes / el / 1e6, "iops": stats.finished / el,
            "avg_latency_s": sum(lat) / len(lat), "max_latency_s": lat[-1],
            "min_latency_s": lat[0]}


def _obj_name(n: int, prefix: str) -> str:
    return f"{prefix}_object{n}"


def _print_summary(args, res: dict, st: ObjectStore, c0: dict) -> None:
    c1 = st.counters.snapshot()
    d = {k: c1[k] - c0[k] for k in c1}
    ops = max(1, res["ops"])
    res["shard_reads_per_op"] = d["shard_reads"] / ops
    res["shard_writes_per_op"] = d["shard_writes"] / ops
    if wants_json(args):
        print_json(res)
        return
    print(f"Total time run:         {res['total_time_run']:.4f}")
    print(f"Total {res['mode']}s made:      {res['ops']}")
    print(f"{res['mode'].capitalize()} size:             {res['op_size']}")
    print(f"Bandwidth (MB/sec):     {res['bandwidth_MBps']:.4f}")
    print(f"Average IOPS:           {res['iops']:.0f}")
    print(f"Average Latency(s):     {res['avg_latency_s']:.6f}")
    print(f"Max latency(s):         {res['max_latency_s']:.6f}")
    print(f"Min latency(s):         {res['min_latency_s']:.6f}")
    print(f"Shard reads per op:     {res['shard_reads_per_op']:.2f}")
    print(f"Shard writes per op:    {res['shard_writes_per_op']:.2f}")


def _bench_write(st: ObjectStore, args, bs: int) -> int:
    prefix = f"benchmark_data_{socket.gethostname()}_{os.getpid()}"
    payload = os.urandom(bs)
    if not wants_json(args):
        print(f"Maintaining {args.threads} concurrent writes of {bs} bytes to objects of "
              f"size {bs} for up to {args.seconds} seconds or 0 objects")
        print(f"Object prefix: {prefix}")
    c0 = st.counters.snapshot()
    stats = _Stats()
    res = _bench_loop(args, stats, lambda n: st.write_full(_obj_name(n, prefix), payload),
                      "write", bs)
    _print_summary(args, res, st, c0)
    if args.no_cleanup:
        st.write_full(BENCH_META, f"{prefix}\n{stats.finished}\n{bs}\n".encode())
    else:
        for n in range(stats.started):
            try:
                st.remove(_obj_name(n, prefix))
            except NotFound:
                pass
    return 0


def _bench_read(st: ObjectStore, args) -> int:
    try:
        prefix, count, bs = st.read(BENCH_META, 0, 4096).decode().split()
    except NotFound:
        raise NotFound("no benchmark objects: run 'ecfs rados bench SECONDS write --no-cleanup' first")
    count, bs = int(count), int(bs)
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
    return 0

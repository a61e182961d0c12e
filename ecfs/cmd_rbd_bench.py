"""``ecfs rbd bench``: rbd bench over an image.

``ecfs rbd bench NAME --io-type read|write|readwrite [--io-size 4K]
[--io-threads 16] [--io-total 1G] [--io-pattern seq|rand] [--rw-mix-read 50]``
issues ``--io-total`` bytes of ``--io-size`` operations from ``--io-threads``
threads on one open image, and prints what ``rbd bench`` prints: the
header line, a row per elapsed second (ops completed so far, then ops and
bytes per second over the last five seconds, as rbd averages them) and the
summary (per kind too for readwrite). ``--json`` prints the summary as one
object instead.

Offsets are multiples of the io size: ``seq`` walks the image forward from
its start, the threads taking the next offset in turn and wrapping at the
end; ``rand`` picks aligned offsets at random. Each thread writes one
buffer of random bytes (never zeros, which could become discards).
"""
from __future__ import annotations

import os
import random
import threading
import time

from backend.errors import InvalidArgument
from backend.objectstore import ObjectStore
from rbdlike.image import Image

from . import progress
from .cli import add_json, wants_json
from .output import print_json
from .units import parse_int, parse_size

MAX_THREADS = 1024          # as rados bench -t
MAX_IO_SIZE = (1 << 32) - 1  # rbd: "io-size should be less than 4G"
WINDOW = 5                  # rows in each row's averages (5 seconds, as rbd)
ROW_SECONDS = 1.0           # time between rows (tests shorten it)
IO_TYPES = {"read": "read", "write": "write", "readwrite": "readwrite", "rw": "readwrite"}
PATTERNS = {"seq": "sequential", "rand": "random"}


def register(rs, parser_class) -> None:
    """Add the ``bench`` verb to the ``ecfs rbd`` subparsers ``rs``."""
    q = rs.add_parser("bench", help="benchmark I/O on an image, as rbd bench")
    q.add_argument("name")
    q.add_argument("--io-type", required=True, choices=sorted(IO_TYPES), metavar="TYPE",
                   help="read, write or readwrite (rw)")
    q.add_argument("--io-size", default="4K",
                   help="bytes per I/O (units K, M, ...; a bare number is bytes; default 4K)")
    q.add_argument("--io-threads", type=_threads, default=16,
                   help=f"I/Os in flight (default 16, at most {MAX_THREADS})")
    q.add_argument("--io-total", default="1G",
                   help="bytes to transfer in all (units K, M, G, ...; default 1G)")
    q.add_argument("--io-pattern", choices=sorted(PATTERNS), default="seq",
                   help="seq or rand (default seq)")
    q.add_argument("--rw-mix-read", type=_percent, default=50, metavar="PERCENT",
                   help="share of reads for readwrite, 0..100 (default 50)")
    add_json(q)
    q.set_defaults(func=cmd_bench)


# ------------------------------------------------------------ arguments
def _threads(text: str) -> int:
    v = parse_int(text, "--io-threads")
    if not 1 <= v <= MAX_THREADS:
        raise InvalidArgument(f"--io-threads must be within 1..{MAX_THREADS} (got {v})")
    return v


def _percent(text: str) -> int:
    v = parse_int(text, "--rw-mix-read")
    if not 0 <= v <= 100:
        raise InvalidArgument(f"--rw-mix-read must be within 0..100 (got {v})")
    return v


def byte_u(v: float) -> str:
    """A byte count as Ceph's ``byte_u_t`` prints it: ``809 MiB``,
    ``1.5 GiB``, ``512 B`` (at most 7 characters when it has a fraction)."""
    v = int(v)
    units = (" B", " KiB", " MiB", " GiB", " TiB", " PiB", " EiB")
    n, i = v, 0
    while n >= 1024 and i < len(units) - 1:
        n //= 1024
        i += 1
    if i == 0:
        return f"{v}{units[0]}"
    mult = 1 << (10 * i)
    if v % mult == 0:
        return f"{n}{units[i]}"
    for prec in (2, 1, 0):
        s = f"{v / mult:.{prec}f}{units[i]}"
        if len(s) <= 7:
            break
    return s


# ---------------------------------------------------------------- verb
def cmd_bench(args) -> int:
    io_type = IO_TYPES[args.io_type]
    io_size = parse_size(args.io_size, what="io size")
    if io_size == 0:
        raise InvalidArgument("--io-size must be greater than zero")
    if io_size > MAX_IO_SIZE:
        raise InvalidArgument("--io-size must be less than 4G")
    io_total = parse_size(args.io_total, what="io total")
    if io_total == 0:
        raise InvalidArgument("--io-total must be greater than zero")
    read_pct = {"read": 100, "write": 0}.get(io_type, args.rw_mix_read)
    with ObjectStore(args.store) as store, \
            Image(store, args.name, read_only=(io_type == "read")) as img:
        size = img.size()
        if io_size > size:
            raise InvalidArgument(f"--io-size {io_size} is larger than image "
                                  f"{args.name!r} ({size} bytes)")
        if io_type != "read":
            img.acquire_lock()       # a held lock is one error line before any output
        img.flush()
        res = _run(args, img, io_type, io_size, io_total, read_pct)
    if wants_json(args):
        print_json(res)
    return 0


class _Bench:
    """State shared by the workers and the reporting loop. The workers share
    one Image, as rbd bench's I/Os share one librbd image."""

    def __init__(self, img: Image, io_size: int, total_ops: int, pattern: str, read_pct: int):
        self.img = img
        self.io_size = io_size
        self.total_ops = total_ops
        self.blocks = img.size() // io_size
        self.pattern = pattern
        self.read_pct = read_pct
        self.lock = threading.Lock()
        self.issued = self.finished = self.read_ops = self.write_ops = 0
        self.lat: list[float] = []
        self.errors: list[BaseException] = []
        self.stop = False
        self.active = 0
        self.done = threading.Event()

    def worker(self) -> None:
        rng = random.Random(os.urandom(16))
        payload = os.urandom(self.io_size) if self.read_pct < 100 else b""
        try:
            while True:
                with self.lock:
                    if self.stop or self.issued >= self.total_ops:
                        return
                    n = self.issued
                    self.issued += 1
                    if self.pattern == "rand":
                        off = rng.randrange(self.blocks) * self.io_size
                    else:
                        off = (n % self.blocks) * self.io_size
                    is_read = rng.randrange(100) < self.read_pct
                    if is_read:
                        self.read_ops += 1
                    else:
                        self.write_ops += 1
                t = time.monotonic()
                try:
                    if is_read:
                        self.img.read(off, self.io_size)
                    else:
                        self.img.write(payload, off)
                except BaseException as e:  # noqa: BLE001 -- report once, stop everyone
                    with self.lock:
                        self.errors.append(e)
                        self.stop = True
                    return
                t = time.monotonic() - t
                with self.lock:
                    self.finished += 1
                    self.lat.append(t)
        finally:
            with self.lock:
                self.active -= 1
                if self.active == 0:
                    self.done.set()


def _run(args, img: Image, io_type: str, io_size: int, io_total: int, read_pct: int) -> dict:
    quiet = wants_json(args)
    total_ops = -(-io_total // io_size)        # as rbd: until io_total bytes are issued
    b = _Bench(img, io_size, total_ops, args.io_pattern, read_pct)
    nthreads = min(args.io_threads, total_ops)
    if not quiet:
        mix = f" read:write={read_pct}:{100 - read_pct}" if io_type == "readwrite" else ""
        print(f"bench  type {io_type}{mix} io_size {io_size} io_threads {args.io_threads} "
              f"bytes {io_total} pattern {PATTERNS[args.io_pattern]}")
        print("  SEC       OPS   OPS/SEC   BYTES/SEC", flush=True)
    rows: list[dict] = []
    hist = [(0.0, 0)]          # (elapsed, ops finished) at each row
    tick = 0.2 if progress.enabled(args) else None
    t0 = time.monotonic()
    b.active = nthreads
    threads = [threading.Thread(target=b.worker, daemon=True) for _ in range(nthreads)]
    try:
        for t in threads:
            t.start()
        with progress.bar(args, total=io_total, desc=f"bench {io_type}") as bar:
            shown = 0
            sec = 0
            while not b.done.is_set():
                wait = t0 + (sec + 1) * ROW_SECONDS - time.monotonic()
                b.done.wait(max(0.0, wait if tick is None else min(wait, tick)))
                with b.lock:
                    fin = b.finished
                now = min(fin * io_size, io_total)
                bar.update(now - shown)
                shown = now
                el = time.monotonic() - t0
                if int(el / ROW_SECONDS) <= sec or b.done.is_set():
                    continue
                # a row per elapsed second; its rates over the last WINDOW seconds
                sec = int(el / ROW_SECONDS)
                hist.append((el, fin))
                (e0, f0), (e1, f1) = hist[max(0, len(hist) - 1 - WINDOW)], hist[-1]
                ops_s = (f1 - f0) / (e1 - e0)
                rows.append({"sec": sec, "ops": fin, "ops_per_sec": ops_s,
                             "bytes_per_sec": ops_s * io_size})
                if not quiet:
                    bar.print(f"{sec:>5}{fin:>10}{ops_s:>10g}{byte_u(ops_s * io_size):>10}/s")
                bar.note(f"{fin} ops")
    except BaseException:
        b.stop = True              # Ctrl-C: let the I/O in flight finish
        for t in threads:
            t.join()
        raise
    for t in threads:
        t.join()
    if b.errors:
        raise b.errors[0]
    if io_type != "read":
        img.flush()                # as rbd: the writes are durable before the clock stops
    el = max(time.monotonic() - t0, 1e-9)
    ops = b.finished
    res = {"image": args.name, "io_type": io_type, "io_size": io_size,
           "io_threads": args.io_threads, "io_total": io_total,
           "io_pattern": args.io_pattern, "rw_mix_read": read_pct,
           "elapsed": el, "ops": ops, "bytes": ops * io_size,
           "ops_per_sec": ops / el, "bytes_per_sec": ops * io_size / el}
    for kind, n in (("read", b.read_ops), ("write", b.write_ops)):
        res[f"{kind}_ops"] = n
        res[f"{kind}_ops_per_sec"] = n / el
        res[f"{kind}_bytes_per_sec"] = n * io_size / el
    lat = sorted(b.lat) or [0.0]
    res.update({"avg_latency_s": sum(lat) / len(lat), "min_latency_s": lat[0],
                "max_latency_s": lat[-1], "seconds": rows})
    if not quiet:
        print(f"elapsed: {int(el)}   ops: {ops}   ops/sec: {ops / el:g}   "
              f"bytes/sec: {byte_u(ops * io_size / el)}/s")
        if io_type == "readwrite":
            for kind, n in (("read", b.read_ops), ("write", b.write_ops)):
                print(f"{kind}_ops: {n}   {kind}_ops/sec: {n / el:g}   "
                      f"{kind}_bytes/sec: {byte_u(n * io_size / el)}/s")
    return res

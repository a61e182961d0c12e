"""Child process of the crash tests: runs an IOGen stream against a store.

    python -m tests.backend.crash_child STORE SIDEFILE SEED NOPS K MAXSIZE [TRACEFILE] [--cache]

Before each mutating op it appends "start I" to SIDEFILE and after it
returns "done I" (plain write(2): the kernel keeps it when the process is
SIGKILLed). With --cache the ops go through a stripe cache (write-back for
every name), flushed after every FLUSH_EVERY ops: "flushed I" once the
flush after op I returned. With ECFS_CRASH_AT=N the store kills the process at its Nth
crash point. With TRACEFILE, each crash point passed is recorded as
"function:line" (used to aim N at each phase of a commit).
"""
import json
import os
import sys

from backend import objectstore, stripecache
from backend.objectstore import ObjectStore
from backend.stripecache import StripeCache

from .iogen import IOGen, run_op, Model

NAMES = ("a", "b")


def gen(seed: int, k: int, max_size: int) -> IOGen:
    return IOGen(seed, k=k, names=NAMES, max_size=max_size, reads=False,
                 weights={"remove": 2})


FLUSH_EVERY = 4
JOURNAL_LIMIT = 96 << 10


def main() -> None:
    argv = [a for a in sys.argv if a != "--cache"]
    cached = len(argv) != len(sys.argv)
    store, side, seed, nops, k, max_size = argv[1:7]
    trace_file = argv[7] if len(argv) > 7 else None
    trace = []
    if trace_file:
        orig = ObjectStore._crashpoint

        def traced(self):
            f = sys._getframe(1)
            trace.append(f"{f.f_code.co_name}:{f.f_lineno}")
            orig(self)
        ObjectStore._crashpoint = traced
    if not cached:
        # a small journal: it is sealed, synced and dropped many times a
        # run, so crash points inside the routine checkpoint are among
        # those chosen. (Not through the cache: which flush thread's commit
        # crosses the limit varies, and so would the count of crash points.)
        objectstore.JOURNAL_LIMIT = JOURNAL_LIMIT
    s = ObjectStore(store)
    s._rng.seed(int(seed))      # write_mode "mixed": the same choices every run
    if cached:
        # one flush thread: write_mode "mixed" draws each stripe's way from
        # one RNG, and two threads drew in whatever order they ran, so the
        # plans, and with them the count of crash points, changed from run
        # to run (472 or 480): a point aimed at from the dry run was
        # sometimes never reached
        stripecache.FLUSH_THREADS = 1
        s = StripeCache(s, 1 << 20, max_age=3600)
        s.set_writeback("", True)
    fd = os.open(side, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    model = Model()
    for op in gen(int(seed), int(k), int(max_size)).ops(int(nops)):
        os.write(fd, f"start {op.index}\n".encode())
        run_op(s, op, model)
        os.write(fd, f"done {op.index}\n".encode())
        if cached and op.index % FLUSH_EVERY == FLUSH_EVERY - 1:
            s.flush()
            os.write(fd, f"flushed {op.index}\n".encode())
    s.close()
    if trace_file:
        with open(trace_file, "w") as f:
            json.dump(trace, f)


if __name__ == "__main__":
    main()

"""Child process of the kill tests (test_kill_commands.py): the ecfs
command, run as ``python -m ecfs.cli`` runs it, in two ways.

    python -m tests.ecfs.cli_child trace FILE ARGS...

runs ``ecfs ARGS`` once, recording every crash point of the object store
it passes (backend/objectstore.py ``_crashpoint``: the steps between
journal and apply) as ``[function, object name, journaled]``, in FILE as
JSON ``{"points": [...], "work": seconds from the store's opening to the
end}``, so a test can aim ``ECFS_CRASH_AT=N`` at one of them.

    python -m tests.ecfs.cli_child serve

reads batches from stdin, one a line (a JSON list of argument lists), runs
each batch's commands in turn and answers each batch with one line: a
JSON list of ``{"rc", "stdout", "stderr", "seconds"}``, until stdin ends.
Every command opens and closes the store as a separate ``ecfs`` run would
(nothing of the store is kept between commands); checks that would each
pay an interpreter start pay it once.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time


def _trace(path: str, argv: list[str]) -> int:
    from backend.objectstore import ObjectStore
    import ecfs.cli

    points = []
    opened = []
    orig_point, orig_init = ObjectStore._crashpoint, ObjectStore.__init__

    def traced(self):
        f = sys._getframe(1)
        obj = f.f_locals.get("obj")
        rec = f.f_locals.get("rec")
        name = getattr(obj, "name", None) or getattr(rec, "name", None) or ""
        # journaled: the transaction's record is in the journal (a kill from
        # here on is replayed), i.e. every point but the one before the append
        journaled = f.f_code.co_name != "_commit_locked" or "ticket" in f.f_locals
        points.append([f.f_code.co_name, name, journaled])
        orig_point(self)

    def init(self, *a, **kw):
        opened.append(time.monotonic())
        orig_init(self, *a, **kw)

    ObjectStore._crashpoint = traced
    ObjectStore.__init__ = init
    try:
        return ecfs.cli.main(argv)
    finally:
        work = time.monotonic() - opened[0] if opened else 0.0
        with open(path, "w") as f:
            json.dump({"points": points, "work": work}, f)


def _run_captured(argv: list[str]) -> dict:
    """``ecfs.cli.main(argv)`` with fds 1 and 2 going to files (the CLI
    writes through the descriptors, not only sys.stdout)."""
    import ecfs.cli

    t0 = time.monotonic()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            rc = ecfs.cli.main(argv)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
        out.seek(0)
        err.seek(0)
        return {"rc": rc, "stdout": out.read().decode(errors="replace"),
                "stderr": err.read().decode(errors="replace"),
                "seconds": round(time.monotonic() - t0, 3)}


def _commands(line: str) -> list[dict]:
    return [_run_captured([str(a) for a in argv]) for argv in json.loads(line)]


def main() -> int:
    mode = sys.argv[1]
    if mode == "trace":
        return _trace(sys.argv[2], sys.argv[3:])
    if mode != "serve":
        raise SystemExit(f"unknown mode {mode!r}")
    import ecfs.cli
    # one parser for all (building it is most of a short command's time);
    # parsing leaves it as it was
    parser = ecfs.cli.build_parser()
    ecfs.cli.build_parser = lambda: parser
    # requests and answers on their own descriptors; the commands get none
    requests = os.fdopen(os.dup(0), "r")
    answers = os.fdopen(os.dup(1), "w")
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for line in requests:
        answers.write(json.dumps(_commands(line)) + "\n")
        answers.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())

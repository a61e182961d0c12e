"""Run the ecfs command as a user would, from this checkout."""
from __future__ import annotations

import fcntl
import json
import os
import select
import struct
import subprocess
import sys
import termios
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _env(env=None):
    e = dict(os.environ, PYTHONPATH=ROOT)
    e.pop("ECFS_STORE", None)
    if env:
        e.update(env)
    return e


def _cmd(store, args, prefix=("-m", "ecfs.cli")):
    return [sys.executable, *prefix] + (["--store", str(store)] if store else []) + \
        [str(a) for a in args]


def ecfs(store, *args, input=None, check=True, env=None, stdout=None):
    """Run ``ecfs --store STORE ARGS``; returns CompletedProcess (bytes).
    ``stdout``: a file to write to instead of capturing it."""
    cmd = _cmd(store, args)
    p = subprocess.run(cmd, input=input, env=_env(env), cwd=ROOT, timeout=120,
                       stdout=subprocess.PIPE if stdout is None else stdout,
                       stderr=subprocess.PIPE)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} failed ({p.returncode}): {p.stderr.decode()}")
    return p


def ecfs_popen(store, *args, env=None, **kwargs):
    """Start ``ecfs --store STORE ARGS`` without waiting (the caller waits
    or kills it, in a finally). ``env``: variables to add (e.g. ECFS_CRASH_AT)."""
    return subprocess.Popen(_cmd(store, args), env=_env(env), cwd=ROOT, **kwargs)


class EcfsServer:
    """One interpreter that runs batches of ``ecfs`` commands for the
    caller's whole lifetime (tests/ecfs/cli_child.py serve): ``run(store,
    *commands)`` runs ``ecfs --store STORE ARGS`` for each ARGS in turn and
    returns a list of {"rc", "stdout", "stderr", "seconds"}. Close it (in a
    finally, or a fixture's teardown); it is killed by its pid."""

    def __init__(self, env=None):
        self.p = subprocess.Popen([sys.executable, "-m", "tests.ecfs.cli_child", "serve"],
                                  env=_env(env), cwd=ROOT, text=True, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE)

    def run(self, store, *commands, timeout=300):
        argvs = [["--store", str(store)] + [str(a) for a in c] for c in commands]
        self.p.stdin.write(json.dumps(argvs) + "\n")
        self.p.stdin.flush()
        ready, _, _ = select.select([self.p.stdout], [], [], timeout)
        line = self.p.stdout.readline() if ready else ""
        if not line:
            self.close()
            raise AssertionError(f"ecfs server: no answer to {argvs} (exit {self.p.returncode})")
        return json.loads(line)

    def close(self):
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(timeout=60)
        for f in (self.p.stdin, self.p.stdout):
            try:
                f.close()
            except OSError:
                pass


def ecfs_trace(store, trace_file, *args, env=None):
    """Run ``ecfs --store STORE ARGS`` recording the object store's crash
    points in ``trace_file`` (tests/ecfs/cli_child.py); returns
    CompletedProcess (bytes)."""
    cmd = [sys.executable, "-m", "tests.ecfs.cli_child", "trace", str(trace_file),
           "--store", str(store)] + [str(a) for a in args]
    return subprocess.run(cmd, env=_env(env), cwd=ROOT, capture_output=True, timeout=120)


def ecfs_json(store, *args):
    return json.loads(ecfs(store, *args, "--json").stdout)


def ecfs_tty(store, *args):
    """Run with stderr on a pseudo-terminal (120 columns), as a user at a
    shell sees it. Returns (returncode, stdout bytes, stderr text)."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    p = subprocess.Popen(_cmd(store, args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=slave, env=_env(), cwd=ROOT)
    os.close(slave)
    chunks = []

    def drain():
        while True:
            try:
                b = os.read(master, 65536)
            except OSError:        # EIO: the child closed its end
                return
            if not b:
                return
            chunks.append(b)

    t = threading.Thread(target=drain)
    t.start()
    out = p.communicate(timeout=120)[0]
    t.join(timeout=30)
    os.close(master)
    return p.returncode, out, b"".join(chunks).decode(errors="replace")


# Run as another user. The interpreter may live where that user cannot
# reach (a pyenv under /root), so start as root, import everything, then
# drop to the user before running the command.
_AS_USER = """
import os, sys
sys.path.insert(0, {root!r})
import fcntl, json, traceback, tqdm
import ecfs.cli, ecfs.cmd_pool, ecfs.cmd_rados, ecfs.progress, backend.objectstore
os.setgroups([]); os.setgid({gid}); os.setuid({uid})
sys.exit(ecfs.cli.main(sys.argv[1:]))
"""


def ecfs_as(uid, gid, store, *args):
    code = _AS_USER.format(root=ROOT, uid=uid, gid=gid)
    cmd = _cmd(store, args, prefix=("-c", code))
    return subprocess.run(cmd, capture_output=True, env=_env(), cwd="/", timeout=120)


def tree(path):
    """{file: content} under ``path`` (directories as None)."""
    out = {}
    for d, dirs, files in os.walk(path):
        for x in dirs:
            out[os.path.join(d, x)] = None
        for f in files:
            p = os.path.join(d, f)
            out[p] = open(p, "rb").read()
    return out


def assert_user_error(p, contains=""):
    """One 'ecfs: error:' line, non-zero exit, no traceback."""
    err = p.stderr.decode()
    assert p.returncode != 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ecfs: error: "), err
    assert "Traceback" not in err
    assert contains.lower() in lines[0].lower(), (contains, err)


def store_with_images(tmp_path, size: int, *names: str):
    """A default store at tmp_path/s with ``names`` imported from one random
    raw image of ``size`` bytes (tmp_path/img.raw); returns (store, bytes)."""
    st = tmp_path / "s"
    ecfs(st, "init")
    img = os.urandom(size)
    (tmp_path / "img.raw").write_bytes(img)
    for n in names:
        ecfs(st, "rbd", "import", str(tmp_path / "img.raw"), n)
    return st, img


def holds_open(pid: int, match) -> bool:
    """Whether process ``pid`` has an fd whose target (readlink of
    /proc/PID/fd/N) satisfies ``match``."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if match(os.readlink(f"/proc/{pid}/fd/{fd}")):
                return True
        except OSError:
            pass
    return False

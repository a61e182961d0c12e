"""Run the ecfs command as a user would, from this checkout."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def ecfs(store, *args, input=None, check=True, env=None):
    """Run ``ecfs --store STORE ARGS``; returns CompletedProcess (bytes)."""
    e = dict(os.environ, PYTHONPATH=ROOT)
    e.pop("ECFS_STORE", None)
    if env:
        e.update(env)
    cmd = [sys.executable, "-m", "ecfs.cli"] + (["--store", str(store)] if store else []) + \
        [str(a) for a in args]
    p = subprocess.run(cmd, input=input, capture_output=True, env=e, cwd=ROOT, timeout=120)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} failed ({p.returncode}): {p.stderr.decode()}")
    return p


def ecfs_json(store, *args):
    return json.loads(ecfs(store, *args, "--json").stdout)


def assert_user_error(p, contains=""):
    """One 'ecfs: error:' line, non-zero exit, no traceback."""
    err = p.stderr.decode()
    assert p.returncode != 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ecfs: error: "), err
    assert "Traceback" not in err
    assert contains.lower() in lines[0].lower(), (contains, err)

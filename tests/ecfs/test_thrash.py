"""scripts/thrash, a short run: OSDs down and up, injected EIO and ENOSPC,
bit flips, SIGKILLed mounts and writers and a rebuild, while a seeded
writer checks every byte; nothing may be lost and no stripe left
inconsistent. (A long run's result is in docs/design.md.)"""
import os
import re
import subprocess
import sys

from .mountutil import need_root

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_a_short_thrash_loses_nothing(tmp_path):
    need_root()
    p = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "thrash"),
                        "--rounds", "10", "--round-seconds", "0.5", "--seed", "3",
                        "--size", "32M", "--dir", str(tmp_path / "work")],
                       capture_output=True, text=True, timeout=400)
    line = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else ""
    assert p.returncode == 0, p.stdout + p.stderr
    got = dict(re.findall(r"(\w+)=(-?\d+)", line))
    assert got["bytes_lost"] == "0" and got["inconsistent_stripes"] == "0", line
    assert int(got["rounds"]) == 10 and int(got["faults"]) >= 1, line
    assert int(got["bytes_verified"]) >= 32 << 20, line        # the final pass at least

"""For scripts/bench and scripts/thrash: run again under the ecfs venv
when started by a python3 without ecfs's dependencies (a plain python3
as root, or under sudo)."""
import os
import sys

VENV_PYTHON = "/opt/ecfs/bin/python"     # where scripts/install puts ecfs; $ECFS_PYTHON overrides
NEEDS = ("numpy", "pyeclib", "pyfuse3", "trio")


def reexec_in_venv(tool: str, script: str) -> None:
    """find_spec, not import: importing numpy or pyeclib here would change
    the process the bench's mallopt figures are taken in."""
    from importlib.util import find_spec
    again = os.environ.pop("ECFS_REEXEC", None)
    if all(find_spec(m) is not None for m in NEEDS):
        return
    py = os.environ.get("ECFS_PYTHON", VENV_PYTHON)
    if again or not os.access(py, os.X_OK):
        sys.exit(f"{tool}: {sys.executable} lacks {'/'.join(NEEDS)} and {py} "
                 f"{'lacks them too' if again else 'is not there'}; run scripts/install, "
                 f"or set ECFS_PYTHON to a python that has ecfs's dependencies")
    os.environ["ECFS_REEXEC"] = "1"
    os.execv(py, [py, os.path.realpath(script), *sys.argv[1:]])

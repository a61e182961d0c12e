"""A real systemd, PID 1 of private namespaces, to test ecfs's unit files.

The confinement (required: an unconfined systemd would take over the host's
cgroups):

- a new cgroup NAME in the host's cgroup2 hierarchy, under the current
  cgroup (the ``0::`` line of /proc/self/cgroup);
- ``unshare --pid --fork --mount --mount-proc --propagation private sh BOOT``;
  BOOT moves itself into NAME, mounts tmpfs on /run and on /tmp (else
  systemd's tmpfiles would empty the host's /tmp), then
  ``exec unshare --cgroup sh -c 'mount -t cgroup2 cgroup2 /sys/fs/cgroup &&
  exec env container=other /lib/systemd/systemd --system ...'``, so
  systemd's cgroup root is NAME.

The mount namespace shares the host's file systems except /run and /tmp:
units go to /run/systemd/system (the namespace's tmpfs; never the host's
/etc/systemd/system), and stores and mount points used by tests live
outside /tmp (a directory of our own under /var/tmp).

The network, UTS and IPC namespaces, /proc/sys and /sys stay the host's,
so this systemd must start nothing that touches them. Hence three more
rules:

- it boots ``--unit=ecfs-test-boot.target``, which pulls in journald only
  (the host's default target would start its databases, ceph, ...);
- ``confine()`` masks (in /run) every unit that starting the given units
  would pull in and that is not already running, except targets: a unit
  with default dependencies pulls in sysinit.target, whose systemd-sysctl,
  systemd-binfmt, systemd-sysusers, systemd-tmpfiles-setup would set the
  host's sysctls, binfmt handlers, users and files. ``boot()`` does it for
  sysinit.target and basic.target; tests do it for the units they start,
  before starting them;
- BOOT lazily unmounts, in the new namespace, the FUSE mounts it copied
  from the host: a FUSE daemon whose file system is unmounted only exits
  once no namespace holds a copy, so another test's daemon on the host
  would otherwise keep running until this systemd is gone.

Two options beyond the recipe make it die with the test process, even a
SIGKILLed one: unshare gets PR_SET_PDEATHSIG=SIGKILL, and ``--kill-child``
passes that on to systemd (the kernel then kills its whole pid namespace).

Commands run inside with ``nsenter -t PID -m -p``. Teardown kills, by pid,
everything left in NAME, removes the cgroups bottom-up, detaches loop
devices and FUSE mounts of ours, and removes the directory.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ..waiting import wait_for

UNIT_DIR = os.path.join(ROOT, "systemd")
ECFS_BIN = "/usr/local/bin/ecfs"
SYSTEMD = "/lib/systemd/systemd"
BOOT_TARGET = "ecfs-test-boot.target"
TOOLS = ("unshare", "nsenter", "systemctl", "systemd-escape", "fusermount3", "losetup",
         "findmnt")


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_table(pid: int | str = "self") -> list[tuple[str, str]]:
    """(mount point, file system type) of every mount seen by ``pid``."""
    out = []
    with open(f"/proc/{pid}/mountinfo") as f:
        for line in f:
            parts = line.split()
            sep = parts.index("-")
            out.append((_unescape(parts[4]), parts[sep + 1]))
    return out


def cgroup2_root() -> str | None:
    for target, kind in mount_table():
        if kind == "cgroup2":
            return target
    return None


def current_cgroup() -> str | None:
    with open("/proc/self/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return line[3:].strip()
    return None


def systemd_escape_path(path: str) -> str:
    return subprocess.run(["systemd-escape", "--path", "--", path], check=True,
                          capture_output=True, text=True).stdout.strip()


def unavailable() -> str | None:
    """Why a systemd namespace cannot be booted here, or None."""
    if os.geteuid() != 0:
        return "needs root (namespaces, cgroups, FUSE, loop devices)"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"missing tools: {', '.join(missing)}"
    if not os.access(SYSTEMD, os.X_OK):
        return f"no {SYSTEMD}"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if cgroup2_root() is None or current_cgroup() is None:
        return "no cgroup2 hierarchy mounted"
    if not os.access(ECFS_BIN, os.X_OK):
        return f"no {ECFS_BIN} (the units run it; scripts/install links it)"
    return None


def loop_devices() -> list[dict]:
    p = subprocess.run(["losetup", "--list", "--json", "--output", "NAME,BACK-FILE"],
                       capture_output=True, text=True)
    if p.returncode != 0 or not p.stdout.strip():
        return []
    return json.loads(p.stdout).get("loopdevices", [])


def loops_under(prefix: str) -> list[str]:
    """Loop devices whose backing file lies under ``prefix``."""
    prefix = prefix.rstrip("/") + "/"
    return [d["name"] for d in loop_devices()
            if (d.get("back-file") or "").removesuffix(" (deleted)").startswith(prefix)]


_DETACH_FUSE = r"""
import re, subprocess
def unesc(s): return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)
found = []
for line in open("/proc/self/mountinfo"):
    f = line.split()
    kind = f[f.index("-") + 1]
    if kind in ("fuse", "fuseblk") or kind.startswith("fuse."):
        found.append(unesc(f[4]))
for target in reversed(found):
    subprocess.run(["umount", "-l", target], capture_output=True)
"""


class SystemdNS:
    """One systemd as PID 1 in its own pid, mount and cgroup namespaces."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="ecfs-systemd-", dir="/var/tmp")
        root, cur = cgroup2_root(), current_cgroup()
        name = f"ecfs-systemd-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.cgroup = os.path.join(root, cur.lstrip("/"), name)
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None
        self.log = os.path.join(self.dir, "boot.log")

    # --- boot -----------------------------------------------------------------------
    def boot(self, timeout: float = 60.0) -> None:
        os.mkdir(self.cgroup)
        helper = os.path.join(self.dir, "detach-fuse.py")
        with open(helper, "w") as f:
            f.write(_DETACH_FUSE)
        boot = os.path.join(self.dir, "boot.sh")
        with open(boot, "w") as f:
            f.write(f"""set -e
echo $$ > '{self.cgroup}/cgroup.procs'
mount -t tmpfs -o mode=755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
'{sys.executable}' '{helper}' || true
mkdir -p /run/systemd/system
cat > /run/systemd/system/{BOOT_TARGET} <<'EOF'
[Unit]
Description=ecfs test boot: the journal and nothing else
Wants=systemd-journald.service
EOF
exec unshare --cgroup sh -c 'mount -t cgroup2 cgroup2 /sys/fs/cgroup && \\
  exec env container=other {SYSTEMD} --system --unit={BOOT_TARGET}'
""")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                ["unshare", "--pid", "--fork", "--kill-child", "--mount", "--mount-proc",
                 "--propagation", "private", "sh", boot],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                preexec_fn=_die_with_parent)
        self.pid = wait_for(self._systemd_pid, timeout=timeout, what="systemd started")
        states = []

        def running():
            p = self.run("systemctl", "is-system-running", check=False, timeout=30)
            states.append((p.stdout + p.stderr).strip())
            return p.stdout.strip() in ("running", "degraded")
        try:
            wait_for(running, timeout=timeout, what="systemd is-system-running")
        except AssertionError as e:
            raise AssertionError(f"{e}; last answer {states[-1:]}; boot log: "
                                 f"{self._boot_log()}") from None
        # what any unit with default dependencies pulls in, masked from the start
        self.confine("sysinit.target", "basic.target")

    def _systemd_pid(self) -> int | None:
        if self.proc.poll() is not None:
            raise AssertionError(f"unshare exited ({self.proc.returncode}): {self._boot_log()}")
        children = []
        try:
            for task in os.listdir(f"/proc/{self.proc.pid}/task"):
                with open(f"/proc/{self.proc.pid}/task/{task}/children") as f:
                    children += [int(c) for c in f.read().split()]
        except OSError:
            return None
        for c in children:
            try:
                with open(f"/proc/{c}/comm") as f:
                    if f.read().strip() == "systemd":
                        return c
            except OSError:
                pass
        return None

    def _boot_log(self) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    # --- inside ---------------------------------------------------------------------
    def run(self, *cmd, check=True, timeout=120, env=None, input=None, text=True):
        """Run ``cmd`` in the namespaces (mount and pid) of this systemd."""
        argv = ["nsenter", "-t", str(self.pid), "-m", "-p", "--", *map(str, cmd)]
        p = subprocess.run(argv, capture_output=True, text=text, timeout=timeout,
                           env=env, input=input)
        if check and p.returncode != 0:
            raise AssertionError(f"{cmd} failed ({p.returncode}): {p.stdout} {p.stderr}")
        return p

    def systemctl(self, *args, check=True, timeout=180):
        return self.run("systemctl", "--no-pager", *args, check=check, timeout=timeout)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *[f"--property={p}" for p in props]).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *units: str) -> str:
        args = [a for u in units for a in ("-u", u)]
        p = self.run("journalctl", "--no-pager", "-o", "short-monotonic", *args,
                     check=False, timeout=60)
        return p.stdout + p.stderr

    def host_path(self, path: str) -> str:
        """The path, as seen inside the namespace, reachable from the host."""
        return f"/proc/{self.pid}/root{path}"

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        full = self.host_path(path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "w") as f:
            f.write(text)
        os.chmod(full, mode)

    def fstype(self, mountpoint: str) -> str | None:
        """The type of the top mount at ``mountpoint`` inside the namespace."""
        p = self.run("findmnt", "--noheadings", "--output", "FSTYPE", "--mountpoint",
                     mountpoint, check=False)
        lines = p.stdout.split()
        return lines[-1] if lines else None

    def install_units(self, conf: dict[str, str], generator: bool = True) -> str:
        """The units of systemd/ into /run/systemd/system, with a drop-in that
        reads a test configuration (``conf``) instead of /etc/ecfs/ecfs.conf
        and runs this checkout's ecfs; the generator, reading the same file,
        into /run/systemd/system-generators. Returns the configuration path."""
        conf_path = os.path.join(self.dir, "ecfs.conf")
        with open(conf_path, "w") as f:
            f.write("# test configuration\n")
            for k, v in conf.items():
                f.write(f"{k}={v}\n")
        for name in sorted(os.listdir(UNIT_DIR)):
            if not name.endswith(".service"):
                continue
            with open(os.path.join(UNIT_DIR, name)) as f:
                self.write(f"/run/systemd/system/{name}", f.read())
            self.write(f"/run/systemd/system/{name}.d/90-test.conf",
                       "[Service]\n"
                       "EnvironmentFile=\n"
                       f"EnvironmentFile={conf_path}\n"
                       f"Environment=PYTHONPATH={ROOT}\n")
        if generator:
            with open(os.path.join(UNIT_DIR, "ecfs-generator")) as f:
                text = f.read()
            assert "conf=/etc/ecfs/ecfs.conf\n" in text
            self.write("/run/systemd/system-generators/ecfs-generator",
                       text.replace("conf=/etc/ecfs/ecfs.conf\n", f"conf={conf_path}\n"), 0o755)
        self.systemctl("daemon-reload")
        return conf_path

    def confine(self, *units: str) -> list[str]:
        """Mask every unit that starting ``units`` would pull in, unless it is
        one of them, a target, a slice, a device, or already active. Then
        check nothing else is left. Returns the masked units."""
        def closure():
            out = self.systemctl("list-dependencies", "--all", "--plain", "--no-legend",
                                 *units).stdout
            names = set()
            for line in out.splitlines():
                n = line.strip().lstrip("●○×*").strip()
                if n:
                    names.add(n)
            return names

        def needs_mask(names):
            todo = []
            for n in sorted(names):
                if n in units or n.endswith((".target", ".slice", ".device", ".scope")):
                    continue
                st = self.show(n, "ActiveState", "LoadState")
                if st.get("LoadState") in ("masked", "not-found"):
                    continue
                if st.get("ActiveState") in ("active", "reloading"):
                    continue
                todo.append(n)
            return todo

        masked = []
        for _ in range(5):
            todo = needs_mask(closure())
            if not todo:
                return masked
            self.systemctl("mask", "--runtime", "--", *todo)
            masked += todo
        raise AssertionError(f"cannot confine the test systemd: still pulls in {todo}")

    # --- teardown -------------------------------------------------------------------
    def alive(self) -> bool:
        return self.pid is not None and self.proc is not None and self.proc.poll() is None

    def _procs(self) -> list[int]:
        pids = []
        for d, _, files in os.walk(self.cgroup):
            if "cgroup.procs" in files:
                try:
                    with open(os.path.join(d, "cgroup.procs")) as f:
                        pids += [int(x) for x in f.read().split()]
                except OSError:
                    pass
        return pids

    def teardown(self) -> list[str]:
        """Stop, kill, clean. Never raises; returns the problems met."""
        problems = []

        def attempt(what, fn):
            try:
                fn()
            except Exception as e:             # noqa: BLE001 -- keep cleaning up
                problems.append(f"{what}: {e}")

        def unmount_inside():
            for target, kind in reversed(mount_table(self.pid)):
                if target.startswith(self.dir + "/") and kind.startswith("fuse"):
                    self.run("fusermount3", "-u", "-z", target, check=False)

        if self.alive():
            attempt("stop the ecfs units",
                    lambda: self.systemctl("stop", "ecfs-map@*", "ecfs@*", timeout=180))
            for dev in loops_under(self.dir):
                attempt(f"detach {dev}", lambda d=dev: self.run("losetup", "--detach", d))
            attempt("unmount inside", unmount_inside)
        # kill by pid everything left in our cgroup (systemd first: the
        # kernel then kills the rest of its pid namespace), until none is left
        if os.path.isdir(self.cgroup):
            def gone():
                pids = self._procs()
                if self.pid in pids:
                    pids.remove(self.pid)
                    pids.insert(0, self.pid)
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                return not pids
            attempt("kill the cgroup's processes",
                    lambda: wait_for(gone, timeout=30, what="the test cgroup empty"))
        if self.proc is not None:
            attempt("wait for unshare", lambda: self.proc.wait(timeout=30))
        if os.path.isdir(self.cgroup):
            attempt("remove the cgroups", lambda: wait_for(
                lambda: _try_rmdirs(self.cgroup), timeout=30, what="the test cgroups removed"))
        # the namespace is gone with its last process; what remains is global
        for dev in loops_under(self.dir):
            attempt(f"detach {dev}", lambda d=dev: subprocess.run(
                ["losetup", "--detach", d], check=True, capture_output=True))
        for target, _ in reversed(mount_table()):
            if target.startswith(self.dir + "/"):       # never expected here
                attempt(f"unmount {target}", lambda t=target: subprocess.run(
                    ["umount", "-l", t], check=True, capture_output=True))
        attempt("remove the directory", lambda: shutil.rmtree(self.dir))
        return problems


def _die_with_parent() -> None:
    """In the unshare process: SIGKILL when the test process dies, even by
    SIGKILL (and --kill-child then takes systemd, and so the whole pid
    namespace, with it): no systemd is left running after a killed test."""
    import ctypes
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _try_rmdirs(top: str) -> bool:
    try:
        for d, _, _ in sorted(os.walk(top), key=lambda t: -len(t[0])):
            os.rmdir(d)
    except OSError:
        return False
    return not os.path.exists(top)

"""A cgroup per code-sandbox run: memory, tasks and CPU of the whole run, and a kill that reaches every process.

RLIMIT_AS bounds one process; a run that forks holds several times that. A cgroup bounds the sum (its tmpfs files
included, which are charged to it), caps the number of tasks, and lists every process of the run for the kill,
however they daemonise. cgroup v1 (one hierarchy per controller) and v2 (one tree) are both handled: for each of
memory, pids and cpu we take a v1 hierarchy that has it, else the v2 tree where our cgroup delegates it. A
controller that cannot be used here (no permission, not delegated) is left out and not reported; with none, the
run has no cgroup and relies on the other layers (see ``sandbox.py``).

The run's processes enter the cgroups before any of them can fork: the host moves the process it started (and,
under bubblewrap, the sandbox's init) right after starting it, and only then sends the payload whose arrival lets
the harness fork. Moving a process waits for an RCU grace period (~8 ms on this kernel after an idle spell), so
it is done while the interpreter starts rather than before (a ``sh -c 'echo $$ > cgroup.procs; exec ...'``
wrapper added that much to every run); no ``preexec_fn`` (unsafe in the trainer's threads) is needed.
"""

from __future__ import annotations

import functools
import os
import secrets
import signal
import subprocess
import sys
import time

CONTROLLERS = ("memory", "pids", "cpu")
PREFIX = "posttrain_sbx_"


def _own_paths() -> dict[str, str]:
    """Our cgroup per v1 controller, and under "" the v2 one, from /proc/self/cgroup."""
    out = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for name in controllers.split(",") if controllers else [""]:
                out[name] = path
    return out


def _mounts():
    """(mount point, root inside the hierarchy, fstype, super options) of cgroup mounts."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, (fstype, _, options) = left.split(), right.split()[:3]
            if fstype in ("cgroup", "cgroup2"):
                yield fields[4], fields[3], fstype, options.split(",")


def _under(point: str, root: str, path: str) -> str | None:
    if root != "/" and not (path + "/").startswith(root.rstrip("/") + "/"):
        return None
    return os.path.join(point, path[len(root.rstrip("/")):].lstrip("/"))


def _usable(parent: str) -> bool:
    """A child cgroup can be made there and a process of ours moved into it."""
    probe = os.path.join(parent, f"{PREFIX}probe_{secrets.token_hex(4)}")
    try:
        os.mkdir(probe)
    except OSError:
        return False
    child = None
    try:
        child = subprocess.Popen([sys.executable, "-S", "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
        _write(os.path.join(probe, "cgroup.procs"), child.pid)
        return True
    except OSError:
        return False
    finally:
        if child is not None:
            child.kill()
            child.wait()
            child.stdin.close()
        _rmdir(probe)


def _remove_stale(parent: str) -> None:
    """Empty run cgroups left by a trainer that was killed (its pid, in their name, is gone)."""
    try:
        names = [n for n in os.listdir(parent) if n.startswith(PREFIX) and n[len(PREFIX):].split("_")[0].isdigit()]
    except OSError:
        return
    for name in names:
        try:
            os.kill(int(name[len(PREFIX):].split("_")[0]), 0)
        except ProcessLookupError:
            try:
                os.rmdir(os.path.join(parent, name))  # refused while a process is still in it: then kept
            except OSError:
                pass
        except OSError:
            pass


@functools.lru_cache(maxsize=None)
def parents() -> tuple[tuple[str, int, str], ...]:
    """(controller, cgroup version, folder to create run cgroups in) for each controller usable here. Stale run
    cgroups found there are removed on the way."""
    try:
        own, mounts = _own_paths(), list(_mounts())
    except OSError:
        return ()
    found: dict[str, tuple[int, str]] = {}
    for point, root, fstype, options in mounts:
        if fstype != "cgroup":
            continue
        for controller in CONTROLLERS:
            if controller in options and controller not in found and controller in own:
                parent = _under(point, root, own[controller])
                if parent and _usable(parent):
                    found[controller] = (1, parent)
    for point, root, fstype, _ in mounts:
        if fstype != "cgroup2" or "" not in own or all(c in found for c in CONTROLLERS):
            continue
        parent = _under(point, root, own[""])
        try:
            with open(os.path.join(parent, "cgroup.subtree_control")) as f:
                delegated = f.read().split()
        except (OSError, TypeError):
            continue
        missing = [c for c in CONTROLLERS if c in delegated and c not in found]
        if missing and _usable(parent):
            found |= {c: (2, parent) for c in missing}
    for _, parent in found.values():
        _remove_stale(parent)
    return tuple((c, *found[c]) for c in CONTROLLERS if c in found)


def _write(path: str, value) -> None:
    with open(path, "w") as f:
        f.write(str(value))


def _rmdir(path: str) -> bool:
    for _ in range(200):  # EBUSY for a moment while the last killed task is being released
        try:
            os.rmdir(path)
            return True
        except FileNotFoundError:
            return True
        except OSError:
            time.sleep(0.002)
    return False


LIMITS = {  # (controller, version) -> [(file, value(memory_bytes, tasks, cpus))], in the order they must be set
    ("memory", 1): [("memory.limit_in_bytes", lambda m, t, c: m), ("memory.memsw.limit_in_bytes", lambda m, t, c: m)],
    ("memory", 2): [("memory.max", lambda m, t, c: m), ("memory.swap.max", lambda m, t, c: 0)],
    ("pids", 1): [("pids.max", lambda m, t, c: t)],
    ("pids", 2): [("pids.max", lambda m, t, c: t)],
    ("cpu", 1): [("cpu.cfs_period_us", lambda m, t, c: 100_000), ("cpu.cfs_quota_us", lambda m, t, c: int(c * 1e5))],
    ("cpu", 2): [("cpu.max", lambda m, t, c: f"{int(c * 1e5)} 100000")],
}


class RunCgroup:
    """The cgroups of one run (a folder per v1 hierarchy, or one v2 folder)."""

    def __init__(self, dirs: dict[str, tuple[int, str]]):
        self.dirs = dirs  # controller -> (version, folder)

    @classmethod
    def create(cls, memory_bytes: int, tasks: int, cpus: float) -> RunCgroup | None:
        name, dirs = f"{PREFIX}{os.getpid()}_{secrets.token_hex(6)}", {}
        for controller, version, parent in parents():
            path = os.path.join(parent, name)
            try:
                if not any(p == path for _, p in dirs.values()):
                    os.mkdir(path)
                for file, value in LIMITS[(controller, version)]:
                    if os.path.exists(os.path.join(path, file)):
                        _write(os.path.join(path, file), value(memory_bytes, tasks, cpus))
                dirs[controller] = (version, path)
            except OSError:
                if not any(p == path for _, p in dirs.values()):
                    _rmdir(path)
        return cls(dirs) if dirs else None

    @property
    def folders(self) -> list[str]:
        return sorted({path for _, path in self.dirs.values()})

    def describe(self) -> str:
        versions = sorted({f"v{v}" for v, _ in self.dirs.values()})
        return f"cgroup {'+'.join(versions)} ({', '.join(self.dirs)}): memory, tasks and CPU of the whole run"

    def enter(self, pids) -> bool:
        """Move ``pids`` (processes that have not forked yet) into the run's cgroups."""
        try:
            for folder in self.folders:
                for pid in pids:
                    _write(os.path.join(folder, "cgroup.procs"), pid)
        except OSError:
            return False
        return True

    def pids(self) -> set[int]:
        found = set()
        for folder in self.folders:
            try:
                with open(os.path.join(folder, "cgroup.procs")) as f:
                    found |= {int(p) for p in f.read().split()}
            except OSError:
                pass
        return found

    def kill_all(self, timeout_s: float = 5.0) -> bool:
        """SIGKILL every process in the cgroups until none is left (a process cannot leave them: the sandbox
        has no cgroup filesystem). True when they are empty."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pids = self.pids()
            if not pids:
                return True
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.002)
        return not self.pids()

    def peak_memory(self) -> int | None:
        """The run's peak memory in bytes (v1: max_usage_in_bytes, v2: memory.peak on Linux >= 5.19)."""
        version, folder = self.dirs.get("memory", (None, None))
        for file in ("memory.max_usage_in_bytes", "memory.peak") if folder else ():
            try:
                with open(os.path.join(folder, file)) as f:
                    return int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue
        return None

    def remove(self) -> bool:
        return all([_rmdir(folder) for folder in self.folders])

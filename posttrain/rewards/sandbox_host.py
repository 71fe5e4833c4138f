"""Host side of the code sandbox: the run's folder, bubblewrap, watching the run, stopping it, cleaning up.

Nothing here may hurt the trainer, whatever the sample did: output and result pipes are capped in total, the stop
reaches every process of the run (the PID namespace's init is killed through a pidfd, so a recycled pid is never
signalled; then the run's cgroup; then, only where neither exists, repeated sweeps of the run's uids), and the
folder is removed without recursion (a 3,000-deep tree made ``shutil.rmtree`` raise RecursionError) and without
raising: a failure is returned as text for the result's ``detail``.
"""

from __future__ import annotations

import functools
import json
import os
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
MODULES = ("_sandbox_child", "_sandbox_os", "_sandbox_seccomp", "_sandbox_guard", "_sandbox_codec",
           "_sandbox_solution", "_sandbox_judge")
STUB = "import _sandbox_child\n_sandbox_child.main()\n"  # the script itself is never loaded from bytecode
RESULT_CAP = 16_384  # the harness writes a few hundred bytes; the defences list is the longest line
_COMPILE = """
import importlib.util, json, os, py_compile, sys
out = {}
for name in sorted(os.listdir(sys.argv[1])):
    source = os.path.join(sys.argv[1], name)
    cached = importlib.util.cache_from_source(source)
    py_compile.compile(source, cfile=cached, doraise=True,
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    out[name] = os.path.relpath(cached, sys.argv[1])
print(json.dumps(out))
"""


@functools.lru_cache(maxsize=None)
def _harness_files(python: str) -> tuple[tuple[str, bytes], ...]:
    """(path in the run folder, contents) of the harness: sources, and their bytecode compiled by ``python``
    once per trainer process. Every run gets fresh copies (a run cannot tamper with the next one's harness),
    and ``-B`` would otherwise have each run compile ~1,900 lines again (~6 ms). The bytecode is of the
    unchecked-hash kind: valid whatever the copies' mtimes. Sources only, if compiling fails."""
    sources = {f"{m}.py": (HERE / f"{m}.py").read_bytes() for m in MODULES}
    files = [("harness.py", STUB.encode()), *sources.items()]
    with tempfile.TemporaryDirectory(prefix="posttrain_sbx_pyc_") as folder:
        for name, data in sources.items():
            Path(folder, name).write_bytes(data)
        try:
            done = subprocess.run([python, "-s", "-S", "-c", _COMPILE, folder], capture_output=True, text=True,
                                  timeout=60, env={"PATH": "/usr/bin:/bin"})
            compiled = json.loads(done.stdout) if done.returncode == 0 else {}
            files += [(path, Path(folder, path).read_bytes()) for path in compiled.values()]
        except (OSError, ValueError, subprocess.SubprocessError):
            pass
    return tuple(files)


def prepare_run_dir(tmp_dir: str | None, python: str) -> tuple[Path, Path]:
    """A fresh run folder holding the harness (the host's, readable by the sandbox uids) and an empty ``work``."""
    run_dir = Path(tempfile.mkdtemp(prefix="posttrain_sbx_", dir=tmp_dir))
    run_dir.chmod(0o755)  # the sandbox uid must traverse it; the harness files inside stay the host's
    work = run_dir / "work"
    work.mkdir(mode=0o700)
    for path, data in _harness_files(python):
        target = run_dir / path
        if not target.parent.exists():
            target.parent.mkdir(mode=0o755)
        target.write_bytes(data)
        target.chmod(0o644)
    return run_dir, work.resolve()


@functools.lru_cache(maxsize=None)
def bwrap_version() -> str | None:
    """bubblewrap's version when it is installed and can make the namespaces the sandbox asks of it, else None."""
    path = shutil.which("bwrap", path="/usr/bin:/bin:/usr/local/bin")
    if not path:
        return None
    trial = [path, *_namespace_args(), "--ro-bind", "/", "/", "--size", "1048576", "--tmpfs", "/tmp", "true"]
    try:
        if subprocess.run(trial, capture_output=True, timeout=20).returncode != 0:
            return None
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return out[-1] if out else "?"


def _namespace_args() -> list[str]:
    # --as-pid-1: the harness is the namespace's init (no bwrap reaper in between), so the child pid bwrap reports
    # is the harness's, which the host moves into the run's cgroup before it forks, and kills through a pidfd
    args = ["--die-with-parent", "--new-session", "--as-pid-1", "--unshare-pid", "--unshare-net", "--unshare-ipc",
            "--unshare-uts", "--unshare-cgroup-try"]
    if os.geteuid() == 0:  # privileged mode, no user namespace: the harness becomes fresh uids itself
        return args + ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_KILL"]
    return args + ["--unshare-user", "--disable-userns"]


def bwrap_command(python: str, run_dir: Path, work: Path, disk_bytes: int, info_fd: int) -> list[str]:
    """bubblewrap around the harness: a private root holding only /usr, the interpreter's prefix and the harness
    (all read-only), a minimal read-only /dev, no /proc, and the work folder as a private size-limited tmpfs."""
    real = os.path.realpath(python)
    prefix = os.path.dirname(os.path.dirname(real))
    args = [shutil.which("bwrap", path="/usr/bin:/bin:/usr/local/bin"), *_namespace_args(),
            "--info-fd", str(info_fd), "--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    if not (prefix + "/").startswith("/usr/"):
        args += _parents_of(prefix) + ["--ro-bind", prefix, prefix]
    args += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache", "--dev", "/dev", "--remount-ro", "/dev",
             *_parents_of(str(run_dir)), "--ro-bind", str(run_dir), str(run_dir),
             "--perms", "1777", "--size", str(disk_bytes), "--tmpfs", str(work), "--chdir", str(work),
             "--remount-ro", "/", "--", real]
    return args


def _parents_of(path: str) -> list[str]:
    """bwrap makes the missing parents of a mount point 0700: the sandbox uids must traverse them."""
    args = []
    for parent in reversed(Path(path).parents):
        if str(parent) != "/":
            args += ["--perms", "0755", "--dir", str(parent)]
    return args


def exited(pid: int) -> bool:
    """Exited, without reaping: the zombie keeps the pid (and process-group id) reserved until we wait for it."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # already reaped
        return True


def communicate(proc, payload: bytes, fds: dict[int, int], max_output: int, deadline: float):
    """Feed stdin; collect stdout (up to ``max_output``) and each of ``fds`` (fd -> cap in bytes, in total)
    until the process exits, the deadline passes or the output overflows. (output, {fd: bytes}, timed_out): the
    output is ``max_output + 1`` bytes long when it overflowed."""
    sel = selectors.DefaultSelector()
    os.set_blocking(proc.stdin.fileno(), False)
    sel.register(proc.stdin, selectors.EVENT_WRITE)
    sel.register(proc.stdout, selectors.EVENT_READ)
    for fd in fds:
        sel.register(fd, selectors.EVENT_READ)
    output, extra, sent = bytearray(), {fd: bytearray() for fd in fds}, 0
    done = timed_out = overflow = False
    while True:
        if not overflow and len(output) > max_output:
            overflow = True  # stop now, but give the harness's result lines a moment to arrive
            deadline = min(deadline, time.monotonic() + 0.3)
        if not done and exited(proc.pid):
            done = True  # a process outside the PID namespace may hold the pipes open: drain briefly, then stop
            deadline = min(deadline, time.monotonic() + 0.2)
        if done and not sel.get_map():
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = not done and not overflow
            break
        for key, _ in sel.select(min(remaining, 0.05 if sel.get_map() else 0.005)):
            if key.fileobj is proc.stdin:
                try:
                    sent += os.write(proc.stdin.fileno(), payload[sent:sent + 65536])
                except BrokenPipeError:
                    sent = len(payload)
                if sent >= len(payload):
                    sel.unregister(proc.stdin)
                    proc.stdin.close()
                continue
            chunk = os.read(key.fd, 65536)
            if not chunk:
                sel.unregister(key.fileobj)
            elif key.fileobj is proc.stdout:
                output += chunk[:max_output + 1 - len(output)] if not overflow else b""
            elif len(extra[key.fd]) < fds[key.fd]:
                extra[key.fd] += chunk[:fds[key.fd] - len(extra[key.fd])]  # a total cap, not one per read
    sel.close()
    return bytes(output), {fd: bytes(v) for fd, v in extra.items()}, timed_out


def read_info(fd: int, deadline: float) -> bytes:
    """bubblewrap's --info-fd report (JSON with "child-pid"), read as soon as it is complete."""
    data = b""
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    try:
        while not data.rstrip().endswith(b"}") and len(data) < 4096 and time.monotonic() < deadline:
            if sel.select(max(0.0, deadline - time.monotonic())):
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                data += chunk
    finally:
        sel.close()
    return data


def info_pid(info: bytes) -> int | None:
    try:
        return int(json.loads(info)["child-pid"])
    except (ValueError, KeyError, TypeError):
        return None


def _init_pidfd(proc, result: bytes, info: bytes) -> int | None:
    """A pidfd for the run's PID-namespace init, opened only when it still is that process: bwrap's (its pid
    namespace is the one bwrap reported; where we may not read that, not root and the init not dumpable, bwrap has
    not exited yet, so at most has reaped it an instant ago) or the harness's (which leaves it a zombie until it
    exits itself, so its pid stays reserved while the harness runs)."""
    try:
        if info:
            report = json.loads(info)
            pid, ns = int(report["child-pid"]), int(report["pid-namespace"])
            pidfd = os.pidfd_open(pid)
            try:
                same = os.readlink(f"/proc/{pid}/ns/pid") == f"pid:[{ns}]"
            except PermissionError:
                same = not exited(proc.pid)
            if same:
                return pidfd
            os.close(pidfd)
            return None
        line = next((ln for ln in result.split(b"\n") if ln.startswith(b"INIT ")), None)
        if line is None:
            return None
        pidfd = os.pidfd_open(int(line[5:]))
        if not exited(proc.pid):
            return pidfd
        os.close(pidfd)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def stop(proc, result: bytes, info: bytes, cgroup, sweep_uids) -> None:
    """End every process of the run; returns once none is left (where the machine lets us know that)."""
    if not exited(proc.pid):
        pidfd = _init_pidfd(proc, result, info)
        if pidfd is not None:
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                proc.wait(timeout=2.0)  # the namespace's processes are gone before its init's parent can exit
            except (OSError, subprocess.TimeoutExpired):
                pass
            finally:
                os.close(pidfd)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    for stream in (proc.stdin, proc.stdout):
        if stream and not stream.closed:
            stream.close()
    if cgroup is not None:
        cgroup.kill_all()
    if sweep_uids:
        _sweep(sweep_uids)


def _alive_under(pid: str, uids) -> bool:
    """Running (not a zombie waiting to be reaped) under one of ``uids``."""
    try:
        if os.stat(f"/proc/{pid}").st_uid not in uids:
            return False
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def _sweep(uids) -> None:
    """SIGKILL every process of the run's uids, until three scans in a row find none (a process that was
    forking during a scan shows up in the next one; one empty scan proves nothing)."""
    empty = 0
    for _ in range(300):
        pids = [pid for pid in os.listdir("/proc") if pid.isdigit() and _alive_under(pid, uids)]
        empty = 0 if pids else empty + 1
        if empty >= 3:
            return
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.002)


def remove_tree(path: Path) -> str | None:
    """Delete ``path`` and everything under it without recursion and without raising; None, or what was left.

    Each subfolder is first renamed to the top level, so no path ever gets deeper than two components however
    deep the tree was (no RecursionError, no ENAMETOOLONG, two open descriptors at most). Symlinks are removed,
    never followed. Whatever resists is tried once more with ``rm -rf``."""
    try:
        top = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError:
        return _rm_rf(path)
    pending, counter = [None], 0  # names of folders left to empty, at the top level; None: the top itself
    try:
        while pending:
            name = pending.pop()
            try:
                fd = top if name is None else _open_dir(top, name)
                entries = list(os.scandir(fd))
            except OSError:
                continue  # left for the final rmdir to notice
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        counter += 1
                        os.rename(entry.name, f".rm{counter}", src_dir_fd=fd, dst_dir_fd=top)
                        pending.append(f".rm{counter}")
                    else:
                        os.unlink(entry.name, dir_fd=fd)
                except OSError:
                    pass
            if fd != top:
                os.close(fd)
                try:
                    os.rmdir(name, dir_fd=top)
                except OSError:
                    pass
    finally:
        os.close(top)
    try:
        os.rmdir(path)
    except OSError:
        return _rm_rf(path)
    return None


def _open_dir(parent_fd: int, name: str) -> int:
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    try:
        fd = os.open(name, flags, dir_fd=parent_fd)
    except PermissionError:  # not root: a folder the sample made unreadable is still ours to open up
        os.chmod(name, 0o700, dir_fd=parent_fd)
        fd = os.open(name, flags, dir_fd=parent_fd)
    if os.geteuid() != 0:
        os.chmod(fd, 0o700)  # and writable, so that its entries can be unlinked
    return fd


def _rm_rf(path: Path) -> str | None:
    try:
        subprocess.run(["rm", "-rf", "--one-file-system", "--", str(path)], capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        return f"could not remove {path}: {e}"
    return f"could not remove {path}" if os.path.lexists(path) else None

"""The harness of the code sandbox: set the run up, fork the solution's and the judge's processes, relay the verdict.

Run by ``sandbox.py`` as ``python -s -S -B harness.py SETTINGS_JSON`` (inside bubblewrap where the host has it)
with a scrubbed environment and a write-only result pipe whose fd number is in the settings; ``harness.py`` is a
two-line stub calling ``main`` here, so that this module loads from the bytecode the host compiled. Standard
library only: it may run under another interpreter than the host's. Its sibling modules are copied next to it.

stdin: a frame with ``{"code": ...}``, then the 32-byte nonce and a newline, then a frame with ``{"tests": ...}``
(a frame: 16 ASCII digits giving the length, then that many bytes of JSON). The harness reads the code, forks the
solution's process (it closes every descriptor but its channel, so it never sees the rest of stdin), then reads
the nonce and the tests and forks the judge: the expected values never exist in the solution's process.

Processes (``_sandbox_os`` confines the two that run code, each under its own uid where we are root):
- this harness: trusted, runs no submitted code; where bubblewrap is absent it makes the namespaces and the
  private filesystem itself, and forks an init for the new PID namespace, whose exit kills every process left;
- the solution (``_sandbox_solution``): runs the completion's code and answers the judge's requests;
- the judge (``_sandbox_judge``): runs the tests, calling into the solution over two pipes.

Result pipe, read by the host (nothing else ever writes to it; the processes that run code do not hold it):
- ``INIT <pid>``: the PID namespace's init (only when the harness made the namespace itself);
- ``INFRA <message>``: the set-up failed before any untrusted code ran (exit 70);
- ``READY <defences json>``: both processes confined; only then is the solution's process let run the code (a
  byte on a pipe it waits on), so from here on every outcome is the code's own, and nothing it does can turn a
  reward of 0 into an ``infra_error`` (masked);
- ``END <solution status> <judge status>``, then ``PASS <nonce>`` only when the judge exited 0.
"""

import os
import sys

import _sandbox_guard
import _sandbox_judge
import _sandbox_os
import _sandbox_solution
from _sandbox_codec import dumps_text, loads

SIGKILL = 9  # the same on every Linux architecture; importing signal would cost the run enum's import time
GUARD = "python guard: no processes, sockets or writes outside the work folder"


def _read_exact(n):
    data = b""
    while len(data) < n:
        chunk = os.read(0, n - len(data))
        if not chunk:
            raise EOFError("stdin closed early")
        data += chunk
    return data


def _read_frame():
    return loads(_read_exact(int(_read_exact(16))))


def _write(fd, line):
    os.write(fd, line.encode(errors="replace") + b"\n")


def _status(pid, options=0):
    """'exit N', 'signal N' or None (still running)."""
    done, status = os.waitpid(pid, options)
    if not done:
        return None
    return f"exit {os.WEXITSTATUS(status)}" if os.WIFEXITED(status) else f"signal {os.WTERMSIG(status)}"


def _spawn(role, keep):
    """Fork a process that keeps only stdout, stderr and ``keep`` (stdin: /dev/null) and runs ``role()``."""
    pid = os.fork()
    if pid:
        return pid
    try:
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        low = 3
        for fd in sorted(keep) + [1 << 20]:
            if fd >= low:
                os.closerange(low, fd)
            low = max(low, fd + 1)
        role()
    except BaseException:
        import traceback

        traceback.print_exc()  # a bug of the harness's: say where, for the logs
    finally:
        os._exit(70)


def _confine_role(s, uid, kit, status_fd, tag, guard):
    """Confine this forked process; report its defences (or the failure) on the status pipe, then close it."""
    try:
        defences = _sandbox_os.confine(s, uid, kit)
        if guard:
            _sandbox_guard.install(s["work"], sys)
            defences.append(GUARD)
    except BaseException as e:
        _write(status_fd, f"{tag} INFRA {type(e).__name__}: {e}"[:2000])  # str(e): an OSError's path too
        try:
            import traceback  # may itself fail: an unreadable standard library is one way to get here

            traceback.print_exc()  # to the captured output, for whoever reads the logs
        finally:
            os._exit(70)
    _write(status_fd, f"{tag} OK " + dumps_text(defences))
    os.close(status_fd)


def _solution_role(s, code, kit, fds):
    requests_r, replies_w, status_w, go_r = fds
    _confine_role(s, s["uids"][0], kit, status_w, "S", s["guard"])
    if os.read(go_r, 1) != b"g":  # no untrusted code before READY: a run that never got there is the sandbox's
        os._exit(70)  # failure (infra_error, masked), and the code must not be able to cause one
    os.close(go_r)
    _sandbox_solution.serve(code, requests_r, replies_w)


def _judge_role(s, tests, kit, fds):
    replies_r, requests_w, status_w = fds
    _confine_role(s, s["uids"][1], kit, status_w, "J", True)  # its guard does not depend on the run's settings
    _sandbox_judge.run(tests, replies_r, requests_w)


def _statuses(fd):
    """The two processes' set-up reports: {"S": line, "J": line}; a missing one counts as a failure."""
    data = b""
    while data.count(b"\n") < 2:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
    lines = [line.decode(errors="replace") for line in data.split(b"\n") if line]
    return {line[:1]: line[2:] for line in lines}


def supervise(s, code, kit, defences):
    """Fork the two processes, wait for the judge, relay the verdict on the result pipe; never returns."""
    result = s["result_fd"]
    requests_r, requests_w = os.pipe()  # judge -> solution
    replies_r, replies_w = os.pipe()  # solution -> judge
    status_r, status_w = os.pipe()
    go_r, go_w = os.pipe()
    fds = (requests_r, replies_w, status_w, go_r)
    solution = _spawn(lambda: _solution_role(s, code, kit, fds), fds)
    nonce = _read_exact(33)[:32].decode()  # only now: the solution's process was forked without them
    tests = _read_frame()["tests"]
    fds = (replies_r, requests_w, status_w)
    judge = _spawn(lambda: _judge_role(s, tests, kit, fds), fds)
    for fd in (requests_r, requests_w, replies_r, replies_w, status_w, go_r):
        os.close(fd)
    reports = _statuses(status_r)
    if not all(reports.get(tag, "").startswith("OK ") for tag in "SJ"):
        for pid in (solution, judge):
            os.kill(pid, SIGKILL)
        _write(result, "INFRA " + " / ".join(reports.get(tag, f"{tag}: no report") for tag in "SJ"))
        os._exit(70)
    solution_defences = loads(reports["S"][3:])
    judge_uid = s["uids"][1]
    judge_line = "a separate judge process" + (f" (uid {judge_uid})" if judge_uid is not None else "")
    _write(result, "READY " + dumps_text(defences + solution_defences + [
        judge_line + " runs the tests; the solution sees no expected values and cannot write the verdict"]))
    os.write(go_w, b"g")
    os.close(go_w)
    judged = _status(judge)
    left = _status(solution, os.WNOHANG)
    if left is None:
        os.kill(solution, SIGKILL)
        _status(solution)
        left = "alive"
    _write(result, f"END {left.replace(' ', ':')} {judged.replace(' ', ':')}")
    if judged == "exit 0":
        _write(result, "PASS " + nonce)
    os._exit(0)


def _as_pid_namespace_init(result, lib, run):
    """Fork the init of the PID namespace that ``unshare`` prepared and wait for it. Its exit makes the kernel
    kill every process left in the namespace. It is left a zombie until we exit, so that its pid, which the host
    may signal, cannot be reused while the host can see us running."""
    pid = os.fork()
    if pid == 0:
        try:
            lib.prctl(1, SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: die with this harness
            run()
        finally:
            os._exit(70)
    _write(result, f"INIT {pid}")
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
    os._exit(0)


def _prepare(s, kit):
    """The run-wide layers this harness sets up itself: none under bubblewrap, which built them already."""
    if s["bwrap"]:
        return [f"namespaces (bwrap {s['bwrap']})", "no network (empty network namespace)",
                "private minimal root (bwrap): only the interpreter and system libraries, read-only",
                "pid namespace: every process dies with the run", f"private tmpfs work folder ({s['disk_mb']} MiB)"]
    if not s["isolate"]:
        return []
    uid, gid = os.getuid(), os.getgid()
    kind = _sandbox_os.enter_namespaces(kit[2], uid, gid)
    if not kind:
        return []
    s["namespaces"] = kind
    _sandbox_os.private_filesystem(kit[2], s["work"], s["disk_mb"] << 20)
    return [f"namespaces ({kind})", "no network (empty network namespace)",
            "read-only filesystem except the work folder; /proc hidden",
            "pid namespace: every process dies with the run", f"private tmpfs work folder ({s['disk_mb']} MiB)"]


def main():
    settings = loads(sys.argv[1])
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)  # what -P would do; -I is not used because it also ignores PYTHONHASHSEED
    result = settings["result_fd"]
    try:
        code = _read_frame()["code"]
        kit = _sandbox_os.libc()
        defences = _prepare(settings, kit)  # before the next line: it writes our own /proc/self/uid_map
        kit[2]("prctl", 4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: not root, the solution shares our uid; no ptrace of us
    except BaseException as e:  # nothing untrusted ran yet: the host reports infra_error, not a reward of 0
        _write(result, f"INFRA {type(e).__name__}: {e}"[:2000])
        os._exit(70)
    if settings.get("namespaces"):
        _as_pid_namespace_init(result, kit[1], lambda: supervise(settings, code, kit, defences))
    supervise(settings, code, kit, defences)


if __name__ == "__main__":
    main()

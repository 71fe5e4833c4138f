"""Run untrusted Python against its tests in a separate, isolated process; the ``code`` reward.

Defences, each reported in ``SandboxResult.defences`` when active (``probe()`` lists them for this machine):

- a fresh process group (``start_new_session``) killed as a whole at the wall-clock timeout, and every process of
  the sandbox uid killed afterwards (so a daemonised grandchild cannot outlive the run);
- rlimits: CPU seconds, address space (memory), file size, open files, and processes (RLIMIT_NPROC, which the
  kernel ignores for root, hence the next point);
- as root: a fresh, unused uid per run (so RLIMIT_NPROC counts only this run's processes), no capabilities,
  no supplementary groups, PR_SET_NO_NEW_PRIVS, and the process made undumpable;
- as root, or through an unprivileged user namespace where the kernel allows it: new mount and network namespaces;
  the whole filesystem is remounted read-only except the work folder (itself noexec), /proc is hidden, and the
  network namespace has no interface up, so no connection leaves the process, 127.0.0.1 included;
- Landlock where the kernel has it (Linux >= 5.13, no privilege needed): nothing outside the work folder and the
  interpreter's standard library can be read, world-readable files included (training data, checkpoints, the
  source tree); TCP bind/connect and signals to outside processes are refused too;
- a Python-level guard (an audit hook, which cannot be removed once installed) that refuses sockets, new
  processes and writes outside the work folder. It is the only write/network defence where namespaces are
  refused, and it can be circumvented by code that deliberately patches the standard library it relies on;
- a scrubbed environment (PATH, LANG, HOME, TMPDIR, PYTHONHASHSEED only): the host's secrets are not inherited.
  The interpreter runs with ``-s -S -B`` and the harness drops its own folder from ``sys.path``: isolated mode
  (``-I``) minus ``-E``, which would also ignore the fixed hash seed;
- a fresh temporary work folder, deleted afterwards.

Verdict (code-execution rewards fooled from inside: verl PR #7853, open-r1 PR #546): ``passed`` only when the harness's result pipe carries ``PASS <nonce>`` with this run's
random nonce, written after the tests ran to completion (see ``_sandbox_child.py`` for why the code cannot forge
it). ``sys.exit(0)``, ``os._exit(0)``, raising, patched builtins, printing a fake marker: ``failed``. Output over
``max_output_bytes`` kills the run (``failed``). ``timeout``: wall clock or CPU limit. ``infra_error``: the
sandbox failed before any untrusted code ran (missing interpreter, isolation refused, tests that do not compile);
the ``code`` reward maps it to NaN (masked), never to 0.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.rewards.registry import register_reward

CHILD = Path(__file__).with_name("_sandbox_child.py")
STATUSES = ("passed", "failed", "timeout", "infra_error")
_CODE_BLOCK = re.compile(r"```(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


@dataclass
class SandboxConfig:
    """Limits of one run. Keep ``timeout_s`` small in tests: the interpreter itself starts in ~30 ms."""

    timeout_s: float = 5.0  # wall clock for the whole run, interpreter start included
    cpu_s: int | None = None  # RLIMIT_CPU; default ceil(timeout_s) + 1
    memory_mb: int = 1024  # RLIMIT_AS (virtual memory, so leave room above the resident size)
    file_mb: int = 16  # RLIMIT_FSIZE
    max_processes: int = 16  # RLIMIT_NPROC for the per-run uid (root only; threads count too)
    max_output_bytes: int = 64_000  # stdout + stderr; more kills the run as failed
    python: str | None = None  # None: this interpreter if the sandbox uid can read it, else /usr/bin/python3
    isolate: bool = True  # namespaces, read-only filesystem, another uid, where this machine permits
    guard: bool = True  # the Python-level guard (no sockets, processes, writes outside the work folder)
    hash_seed: int = 0
    tmp_dir: str | None = None  # parent of the per-run folders


@dataclass
class SandboxResult:
    status: str  # one of STATUSES
    output: str = ""  # stdout + stderr, capped
    detail: str = ""  # why it failed, for logs
    elapsed_s: float = 0.0
    returncode: int | None = None
    defences: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def reward(self) -> float:
        """1 passed, 0 failed or timed out, NaN (masked) when the sandbox itself failed."""
        return math.nan if self.status == "infra_error" else float(self.passed)


def extract_code(completion: str) -> str | None:
    """The last fenced code block (```python, ```py or bare ```) of a completion, or None."""
    blocks = _CODE_BLOCK.findall(completion)
    return blocks[-1] if blocks else None


def _as_test_source(tests) -> str:
    if isinstance(tests, str):
        return tests
    return "\n".join(str(t) for t in tests)


def _sandbox_uid() -> int | None:
    """A fresh uid per run when we are root (no /etc/passwd entry needed), None otherwise."""
    return 200_000_000 + secrets.randbelow(100_000_000) if os.geteuid() == 0 else None


@functools.lru_cache(maxsize=None)
def _python_for_sandbox(preferred: str | None, isolate: bool) -> str:
    """The interpreter to run: its standard library must stay readable once the run has dropped to another uid
    (a pyenv under /root, mode 0700, is not), so as root we check with a real run and fall back. If none works,
    the first one is returned and every run reports that as an infra_error."""
    candidates = [preferred] if preferred else [sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"]
    if preferred or os.geteuid() != 0:
        return candidates[0]
    for python in candidates:
        if Path(python).exists():
            result = _run(python, "import json, re, collections, math, itertools", "assert True",
                          SandboxConfig(timeout_s=10.0, isolate=isolate))
            if result.passed:
                return python
    return candidates[0]


def run_tests(code: str, tests, config: SandboxConfig | None = None) -> SandboxResult:
    """Run ``code`` then ``tests`` (a string of asserts, or a list of them) in the sandbox."""
    config = config or SandboxConfig()
    python = _python_for_sandbox(config.python, config.isolate)
    return _run(python, code, _as_test_source(tests), config)


def probe(config: SandboxConfig | None = None) -> SandboxResult:
    """A trivial passing run; its ``defences`` say which isolation mechanisms work on this machine."""
    return run_tests("x = 1", "assert x == 1", config)


def _prepare(config: SandboxConfig):
    run_dir = Path(tempfile.mkdtemp(prefix="posttrain_sbx_", dir=config.tmp_dir))
    run_dir.chmod(0o755)  # the sandbox uid must traverse it; the harness copy inside stays root-owned
    work = run_dir / "work"
    work.mkdir(mode=0o700)
    shutil.copyfile(CHILD, run_dir / "harness.py")
    (run_dir / "harness.py").chmod(0o644)
    uid = _sandbox_uid()
    if uid is not None:
        os.chown(work, uid, uid)
    return run_dir, work.resolve(), uid


def _run(python: str, code: str, tests: str, config: SandboxConfig) -> SandboxResult:
    start = time.monotonic()
    try:
        run_dir, work, uid = _prepare(config)
    except OSError as e:
        return SandboxResult("infra_error", detail=f"could not prepare the work folder: {e}")
    settings = {
        "work": str(work), "uid": uid, "isolate": config.isolate, "guard": config.guard,
        "cpu_s": config.cpu_s or math.ceil(config.timeout_s) + 1, "memory_bytes": config.memory_mb << 20,
        "file_bytes": config.file_mb << 20, "max_processes": config.max_processes,
    }
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": str(config.hash_seed),
           "HOME": str(work), "TMPDIR": str(work)}
    nonce = secrets.token_hex(16).encode()
    result_r, result_w = os.pipe()
    settings["result_fd"] = result_w
    try:
        try:
            proc = subprocess.Popen(
                [python, "-s", "-S", "-B", str(run_dir / "harness.py"), json.dumps(settings)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, pass_fds=(result_w,),
                env=env, cwd=str(work), start_new_session=True)
        except OSError as e:
            return SandboxResult("infra_error", detail=f"could not start {python}: {e}",
                                 elapsed_s=time.monotonic() - start)
        finally:
            os.close(result_w)
        payload = nonce + b"\n" + json.dumps({"code": code, "tests": tests}).encode()
        output, result, timed_out, overflow = _communicate(proc, payload, result_r, config, start)
        _kill_everything(proc, uid)
        return _verdict(proc.returncode, output, result, nonce, timed_out, overflow, config,
                        time.monotonic() - start)
    finally:
        os.close(result_r)
        shutil.rmtree(run_dir, ignore_errors=True)


def _exited(pid: int) -> bool:
    """Exited, without reaping: the zombie keeps the process-group id reserved until we have killed the group."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _communicate(proc, payload: bytes, result_r: int, config: SandboxConfig, start: float):
    """Feed stdin, collect capped output and the result pipe until exit, timeout or overflow."""
    sel = selectors.DefaultSelector()
    os.set_blocking(proc.stdin.fileno(), False)
    sel.register(proc.stdin, selectors.EVENT_WRITE)
    sel.register(proc.stdout, selectors.EVENT_READ)
    sel.register(result_r, selectors.EVENT_READ)
    output, result, sent = bytearray(), bytearray(), 0
    exited = timed_out = overflow = False
    deadline = start + config.timeout_s
    while len(output) <= config.max_output_bytes:
        if not exited and _exited(proc.pid):
            exited = True  # a grandchild may hold the pipes open: drain briefly, then stop
            deadline = min(deadline, time.monotonic() + 0.2)
        if exited and not sel.get_map():
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = not exited
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
            elif key.fileobj is result_r:
                result += chunk[:4096]  # the protocol needs a few hundred bytes; more is junk written by the code
            else:
                output += chunk
    overflow = len(output) > config.max_output_bytes
    sel.close()
    return bytes(output[:config.max_output_bytes]), bytes(result), timed_out, overflow


def _kill_everything(proc, uid: int | None) -> None:
    """SIGKILL the process group, then (as root) every process still running under the run's uid."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    if proc.stdin and not proc.stdin.closed:
        proc.stdin.close()
    proc.stdout.close()
    for _ in range(100) if uid is not None else ():
        pids = [pid for pid in os.listdir("/proc") if pid.isdigit() and _alive_under(pid, uid)]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)


def _alive_under(pid: str, uid: int) -> bool:
    """Running (not a zombie waiting to be reaped) under ``uid``."""
    try:
        if os.stat(f"/proc/{pid}").st_uid != uid:
            return False
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def _verdict(rc, output: bytes, result: bytes, nonce: bytes, timed_out: bool, overflow: bool,
             config: SandboxConfig, elapsed: float) -> SandboxResult:
    text = output.decode(errors="replace")
    lines = result.split(b"\n")
    if lines[0].startswith(b"INFRA "):
        return SandboxResult("infra_error", text, lines[0][6:].decode(errors="replace"), elapsed, rc)
    if not lines[0].startswith(b"READY "):
        why = "did not start within the timeout" if timed_out else f"exited with {rc} before starting"
        return SandboxResult("infra_error", text, f"sandbox {why}", elapsed, rc)
    defences = json.loads(lines[0][6:])
    made = lambda status, detail: SandboxResult(status, text, detail, elapsed, rc, defences)  # noqa: E731
    cpu_killed = rc in (-signal.SIGXCPU, -signal.SIGKILL) and not overflow
    if timed_out or cpu_killed:
        return made("timeout", f"killed after {config.timeout_s} s wall clock" if timed_out else "CPU limit")
    if overflow:
        return made("failed", f"output over {config.max_output_bytes} bytes")
    if result == lines[0] + b"\n" + b"PASS " + nonce + b"\n" and rc == 0:
        return made("passed", "")
    return made("failed", f"exit status {rc}" + ("" if rc else " without the harness's pass line"))


@register_reward("code")
def code(prompts, completions, tests, *, timeout_s: float = 5.0, memory_mb: int = 1024,
         config: SandboxConfig | None = None, **_) -> list[float]:
    """1.0 when the last ```python block of the completion passes ``tests`` (column: a string of asserts or a
    list of them), 0.0 when it fails, times out or has no code block, NaN (masked) on an infra error."""
    config = config or SandboxConfig(timeout_s=timeout_s, memory_mb=memory_mb)
    rewards = []
    for completion, sample_tests in zip(completions, tests, strict=True):
        source = extract_code(completion)
        rewards.append(0.0 if source is None else run_tests(source, sample_tests, config).reward)
    return rewards

"""Run untrusted Python against its tests in separate, isolated processes; the ``code`` reward.

Under RL the policy is optimised to find whatever scores, so the sandbox faces an adversary. Two principles:

1. The verdict never comes from the untrusted process. The completion's code runs in one process (the solution),
   the tests in another (the judge), forked before any untrusted code ran and never running any. The judge calls
   the solution's functions over a pipe with plain data and a per-call secret, and compares what comes back
   itself (``_sandbox_judge``, ``_sandbox_codec``): the expected values never enter the solution's process, which
   never holds the verdict's channel either, so forged pass lines, frame walking, ctypes or native modules,
   builtins shadowing, patched ``math``/``unittest`` and always-equal objects have nothing to act on. The judge's
   exit status, read by the trusted harness with waitpid, is the verdict (``PASS <nonce>`` on a pipe only the
   harness holds).
2. Isolation from maintained tools and kernel primitives, each layer reported in ``SandboxResult.defences`` and,
   as ``rewards/code/layers/<name>`` values, by ``sandbox_metrics()`` (``sandbox_layers()`` for this machine):
   - bubblewrap where installed (Debian ``bubblewrap``): a private minimal root (``/usr``, the interpreter, the
     harness, read-only), a private size-limited tmpfs work folder, PID/network/IPC/UTS/cgroup namespaces.
     Without it the harness makes the same namespaces itself (as root, or in a user namespace), remounts the
     host's filesystem read-only, and mounts the tmpfs; its PID namespace's init takes every process with it;
   - a cgroup per run (v1 or v2, ``sandbox_cgroup``): ``memory_mb`` for all the run's processes together (its
     tmpfs included), a task cap, ``cpus`` of CPU, and a kill that reaches every process;
   - per process that runs code (``_sandbox_os``): a fresh uid each (root only), rlimits (CPU seconds, address
     space, file size, open files, processes), a fresh session keyring, no new privileges, Landlock (nothing
     outside the work folder and the standard library; no TCP, abstract sockets or signals out), not
     dumpable, and a seccomp filter denying keyctl, unshare, io_uring, perf_event_open, ptrace, bpf, mounts,
     socket(AF_UNIX) and friends (``_sandbox_seccomp``);
   - an audit-hook guard in the solution's process (``_sandbox_guard``): a first, bypassable, line;
   - a scrubbed environment; ``-s -S -B``; a fresh run folder removed without recursion (``sandbox_host``).

Statuses: ``passed`` when the judge ran the tests to completion. ``failed``: a test failed, the solution raised,
exited, or returned something that is not data where data was compared; output over ``max_output_bytes``.
``timeout``: wall clock, or a CPU limit. ``infra_error`` (reward NaN, masked): the sandbox failed before any
untrusted code ran, or the tests cannot be judged safely (they do not parse, or they ``eval``/``exec`` what they
are given, which would run the solution's output as code in the judge).
"""

from __future__ import annotations

import ast
import functools
import json
import math
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from posttrain.rewards import sandbox_host
from posttrain.rewards.registry import register_reward
from posttrain.rewards.sandbox_cgroup import RunCgroup

STATUSES = ("passed", "failed", "timeout", "infra_error")
_CODE_BLOCK = re.compile(r"```(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
# Tests that run text as code would run the solution's output as code in the judge: refused as unjudgeable.
REFUSED_CALLS = frozenset({"eval", "exec", "compile", "__import__", "breakpoint"})
REFUSED_MODULES = frozenset({"pickle", "marshal", "shelve", "ctypes", "subprocess", "dill", "cloudpickle"})
LAYERS = {  # metric name -> prefix of the defence that shows it active
    "bwrap": "namespaces (bwrap", "namespaces": "namespaces", "pid_namespace": "pid namespace",
    "private_tmpfs": "private tmpfs", "cgroup": "cgroup", "seccomp": "seccomp", "landlock": "landlock",
    "fresh_uid": "unprivileged uid", "fresh_keyring": "fresh session keyring", "python_guard": "python guard",
    "separate_judge": "a separate judge process", "rlimits": "nice 19, rlimits",
}


@dataclass
class SandboxConfig:
    """Limits of one run. Keep ``timeout_s`` small in tests: the interpreter itself starts in ~30 ms."""

    timeout_s: float = 5.0  # wall clock for the whole run, interpreter start included
    cpu_s: int | None = None  # RLIMIT_CPU per process; default ceil(timeout_s) + 1
    memory_mb: int = 1024  # all the run's processes together (cgroup), and RLIMIT_AS of each
    file_mb: int = 16  # RLIMIT_FSIZE
    disk_mb: int = 64  # size of the private tmpfs work folder (where a mount namespace is available)
    max_processes: int = 16  # RLIMIT_NPROC of the solution's uid (root only; threads count too); the cgroup's cap
    cpus: float = 1.0  # CPU of the whole run (cgroup)
    max_output_bytes: int = 64_000  # stdout + stderr of all the run's processes; more kills the run as failed
    python: str | None = None  # None: this interpreter if the sandbox uid can read it, else /usr/bin/python3
    isolate: bool = True  # namespaces, private filesystem, Landlock, where this machine permits
    use_bwrap: bool = True  # bubblewrap for the namespaces and the private root, when installed
    cgroup: bool = True  # a cgroup for the run, where this machine lets us make one
    seccomp: bool = True  # the seccomp filter
    guard: bool = True  # the Python-level guard in the solution's process
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
    peak_memory_bytes: int | None = None  # of the whole run, where a memory cgroup measured it

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    @property
    def reward(self) -> float:
        """1 passed, 0 failed or timed out, NaN (masked) when the sandbox itself failed."""
        return math.nan if self.status == "infra_error" else float(self.passed)

    @property
    def layers(self) -> dict[str, bool]:
        return {name: any(d.startswith(prefix) for d in self.defences) for name, prefix in LAYERS.items()}


def extract_code(completion: str) -> str | None:
    """The last fenced code block (```python, ```py or bare ```) of a completion, or None."""
    blocks = _CODE_BLOCK.findall(completion)
    return blocks[-1] if blocks else None


def _as_test_source(tests) -> str:
    if isinstance(tests, str):
        return tests
    return "\n".join(str(t) for t in tests)


def check_tests(source: str) -> str | None:
    """Why these tests cannot be judged safely (they do not parse, or they run text as code), or None."""
    try:
        tree = ast.parse(source, "<tests>")
    except (SyntaxError, ValueError) as e:
        return f"the tests do not compile: {type(e).__name__}: {e}"
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in REFUSED_CALLS:
            return f"unsupported test form: the tests use {node.id}(), which would run the solution's output"
        modules = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        for module in modules:
            if module.partition(".")[0] in REFUSED_MODULES:
                return f"unsupported test form: the tests import {module}"
    return None


def _sandbox_uids() -> list[int | None]:
    """Two fresh, distinct uids per run when we are root (no /etc/passwd entry needed): the solution's, the
    judge's. None otherwise."""
    if os.geteuid() != 0:
        return [None, None]
    first = 200_000_000 + secrets.randbelow(100_000_000)
    return [first, first + 100_000_000]


@functools.lru_cache(maxsize=None)
def _python_for_sandbox(preferred: str | None, isolate: bool, use_bwrap: bool) -> str:
    """The interpreter to run: its standard library must stay readable once the run has dropped to another uid
    (a pyenv under /root, mode 0700, is not, unless bubblewrap binds it into the private root), so as root we
    check with a real run and fall back. If none works, the first is returned and every run reports an error."""
    candidates = [preferred] if preferred else [sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"]
    if preferred or os.geteuid() != 0:
        return candidates[0]
    for python in candidates:
        if os.path.exists(python):
            config = SandboxConfig(timeout_s=10.0, isolate=isolate, use_bwrap=use_bwrap)
            if _run(python, "import json, re, collections, math, itertools", "assert True", config).passed:
                return python
    return candidates[0]


def run_tests(code: str, tests, config: SandboxConfig | None = None) -> SandboxResult:
    """Run ``code`` in the sandbox and judge it by ``tests`` (a string of Python, or a list of statements)."""
    config = config or SandboxConfig()
    python = _python_for_sandbox(config.python, config.isolate, config.use_bwrap)
    return _run(python, code, _as_test_source(tests), config)


def probe(config: SandboxConfig | None = None) -> SandboxResult:
    """A trivial passing run; its ``defences`` say which isolation mechanisms work on this machine."""
    return run_tests("x = 1", "assert x == 1", config)


@functools.lru_cache(maxsize=None)
def _probe_layers(isolate: bool, use_bwrap: bool, cgroup: bool, seccomp: bool, guard: bool) -> tuple:
    config = SandboxConfig(timeout_s=10.0, isolate=isolate, use_bwrap=use_bwrap, cgroup=cgroup, seccomp=seccomp,
                           guard=guard)
    return tuple(probe(config).layers.items())


def sandbox_layers(config: SandboxConfig | None = None) -> dict[str, bool]:
    """Which layers a run with ``config`` gets on this machine (one probe run, cached)."""
    c = config or SandboxConfig()
    return dict(_probe_layers(c.isolate, c.use_bwrap, c.cgroup, c.seccomp, c.guard))


def sandbox_metrics(config: SandboxConfig | None = None, name: str = "code") -> dict[str, float]:
    """``rewards/<name>/layers/<layer>``: 1.0 active, 0.0 not, for a trainer's metrics."""
    return {f"rewards/{name}/layers/{k}": float(v) for k, v in sandbox_layers(config).items()}


def _frame(obj) -> bytes:
    data = json.dumps(obj).encode()
    return b"%016d" % len(data) + data


def _command(python, run_dir, work, config, settings, info_w, use_bwrap):
    harness = [os.path.realpath(python) if use_bwrap else python, "-s", "-S", "-B", str(run_dir / "harness.py")]
    if use_bwrap:
        command = sandbox_host.bwrap_command(python, run_dir, work, config.disk_mb << 20, info_w)
        harness = command + harness[1:]
    return harness + [json.dumps(settings)]


def _run(python: str, code: str, tests: str, config: SandboxConfig) -> SandboxResult:
    start = time.monotonic()
    problem = check_tests(tests)
    if problem:
        return SandboxResult("infra_error", detail=problem)
    uids = _sandbox_uids()
    try:
        run_dir, work = sandbox_host.prepare_run_dir(config.tmp_dir, python)
        if uids[0] is not None:  # the solution's, and the judge's group: it reads what the solution wrote (0770)
            os.chown(work, uids[0], uids[1])
            work.chmod(0o770)
    except OSError as e:
        return SandboxResult("infra_error", detail=f"could not prepare the work folder: {e}")
    bwrap = sandbox_host.bwrap_version() if config.use_bwrap and config.isolate else None
    cgroup = RunCgroup.create(config.memory_mb << 20, config.max_processes + 8, config.cpus) if config.cgroup \
        else None
    settings = {
        "work": str(work), "uids": uids, "isolate": config.isolate, "guard": config.guard, "bwrap": bwrap,
        "seccomp": config.seccomp, "disk_mb": config.disk_mb, "cpu_s": config.cpu_s or math.ceil(config.timeout_s) + 1,
        "memory_bytes": config.memory_mb << 20, "file_bytes": config.file_mb << 20,
        "max_processes": config.max_processes,
    }
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": str(config.hash_seed),
           "HOME": str(work), "TMPDIR": str(work)}
    result_r, result_w = os.pipe()
    info_r, info_w = os.pipe()
    settings["result_fd"] = result_w
    try:
        return _execute(python, code, tests, config, (run_dir, work, settings, env, bwrap, cgroup, uids),
                        (result_r, result_w, info_r, info_w), start)
    finally:
        for fd in (result_r, info_r):
            os.close(fd)
        if cgroup is not None:
            cgroup.remove()
        sandbox_host.remove_tree(run_dir)


def _execute(python, code, tests, config, run, pipes, start) -> SandboxResult:
    run_dir, work, settings, env, bwrap, cgroup, uids = run
    result_r, result_w, info_r, info_w = pipes
    command = _command(python, run_dir, work, config, settings, info_w, bool(bwrap))
    try:
        proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                pass_fds=(result_w, info_w), env=env, cwd=str(work), start_new_session=True)
    except OSError as e:
        return SandboxResult("infra_error", detail=f"could not start {python}: {e}", elapsed_s=time.monotonic() - start)
    finally:
        os.close(result_w)
        os.close(info_w)
    info = sandbox_host.read_info(info_r, start + config.timeout_s) if bwrap and cgroup is not None else b""
    if cgroup is not None and not cgroup.enter([proc.pid] + ([sandbox_host.info_pid(info)] if bwrap else [])):
        sandbox_host.stop(proc, b"", info, cgroup, [u for u in uids if u is not None])
        return SandboxResult("infra_error", detail="could not move the run into its cgroup")
    payload = _frame({"code": code}) + (nonce := secrets.token_hex(16).encode()) + b"\n" + _frame({"tests": tests})
    output, extra, timed_out = sandbox_host.communicate(
        proc, payload, {result_r: sandbox_host.RESULT_CAP, info_r: 4096}, config.max_output_bytes,
        start + config.timeout_s)
    result, info = extra[result_r], info + extra[info_r]
    overflow = len(output) > config.max_output_bytes
    contained = bool(bwrap) or b"pid namespace" in result
    sandbox_host.stop(proc, result, info, cgroup, [u for u in uids if u is not None] if not contained else None)
    peak = cgroup.peak_memory() if cgroup is not None else None
    verdict = _verdict(proc.returncode, output[:config.max_output_bytes], result, nonce, timed_out, overflow,
                       config, time.monotonic() - start)
    verdict.peak_memory_bytes = peak
    if cgroup is not None and verdict.defences:
        verdict.defences.insert(0, cgroup.describe())
    return verdict


def _statuses(lines: list[bytes]) -> tuple[str, str]:
    end = next((line for line in lines if line.startswith(b"END ")), b"END ? ?").split()
    return end[1].decode(errors="replace"), end[2].decode(errors="replace") if len(end) > 2 else "?"


def _verdict(rc, output: bytes, result: bytes, nonce: bytes, timed_out: bool, overflow: bool,
             config: SandboxConfig, elapsed: float) -> SandboxResult:
    text = output.decode(errors="replace")
    lines = [line for line in result.split(b"\n") if not line.startswith(b"INIT ")]
    if lines[0].startswith(b"INFRA "):
        return SandboxResult("infra_error", text, lines[0][6:].decode(errors="replace"), elapsed, rc)
    defences = json.loads(lines[0][6:]) if lines[0].startswith(b"READY ") else []
    made = lambda status, detail: SandboxResult(status, text, detail, elapsed, rc, defences)  # noqa: E731
    if overflow:  # only code that ran can write that much (before READY too: it starts as soon as it is confined)
        return made("failed", f"output over {config.max_output_bytes} bytes")
    if not defences:
        why = "did not start within the timeout" if timed_out else f"exited with {rc} before starting"
        return SandboxResult("infra_error", text, f"sandbox {why}", elapsed, rc)
    solution, judge = _statuses(lines)
    if timed_out:
        return made("timeout", f"killed after {config.timeout_s} s wall clock")
    if f"signal:{int(signal.SIGXCPU)}" in (solution, judge):
        return made("timeout", "CPU limit")
    if lines[1:] == [b"END " + solution.encode() + b" " + judge.encode(), b"PASS " + nonce, b""] and rc == 0:
        return made("passed", "")
    return made("failed", f"the tests did not pass (judge {judge}, solution {solution}, harness exit {rc})")


@register_reward("code")
def code(prompts, completions, tests, *, timeout_s: float = 5.0, memory_mb: int = 1024,
         config: SandboxConfig | None = None, **_) -> list[float]:
    """1.0 when the last ```python block of the completion passes ``tests`` (column: Python test code, e.g. a
    string of asserts or a list of them), 0.0 when it fails, times out or has no code block, NaN (masked) on an
    infra error or tests that cannot be judged safely. ``sandbox_metrics()`` says which layers are active."""
    config = config or SandboxConfig(timeout_s=timeout_s, memory_mb=memory_mb)
    rewards = []
    for completion, sample_tests in zip(completions, tests, strict=True):
        source = extract_code(completion)
        rewards.append(0.0 if source is None else run_tests(source, sample_tests, config).reward)
    return rewards


code.layers = sandbox_layers  # load_reward("code").layers() where no options were bound

"""The code sandbox against a policy optimised to score: forged verdicts, escapes and leaks, resource gaps.

Each forgery is run with the Python guard on (the default) and off (``os-only``: the attack really runs, with
ctypes, fork and signals at hand), and must score 0 against a failing test and 1 against a passing one: the trick
neither forges a pass nor stops an honest judgement. The escapes are tried under bubblewrap and, where it is
installed, also without it (the harness's own namespaces), so that both paths are shown to hold.
"""

import ctypes
import os
import secrets
import shutil
import socket
import statistics
import tempfile
import time

import pytest

from posttrain.rewards import sandbox_host
from posttrain.rewards._sandbox_seccomp import ARCHES, DENIED
from posttrain.rewards.registry import load_reward
from posttrain.rewards.runner import RewardRunner
from posttrain.rewards.sandbox import SandboxConfig, probe, run_tests, sandbox_metrics

BASE = {"timeout_s": 3.0, "memory_mb": 256}
LAYERS = probe(SandboxConfig(**BASE)).layers
GUARDS = [SandboxConfig(**BASE), SandboxConfig(**BASE, guard=False)]
GUARD_IDS = ["guard", "os-only"]


def modes(**options):
    """The run configurations to try an escape in: bubblewrap (when installed) and the harness's own layers."""
    configs = [SandboxConfig(**BASE, **options)]
    if LAYERS["bwrap"]:
        configs.append(SandboxConfig(**BASE, use_bwrap=False, **options))
    return configs


MODE_IDS = ["bwrap", "own-namespaces"] if LAYERS["bwrap"] else ["own-namespaces"]


@pytest.fixture
def run_parent():
    """A parent for the run folders that the sandbox uids can traverse (pytest's tmp_path is under a 0700
    folder, which only bubblewrap's private root hides), removed afterwards."""
    folder = tempfile.mkdtemp(prefix=f"posttrain_marker_{secrets.token_hex(6)}_")
    os.chmod(folder, 0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)
SOLUTION = "\ndef f(x):\n    return x * 2\n"
PASSING, FAILING = ["assert f(2) == 4"], ["assert f(2) == 5"]

# ---- forged verdicts -----------------------------------------------------------------------------------------------

NATIVE = """
import os, sys
try:
    import importlib.util
    for folder in [p for p in sys.path if p and os.path.isdir(p)]:
        for name in os.listdir(folder):
            if name.startswith("_ctypes.") and name.endswith(".so"):
                spec = importlib.util.spec_from_file_location("innocent._ctypes", os.path.join(folder, name))
                spec.loader.exec_module(importlib.util.module_from_spec(spec))
                print("NATIVE LOADED under another name")
except BaseException as e:
    print("native module refused:", type(e).__name__)
"""
CTYPES = """
import os
try:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    for pid in range(1, 300):
        if pid != os.getpid() and libc.ptrace(16, pid, 0, 0) == 0:  # PTRACE_ATTACH: the judge, the harness
            print("ATTACHED", pid)
        if pid != os.getpid() and libc.kill(pid, 19) == 0:  # SIGSTOP
            print("STOPPED", pid)
    for fd in (1, 2):
        libc.write(fd, b"READY []\\nPASS " + b"0" * 32 + b"\\n", 40)
except BaseException as e:
    print("ctypes refused:", type(e).__name__)
"""
FRAMES = """
import gc, signal, sys, time
seen = []
def walk(frame):
    while frame is not None:
        for value in list(frame.f_locals.values()) + list(frame.f_globals.values()):
            if type(value).__name__ == "generator":
                try:
                    next(value)  # the old harness kept its verdict in a suspended generator
                except BaseException:
                    pass
            seen.append(type(value).__name__)
        frame = frame.f_back
try:
    signal.signal(signal.SIGALRM, lambda signum, frame: walk(frame))
    signal.setitimer(signal.ITIMER_REAL, 0.01)
    time.sleep(0.05)
    walk(sys._getframe())
    for obj in gc.get_objects():
        if type(obj).__name__ == "code":
            seen.append(obj.co_consts)  # the old design left the tests' code object (and its constants) here
except BaseException as e:
    print("frames refused:", type(e).__name__)
"""
SHADOW = """
import builtins
abs = lambda x: 5
len = lambda x: 5
isinstance = lambda *a: True
AssertionError = type("AssertionError", (Exception,), {})
builtins.len = lambda x: 5
builtins.abs = lambda x: 5
builtins.AssertionError = type("Quiet", (Exception,), {})
"""
PATCHED = """
import math, operator, unittest
math.isclose = lambda *a, **k: True
operator.eq = lambda a, b: True
unittest.TestCase.assertEqual = lambda *a, **k: None
unittest.TestCase.assertTrue = lambda *a, **k: None
"""
ALWAYS_EQUAL = """
class Eq:
    def __eq__(self, other): return True
    def __ne__(self, other): return False
    def __bool__(self): return True
    def __hash__(self): return 0
class EqInt(int):
    def __eq__(self, other): return True
    __hash__ = int.__hash__
class EqStr(str):
    def __eq__(self, other): return True
    __hash__ = str.__hash__
class EqList(list):
    def __eq__(self, other): return True
def g(x): return Eq()
def h(x): return EqInt(x * 2)
def s(x): return EqStr(str(x * 2))
def l(x): return EqList([x * 2])
"""
PRINTED = """
import os, sys
lines = "READY []\\nPASS " + "0" * 32 + "\\nEND exit:0 exit:0\\nPASS " + "f" * 32 + "\\npassed\\n"
print(lines)
sys.stderr.write(lines)
os.write(1, lines.encode())
os.write(2, lines.encode())
"""
EXFILTRATE = """
import gc, os, sys
PREFIX = str(9182736)  # the failing test expects 918273645: find it anywhere, and return it
found = None
def look(text):
    global found
    at = text.find(PREFIX) if type(text) is str else -1
    while at >= 0 and found is None:
        digits = "".join(c for c in text[at:at + 12] if c.isdigit())
        found = int(digits[:9]) if len(digits) >= 9 and digits[:9] != PREFIX else None
        at = text.find(PREFIX, at + 1)
look(" ".join(sys.argv) + str(dict(os.environ)))
for root in (os.getcwd(), os.path.dirname(os.getcwd()), "/tmp", "/dev/shm", "/proc/self", "/proc/1", "/proc"):
    try:
        for folder, _, files in os.walk(root):
            for name in files[:50]:
                try:
                    with open(os.path.join(folder, name), errors="replace") as handle:
                        look(handle.read(1 << 16))
                except (OSError, ValueError):
                    pass
    except OSError:
        pass
try:
    for obj in gc.get_objects():
        for part in (obj.values() if type(obj) is dict else obj if type(obj) in (list, tuple) else ()):
            look(part if type(part) is str else str(part) if type(part) is int else "")
except BaseException:
    pass
def constants(code):  # the old design compiled the tests in this process: their constants were a frame away
    for value in code.co_consts:
        look(str(value)) if type(value) in (int, str) else constants(value) if type(value).__name__ == "code" else 0
def handler(signum, frame):
    while frame is not None:
        for value in list(frame.f_locals.values()):
            if type(value).__name__ == "code":
                constants(value)
        frame = frame.f_back
try:
    import signal, time
    signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 0.01)
    time.sleep(0.05)
except BaseException:
    pass
def f(x):
    return found if found is not None else x * 2
"""
FORGERIES = {  # name: (code defining f and friends, passing tests, failing tests)
    "native module under another name": (NATIVE + SOLUTION, PASSING, [FAILING]),
    "ctypes": (CTYPES + SOLUTION, PASSING, [FAILING]),
    "frame walking": (FRAMES + SOLUTION, PASSING, [FAILING]),
    "builtins shadowing": (SHADOW + SOLUTION, ["assert abs(f(-2)) == 4 and len([f(1), f(2)]) == 2",
                                               "assert isinstance(f(1), int)"],
                           [["assert len([f(1)]) == 5"], ["assert abs(f(-2)) == 5"], ["assert isinstance(f, int)"]]),
    "stdlib and unittest patching": (PATCHED + SOLUTION,
                                     ["import math, unittest", "assert math.isclose(f(2), 4.0)",
                                      "unittest.TestCase().assertEqual(f(2), 4)"],
                                     [["assert math.isclose(f(2), 5.0)"],  # math: the solution's name
                                      ["import unittest", "unittest.TestCase().assertEqual(f(2), 5)"],
                                      ["import operator", "assert operator.eq(f(2), 5)"]]),
    "always-equal objects": (ALWAYS_EQUAL + SOLUTION, ["assert h(2) == 4 and s(2) == '4' and l(2) == [4]"],
                             [["assert g(2) == 5"], ["assert g(2)"], ["assert not (g(2) != 5)"],
                              ["assert [g(2)] == [5]"], ["assert h(2) == 5"], ["assert s(2) == '5'"],
                              ["assert l(2) == [5]"]]),
    "printed pass lines": (PRINTED + SOLUTION, PASSING, [FAILING]),
    "reading the expected values": (EXFILTRATE, PASSING, [["assert f(2) == 918273645"]]),
}


@pytest.mark.parametrize("config", GUARDS, ids=GUARD_IDS)
@pytest.mark.parametrize("name", list(FORGERIES))
def test_a_forgery_scores_0_on_a_failing_test_and_1_on_a_passing_one(name, config):
    code, passing, failings = FORGERIES[name]
    for failing in failings:
        result = run_tests(code, failing, config)
        assert result.status == "failed" and result.reward == 0.0, (name, failing, result)
    result = run_tests(code, passing, config)
    assert result.status == "passed" and result.reward == 1.0, (name, result)
    assert "ATTACHED" not in result.output and "STOPPED" not in result.output
    if name == "native module under another name" and not config.guard:
        assert "NATIVE LOADED" in result.output  # the attack did run: the verdict held without the guard


SELF_DEFEATING = {  # they can only lose: each breaks its own channel or process, and must still score 0
    "junk on every descriptor": "import os\nfor fd in range(3, 256):\n    try:\n"
                                "        os.write(fd, b'{\"id\": null, \"ok\": 5}\\nPASS ' + b'0' * 32 + b'\\n')\n"
                                "    except OSError:\n        pass\n" + SOLUTION,
    "exit 0 at interpreter shutdown": "import atexit, os\natexit.register(lambda: os._exit(0))\n"
                                      "def f(x):\n    raise SystemExit(0)\n",
    "exit 0 from the call": "import os\ndef f(x):\n    os._exit(0)\n",
}


@pytest.mark.parametrize("config", GUARDS, ids=GUARD_IDS)
@pytest.mark.parametrize("name", list(SELF_DEFEATING))
def test_self_defeating_tricks_score_0(name, config):
    result = run_tests(SELF_DEFEATING[name], PASSING, config)
    assert result.status in ("failed", "timeout") and result.reward == 0.0, (name, result)


# ---- escapes and leaks ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", modes(guard=False), ids=MODE_IDS)
def test_a_pathname_socket_of_the_host_receives_nothing(config):
    folder = tempfile.mkdtemp(prefix="posttrain_sock_")
    os.chmod(folder, 0o755)
    path = os.path.join(folder, "listener.sock")
    stream, datagram = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        stream.bind(path)
        stream.listen(4)
        stream.setblocking(False)
        datagram.bind(path + "-dgram")
        datagram.setblocking(False)
        for p in (path, path + "-dgram"):
            os.chmod(p, 0o777)  # world-writable: anyone on the host may connect
        targets = ((int(socket.SOCK_STREAM), path), (int(socket.SOCK_DGRAM), path + "-dgram"))
        code = (f"import socket\nfor kind, p in {targets!r}:\n"
                "    try:\n        s = socket.socket(socket.AF_UNIX, kind)\n        s.connect(p)\n"
                "        s.send(b'escaped')\n        print('CONNECTED', p)\n"
                "    except OSError as e:\n        print('refused', e)\n")
        result = run_tests(code, "assert True", config)
        assert result.status == "passed" and "CONNECTED" not in result.output, result
        with pytest.raises(BlockingIOError):
            stream.accept()
        with pytest.raises(BlockingIOError):
            datagram.recv(64)
    finally:
        stream.close()
        datagram.close()
        shutil.rmtree(folder)


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc, ARCHES[os.uname().machine][0]


@pytest.mark.skipif(os.uname().machine not in ARCHES, reason="system call numbers known for x86_64 and aarch64")
@pytest.mark.parametrize("config", modes(guard=False) + modes(guard=False, seccomp=False),
                         ids=[f"{m}-seccomp" for m in MODE_IDS] + [f"{m}-no-seccomp" for m in MODE_IDS])
def test_a_key_in_the_trainers_session_keyring_is_not_readable(config):
    libc, column = _libc()
    payload = ("key-" + secrets.token_hex(8)).encode()
    key = libc.syscall(DENIED["add_key"][column], b"user", b"posttrain-sandbox-test", payload, len(payload),
                       ctypes.c_int(-3))  # KEY_SPEC_SESSION_KEYRING
    if key < 0:
        pytest.skip(f"this kernel or container gives no session keyring: errno {ctypes.get_errno()}")
    keyctl = DENIED["keyctl"][column]
    try:
        code = (f"import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nlibc.syscall.restype = ctypes.c_long\n"
                f"buf = ctypes.create_string_buffer(256)\nread = []\n"
                f"for target in ({key}, -3, -4, -5):  # the key; the session, user and user-session keyrings\n"
                f"    n = libc.syscall({keyctl}, 11, ctypes.c_long(target), buf, 256)  # KEYCTL_READ\n"
                f"    read.append([n, ctypes.get_errno(), buf.raw[:max(n, 0)].hex()])\n"
                f"print(read)\n")
        result = run_tests(code, f"assert read[0][0] < 0 and all({payload.hex()!r} not in r[2] for r in read)", config)
        assert result.status == "passed", result
        assert payload.decode() not in result.output and payload.hex() not in result.output
    finally:
        libc.syscall(keyctl, 3, ctypes.c_long(key))  # KEYCTL_REVOKE


def _alive_with(marker: str) -> list[int]:
    """Processes (not zombies) whose command line holds ``marker``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            continue
    return [pid for pid in found if pid != os.getpid()]


DAEMON = """
import os, signal, time
for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
    signal.signal(s, signal.SIG_IGN)
if os.fork() == 0:
    os.setsid()
    for _ in range(3):
        if os.fork():
            break
    while True:
        time.sleep(0.05)
"""


@pytest.mark.parametrize("config", modes(guard=False) + [SandboxConfig(**BASE, guard=False, isolate=False)],
                         ids=MODE_IDS + ["no-namespaces"])
def test_no_process_of_the_sample_is_alive_after_the_call(config, run_parent):
    """Every process of a run carries its folder in its argv (they are forks of the harness, whose settings name
    it): with a unique parent folder, that is the marker to look for, 20 times over."""
    config.tmp_dir = marker = run_parent
    for _ in range(20):
        result = run_tests(DAEMON + SOLUTION, PASSING, config)
        assert _alive_with(marker) == [], result
        assert result.status == "passed", result
    config.timeout_s = 0.6  # and when the run is killed at its timeout, the daemons spinning on
    result = run_tests(DAEMON.replace("time.sleep(0.05)", "pass") + "while True:\n    pass\n", PASSING, config)
    assert result.status == "timeout" and _alive_with(marker) == []
    assert os.listdir(config.tmp_dir) == []


DEEP_TREE = "import os\nfor _ in range(3000):\n    os.mkdir('d')\n    os.chdir('d')\n" + SOLUTION


@pytest.mark.parametrize("config", modes(guard=False) + [SandboxConfig(**BASE, guard=False, isolate=False)],
                         ids=MODE_IDS + ["no-namespaces"])
def test_a_deep_tree_leaves_the_trainer_running_and_the_disk_clean(config, run_parent):
    """Without namespaces the tree lands on the host's disk: the trainer's cleanup must not recurse."""
    config.tmp_dir = run_parent
    runner = RewardRunner([("code", load_reward("code", config=config), 1.0)], num_workers=1, timeout_s=30,
                          on_error="raise")
    batch = runner(["p"], [f"```python\n{DEEP_TREE}```"], tests=[PASSING])
    assert batch.per_fn["code"] == [1.0]
    assert os.listdir(run_parent) == []


def test_remove_tree_deletes_what_shutil_rmtree_cannot(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    _deep(tmp_path / "a", 3000)
    _deep(tmp_path / "b", 3000)
    with pytest.raises(RecursionError):
        shutil.rmtree(tmp_path / "a")  # what the trainer used to call
    assert sandbox_host.remove_tree(tmp_path / "b") is None and not (tmp_path / "b").exists()
    assert sandbox_host.remove_tree(tmp_path / "a") is None and not (tmp_path / "a").exists()


def _deep(root, depth):
    """A chain of ``depth`` folders, made through descriptors (its paths are longer than PATH_MAX)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(depth):
        os.mkdir("d", dir_fd=fd)
        child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        with open(os.open("f", os.O_WRONLY | os.O_CREAT, dir_fd=child), "w") as f:
            f.write("x")
        os.close(fd)
        fd = child
    os.close(fd)


FILL = """
written = 0
i = 0
try:
    while True:
        with open(f"fill{i}", "wb") as f:
            for _ in range(4):
                f.write(b"x" * (1 << 20))
                written += 1 << 20
        i += 1
except OSError as e:
    print("stopped:", e)
"""


@pytest.mark.parametrize("config", modes(guard=False, disk_mb=8, file_mb=4), ids=MODE_IDS)
def test_a_disk_fill_is_bounded_and_leaves_the_disk_clean(config, run_parent):
    if not LAYERS["private_tmpfs"]:
        pytest.xfail("no mount namespace here: only RLIMIT_FSIZE bounds each file, not the folder")
    config.tmp_dir = run_parent
    before = shutil.disk_usage(run_parent).free
    result = run_tests(FILL, ["assert 4 << 20 <= written <= 8 << 20, written"], config)
    assert result.status == "passed", result
    assert "No space left on device" in result.output
    assert os.listdir(run_parent) == []
    assert before - shutil.disk_usage(run_parent).free < 4 << 20  # nothing reached the host's disk


FORKS = """
import os
pids = []
for _ in range(4):
    pid = os.fork()
    if pid == 0:
        try:
            block = bytearray(100 << 20)
            block[::4096] = b"\\x01" * len(block[::4096])  # touch every page: resident, charged
            os._exit(0)
        except BaseException:
            os._exit(1)
    pids.append(pid)
held = sum(os.waitpid(pid, 0)[1] == 0 for pid in pids)
"""


@pytest.mark.skipif(not LAYERS["cgroup"], reason="no usable memory cgroup here")
def test_memory_across_forks_stays_under_the_limit():
    """4 forks of 100 MiB each under memory_mb=256: RLIMIT_AS (per process) lets each through; the cgroup caps the
    run as a whole, so at most two can hold theirs."""
    config = SandboxConfig(timeout_s=10.0, memory_mb=256, guard=False)
    result = run_tests(FORKS, "assert held <= 2, held", config)
    assert result.status in ("passed", "failed"), result  # failed if the OOM killer chose the parent
    assert result.peak_memory_bytes is not None and result.peak_memory_bytes <= 256 << 20
    unbounded = run_tests(FORKS, "assert held == 4, held", SandboxConfig(timeout_s=10.0, memory_mb=256, guard=False,
                                                                           cgroup=False))
    assert unbounded.status == "passed", unbounded  # the gap the cgroup closes


# ---- what is reported ----------------------------------------------------------------------------------------------

def test_the_active_layers_are_reported_as_metrics():
    metrics = sandbox_metrics()
    assert set(metrics) >= {f"rewards/code/layers/{k}" for k in ("bwrap", "pid_namespace", "cgroup", "seccomp",
                                                                 "fresh_keyring", "separate_judge", "landlock")}
    assert metrics["rewards/code/layers/separate_judge"] == 1.0 and metrics["rewards/code/layers/rlimits"] == 1.0
    assert metrics["rewards/code/layers/bwrap"] == float(sandbox_host.bwrap_version() is not None)
    if os.uname().machine in ARCHES:
        assert metrics["rewards/code/layers/seccomp"] == 1.0


def test_the_per_sample_cost_stays_small():
    """Not a benchmark (the report has one): a guard against a layer that would make every sample slow."""
    config = SandboxConfig(timeout_s=5.0)
    run_tests(SOLUTION, PASSING, config)
    times = []
    for _ in range(10):
        start = time.perf_counter()
        assert run_tests(SOLUTION, PASSING, config).passed
        times.append(time.perf_counter() - start)
    assert statistics.median(times) < 0.5

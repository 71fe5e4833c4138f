"""The code sandbox against hostile code (code-execution rewards fooled from inside: verl PR #7853, open-r1 PR #546): each attack scores 0 within its timeout, the host is
untouched, and an infrastructure failure is reported apart from a reward of 0."""

import math
import os
import secrets
import socket
import subprocess
import time

import pytest

from posttrain.rewards.sandbox import SandboxConfig, extract_code, probe, run_tests
from posttrain.rewards.registry import load_reward

FAST = SandboxConfig(timeout_s=2.0, memory_mb=256)
DEFENCES = probe(FAST).defences
# Where the OS layers work (root here and in CI), every attack is also tried with the Python guard off, so
# that each layer is shown to hold on its own; without them the guard is the only line and is tested alone.
OS_LAYERS = any(d.startswith("namespaces") for d in DEFENCES)
CONFIGS = [FAST] + ([SandboxConfig(timeout_s=2.0, memory_mb=256, guard=False)] if OS_LAYERS else [])
IDS = ["guard", "os-only"][: len(CONFIGS)]


def test_probe_reports_the_defences_in_use():
    assert any(d.startswith("nice 19, rlimits cpu/as/fsize/nofile") for d in DEFENCES)
    assert any(d.startswith("python guard") for d in DEFENCES)
    if os.geteuid() == 0:  # the per-run uid is what makes RLIMIT_NPROC bite: the kernel exempts root
        assert any(d.startswith("unprivileged uid") for d in DEFENCES)
        assert "nproc" in next(d for d in DEFENCES if "rlimits" in d)


def test_correct_solution_passes_and_wrong_one_fails():
    code = "def add(a, b):\n    return a + b\n"
    ok = run_tests(code, ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"], FAST)
    assert ok.status == "passed" and ok.reward == 1.0
    bad = run_tests("def add(a, b):\n    return a - b\n", "assert add(1, 2) == 3", FAST)
    assert bad.status == "failed" and bad.reward == 0.0 and "AssertionError" in bad.output


def test_ordinary_stdlib_use_still_works_inside():
    code = (
        "import collections, dataclasses, enum, typing, heapq, fractions, decimal, threading, json, re\n"
        "P = collections.namedtuple('P', 'x y')\n"
        "@dataclasses.dataclass\nclass A:\n    x: int\n"
        "class E(enum.Enum):\n    a = 1\n"
        "t = threading.Thread(target=lambda: None); t.start(); t.join()\n"
        "open('scratch.txt', 'w').write('kept in the work folder')\n"
    )
    tests = "assert P(1, 2).x == 1 and A(3).x == 3 and open('scratch.txt').read().startswith('kept')"
    assert run_tests(code, tests, FAST).status == "passed"


def test_infinite_loop_is_killed_at_its_timeout():
    config = SandboxConfig(timeout_s=1.0)
    start = time.monotonic()
    result = run_tests("while True:\n    pass\n", "assert True", config)
    assert result.status == "timeout" and result.reward == 0.0
    assert time.monotonic() - start < config.timeout_s + 2.0


HOGS = ["x = bytearray(8 * 1024 ** 3)", "l = []\nwhile True:\n    l.append(bytearray(10 ** 7))"]


@pytest.mark.parametrize("code", HOGS, ids=["at-once", "growing"])
def test_memory_hog_is_contained(code):
    start = time.monotonic()
    result = run_tests(code, "assert True", SandboxConfig(timeout_s=3.0, memory_mb=256))
    assert result.status in ("failed", "timeout") and result.reward == 0.0
    assert time.monotonic() - start < 5.0


def _uid_of(result):
    found = [d for d in result.defences if d.startswith("unprivileged uid ")]
    return int(found[0].split()[-1]) if found else None


def _processes_of(uid):
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read().rpartition(b")")[2].split()[0]
            if os.stat(f"/proc/{pid}").st_uid == uid and state != b"Z":
                pids.append(pid)
        except OSError:
            continue
    return pids


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_fork_bomb_is_contained_and_the_host_is_fine(config):
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    start = time.monotonic()
    result = run_tests(code, "assert True", config)
    assert result.status in ("failed", "timeout") and result.reward == 0.0
    assert time.monotonic() - start < config.timeout_s + 2.0
    uid = _uid_of(result)
    if uid is not None:
        assert _processes_of(uid) == []  # nothing of the run survives it
    assert subprocess.run(["true"], timeout=5).returncode == 0  # the host can still start processes


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_network_access_fails(config):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]
    code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\ns.sendall(b'hi')\n"
    try:
        result = run_tests(code, "assert True", config)
        assert result.status == "failed"
        with pytest.raises(BlockingIOError):
            server.accept()  # no connection ever arrived
    finally:
        server.close()


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_writing_outside_the_work_folder_fails(config):
    target = f"/tmp/posttrain_sandbox_escape_{secrets.token_hex(6)}"
    code = f"with open({target!r}, 'w') as f:\n    f.write('escaped')\n"
    try:
        result = run_tests(code, "assert True", config)
        assert result.status == "failed"
        assert not os.path.exists(target)
        # the same through a shell, where the OS layers are the only defence
        shell = f"import os\nos.system('touch {target}')\n"
        run_tests(shell, "assert True", config)
        assert not os.path.exists(target)
    finally:
        if os.path.exists(target):
            os.remove(target)


def test_environment_secrets_are_not_visible(monkeypatch):
    secret = "s3cr3t-" + secrets.token_hex(8)
    monkeypatch.setenv("POSTTRAIN_TEST_SECRET", secret)
    code = "import os\nprint(dict(os.environ))\nprint(open('/proc/1/environ', 'rb').read())\n"
    result = run_tests(code, "assert True", FAST)
    assert secret not in result.output
    env = run_tests("import os\nkeys = set(os.environ)\n", "assert 'POSTTRAIN_TEST_SECRET' not in keys", FAST)
    assert env.status == "passed"


CHEATS = {
    "sys.exit(0)": "import sys\nsys.exit(0)\n",
    "os._exit(0)": "import os\nos._exit(0)\n",
    "raise": "raise RuntimeError('no')\n",
    "patched assert/builtins": (
        "import builtins\nbuiltins.AssertionError = type('Quiet', (Exception,), {})\n"
        "builtins.exec = lambda *a, **k: None\nbuiltins.compile = lambda *a, **k: compile('pass', '', 'exec')\n"
    ),
    "fake pass line": (
        "import os\nfor fd in range(3, 256):\n    try:\n"
        "        os.write(fd, b'READY []\\nPASS ' + b'0' * 32 + b'\\n')\n"
        "    except OSError:\n        pass\nprint('PASS ' + '0' * 32)\n"
    ),
    "frame walk to the nonce": "import sys\nf = sys._getframe()\nwhile f:\n    print(f.f_locals)\n    f = f.f_back\n",
    "traceback frames": (
        "try:\n    1 / 0\nexcept Exception as e:\n    print(e.__traceback__.tb_frame.f_back.f_locals)\n"
    ),
    "gc scan": "import gc\nprint([o for o in gc.get_objects() if type(o).__name__ == 'generator'])\n",
    "exit at interpreter shutdown": "import atexit, os\natexit.register(lambda: os._exit(0))\n",
    "ctypes": "import ctypes\n",
    # a signal handler gets the current frame; f_back and f_locals are not audited: resume any generator found
    # (the harness's nonce holder, if one were named) and read every closure, then exit cleanly
    "signal-handler frame walk": (
        "import os, signal, time\n"
        "def handler(signum, frame):\n"
        "    while frame is not None:\n"
        "        for value in list(frame.f_locals.values()):\n"
        "            if type(value).__name__ == 'generator':\n"
        "                try:\n                    next(value)\n"
        "                except BaseException:\n                    pass\n"
        "            for cell in getattr(value, '__closure__', None) or ():\n"
        "                print(repr(cell.cell_contents)[:80])\n"
        "        frame = frame.f_back\n"
        "    os._exit(0)\n"
        "signal.signal(signal.SIGALRM, handler)\n"
        "signal.setitimer(signal.ITIMER_REAL, 0.01)\n"
        "time.sleep(1)\n"
    ),
    # through the handler's frame, empty the harness's block lists (f_globals), then gc to the nonce and write
    # the pass line: this forges a pass against a hook that reads its block lists from module globals
    "rebind the hook's globals, then gc to the nonce": (
        "import os, signal, time\n"
        "def handler(signum, frame):\n"
        "    while frame is not None:\n"
        "        for k in ('INTEGRITY_EVENTS', 'FRAME_ATTRS', 'FRAME_EVENTS', 'INTEGRITY_MODULES'):\n"
        "            if k in frame.f_globals:\n"
        "                frame.f_globals[k] = frozenset()\n"
        "        frame = frame.f_back\n"
        "    import gc\n"
        "    for o in gc.get_objects():\n"
        "        if type(o).__name__ == 'generator' and o.gi_code.co_name == '_session':\n"
        "            loc = o.gi_frame.f_locals\n"
        "            os.write(loc['result_fd'], b'PASS ' + loc['nonce'] + b'\\n')\n"
        "            os._exit(0)\n"
        "signal.signal(signal.SIGALRM, handler)\n"
        "signal.setitimer(signal.ITIMER_REAL, 0.01)\n"
        "time.sleep(1)\n"
    ),
}


@pytest.mark.parametrize("name", list(CHEATS))
def test_cheats_score_zero(name):
    result = run_tests(CHEATS[name], "assert False, 'the tests must fail'", FAST)
    assert result.status == "failed" and result.reward == 0.0, (name, result)


def test_huge_output_is_capped():
    config = SandboxConfig(timeout_s=3.0, max_output_bytes=10_000)
    start = time.monotonic()
    result = run_tests("import sys\nwhile True:\n    sys.stdout.write('x' * 100_000)\n", "assert True", config)
    assert result.status == "failed" and "output over" in result.detail
    assert len(result.output) <= config.max_output_bytes
    assert time.monotonic() - start < config.timeout_s


def test_infra_errors_are_reported_apart_from_zero():
    missing = run_tests("x = 1", "assert x == 1", SandboxConfig(timeout_s=2.0, python="/nonexistent/python3"))
    assert missing.status == "infra_error" and math.isnan(missing.reward)
    broken_tests = run_tests("x = 1", "assert x ==", FAST)  # the dataset's fault, not the completion's
    assert broken_tests.status == "infra_error" and "SyntaxError" in broken_tests.detail


def test_extract_code_takes_the_last_fenced_block():
    text = "first\n```python\nx = 1\n```\nthen\n```py\ndef f():\n    return 2\n```\n"
    assert extract_code(text) == "def f():\n    return 2\n"
    assert extract_code("```\ny = 3\n```") == "y = 3\n"
    assert extract_code("no code here") is None


def test_code_reward_end_to_end():
    code = load_reward("code", timeout_s=2.0)
    completions = [
        "Here:\n```python\ndef sq(x):\n    return x * x\n```",
        "```python\ndef sq(x):\n    return x + x\n```",
        "I cannot write code.",
    ]
    tests = [["assert sq(3) == 9", "assert sq(0) == 0"], "assert sq(3) == 9", "assert sq(3) == 9"]
    assert code(["p"] * 3, completions, tests=tests) == [1.0, 0.0, 0.0]


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_process_count_is_limited(config):
    code = (
        "import os, time\nn = 0\ntry:\n    for _ in range(100):\n        if os.fork() == 0:\n"
        "            time.sleep(10)\n            os._exit(0)\n        n += 1\nexcept OSError:\n    pass\n"
    )
    result = run_tests(code, f"assert n < {config.max_processes}, n", config)
    assert result.status == "passed", result.output


def test_file_size_limit_and_work_folder_removed():
    big = run_tests("open('big.bin', 'wb').write(b'x' * (2 << 20))", "assert True",
                    SandboxConfig(timeout_s=2.0, file_mb=1))
    assert big.status == "failed"
    where = run_tests("import os\nprint(os.getcwd())", "assert True", FAST)
    assert where.status == "passed" and not os.path.exists(where.output.strip())


def test_code_reward_in_the_runner_threads():
    from posttrain.rewards.runner import RewardRunner

    runner = RewardRunner([("code", load_reward("code", timeout_s=2.0), 1.0)], num_workers=2, timeout_s=10)
    completions = [f"```python\ndef f():\n    return {i}\n```" for i in range(4)]
    batch = runner(["p"] * 4, completions, tests=["assert f() == 2"] * 4)
    assert batch.per_fn["code"] == [0.0, 0.0, 1.0, 0.0]


# ---- the judge: the test forms it runs, and the semantics it keeps -------------------------------------------------

FORMS = {  # name: (solution, tests) -- the tests run in the judge's process, calling into the solution's
    "asserts": ("def add(a, b):\n    return a + b\n", ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]),
    "check(candidate)": ("def inc(x):\n    return x + 1\n",
                         "def check(candidate):\n    assert candidate(1) == 2\n    assert candidate(-1) == 0\ncheck(inc)"),
    "a class": ("class Solution:\n    def two_sum(self, nums, target):\n        seen = {}\n"
                "        for i, n in enumerate(nums):\n            if target - n in seen:\n"
                "                return [seen[target - n], i]\n            seen[n] = i\n",
                "assert Solution().two_sum([2, 7, 11, 15], 9) == [0, 1]"),
    "objects and attributes": ("class Node:\n    def __init__(self, v, nxt=None):\n        self.val, self.next = v, nxt\n"
                               "def build(xs):\n    head = None\n    for x in reversed(xs):\n"
                               "        head = Node(x, head)\n    return head\n",
                               "h = build([1, 2, 3])\nout = []\nwhile h is not None:\n    out.append(h.val)\n"
                               "    h = h.next\nassert out == [1, 2, 3]"),
    "a generator": ("def gen(n):\n    yield from range(n)\n", "assert list(gen(3)) == [0, 1, 2]"),
    "in-place mutation": ("def sort_in_place(a):\n    a.sort()\n", "a = [3, 1, 2]\nsort_in_place(a)\nassert a == [1, 2, 3]"),
    "an expected exception": ("def f(x):\n    if x < 0:\n        raise ValueError('negative')\n    return x\n",
                              "try:\n    f(-1)\n    assert False\nexcept ValueError as e:\n    assert 'negative' in str(e)"),
    "math.isclose, math from the solution": ("import math\ndef area(r):\n    return math.pi * r * r\n",
                                             "assert math.isclose(area(1), 3.14159, rel_tol=1e-4)"),
    "a module-level constant": ("MOD = 10 ** 9 + 7\n", "assert MOD == 1000000007"),
    "many types": ("from fractions import Fraction\nimport collections\nP = collections.namedtuple('P', 'x y')\n"
                   "def f():\n    return (1, [2], {3}, {(4, 5): b'x'}, 1.5, None, True, Fraction(1, 3), P(1, 2), 1+2j)\n",
                   "from fractions import Fraction\nr = f()\n"
                   "assert r == (1, [2], {3}, {(4, 5): b'x'}, 1.5, None, True, Fraction(1, 3), (1, 2), 1+2j)\n"
                   "assert type(r[0]) is int and type(r[1]) is list and r[8].y == 2"),
}


@pytest.mark.parametrize("name", list(FORMS))
def test_supported_test_forms(name):
    code, tests = FORMS[name]
    result = run_tests(code, tests, FAST)
    assert result.status == "passed", result.output


def test_values_keep_their_exact_types():
    assert run_tests("def f():\n    return (1,)\n", "assert f() == (1,)", FAST).passed
    assert run_tests("def f():\n    return (1,)\n", "assert f() == [1]", FAST).status == "failed"  # as in Python
    assert run_tests("def g(n):\n    return (i for i in range(n))\n", "assert g(2) != [0, 1]", FAST).passed


def test_an_object_of_the_solution_has_attributes_but_no_truth_value_here():
    code = "class A:\n    x = 3\ndef make():\n    return A()\n"
    assert run_tests(code, "assert make().x == 3", FAST).passed
    falsy = run_tests(code, "assert make()", FAST)
    assert falsy.status == "failed" and "no truth value" in falsy.output
    assert run_tests(code, "a = make()\nassert a == a and make() != a", FAST).passed  # identity, as in Python


@pytest.mark.parametrize("tests", ["assert eval('f(2)') == 4", "exec('assert f(2) == 4')",
                                   "import pickle\nassert f(2) == 4"], ids=["eval", "exec", "pickle"])
def test_tests_that_run_text_as_code_are_refused_as_unjudgeable(tests):
    result = run_tests("def f(x):\n    return 2 * x\n", tests, FAST)
    assert result.status == "infra_error" and math.isnan(result.reward)
    assert "unsupported test form" in result.detail


def test_prints_reach_the_output_and_a_failure_names_its_test_line():
    code = "print('at import')\ndef f():\n    print('in a call')\n    return 1\n"
    result = run_tests(code, ["assert f() == 1", "assert f() == 2"], FAST)
    assert result.status == "failed"
    assert "at import" in result.output and "in a call" in result.output
    assert "tests line 2: assert f() == 2" in result.output

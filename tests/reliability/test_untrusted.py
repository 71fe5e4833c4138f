"""Untrusted code and files (issue 7, point 5).

The code-execution reward's network, environment, memory, process and wall-clock defences are tested in
tests/unit/test_rewards_sandbox.py; this adds what it leaves out: reading files outside the work folder, the CPU
limit on its own, and a daemonised grandchild that tries to outlive the run. Then checkpoints and model folders
that carry a pickle payload, and `module:function` rewards that are imported only when a config names them.
"""

import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from posttrain.rewards.sandbox import SandboxConfig, probe, run_tests
from tiny import addition_sft_rows, run_config, tiny_model_dir, write_jsonl

FAST = SandboxConfig(timeout_s=2.0, memory_mb=256)
DEFENCES = probe(FAST).defences
OTHER_UID = any(d.startswith("unprivileged uid") for d in DEFENCES)
LANDLOCK = any(d.startswith("landlock") for d in DEFENCES)
OS_LAYERS = any(d.startswith("namespaces") for d in DEFENCES)
# each file attack with the Python guard on, and (where the OS layers work) off: the OS must hold on its own
CONFIGS = [FAST] + ([SandboxConfig(timeout_s=2.0, memory_mb=256, guard=False)] if OS_LAYERS else [])
IDS = ["guard", "os-only"][: len(CONFIGS)]


def _refused(output: str) -> bool:
    """Denied (Landlock, another uid), or absent (bubblewrap's private root holds only what the run needs)."""
    return "Permission denied" in output or "No such file or directory" in output


def _read(path: str, config: SandboxConfig):
    return run_tests(f"print(open({path!r}).read())\n", "assert True", config)


@pytest.fixture
def private_file(tmp_path):
    """A secret in a 0600 file inside a 0700 folder, as ~/.ssh or ~/.netrc are."""
    folder = tmp_path / "private"
    folder.mkdir(mode=0o700)
    path = folder / "key"
    secret = "secret-" + secrets.token_hex(8)
    path.write_text(secret)
    path.chmod(0o600)
    return str(path), secret


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_private_files_and_home_are_unreadable(private_file, config):
    if not OTHER_UID and not LANDLOCK:
        pytest.xfail("neither another uid (not root) nor Landlock (old kernel): the user's own files stay readable")
    path, secret = private_file
    result = _read(path, config)
    assert result.status == "failed" and secret not in result.output and _refused(result.output)
    home = run_tests(f"import os\nprint(os.listdir({str(Path.home())!r}))\n", "assert True", config)
    assert home.status == "failed" and _refused(home.output)


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_world_readable_files_outside_the_work_folder_are_unreadable(config):
    """Training data, checkpoints, the source tree: readable by anyone, yet not by the code under test."""
    if not LANDLOCK:
        pytest.xfail("this kernel has no Landlock: the sandbox sees the host filesystem read-only")
    folder = tempfile.mkdtemp(prefix="posttrain_public_")
    try:
        os.chmod(folder, 0o755)
        path = os.path.join(folder, "train.jsonl")
        secret = "data-" + secrets.token_hex(8)
        Path(path).write_text(secret)
        os.chmod(path, 0o644)
        result = _read(path, config)
        assert result.status == "failed" and secret not in result.output and _refused(result.output)
        listing = run_tests(f"import os\nprint(os.listdir({os.getcwd()!r}))\n", "assert True", config)
        assert listing.status == "failed" and _refused(listing.output)
    finally:
        shutil.rmtree(folder)


def test_cpu_limit_stops_a_busy_loop_before_the_wall_clock_timeout():
    config = SandboxConfig(timeout_s=10.0, cpu_s=1)
    start = time.monotonic()
    result = run_tests("while True:\n    pass\n", "assert True", config)
    assert result.status == "timeout" and result.detail == "CPU limit" and result.reward == 0.0
    assert time.monotonic() - start < 6.0  # 1 s of CPU (nice 19 on a shared machine), far from the 10 s wall limit


def _alive_under(uid: int) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read().rpartition(b")")[2].split()[0]
            if os.stat(f"/proc/{pid}").st_uid == uid and state != b"Z":
                found.append(pid)
        except OSError:
            continue
    return found


def test_a_daemonised_grandchild_does_not_outlive_the_run():
    """Double fork + setsid leaves the process group that the timeout kills; the per-run uid sweep still gets it."""
    config = CONFIGS[-1]  # the guard refuses fork outright; without it the OS layers must clean up
    code = ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n        time.sleep(60)\n"
            "    os._exit(0)\ntime.sleep(60)\n")
    start = time.monotonic()
    result = run_tests(code, "assert True", SandboxConfig(timeout_s=1.5, memory_mb=256, guard=config.guard))
    assert result.status in ("timeout", "failed") and result.reward == 0.0
    assert time.monotonic() - start < 1.5 + 2.0
    uid = next((int(d.split()[-1]) for d in result.defences if d.startswith("unprivileged uid ")), None)
    if uid is not None:
        assert _alive_under(uid) == []


# ---- files that could carry code -----------------------------------------------------------------------------------

class Payload:
    """Unpickling this creates `marker`: what a malicious checkpoint would do with os.system instead."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(path: Path, marker: Path) -> None:
    torch.save({"optimizer": Payload(str(marker)), "scheduler": {}, "rng": {}}, path)


def test_resume_refuses_a_checkpoint_whose_optimizer_file_is_a_pickle_payload(tmp_path):
    from posttrain.train.registry import run

    model = tiny_model_dir(tmp_path / "model")
    data = write_jsonl(tmp_path / "sft.jsonl", addition_sft_rows(16))
    args = ["train.max_steps=2", "train.batch_size=4", "data.eval_fraction=0", "train.num_threads=1"]
    run(run_config("sft", tmp_path / "run", model, data, *args))
    optim = tmp_path / "run" / "checkpoints" / "step-2" / "optim.pt"
    marker = tmp_path / "pwned"
    _plant(optim, marker)
    # the payload is live: a plain torch.load runs it
    torch.load(optim, weights_only=False)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(RuntimeError, match=r"optim.pt: refused to load, it is not a plain tensor file"):
        run(run_config("sft", tmp_path / "run", model, data, *args, "train.max_steps=4", "train.resume=true"))
    assert not marker.exists()


def test_a_model_folder_with_a_pickle_payload_is_refused(tmp_path):
    """A downloaded model folder whose weights are a .bin pickle: loading must not run it."""
    from posttrain.config import ModelConfig
    from posttrain.models.loading import load_causal_lm

    model = Path(tiny_model_dir(tmp_path / "model"))
    for f in model.glob("*.safetensors"):
        f.unlink()
    marker = tmp_path / "pwned"
    torch.save({"model.embed_tokens.weight": Payload(str(marker))}, model / "pytorch_model.bin")
    import pickle

    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_causal_lm(ModelConfig(name_or_path=str(model), autocast="none"), str(model))
    assert not marker.exists()


# ---- reward modules ------------------------------------------------------------------------------------------------

def test_a_module_reward_is_imported_only_when_a_config_names_it(tmp_path, monkeypatch):
    """Listing rewards, loading built-ins, parsing configs and building the CLI or a reward runner import no user
    module from the path; naming it as `module:function` does (so the check could fail)."""
    from posttrain.cli import build_parser
    from posttrain.config import load_config
    from posttrain.evaluate import load_reward_fns
    from posttrain.rewards.registry import REWARDS, _load_builtins, load_reward
    from posttrain.train.online_rewards import build_reward_runner

    module = f"sneaky_reward_{secrets.token_hex(4)}"
    marker = tmp_path / "imported"
    (tmp_path / f"{module}.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('side effect')\n"
        "def score(prompts, completions, **_):\n    return [1.0] * len(completions)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    build_parser()
    _load_builtins()
    assert {"numeric", "code"} <= set(REWARDS)
    load_reward("numeric"), load_reward("code", timeout_s=1.0), load_reward_fns(["numeric", "math"])
    import posttrain.train.grpo  # noqa: F401  (registers the grpo config)

    cfg = load_config("grpo", None, ["algo.reward.functions=[numeric,format]"])
    build_reward_runner(cfg.algo.reward)
    assert module not in sys.modules and not marker.exists()
    named = load_config("grpo", None, [f"algo.reward.functions=[{module}:score]"])
    assert module not in sys.modules  # a config is data: parsing it imports nothing
    runner = build_reward_runner(named.algo.reward)
    assert module in sys.modules and marker.exists()
    assert runner(["p"], ["c"]).per_fn["score"] == [1.0]
    monkeypatch.delitem(sys.modules, module)

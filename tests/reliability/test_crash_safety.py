"""Crash safety (issue 7, point 2): SIGKILL during training and during a checkpoint write, a failed write (full
disk), Ctrl-C in GRPO and a pipeline killed mid-stage. Each keeps its newest complete checkpoint, and resuming logs
the metrics an uninterrupted run logs."""

import errno
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from posttrain.metrics import read_metrics
from posttrain.train import checkpoint as ckpt
from posttrain.train.registry import run
from tiny import addition_sft_rows, prompt_rows, run_config, tiny_model_dir, write_jsonl

HERE = Path(__file__).resolve().parent
WORKER = HERE / "crash_worker.py"
SFT_ARGS = ["train.max_steps=8", "train.save_every=2", "train.batch_size=4", "train.lr=2e-3", "train.num_threads=1",
            "data.eval_fraction=0"]
GRPO_ARGS = ["algo.reward.functions=[tiny:vowel_reward]", "algo.sampling.max_new_tokens=6", "algo.sampling.prompts_per_step=4", "algo.sampling.num_generations=4",
             "train.batch_size=16", "train.lr=1e-2", "train.max_steps=6", "train.save_every=2", "train.num_threads=1",
             "data.eval_fraction=0"]
CLI_BASE = ["model.autocast=none", "train.tensorboard=false", "train.progress=false"]
GRPO_KEYS = ("loss", "grad_norm", "lr", "reward", "rewards/total/mean", "completions/mean_length", "clip_ratio")


class Child:
    """A crash_worker process; a watcher thread sends it `sig` the moment `trigger` exists."""

    def __init__(self, log_dir: Path, args: list[str], trigger: Path | None = None, sig: int | None = None):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir, self.trigger, self.sig = log_dir, trigger, sig
        with open(log_dir / "child.out", "w") as out, open(log_dir / "child.err", "w") as err:
            self.proc = subprocess.Popen([sys.executable, str(WORKER), *args], env=child_env(), stdout=out, stderr=err)
        self.signalled = False
        self.watcher = threading.Thread(target=self._watch, daemon=True)
        if trigger is not None:
            self.watcher.start()

    def _watch(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.trigger.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                return
            time.sleep(0.02)
        self.proc.send_signal(self.sig)
        self.signalled = True

    def wait(self, timeout: float = 300.0) -> int:
        code = self.proc.wait(timeout)
        if self.trigger is not None:
            self.watcher.join()
            assert self.signalled, f"{self.trigger} never appeared:\n{self.err()[-3000:]}"
        return code

    def err(self) -> str:
        return (self.log_dir / "child.err").read_text()


def child_env() -> dict:
    path = os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny model and data; the child processes of the tests below, started together so that their (slow)
    interpreter starts overlap; and the uninterrupted runs every resumed run is compared with."""
    root = tmp_path_factory.mktemp("crash")
    s = {"root": root, "model": tiny_model_dir(root / "model"), "data": write_jsonl(root / "sft.jsonl", addition_sft_rows(48)),
         "prompts": write_jsonl(root / "prompts.jsonl", prompt_rows(24))}
    killed, in_save, grpo = root / "killed", root / "killed_in_save", root / "grpo_int"
    s["children"] = {
        # SIGKILL from outside once step 4 is checkpointed; the 0.4 s per step keeps the run from ending first
        "killed": Child(killed, ["--step-delay", "0.4", *sft_cli(s, killed)], killed / "checkpoints/step-4/COMPLETE",
                        signal.SIGKILL),
        # SIGKILL from inside, between two files of the second checkpoint's temporary folder
        "in_save": Child(in_save, ["--kill-in-save", "2", *sft_cli(s, in_save)]),
        # Ctrl-C (SIGINT) once step 2 is checkpointed
        "grpo": Child(grpo, ["--step-delay", "0.4", "grpo", "--model", s["model"], "--data", s["prompts"], "--output-dir",
                             str(grpo), *CLI_BASE, *GRPO_ARGS], grpo / "checkpoints/step-2/COMPLETE", signal.SIGINT),
    }
    run(run_config("sft", root / "reference", s["model"], s["data"], *SFT_ARGS))
    run(run_config("grpo", root / "grpo_ref", s["model"], s["prompts"], *GRPO_ARGS))
    s["reference"] = root / "reference"
    yield s
    for child in s["children"].values():
        if child.proc.poll() is None:
            child.proc.kill()


def sft_cli(setup, out: Path, *extra: str) -> list[str]:
    return ["sft", "--model", setup["model"], "--data", setup["data"], "--output-dir", str(out), *CLI_BASE, *SFT_ARGS, *extra]


def train_rows(run_dir: Path, keys) -> list[dict]:
    return [{k: r.get(k) for k in ("step", *keys)} for r in read_metrics(run_dir) if "loss" in r]


def assert_same_metrics(reference: Path, resumed: Path, keys=("loss", "grad_norm", "lr", "padding_fraction")) -> None:
    a, b = train_rows(reference, keys), train_rows(resumed, keys)
    assert [r["step"] for r in b] == [r["step"] for r in a] == list(range(1, len(a) + 1))
    for x, y in zip(a, b):
        assert x == pytest.approx(y, rel=1e-6, abs=1e-9), (x, y)


def checkpoint_names(run_dir: Path) -> list[str]:
    return [p.name for p in ckpt.list_checkpoints(run_dir / "checkpoints")]


def temporaries(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob(".tmp-*"))


def assert_loadable(path: Path, step: int) -> None:
    from safetensors.torch import load_file

    assert load_file(str(path / "policy.safetensors"))
    assert set(torch.load(path / "optim.pt", weights_only=True)) == {"optimizer", "scheduler", "rng"}
    assert json.loads((path / "trainer_state.json").read_text())["step"] == step


def test_sigkill_during_training_resumes_from_the_newest_complete_checkpoint(setup):
    out, child = setup["root"] / "killed", setup["children"]["killed"]
    assert child.wait() == -signal.SIGKILL
    assert not (out / "final").exists()  # really killed mid-run
    assert checkpoint_names(out) == ["step-2", "step-4"]
    assert_loadable(out / "checkpoints" / "step-4", 4)
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 5, "loss": 0.12')  # what a kill in the middle of a metrics write leaves
    run(run_config("sft", out, setup["model"], setup["data"], *SFT_ARGS, "train.resume=true"))
    assert_same_metrics(setup["reference"], out)


def test_sigkill_inside_a_checkpoint_write_leaves_the_previous_one(setup):
    """Killed between two files of step-4's temporary folder: step-2 is the newest complete checkpoint."""
    out, child = setup["root"] / "killed_in_save", setup["children"]["in_save"]
    assert child.wait() == -signal.SIGKILL, child.err()[-3000:]
    assert checkpoint_names(out) == ["step-2"] and not (out / "checkpoints" / "step-4").exists()
    [half] = temporaries(out)
    assert half.name == f".tmp-step-4-{child.proc.pid}"
    assert (half / "policy.safetensors").exists() and not (half / "optim.pt").exists() and not (half / "COMPLETE").exists()
    run(run_config("sft", out, setup["model"], setup["data"], *SFT_ARGS, "train.resume=true"))
    assert_same_metrics(setup["reference"], out)
    assert temporaries(out) == [] and checkpoint_names(out) == ["step-6", "step-8"]  # the dead writer's folder is gone


def _hashes(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _fail_second_save(monkeypatch, how: str, seen: dict):
    """Make the step-4 checkpoint write fail the way a full disk does; remember step-2's bytes at that moment."""
    import resource

    real_save = ckpt.save_checkpoint

    def save_checkpoint(root, step, *args, **kwargs):
        if step != 4:
            return real_save(root, step, *args, **kwargs)
        seen["before"] = _hashes(root / "step-2")
        if how == "file-size-limit":  # a real short write: the kernel refuses bytes past RLIMIT_FSIZE (EFBIG)
            old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))
            try:
                return real_save(root, step, *args, **kwargs)
            finally:
                resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
                signal.signal(signal.SIGXFSZ, old_handler)
        return real_save(root, step, *args, **kwargs)

    def full_disk(real):
        def wrapped(obj, target, *args, **kwargs):
            if "tmp-step-4" in str(target):
                Path(target).write_bytes(b"\0" * 100)  # a few bytes made it before the disk filled up
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
            return real(obj, target, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(ckpt, "save_checkpoint", save_checkpoint)
    if how == "save_file":
        import safetensors.torch

        monkeypatch.setattr(safetensors.torch, "save_file", full_disk(safetensors.torch.save_file))
    elif how == "torch.save":
        monkeypatch.setattr(torch, "save", full_disk(torch.save))


@pytest.mark.parametrize("how", ["save_file", "torch.save", "file-size-limit"])
def test_failed_checkpoint_write_leaves_the_previous_one_intact(setup, monkeypatch, how):
    out = setup["root"] / f"full_disk_{how}"
    seen = {}
    with monkeypatch.context() as patch:
        _fail_second_save(patch, how, seen)
        with pytest.raises(Exception) as info:
            run(run_config("sft", out, setup["model"], setup["data"], *SFT_ARGS))
    assert any("step-4 was not written; the earlier checkpoints" in note for note in getattr(info.value, "__notes__", []))
    if how != "file-size-limit":
        assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    assert checkpoint_names(out) == ["step-2"] and temporaries(out) == []
    assert not (out / "checkpoints" / "step-4").exists()
    assert _hashes(out / "checkpoints" / "step-2") == seen["before"]
    run(run_config("sft", out, setup["model"], setup["data"], *SFT_ARGS, "train.resume=true"))
    assert_same_metrics(setup["reference"], out)


def test_save_only_model_checkpoints_are_small_and_refuse_to_resume(setup):
    """train.save_only_model: weights and trainer state only (no optimizer), and resuming says why it cannot."""
    out = setup["root"] / "only_model"
    run(run_config("sft", out, setup["model"], setup["data"], *SFT_ARGS, "train.save_only_model=true"))
    assert checkpoint_names(out) == ["step-6", "step-8"]
    for path in ckpt.list_checkpoints(out / "checkpoints"):
        assert not (path / "optim.pt").exists() and (path / "policy.safetensors").exists()
    assert_same_metrics(setup["reference"], out)  # the training itself is unchanged
    with pytest.raises(RuntimeError, match="holds no optimizer state .*save_only_model"):
        run(run_config("sft", out, setup["model"], setup["data"], *SFT_ARGS, "train.resume=true",
                           "train.save_only_model=true"))


def test_ctrl_c_in_grpo_saves_a_checkpoint_and_exits_cleanly(setup):
    """A real SIGINT from outside, once step 2 is checkpointed: exit status 1, one line, no traceback, a complete
    checkpoint at the step it names, and `resume` finishes the run from there."""
    out, child = setup["root"] / "grpo_int", setup["children"]["grpo"]
    assert child.wait() == 1
    err = child.err()
    assert "Traceback" not in err, err
    found = re.search(r"interrupted at step (\d+); checkpoint saved to (\S+)", err)
    assert found, err
    step, path = int(found.group(1)), Path(found.group(2))
    assert 2 <= step < 6 and path == out / "checkpoints" / f"step-{step}" and (path / "COMPLETE").exists()
    assert not (out / "final").exists()
    run(run_config("grpo", out, setup["model"], setup["prompts"], *GRPO_ARGS, "train.resume=true"))
    assert (out / "final" / "config.json").exists() and read_metrics(out)[-1]["step"] == 6


@pytest.mark.parametrize("command", ["sft", "grpo"])
def test_ctrl_c_in_the_middle_of_a_step_resumes_exactly(setup, monkeypatch, command):
    """SIGINT arrives while step 3 is between its rollout/batch and its update (delivered by the process to itself,
    so it lands there every time); after resuming, the metrics are those of the uninterrupted run."""
    from posttrain.train import loop
    from posttrain.train.grpo import GRPO
    from posttrain.train.sft import SFT

    args, data, reference = {"sft": (SFT_ARGS, setup["data"], setup["reference"]),
                             "grpo": (GRPO_ARGS, setup["prompts"], setup["root"] / "grpo_ref")}[command]
    out = setup["root"] / f"mid_step_{command}"
    cfg = run_config(command, out, setup["model"], data, *args)
    from posttrain.train import common

    common.setup_run(cfg)
    algo = {"sft": SFT, "grpo": GRPO}[command](cfg)
    real_update, calls = loop._run_update, []

    def update_then_ctrl_c(*a, **k):
        calls.append(1)
        if len(calls) == 3:  # the update of step 3: its batch has been drawn, its optimizer step not yet taken
            os.kill(os.getpid(), signal.SIGINT)
        return real_update(*a, **k)

    monkeypatch.setattr(loop, "_run_update", update_then_ctrl_c)
    with pytest.raises(SystemExit, match="interrupted"):
        loop.Trainer(algo, cfg.train).fit()
    monkeypatch.setattr(loop, "_run_update", real_update)
    run(run_config(command, out, setup["model"], data, *args, "train.resume=true"))
    assert_same_metrics(reference, out, GRPO_KEYS if command == "grpo" else ("loss", "grad_norm", "lr", "padding_fraction"))


PIPELINE = """
output_dir: {out}
model: {model}
data: {prompts}
eval: {{prompts: 3, max_new_tokens: 3, rewards: ["tiny:vowel_reward"], kl_prompts: 2}}
defaults: {{model.autocast: none, train.progress: false, train.tensorboard: false, train.num_threads: 1,
            data.eval_fraction: 0}}
stages:
  - {{name: sft, command: sft, data: {sft}, overrides: {{train.max_steps: 2, train.batch_size: 4}}}}
  - name: grpo
    command: grpo
    from: sft
    overrides: {{train.max_steps: 6, train.save_every: 2, algo.reward.functions: ["crash_worker:slow_vowel_reward"],
                algo.sampling.max_new_tokens: 4, algo.sampling.prompts_per_step: 2, algo.sampling.num_generations: 4, train.batch_size: 8}}
"""


def test_pipeline_killed_in_its_second_stage_resumes_that_stage(setup, monkeypatch, capsys):
    """The grpo stage's process is SIGKILLed after its step-2 checkpoint (as by the OOM killer); the pipeline stops
    with a one-line message, and a rerun skips the finished sft stage and resumes grpo from its checkpoint."""
    from posttrain import pipeline

    root = setup["root"] / "pipeline"
    root.mkdir()
    out, config = root / "run", root / "pipeline.yaml"
    config.write_text(PIPELINE.format(out=out, model=setup["model"], prompts=setup["prompts"], sft=setup["data"]))
    monkeypatch.setenv("PYTHONPATH", child_env()["PYTHONPATH"])  # stage processes import tiny and crash_worker
    stages = []

    def call(argv, **kwargs):  # the pipeline's own subprocess.call, keeping a handle on the stage process
        stages.append(subprocess.Popen(argv, **kwargs))
        return stages[-1].wait()

    def kill_grpo_after_its_second_step():
        trigger = out / "grpo" / "checkpoints" / "step-2" / "COMPLETE"
        deadline = time.monotonic() + 300
        while not trigger.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        stages[-1].kill()

    monkeypatch.setattr(pipeline.subprocess, "call", call)
    killer = threading.Thread(target=kill_grpo_after_its_second_step, daemon=True)
    killer.start()
    with pytest.raises(SystemExit, match=r"stage 'grpo' failed \(exit -9\).*Re-run the pipeline to resume it"):
        pipeline.run_pipeline(pipeline.load_pipeline(config))
    killer.join()
    assert (out / "sft" / "DONE").exists() and not (out / "grpo" / "DONE").exists()
    before = {"sft_log": (out / "sft" / "stage.log").read_text(), "sft_done": (out / "sft" / "DONE").read_text(),
              "grpo_rows": (out / "grpo" / "metrics.jsonl").read_text().splitlines()[:2]}
    capsys.readouterr()
    pipeline.run_pipeline(pipeline.load_pipeline(config))
    assert "[pipeline] sft: done already, skipped" in capsys.readouterr().out
    assert len(stages) == 3  # sft, the killed grpo, the resumed grpo
    assert (out / "sft" / "stage.log").read_text() == before["sft_log"]
    assert (out / "sft" / "DONE").read_text() == before["sft_done"]
    assert (out / "grpo" / "DONE").exists()
    rows = read_metrics(out / "grpo")
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 7))
    # resumed, not restarted: the rows logged before the kill are kept byte for byte (their timings included)
    assert (out / "grpo" / "metrics.jsonl").read_text().splitlines()[:2] == before["grpo_rows"]
    summary = json.loads((out / "pipeline_summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["base", "sft", "grpo"]

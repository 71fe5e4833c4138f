"""Device resolution (CUDA availability and LOCAL_RANK monkeypatched), refusals, and per-device decisions."""

import pytest
import torch

from posttrain import devices
from posttrain.devices import DeviceError, backend_for, check_launch, resolve


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this machine has `n` visible GPUs."""

    def set_count(n: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    return set_count


def test_auto_is_the_cpu_without_cuda(gpus):
    gpus(0)
    assert resolve("auto") == torch.device("cpu")
    assert resolve("cpu") == torch.device("cpu")


@pytest.mark.parametrize("local_rank, expected", [(0, "cuda:0"), (3, "cuda:3")])
def test_auto_and_cuda_take_the_local_rank(gpus, monkeypatch, local_rank, expected):
    gpus(4)
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    assert resolve("auto") == torch.device(expected)
    assert resolve("cuda") == torch.device(expected)
    assert resolve("cuda:1") == torch.device("cuda:1")  # an explicit index wins


def test_one_visible_gpu_per_rank_is_cuda0(gpus, monkeypatch):
    gpus(1)
    monkeypatch.setenv("LOCAL_RANK", "2")  # the launcher set CUDA_VISIBLE_DEVICES to this rank's GPU
    assert resolve("cuda") == torch.device("cuda:0")


def test_cpu_wins_on_a_gpu_machine(gpus):
    gpus(8)
    assert resolve("cpu") == torch.device("cpu")


def test_cuda_without_a_gpu_is_one_clear_line(gpus):
    gpus(0)
    for spec in ("cuda", "cuda:0"):
        with pytest.raises(DeviceError, match="use train.device=cpu or auto") as err:
            resolve(spec)
        assert "\n" not in str(err.value)


def test_bad_specs_are_refused(gpus):
    gpus(2)
    with pytest.raises(DeviceError, match="GPU 5 asked for, 2 visible"):
        resolve("cuda:5")
    with pytest.raises(DeviceError, match="must be a number"):
        resolve("cuda:x")
    with pytest.raises(DeviceError, match="use auto, cpu, cuda or cuda:N"):
        resolve("tpu")


def test_launch_checks_one_gpu_per_process(gpus):
    gpus(2)
    check_launch("auto", 2)
    with pytest.raises(DeviceError, match="4 processes need one GPU each, 2 visible"):
        check_launch("cuda", 4)
    with pytest.raises(DeviceError, match="names one GPU for 2 processes"):
        check_launch("cuda:1", 2)
    gpus(0)
    check_launch("auto", 4)  # CPU processes: gloo, any number


def test_backend_follows_the_device():
    assert backend_for(torch.device("cuda", 1)) == "nccl"
    assert backend_for(torch.device("cpu")) == "gloo"


def test_prepare_sets_the_rank_gpu_and_tf32(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        devices.prepare(torch.device("cpu"))
        assert chosen == [] and torch.get_float32_matmul_precision() == "highest"  # nothing changes for the CPU
        devices.prepare(torch.device("cuda", 1))
        assert chosen == [torch.device("cuda", 1)] and torch.get_float32_matmul_precision() == "high"  # TF32
    finally:
        torch.set_float32_matmul_precision(before)


def test_bf16_on_cuda_needs_hardware_support(monkeypatch):
    from posttrain.config import ModelConfig
    from posttrain.models.loading import wants_bf16

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a V100
    assert not wants_bf16(ModelConfig(autocast="auto"), "cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert wants_bf16(ModelConfig(autocast="auto"), "cuda")
    assert not wants_bf16(ModelConfig(autocast="none"), "cuda")


def test_to_device_moves_nested_tensors_and_keeps_the_rest():
    batch = {"ids": torch.ones(2, device="cpu"), "keys": [("train.chosen", 3)], "n": 2, "nested": (torch.zeros(1),)}
    moved = devices.to_device(batch, "meta")
    assert moved["ids"].device.type == "meta" and moved["nested"][0].device.type == "meta"
    assert moved["keys"] == [("train.chosen", 3)] and moved["n"] == 2


def test_memory_metrics_say_which_memory():
    from posttrain.metrics import memory_metrics

    out = memory_metrics(torch.device("cpu"))
    assert set(out) == {"peak_mem_gb", "mem/host_peak_rss_gb"}  # no GPU metric where there is no GPU
    assert out["peak_mem_gb"] == out["mem/host_peak_rss_gb"] > 0


def test_cli_refuses_cuda_without_a_gpu_in_one_line(gpus, tmp_path, capsys):
    from posttrain.cli import main

    gpus(0)
    code = main(["sft", "--device", "cuda", "--output-dir", str(tmp_path / "run"), "--max-steps", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "train.device=cuda" in err
    assert "CPU-only" in err or "is_available" in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_an_offloaded_frozen_model_visits_the_device_only_for_its_call():
    from posttrain.models.loading import frozen_on

    model = torch.nn.Linear(2, 2)
    moves = []
    real_to = model.to
    model.to = lambda device, *a, **k: (moves.append(str(device)), real_to("cpu"))[1]  # record, stay on the host
    with frozen_on(model, "meta") as inside:
        assert inside is model and moves == ["meta"]
    assert moves == ["meta", "cpu"]  # back home afterwards
    with frozen_on(model, "cpu"):
        pass
    assert moves == ["meta", "cpu"]  # already there: not moved
    with frozen_on(None, "meta") as nothing:
        assert nothing is None

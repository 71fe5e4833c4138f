"""What needs a CUDA GPU: device resolution, every algorithm's tiny run kept on the GPU (parameters and optimizer
state), a fused SDPA kernel under bf16 autocast, GPU memory metrics, a GPU checkpoint resumed on the CPU.

Marked `gpu`: deselected by the default `-m 'not gpu'` (pyproject addopts) and run by scripts/gpu_check.sh with
`pytest -m gpu tests/gpu`; skipped if run where no GPU is visible.
"""

import math
import sys
from pathlib import Path

import pytest
import torch

from posttrain.metrics import read_metrics
from tiny import addition_sft_rows, sum_pair_rows, prompt_rows, run_config, tiny_llama, tiny_tokenizer, write_jsonl

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from _gpu_workloads import ALGO_CLASSES, frozen_modules, off_device  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GPU = torch.device("cuda", 0)
ON_GPU = ["train.device=cuda", "model.autocast=bf16"]
ONLINE = ["algo.reward.functions=[tiny:vowel_reward]", "algo.sampling.max_new_tokens=6", "algo.sampling.eval_max_new_tokens=6", "train.max_steps=3"]
RUNS = {  # command -> overrides of a few-second run on the tiny Llama
    "sft": ["train.max_steps=12", "train.lr=3e-3", "train.batch_size=8"],
    "dpo": ["train.max_steps=10", "train.lr=1e-2", "train.batch_size=8", "train.schedule=constant"],
    "grpo": [*ONLINE, "algo.sampling.prompts_per_step=4", "algo.sampling.num_generations=4", "train.batch_size=8", "train.lr=1e-3"],
    "ppo": [*ONLINE, "algo.sampling.prompts_per_step=16", "train.batch_size=8", "train.lr=1e-3"],
}
FUSED_SDPA = ("flash", "efficient", "cudnn")


def pair_rows(n: int = 40) -> list[dict]:
    return sum_pair_rows(n, wrong_by=lambda rng: rng.randrange(1, 9))


def data_for(command: str, tmp_path) -> str:
    rows = {"sft": addition_sft_rows, "dpo": pair_rows, "grpo": prompt_rows, "ppo": prompt_rows}[command]()
    return write_jsonl(tmp_path / f"{command}.jsonl", rows)


def train(cfg):
    """Set up, build and fit `cfg.command`'s algorithm; (algo, trainer)."""
    import importlib

    from posttrain.train import common
    from posttrain.train.loop import Trainer

    module, cls = ALGO_CLASSES[cfg.command]
    common.setup_run(cfg)
    algo = getattr(importlib.import_module(module), cls)(cfg)
    trainer = Trainer(algo, cfg.train)
    trainer.fit()
    return algo, trainer


def test_auto_and_cuda_resolve_to_the_first_gpu(monkeypatch):
    from posttrain.devices import resolve

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert resolve("auto") == GPU
    assert resolve("cuda") == GPU
    assert resolve("cuda:0") == GPU
    assert resolve("cpu") == torch.device("cpu")


@pytest.mark.parametrize("command", list(RUNS))
def test_a_tiny_run_keeps_every_parameter_and_optimizer_state_on_the_gpu(tmp_path, tiny_dir, command):
    cfg = run_config(command, tmp_path / "run", tiny_dir, data_for(command, tmp_path), *ON_GPU, *RUNS[command])
    algo, trainer = train(cfg)
    assert off_device(algo.modules(), trainer.optimizer, GPU) == []
    assert off_device(frozen_modules(algo), None, GPU) == []  # reference, reward model
    assert trainer.optimizer.state, "the optimizer never stepped"
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    losses = [r["loss"] for r in rows]
    assert all(math.isfinite(x) for x in losses), losses
    if command in ("sft", "dpo"):  # offline losses on their own training data fall within a few steps
        assert min(losses[len(losses) // 2 :]) < losses[0], losses
    assert rows[-1]["peak_mem_gb"] > 0
    assert rows[-1]["mem/gpu_peak_allocated_gb"] > 0


def test_bf16_autocast_on_cuda_runs_a_fused_sdpa_kernel_not_the_math_backend(tmp_path):
    """The math-backend switch of models/loading.bf16_autocast is for CPUs only: on a GPU SDPA keeps its fused
    kernels (flash, memory-efficient or cuDNN), in the real SFT loss path, forward and backward."""
    from torch.profiler import ProfilerActivity, profile

    from posttrain.devices import to_device
    from posttrain.train import common
    from posttrain.train.sft import SFT

    model_dir = tmp_path / "model"
    tiny_llama(hidden=64).save_pretrained(model_dir)  # head_dim 16: every fused kernel supports it
    tiny_tokenizer().save_pretrained(model_dir)
    data = write_jsonl(tmp_path / "sft.jsonl", addition_sft_rows(32))
    cfg = run_config("sft", tmp_path / "run", str(model_dir), data, *ON_GPU, "train.batch_size=8")
    common.setup_run(cfg)
    algo = SFT(cfg)
    update = algo.next_iteration(1).updates[0]
    with profile(activities=[ProfilerActivity.CPU]) as prof:  # aten op names are recorded on the host side
        algo.loss(to_device(update[0], GPU), algo.totals(update)).loss.backward()
        torch.cuda.synchronize()
    ops = {e.key for e in prof.key_averages() if "attention" in e.key}
    assert any(kind in op for op in ops for kind in FUSED_SDPA), ops
    assert not any("math" in op for op in ops), ops


def test_a_gpu_checkpoint_resumes_on_the_cpu_and_final_loads_with_plain_transformers(tmp_path, tiny_dir):
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "sft.jsonl", addition_sft_rows(64))
    shared = ["model.autocast=bf16", "train.batch_size=8", "train.lr=3e-3", "train.save_every=1"]
    train(run_config("sft", tmp_path / "run", tiny_dir, data, "train.device=cuda", *shared, "train.max_steps=2"))
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")  # on the CPU, no posttrain involved
    assert next(final.parameters()).device.type == "cpu"
    with torch.no_grad():
        assert torch.isfinite(final(torch.tensor([[5, 6, 7]])).logits).all()
    algo, trainer = train(run_config("sft", tmp_path / "run", tiny_dir, data, "train.device=cpu", *shared,
                                     "train.max_steps=3", "train.resume=true"))
    assert trainer.step == 3
    cpu = torch.device("cpu")
    assert off_device(algo.modules(), trainer.optimizer, cpu) == []
    assert all(p.device == cpu for state in trainer.optimizer.state.values() for p in state.values() if torch.is_tensor(p))
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]  # steps 1-2 from the GPU run, 3 resumed on the CPU
    assert math.isfinite(rows[-1]["loss"]) and "mem/gpu_peak_allocated_gb" not in rows[-1]


def test_fast_decode_on_cuda_gives_the_cpu_greedy_tokens_and_padding_free_matches_padded():
    """The preallocated cache, the inverse-CDF draw and the packed block mask on a GPU: fp32 greedy tokens equal
    the CPU's; sampling returns tokens inside the vocabulary; packed SFT loss equals padded."""
    from posttrain.data.chat import Encoded
    from posttrain.data.padding_free import pack_documents
    from posttrain.devices import to_device
    from posttrain.ops import IGNORE_INDEX
    from posttrain.rollout.base import SamplingParams
    from posttrain.rollout.hf import HFGenerator
    from posttrain.train.common import padded_sft_batch
    from posttrain.train.sft import sft_loss

    model = tiny_llama().eval()
    prompts = [[1, 5, 9, 13, 2], [3, 4], [11, 12, 13]]
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0)
    cpu = HFGenerator(model, 0).generate(prompts, greedy, num_samples=2, seed=0)
    gpu = HFGenerator(model.cuda(), 0).generate(prompts, greedy, num_samples=2, seed=0)
    assert gpu.completion_ids.device.type == "cuda"
    assert gpu.completion_ids.cpu().tolist() == cpu.completion_ids.tolist()
    sampled = HFGenerator(model, 0).generate(prompts, SamplingParams(max_new_tokens=6, top_p=0.9), num_samples=4, seed=1)
    assert int(sampled.completion_ids.max()) < model.config.vocab_size
    seqs = [Encoded(p + [7, 8], [IGNORE_INDEX] * len(p) + [7, 8]) for p in prompts]
    totals = {"num_tokens": 6, "num_seqs": 3}
    padded = sft_loss(model, to_device(padded_sft_batch(seqs, 0), "cuda"), totals).loss
    packed = sft_loss(model, to_device(pack_documents(seqs, 0), "cuda"), totals).loss
    assert float(packed) == pytest.approx(float(padded), abs=1e-5)

"""Multi-turn rollouts with each trajectory's KV cache kept between turns, against re-encoding the whole
conversation at every turn (what the HF engine did before `rollout/turn_session.py`).

    python bench/multiturn_kv.py --model runs/exp/tools_grpo/final          # a model that calls the calculator
    python bench/multiturn_kv.py --model smollm2 --prompts 32 --repeats 3

Greedy decoding through the `tools` environment on `task:arithmetic_tools` test prompts, one sample per prompt,
the two modes interleaved `--repeats` times (this box's speed drifts); prints each mode's median wall time, the
tokens prefilled, the share of context read from the cache, and whether the two modes sampled the same tokens
(under bf16 autocast a different batch layout can round a near-tie the other way: the count of differing
trajectories is printed, not hidden).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from posttrain.data.tasks import make_task_records  # noqa: E402
from posttrain.envs.trajectory import run_trajectories  # noqa: E402
from posttrain.models.loading import bf16_is_fast, load_tokenizer, resolve_model_path  # noqa: E402
from posttrain.online_config import EnvConfig  # noqa: E402
from posttrain.rollout.base import SamplingParams  # noqa: E402
from posttrain.rollout.hf import HFGenerator  # noqa: E402


class CountingModel(torch.nn.Module):
    """The model, counting the real tokens of every multi-token forward (the prefills)."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config, self.prefilled = model, model.config, 0

    def forward(self, input_ids, **kwargs):
        if input_ids.shape[1] > 1:
            self.prefilled += int(kwargs["attention_mask"][:, -input_ids.shape[1]:].sum())
        return self.inner(input_ids=input_ids, **kwargs)


class ReEncoding:
    """The engine without its multi-turn session: every turn re-encodes its whole context."""

    def __init__(self, engine):
        self.engine, self.model = engine, engine.model

    def generate(self, *args):
        return self.engine.generate(*args)


def timed(engine, tok, records, cfg, params):
    counter = engine.model
    counter.prefilled = 0
    start = time.perf_counter()
    rollout = run_trajectories(engine, tok, records, cfg, params, 1, seed=0)
    return time.perf_counter() - start, counter.prefilled, rollout


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-turns", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(args.model)
    tok = load_tokenizer(path)
    model = CountingModel(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval())
    bf16 = bf16_is_fast("cpu")
    engine = HFGenerator(model, tok.pad_token_id, tok, torch.bfloat16 if bf16 else None)
    records = make_task_records("arithmetic_tools", "prompts", split="test", n=args.prompts)
    cfg = EnvConfig(name="tools", max_turns=args.max_turns, max_total_tokens=160)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0, stop_token_ids=[tok.eos_token_id],
                            batch_size=args.prompts)
    modes = {"kept cache": engine, "re-encoded": ReEncoding(engine)}
    times, last = {name: [] for name in modes}, {}
    for _ in range(args.repeats):
        for name, eng in modes.items():
            seconds, prefilled, rollout = timed(eng, tok, records, cfg, params)
            times[name].append(seconds)
            last[name] = (prefilled, rollout)
    kept, dense = last["kept cache"][1], last["re-encoded"][1]
    differ = sum(not torch.equal(a[m.bool()], b[n.bool()]) for a, m, b, n in zip(
        kept.completion_ids, kept.completion_mask, dense.completion_ids, dense.completion_mask))
    metrics = kept.info["metrics"]
    print(f"model: {path}, {'bf16 autocast' if bf16 else 'fp32'}, {torch.get_num_threads()} threads")
    print(f"{args.prompts} trajectories, ≤ {args.max_turns} turns of ≤ {args.max_new_tokens} tokens, greedy; "
          f"turns per trajectory {metrics['env/turns_mean']:.2f}, "
          f"tool calls {metrics.get('env/tool_calls_mean', 0):.2f}")
    print(f"{'':12}{'median s':>10}{'runs':>24}{'prefilled tokens':>18}")
    for name in modes:
        runs = ", ".join(f"{t:.2f}" for t in times[name])
        print(f"{name:12}{statistics.median(times[name]):>10.2f}{runs:>24}{last[name][0]:>18}")
    speedup = statistics.median(times["re-encoded"]) / statistics.median(times["kept cache"])
    print(f"speed-up {speedup:.2f}x; context read from the cache: {metrics['env/kv_reused_fraction']:.1%}; "
          f"trajectories whose tokens differ between the modes: {differ} of {len(records)}")


if __name__ == "__main__":
    main()

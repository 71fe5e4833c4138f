"""What the posttrain-vs-TRL benches share: one subprocess per contender (so each peak RSS is its own), a
setup file the contenders read, a step timer for TRL's Trainer, the load average, and side-by-side tables.

A bench script calls `worker_or_none(args, WORKERS)` first: in a worker process it runs the named contender
and writes `WORKDIR/NAME.json`; in the parent it returns False and the script runs `run_worker` per contender.
Arguments travel to the workers as `--key value` pairs rebuilt from the parent's namespace (no boolean
flags: every option takes a value).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ siblings (matmul_peak) importable from workers


WAIT_POLICIES = ("passive", "active", "inherit")


def set_wait_policy(policy: str) -> str:
    """Set OMP_WAIT_POLICY for this process and the workers it starts; must run before torch is imported.

    PyTorch's OpenMP threads spin at barriers by default; on a small box shared with other jobs a spinning thread
    waits for a descheduled sibling, and 2 threads ran 3-4x slower than 1 on the 2-core dev box (a small fp32
    matmul 60x slower). PASSIVE lets waiting threads sleep; both contenders get the same policy."""
    if "torch" in sys.modules and policy != "inherit":
        raise RuntimeError("set_wait_policy must run before torch is imported")
    if policy != "inherit":
        os.environ["OMP_WAIT_POLICY"] = policy.upper()
    return os.environ.get("OMP_WAIT_POLICY", "unset (OpenMP default: active spinning)")


def peak_rss_gb() -> float:
    """This process's resident-memory high mark (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def load_1min() -> float:
    return os.getloadavg()[0]


def forwarded(args) -> list[str]:
    """The parent's options as a worker command line: `--batch-size 4 ...` (None values and `worker` left out)."""
    out = []
    for key, value in vars(args).items():
        if key != "worker" and value is not None:
            out += ["--" + key.replace("_", "-"), str(value)]
    return out


def run_worker(script: str, name: str, args, timeout_s: float | None = None) -> dict:
    """Run contender `name` of `script` in a fresh interpreter; its result dict plus wall time and load averages."""
    cmd = [sys.executable, script, "--worker", name, *forwarded(args)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    load_before, start = load_1min(), time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"{name} ran past {timeout_s:.0f} s; lower --steps or drop it with --contenders") from None
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{name} failed (exit {proc.returncode})")
    result = json.loads((Path(args.workdir) / f"{name}.json").read_text())
    result.update(wall_s=time.perf_counter() - start, load_before=load_before, load_after=load_1min())
    return result


def add_shared_args(parser) -> None:
    """Options every bench takes: TRL's attention and interleaved repeats."""
    parser.add_argument("--trl-attn", default="sdpa", choices=["sdpa", "eager"],
                        help="attention of the TRL contenders' model (transformers' attn_implementation). On a CPU in "
                             "bf16, SDPA's fused flash kernel is slow; posttrain picks the math backend itself, TRL "
                             "users can only pick eager: run both to give TRL its best")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run the contenders this many times, interleaved (A B A B ...), and report each one's "
                             "median run: on a shared VM the box's speed drifts by tens of %% within minutes")


def run_contenders(script: str, names: list[str], args, time_of: Callable[[dict], float]) -> dict:
    """Each contender `args.repeats` times in rounds, so a drift of the box's speed hits all of them alike; the
    run with the median `time_of(result)` stands for each, its siblings' times kept in `repeat_times`."""
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for round_ in range(args.repeats):
        for name in names:
            suffix = f" ({round_ + 1}/{args.repeats})" if args.repeats > 1 else ""
            print(f"running {name}{suffix} ...", flush=True)
            runs[name].append(run_worker(script, name, args))
    results = {}
    for name, done in runs.items():
        ordered = sorted(done, key=time_of)
        results[name] = {**ordered[len(ordered) // 2], "repeat_times": [round(time_of(r), 2) for r in done]}
    return results


def describe_repeats(results: dict) -> str:
    """One line: every contender's timed seconds per repeat (empty when run once)."""
    if all(len(r.get("repeat_times", [])) < 2 for r in results.values()):
        return ""
    return "timed seconds per repeat (median used): " + "; ".join(f"{n} {r['repeat_times']}" for n, r in results.items())


def load_trl_model(path: str, args, variant: str = ""):
    """The TRL contenders' policy: fp32 weights (their configs turn on bf16 autocast) with `--trl-attn`, or eager
    attention for a contender whose name ends in `-eager`."""
    import torch
    from transformers import AutoModelForCausalLM

    attn = "eager" if variant.endswith("eager") else args.trl_attn
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn)


def worker_or_none(args, workers: dict[str, Callable]) -> bool:
    """In a worker process (`--worker NAME`): run workers[NAME](args, workdir), write its JSON, return True."""
    if not args.worker:
        return False
    work = Path(args.workdir)
    result = workers[args.worker](args, work)
    result.setdefault("peak_gb", peak_rss_gb())
    (work / f"{args.worker}.json").write_text(json.dumps(result))
    return True


def write_setup(work: Path, setup: dict, name: str = "setup") -> None:
    """What the contenders share (records, order, settings), as WORKDIR/NAME.json."""
    work.mkdir(parents=True, exist_ok=True)
    (work / f"{name}.json").write_text(json.dumps(setup))


def read_setup(work: Path, name: str = "setup") -> dict:
    return json.loads((work / f"{name}.json").read_text())


def record_visits(order) -> list[int]:
    """Wrap a posttrain BatchOrder so every index it hands out is appended to the returned list (the order the
    TRL contenders then read with a sequential sampler)."""
    visited: list[int] = []
    next_batch = order.next

    def recording_next() -> list[int]:
        batch = next_batch()
        visited.extend(batch)
        return batch

    order.next = recording_next
    return visited


def metrics_rows(run_dir: Path) -> list[dict]:
    """The per-step rows of a posttrain run's metrics.jsonl (those with a loss)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def no_saving(trainer, algo) -> None:
    """The benches time training, not checkpoint or export writing."""
    trainer.save = lambda: None
    algo.export = lambda out_dir, state_dict=None: None


def trl_step_timer():
    """A TrainerCallback recording each optimizer step's wall time (on_step_begin to on_step_end: the step's
    forward, backward, optimizer and, in GRPO, generation) and every logged dict."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.step_s, self.logs, self._t = [], [], 0.0

        def on_step_begin(self, *a, **k):
            self._t = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.step_s.append(time.perf_counter() - self._t)

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "loss" in logs:
                self.logs.append(dict(logs))

    return StepTimer()


def require_trl():
    try:
        import trl
    except ImportError:
        raise SystemExit("TRL is not installed: pip install trl") from None
    return trl


def machine_peak(threads: int) -> dict:
    """fp32 and bf16 matmul peaks (GFLOPS) at `threads`; "best" is the faster one (the MFU denominator) and
    decides whether the TRL contenders tuned for this machine use bf16."""
    from matmul_peak import measure_peak

    fp32 = measure_peak("fp32", (512, 1024), repeats=5, threads=threads)["gflops"]
    bf16 = measure_peak("bf16", (256, 512), repeats=2, threads=threads)["gflops"]
    return {"fp32": fp32, "bf16": bf16, "best": max(fp32, bf16), "best_dtype": "fp32" if fp32 >= bf16 else "bf16",
            "bf16_fast": bf16 > fp32}


def format_table(columns: list[tuple[str, int, str]], rows: list[dict]) -> str:
    """columns: (header, width, format spec) with the header also the row key; a missing value prints '-'."""
    head = "".join(f"{h:<{w}}" if i == 0 else f"{h:>{w}}" for i, (h, w, _) in enumerate(columns))
    lines = [head, "-" * len(head)]
    for row in rows:
        cells = []
        for i, (h, w, spec) in enumerate(columns):
            v = row.get(h)
            text = "-" if v is None else format(v, spec)
            cells.append(f"{text:<{w}}" if i == 0 else f"{text:>{w}}")
        lines.append("".join(cells))
    return "\n".join(lines)


def describe_load(results: dict) -> str:
    """One line: the 1-minute load average at the start and end of each contender."""
    parts = [f"{n} {r['load_before']:.1f}->{r['load_after']:.1f}" for n, r in results.items()]
    return f"load average (1 min, {os.cpu_count()} cores) before->after each contender: " + ", ".join(parts)

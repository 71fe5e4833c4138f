"""One GPU check: SFT, DPO, GRPO (HF engine) and PPO steps of posttrain, side by side with TRL, on a tiny model and
on random-init models of SmolLM2-135M's and Qwen2.5-0.5B's shapes; asserts every trained parameter and optimizer
state is on the device, and reports speed, MFU and memory.

    python bench/gpu_check.py --device cuda                  # what scripts/gpu_check.sh runs (sized for < 8 min on an H200)
    python bench/gpu_check.py --device cpu --quick           # the same code path on a CPU, tiny shapes, 1+1 steps
    python bench/gpu_check.py --dry-run [--quick]            # print the plan, run nothing

Each contender of each workload runs in its own process (H.run_worker), so its GPU peak memory and host RSS are
its own, under a per-workload timeout; `--budget-s` bounds the whole run: a workload that would not fit in what is
left is skipped with a note. A failed workload prints its error line and the run carries on; the exit status is 1
when any posttrain or TRL workload failed or left a parameter or optimizer state off the device.

Settings (both sides): fp32 weights with bf16 autocast (`--precision`), no gradient checkpointing, no
torch.compile, the same data in the same order, batch shapes, steps, learning rate and sampling settings; TRL
generates with transformers (use_vllm=False) and precomputes DPO's reference log-probs, as posttrain does; TF32
for fp32 matmuls on both (posttrain's devices.prepare; the TRL worker sets the same flags).
The TRL contenders are those of bench/{sft,dpo,grpo}_vs_trl.py, run on the device.

Figures, over the timed steps after warm-up: tokens/s = trained tokens per second of optimizer-step wall time (the
non-pad prompt + completion tokens of every row of every update: PPO's 2 epochs count each rollout token twice; a DPO
pair counts both its sequences, the shared prompt twice, whatever packing a side does); completions/s = completions
sampled per second of whole-step time (generation, reward, log-prob passes and updates). MFU = model FLOPs per second
over the bf16 matmul peak measured at the start: 6N + 12·L·d·S per trained token (PaLM appendix B; S the mean row
length, N with the tied embedding counted once), 2N per generated token, the LM head of GRPO/PPO training counted on
completion tokens only, PPO's two extra forward passes and its critic added (_gpu_workloads.step_flops). GPU peak =
torch.cuda.max_memory_allocated of the contender's process; host RSS = its ru_maxrss. posttrain÷TRL = tokens/s (SFT,
DPO) or completions/s (GRPO).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _gpu_workloads as W  # noqa: E402  (also puts the checkout and tests/ on sys.path)
import _harness as H  # noqa: E402

COLUMNS = ("workload", "model", "contender", "tokens/s", "completions/s", "MFU %", "GPU peak GB", "host RSS GB",
           "s/step", "posttrain÷TRL")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu (posttrain's train.device; TRL gets the same GPU)")
    p.add_argument("--quick", type=int, nargs="?", const=1, default=0, help="tiny shapes and 1+1 steps (CPU smoke run)")
    p.add_argument("--dry-run", type=int, nargs="?", const=1, default=0, help="print the plan and exit")
    p.add_argument("--models", default=",".join(W.SHAPES))
    p.add_argument("--workloads", default=",".join(W.ALGOS))
    p.add_argument("--contenders", default="posttrain,trl")
    p.add_argument("--budget-s", type=float, default=420.0, help="wall-time budget of the whole run")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="autocast dtype of both sides")
    p.add_argument("--compile", default="off", choices=["off", "on", "auto"], help="posttrain's model.compile (TRL: never)")
    p.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--workdir", default="/tmp/posttrain-gpu-check")
    p.add_argument("--out", default=os.environ.get("OUT"), help="folder for gpu_check.md / .json (default: $OUT)")
    for hidden in ("--worker", "--shape", "--workload", "--model-dir"):  # set by the parent for its workers
        p.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def split(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def worker_args(args, **per_worker) -> argparse.Namespace:
    """The options a worker process gets: the parent's, minus its own-only ones, plus the workload's."""
    mine = {k: v for k, v in vars(args).items() if k not in ("out", "dry_run", "models", "workloads", "contenders")}
    device = "cuda" if args.device.startswith("cuda") else args.device  # cuda:N becomes CUDA_VISIBLE_DEVICES=N
    return argparse.Namespace(**{**mine, "device": device, **per_worker})


def print_plan(args) -> None:
    print(f"device {args.device}, precision {args.precision}, budget {args.budget_s:.0f} s, quick={bool(args.quick)}, "
          f"threads {args.threads}, workdir {args.workdir}")
    for shape in split(args.models):
        s = W.sizes_for(shape, bool(args.quick))
        print(f"\n{shape}: per-process timeout {s.timeout_s} s")
        for algo in split(args.workloads):
            warm, timed = W.step_counts(algo, s)
            wa = worker_args(args, shape=shape, workload=algo, model_dir=f"{args.workdir}/{shape}-model")
            print(f"  {algo}: {warm} warm-up + {timed} timed steps")
            print(f"    posttrain: {' '.join(W.posttrain_overrides(algo, s, wa))}")
            if "trl" in split(args.contenders):
                variant = {"sft": "sft_vs_trl trl-best", "dpo": "dpo_vs_trl trl-precompute",
                           "grpo": "grpo_vs_trl trl-best", "ppo": "none (TRL has no PPOTrainer)"}[algo]
                print(f"    trl:       {variant}: {vars(W.trl_namespace(algo, s, wa)) if algo != 'ppo' else ''}")


# ---- the bf16 matmul peak ------------------------------------------------------------------------------------------

def measure_peak(args, work: Path) -> dict:
    """The bf16 matmul peak (TFLOP/s): on CUDA the median of timed runs of 10 products (CUDA events) per size,
    two input sets alternated, best size kept; on a CPU bench/matmul_peak.py's measurement."""
    import torch

    if not args.device.startswith("cuda"):
        from matmul_peak import measure_peak as cpu_peak

        r = cpu_peak("bf16", (256, 512) if args.quick else (512, 1024), repeats=3, threads=args.threads)
        return {"tflops": r["gflops"] / 1e3, "by_size": r["by_size"], "device": "cpu", "name": "cpu"}
    device = torch.device("cuda", 0)
    by_size = {n: _cuda_matmul_tflops(n, device) for n in (4096, 8192)}
    return {"tflops": max(by_size.values()), "by_size": by_size, "device": str(device),
            "name": torch.cuda.get_device_name(device), "torch": torch.__version__, "cuda": torch.version.cuda}


def _cuda_matmul_tflops(n: int, device, runs: int = 7, per_run: int = 10) -> float:
    import statistics

    import torch

    inputs = [(torch.randn(n, n, device=device, dtype=torch.bfloat16), torch.randn(n, n, device=device, dtype=torch.bfloat16))
              for _ in range(2)]
    out = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    for a, b in inputs * 3:  # warm-up: cuBLAS handle, kernel choice, clocks
        torch.matmul(a, b, out=out)
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(per_run):
            a, b = inputs[i % 2]
            torch.matmul(a, b, out=out)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2.0 * n**3 * per_run / statistics.median(times) / 1e12


def reporting_errors(fn):
    """Worker wrapper: the exception's one line goes to WORKDIR/NAME.error for the parent's report."""
    def run(args, work: Path) -> dict:
        start = time.perf_counter()
        try:
            result = fn(args, work)
        except BaseException as exc:
            (work / f"{args.worker}.error").write_text(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            raise
        result["worker_s"] = time.perf_counter() - start
        return result
    return run


WORKERS = {"posttrain": reporting_errors(W.run_posttrain), "trl": reporting_errors(W.run_trl),
           "peak": reporting_errors(measure_peak)}


# ---- running -------------------------------------------------------------------------------------------------------

class Budget:
    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def run_contender(name: str, wargs, cap_s: float, budget: Budget) -> dict:
    """One worker process; {"status": ok|failed|skipped, "note", "data"}."""
    work = Path(wargs.workdir)
    for stale in (work / f"{name}.json", work / f"{name}.error"):
        stale.unlink(missing_ok=True)
    left = budget.left()
    if left < min(cap_s / 3, 45):  # too little to start; one started late and stopped by the budget is "skipped"
        return {"status": "skipped", "note": f"{left:.0f} s of the budget left, this workload is allowed {cap_s:.0f} s"}
    timeout = min(cap_s, left)
    start = time.perf_counter()
    try:
        data = H.run_worker(__file__, name, wargs, timeout)
    except SystemExit as exc:
        error = work / f"{name}.error"
        if time.perf_counter() - start >= timeout - 1 and timeout < cap_s:
            return {"status": "skipped", "note": f"stopped by the budget after {timeout:.0f} s"}
        return {"status": "failed", "note": error.read_text() if error.exists() else str(exc)}
    if data.get("placement"):
        return {"status": "failed", "data": data,
                "note": f"{len(data['placement'])} tensors off {data['device']}: " + "; ".join(data["placement"][:3])}
    return {"status": "ok", "data": data, "note": ""}


def run_all(args, budget: Budget, peak: dict) -> list[dict]:
    entries = []
    contenders = split(args.contenders)
    for shape in split(args.models):
        s = W.sizes_for(shape, bool(args.quick))
        model_dir = Path(args.workdir) / f"{shape}-model"
        start = time.perf_counter()
        facts = W.build_model_dir(shape, model_dir, bool(args.quick))
        print(f"\n== {shape}: {facts['params'] / 1e6:.1f} M parameters, {facts['layers']} layers, hidden "
              f"{facts['hidden']}, vocab {facts['vocab']} (built in {time.perf_counter() - start:.0f} s)", flush=True)
        for algo in split(args.workloads):
            work = Path(args.workdir) / f"{shape}-{algo}"
            work.mkdir(parents=True, exist_ok=True)
            W.write_workload(work, algo, s, args.precision == "bf16")
            wargs = worker_args(args, shape=shape, workload=algo, model_dir=str(model_dir), workdir=str(work))
            for contender in contenders:
                missing = W.trl_has(algo) if contender == "trl" else None
                entry = {"status": "n/a", "note": missing} if missing else run_contender(contender, wargs, s.timeout_s, budget)
                entry.update(workload=algo, model=shape, contender=contender, facts=facts)
                entries.append(entry)
                print(f"  {algo:<5} {contender:<10} {entry['status']:<8} {_brief(entry, peak)}", flush=True)
    return entries


def _brief(entry: dict, peak: dict) -> str:
    if entry["status"] != "ok":
        return entry["note"] or ""
    row = figures(entry, peak)
    if not row:
        return "no timed steps"
    rate = f"{row['completions/s']:.1f} completions/s" if row["completions/s"] else f"{row['tokens/s']:.0f} tokens/s"
    return f"{rate}, MFU {row['MFU %']:.1f} %, {row['s/step']:.3f} s/step, process {entry['data'].get('wall_s', 0):.0f} s"


# ---- figures -------------------------------------------------------------------------------------------------------

def figures(entry: dict, peak: dict) -> dict:
    """The table's numbers for one finished contender (see the module docstring for the definitions)."""
    d, facts = entry["data"], entry["facts"]
    seconds, n = sum(d["step_s"]), len(d["step_s"])
    if not n or seconds <= 0:
        return {}
    flops = sum(W.step_flops(entry["workload"], facts, t, g, d["rows"], u)
                for t, g, u in zip(d["train_tokens"], d["gen_tokens"], d["updates"]))
    return {"tokens/s": sum(d["train_tokens"]) / seconds,
            "completions/s": d["completions"] * n / seconds if d["completions"] else None,
            "MFU %": 100 * flops / seconds / (peak["tflops"] * 1e12), "GPU peak GB": d.get("gpu_peak_gb"),
            "host RSS GB": d.get("host_rss_gb"), "s/step": seconds / n}


def table_rows(entries: list[dict], peak: dict) -> list[dict]:
    rows = []
    for e in entries:
        row = {"workload": e["workload"], "model": e["model"], "contender": e["contender"]}
        if e.get("data"):
            row.update(figures(e, peak))
        if e["status"] != "ok":
            row["contender"] += f" ({e['status']})"
        rows.append(row)
    by_key = {(r["workload"], r["model"], r["contender"]): r for r in rows}
    for r in rows:
        trl = by_key.get((r["workload"], r["model"], "trl"))
        if r["contender"] == "posttrain" and trl:
            key = "completions/s" if r["workload"] in ("grpo", "ppo") else "tokens/s"
            if r.get(key) and trl.get(key):
                r["posttrain÷TRL"] = r[key] / trl[key]
    return rows


def markdown(rows: list[dict]) -> str:
    def cell(v) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def report(args, entries: list[dict], peak: dict, wall_s: float) -> int:
    rows = table_rows(entries, peak)
    notes = [f"- {e['workload']} {e['model']} {e['contender']}: {e['status']}: {e['note']}" for e in entries if e["note"]]
    settings = sorted({f"- {e['contender']}: {e['data']['settings']}" for e in entries if e.get("data")})
    failed = [e for e in entries if e["status"] == "failed"]
    head = (f"GPU check on {peak.get('name', args.device)}: bf16 matmul peak {peak['tflops']:.1f} TFLOP/s "
            f"(MFU denominator), precision {args.precision}, {wall_s:.0f} s")
    text = "\n".join([head, "", markdown(rows), "", *settings, *(["", "Notes:", *notes] if notes else []),
                      "", f"{len(failed)} failed, {sum(e['status'] == 'skipped' for e in entries)} skipped, "
                          f"{sum(e['status'] == 'ok' for e in entries)} ok"])
    print("\n" + text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_check.md").write_text(text + "\n")
        (out / "gpu_check.json").write_text(json.dumps({"peak": peak, "rows": rows, "entries": entries}, indent=1, default=str))
    return 1 if failed else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    for key, value in {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}.items():
        os.environ.setdefault(key, value)  # the workers inherit them; a failure's stderr tail then holds the error
    if H.worker_or_none(args, WORKERS):
        return 0
    if args.dry_run:
        print_plan(args)
        return 0
    start, budget = time.perf_counter(), Budget(args.budget_s)
    if args.device.startswith("cuda:"):
        os.environ["CUDA_VISIBLE_DEVICES"] = args.device.split(":", 1)[1]  # every worker sees that GPU as cuda:0
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    peak_entry = run_contender("peak", worker_args(args), 90, budget)
    if peak_entry["status"] != "ok":
        print(f"matmul peak measurement failed, nothing else can run: {peak_entry['note']}")
        return 2
    peak = peak_entry["data"]
    print(f"bf16 matmul peak on {peak['name']}: {peak['tflops']:.1f} TFLOP/s "
          f"(by size: {', '.join(f'{k}: {v:.1f}' for k, v in peak['by_size'].items())})", flush=True)
    entries = run_all(args, budget, peak)
    return report(args, entries, peak, time.perf_counter() - start)


if __name__ == "__main__":
    sys.exit(main())

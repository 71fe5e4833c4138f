"""Metrics: one JSON object per logged step in metrics.jsonl, mirrored to TensorBoard and the trackers of
`train.report_to` (trackers.py); memory and throughput."""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from pathlib import Path


def host_peak_rss_gb() -> float:
    """This process's resident-set high-water mark on the host."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20


def peak_memory_gb(device=None) -> float:
    """The headline peak memory: the GPU allocator's peak on a CUDA device, else the host's peak RSS."""
    if device is not None and getattr(device, "type", str(device).split(":")[0]) == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**30
    return host_peak_rss_gb()


def memory_metrics(device) -> dict:
    """Peak memory, each metric named for the memory it measures: `mem/host_peak_rss_gb` always,
    `mem/gpu_peak_allocated_gb` and `mem/gpu_peak_reserved_gb` on CUDA (tensors vs the caching allocator's
    pool), and `peak_mem_gb`: the GPU's allocated peak on CUDA, the host RSS on the CPU."""
    out = {"peak_mem_gb": peak_memory_gb(device), "mem/host_peak_rss_gb": host_peak_rss_gb()}
    if getattr(device, "type", None) == "cuda":
        import torch

        out["mem/gpu_peak_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["mem/gpu_peak_reserved_gb"] = torch.cuda.max_memory_reserved(device) / 2**30
    return out


def to_float(value) -> float:
    return float(value.detach().float().item()) if hasattr(value, "detach") else float(value)


class MetricsLogger:
    """Appends to metrics.jsonl (truncated past `resume_step` on resume) and to TensorBoard when available."""

    def __init__(self, out_dir: str | Path, tensorboard: bool = True, resume_step: int | None = None, enabled: bool = True,
                 report_to: list[str] = (), project: str = "posttrain"):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled = enabled
        self._tb = None
        self._trackers: list = []
        if not enabled:
            return
        tensorboard = tensorboard or "tensorboard" in report_to
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        elif resume_step is None and self.path.exists():
            self.path.unlink()  # a fresh run does not append to an old one's curve
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))
            except ImportError:
                self._tb = None
        if report_to:
            from posttrain.trackers import open_trackers

            self._trackers = open_trackers(report_to, out_dir, project, _run_config(out_dir))

    def _truncate_after(self, step: int) -> None:
        rows = _parse_rows(self.path.read_text())
        kept = [json.dumps(row) for row in rows if row.get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def log(self, step: int, metrics: dict) -> dict:
        row = {"step": step}
        for key, value in metrics.items():
            value = to_float(value) if not isinstance(value, (str, bool)) else value
            row[key] = value if not (isinstance(value, float) and not math.isfinite(value)) else str(value)
        if self.enabled:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
                fh.flush()
            scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
            if self._tb is not None:
                for key, value in scalars.items():
                    self._tb.add_scalar(key, value, step)
            for tracker in self._trackers:
                tracker.log(step, scalars)
        return row

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
        for tracker in self._trackers:
            tracker.close()
        self._trackers = []


def _run_config(out_dir) -> dict:
    """The run's resolved config (config.yaml, written before training) for the trackers' run parameters."""
    path = Path(out_dir) / "config.yaml"
    if not path.exists():
        return {}
    import yaml

    data = yaml.safe_load(path.read_text())
    return data if isinstance(data, dict) else {}


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    return _parse_rows(path.read_text())


def _parse_rows(text: str) -> list[dict]:
    """The rows of a metrics.jsonl; a last line cut short (the process was killed mid-write) is left out."""
    lines = [line for line in text.splitlines() if line.strip()]
    rows = [json.loads(line) for line in lines[:-1]]
    if lines:
        try:
            rows.append(json.loads(lines[-1]))
        except json.JSONDecodeError:
            if text.endswith("\n"):  # a complete line that does not parse is damage, not a torn write
                raise
    return rows

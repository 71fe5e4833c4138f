"""Experiment trackers beside metrics.jsonl, chosen by `train.report_to` (a list): `trackio`, `wandb`, `mlflow`
(and `tensorboard`, the same as `train.tensorboard=true`). Each library is imported only when named, and installed
by the extra `pip install -e ".[trackers]"`. None of them needs the network:

- trackio (Hugging Face's local-first tracker): its SQLite store in `$TRACKIO_DIR` (default: trackio's own,
  ~/.cache/huggingface/trackio), one project `train.tracker_project`; `trackio show` opens its dashboard.
- wandb: `mode=offline` unless WANDB_MODE says otherwise; the record is `RUN_DIR/wandb/offline-run-*`
  (`wandb sync` uploads it later).
- mlflow: a local file store `RUN_DIR/mlruns` (`mlflow ui --backend-store-uri RUN_DIR/mlruns`); MLflow 3.7+ keeps
  that store in maintenance mode, so posttrain sets MLFLOW_ALLOW_FILE_STORE=true (a SQLite store would need SQLAlchemy).

metrics.jsonl stays the run's record of truth; a tracker that fails to start names itself in the error.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from posttrain.registry import Registry

TRACKERS = Registry("tracker")  # name -> class(run_dir, project, config) with log(step, scalars) and close()
KNOWN = ("tensorboard", "trackio", "wandb", "mlflow")
EXTRA_HINT = 'pip install -e ".[trackers]"'


def _import(module: str, tracker: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"train.report_to={tracker}: {module} is not installed ({EXTRA_HINT}): {exc}") from None


@TRACKERS.register("trackio")
class TrackioTracker:
    def __init__(self, run_dir: Path, project: str, config: dict):
        self.lib = _import("trackio", "trackio")
        # no background CPU/GPU sampler threads, no dashboard embedding: just the run's scalars
        self.lib.init(project=project, name=run_dir.resolve().name, config=config, auto_log_cpu=False,
                      auto_log_gpu=False, embed=False)

    def log(self, step: int, scalars: dict) -> None:
        self.lib.log(scalars, step=step)

    def close(self) -> None:
        self.lib.finish()


@TRACKERS.register("wandb")
class WandbTracker:
    def __init__(self, run_dir: Path, project: str, config: dict):
        self.lib = _import("wandb", "wandb")
        mode = os.environ.get("WANDB_MODE", "offline")  # never online unless the user asks for it
        self.run = self.lib.init(project=project, name=run_dir.resolve().name, dir=str(run_dir), config=config,
                                 mode=mode, reinit="create_new", settings=self.lib.Settings(silent=True))

    def log(self, step: int, scalars: dict) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


_MLFLOW_BAD = re.compile(r"[^A-Za-z0-9_\-. /]")  # what MLflow accepts in a metric name; others become "_"


@TRACKERS.register("mlflow")
class MlflowTracker:
    def __init__(self, run_dir: Path, project: str, config: dict):
        # MLflow 3.7+ refuses its file store (in maintenance mode) unless asked: it needs no database package
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        _import("mlflow", "mlflow")
        from mlflow.tracking import MlflowClient

        # a client of its own, not mlflow's global active run: several runs in one process stay apart
        self.client = MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
        exp = self.client.get_experiment_by_name(project)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(project)
        self.run_id = self.client.create_run(exp_id, run_name=run_dir.resolve().name).info.run_id
        from mlflow.entities import Param

        flat = _flatten(config)
        self.client.log_batch(self.run_id, params=[Param(k, str(v)[:500]) for k, v in flat.items()])

    def log(self, step: int, scalars: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(_MLFLOW_BAD.sub("_", k), v, now, step)
                                                    for k, v in scalars.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        out.update(_flatten(value, name) if isinstance(value, dict) else {name: value})
    return out


def check_names(names) -> None:
    unknown = [n for n in names if n not in KNOWN]
    if unknown:
        raise ValueError(f"train.report_to: unknown tracker(s) {unknown}; known: {', '.join(KNOWN)}")


def open_trackers(names, run_dir: str | Path, project: str, config: dict) -> list:
    """The trackers named (tensorboard excluded: MetricsLogger writes it itself), each started."""
    check_names(names)
    return [TRACKERS.lookup(n)(Path(run_dir), project, config) for n in dict.fromkeys(names) if n != "tensorboard"]

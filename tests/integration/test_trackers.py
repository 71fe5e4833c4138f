"""train.report_to: one tiny SFT run logs to trackio, wandb (offline) and mlflow (local file store) at once; each
tracker's offline record holds the losses metrics.jsonl holds, at their steps. No network: wandb runs offline,
trackio and mlflow write local files. The run is a child process because trackio fixes its store's folder
(TRACKIO_DIR) when first imported."""

import glob
import json
import os
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tiny import addition_sft_rows, tiny_model_dir, write_jsonl

STEPS = 3


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("trackers")
    model, data = tiny_model_dir(root / "model"), write_jsonl(root / "sft.jsonl", addition_sft_rows(32))
    env = {**os.environ, "TRACKIO_DIR": str(root / "trackio"), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
           "WANDB_DISABLE_GIT": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "posttrain.cli", "sft", "--model", model, "--data", data, "--output-dir", str(root / "run"),
           "--max-steps", str(STEPS), "model.autocast=none", "train.progress=false", "train.tensorboard=false",
           "train.report_to=[trackio,wandb,mlflow]", "train.tracker_project=pt-test"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert sorted(losses) == list(range(1, STEPS + 1))
    return root, losses


def test_trackio_sqlite_store_holds_the_losses(tracked_run):
    root, losses = tracked_run
    db = sqlite3.connect(root / "trackio" / "pt-test.db")
    rows = db.execute("select run_name, step, metrics from metrics order by step").fetchall()
    logged = {step: json.loads(m)["loss"] for name, step, m in rows if name == "run" and "loss" in json.loads(m)}
    assert logged == losses


def _wandb_records(path: Path):
    """The protobuf records of a .wandb file: a ':W&B' header, then LevelDB-log blocks of 32 KiB whose chunks are
    (crc32, length, type) + bytes; types 1 (full) and 4 (last) end a record."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf, out = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7]) if left >= 7 else (0, 0)
        if length == 0 and kind == 0:  # the rest of a block is padding
            pos += left
            continue
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def test_wandb_offline_run_holds_the_losses(tracked_run):
    root, losses = tracked_run
    files = glob.glob(str(root / "run" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1
    logged = {}
    for record in _wandb_records(Path(files[0])):
        if record.WhichOneof("record_type") == "history":
            items = {(i.key or "/".join(i.nested_key)): i.value_json for i in record.history.item}
            if "loss" in items:
                logged[record.history.step.num] = json.loads(items["loss"])
    assert logged == losses


def test_mlflow_file_store_holds_the_losses_and_params(tracked_run):
    root, losses = tracked_run
    runs = glob.glob(str(root / "run" / "mlruns" / "*" / "*" / "metrics"))
    assert len(runs) == 1
    lines = (Path(runs[0]) / "loss").read_text().split("\n")
    logged = {int(step): float(value) for _, value, step in (line.split() for line in lines if line.strip())}
    assert logged == losses
    assert (Path(runs[0]).parent / "params" / "train.max_steps").read_text() == str(STEPS)


def test_unknown_tracker_is_refused_before_the_run():
    from posttrain.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="train.report_to"):
        load_config("sft", None, ["train.report_to=[neptune]"], {"model.name_or_path": "smollm2"})

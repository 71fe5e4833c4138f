"""What every algorithm's setup shares: run directory, tokenizer and policy, data splits, batching helpers."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import torch

from posttrain.config import RunConfig, save_config
from posttrain.data.collate import BatchOrder, LengthReport, filter_by_length, pad_batch, padding_fraction
from posttrain.data.formats import DataError, Record, load_dataset_records
from posttrain.data.padding_free import pack_documents, packed_micro_batches, token_budget_batches
from posttrain.models.loading import autocast_context, count_parameters, load_causal_lm, load_tokenizer, resolve_model_path

log = logging.getLogger("posttrain")


def setup_run(cfg: RunConfig) -> Path:
    """Select the run's device (before any process group: its backend follows the device), create the run
    directory, save the resolved config, set CPU threads."""
    from posttrain.train.distributed import context

    run_device(cfg)
    out = Path(cfg.train.output_dir)
    if context().is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    return out


def run_device(cfg: RunConfig) -> torch.device:
    """The process's device for this run (`train.device`, resolved and prepared once per call site)."""
    from posttrain import devices

    return devices.select(cfg.train.device)


def load_policy_and_tokenizer(cfg: RunConfig, trainable: bool = True, device=None):
    """The policy on `device` (default: the run's device) and its tokenizer."""
    path = resolve_model_path(cfg.model.name_or_path)
    tokenizer = load_tokenizer(path, cfg.data.chat_template)
    torch.manual_seed(cfg.train.seed)  # LoRA init draws random numbers: same seed, same adapter
    model = load_causal_lm(cfg.model, path, trainable=trainable, device=device or run_device(cfg))
    return model, tokenizer



def load_splits(cfg: RunConfig, kind: str) -> tuple[list[Record], list[Record]]:
    """(train, eval) records of `kind`; a built-in task's test split, an eval file, or a held-out slice. Refused
    here rather than after loading models or in the middle of a run: a train split of pairs that all have chosen ==
    rejected (nothing to learn), prompts without a column one of the run's rewards needs."""
    train, held = _read_splits(cfg, kind)
    if kind == "preference":
        check_pairs_differ(cfg, train)
    if kind == "prompts" and getattr(cfg.algo, "reward", None) is not None:
        from posttrain.train.collector import check_reward_columns  # collector imports this module

        check_reward_columns(cfg, train, held)
    return train, held


def _read_splits(cfg: RunConfig, kind: str) -> tuple[list[Record], list[Record]]:
    data = cfg.data
    train = load_dataset_records(data.path, kind, "train", n=data.num_examples, seed=cfg.train.seed)
    if data.eval_path:
        return train, load_dataset_records(data.eval_path, kind, "test", n=data.num_eval_examples, seed=cfg.train.seed)
    if data.path.startswith("task:"):
        return train, load_dataset_records(data.path, kind, "test", n=data.num_eval_examples, seed=cfg.train.seed)
    order = list(range(len(train)))
    random.Random(cfg.train.seed).shuffle(order)
    n_eval = int(len(train) * data.eval_fraction) if len(train) >= 20 else 0
    held = set(order[:n_eval])
    return [r for i, r in enumerate(train) if i not in held], [r for i, r in enumerate(train) if i in held]


def check_pairs_differ(cfg: RunConfig, train: list[Record]) -> None:
    """A train split whose every pair has chosen == rejected leaves DPO and KTO nothing once those are dropped
    (and gives a reward model a zero margin on every pair): refused with the count, not an empty batch order."""
    from posttrain.data.preference import split_degenerate

    kept, same = split_degenerate(train)
    if train and not kept:
        first = ", ".join(r.where for r in same[:3])
        raise DataError(f"{cfg.data.path}: no examples left to train on: all {len(same)} pairs of the train split "
                        f"have chosen == rejected (first: {first})")


def encode_all(records: list[Record], encode, lengths_of, cfg: RunConfig, fit=None, name: str = "train",
               dropped_before: dict[str, int] | None = None):
    """Encode records, apply the over-long policy, write the counts to the run directory and the log.
    `dropped_before`: {reason: count} of records the caller removed before encoding (pairs with chosen ==
    rejected), counted in the error when no train example is left."""
    items = [encode(r) for r in records]
    kept, report = filter_by_length(
        items, [lengths_of(x) for x in items], [r.where for r in records], cfg.data.max_length, cfg.data.overlong, fit
    )
    record_length_report(cfg, name, report, dropped_before)
    return kept, report


TRAIN_SPLITS = ("train", "train_prompts")  # the report names of what a run trains on (eval may be empty)


def record_length_report(cfg: RunConfig, name: str, report: LengthReport,
                         dropped_before: dict[str, int] | None = None) -> None:
    """Log and save (rank 0) what the over-long policy did; a train split left empty is a DataError on every rank,
    raised after the counts are saved, instead of a batch order over nothing."""
    from posttrain.train.distributed import context

    if report.dropped or report.truncated:
        log.warning("%s data: %s (first: %s)", name, report.summary(), ", ".join(report.examples))
    if context().is_main:
        out = Path(cfg.train.output_dir) / "data_report.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        existing = json.loads(out.read_text()) if out.exists() else {}
        existing[name] = {"policy": report.policy, "kept": report.kept, "dropped": report.dropped, "truncated": report.truncated, "first_overlong": report.examples}
        out.write_text(json.dumps(existing, indent=1))
    if name in TRAIN_SPLITS and report.kept == 0:
        raise nothing_left(cfg, name, report, dropped_before or {})


def nothing_left(cfg: RunConfig, name: str, report: LengthReport, dropped_before: dict[str, int]) -> DataError:
    """`FILE: no examples left to train on: ...` with the count of each reason they were dropped for."""
    prompts = name.endswith("_prompts")  # prompts: dropped above max_prompt_length, never truncated
    key = "data.max_prompt_length" if prompts else "data.max_length"
    limit = cfg.data.max_prompt_length if prompts else cfg.data.max_length
    reasons = [f"{n} {why}" for why, n in dropped_before.items() if n]
    if report.dropped:
        policy = "" if prompts else f"data.overlong={report.policy!r}; "
        reasons.append(f"{report.dropped} longer than {key}={limit} tokens ({policy}first: {', '.join(report.examples)})")
    total = report.dropped + sum(dropped_before.values())
    what = "prompts" if prompts else "records"
    if not reasons:
        return DataError(f"{cfg.data.path}: no examples left to train on: the train split is empty")
    return DataError(f"{cfg.data.path}: no examples left to train on: all {total} {what} of the train split were "
                     f"dropped: {'; '.join(reasons)}")


def make_order(lengths: list[int], cfg: RunConfig, batch_size: int | None = None, group_by_length: bool | None = None,
               drop_last: bool = False) -> BatchOrder:
    """The data order of this process: its share of each global batch when several processes train."""
    from posttrain.train.distributed import context

    ctx = context()
    grouped = cfg.data.group_by_length if group_by_length is None else group_by_length
    return BatchOrder(lengths, batch_size or cfg.train.batch_size, cfg.train.seed, grouped, drop_last, ctx.rank, ctx.world)


def padded_sft_batch(items, pad_id: int) -> dict:
    batch = pad_batch([x.input_ids for x in items], pad_id, "right", [x.labels for x in items])
    batch["padding_fraction"] = padding_fraction([len(x) for x in items])
    return batch


def sequence_micro_batches(batches: list[list], cfg: RunConfig, pad_id: int) -> list[dict]:
    """One update's micro-batches from its `grad_accum` batches of Encoded sequences: padded rows of
    `batch_size` as drawn (the default); with `train.padding_free`, the update's sequences packed into rows of
    its longest one; with `train.max_tokens_per_micro_batch`, micro-batches sized by that many tokens."""
    t = cfg.train
    if not t.padding_free and t.max_tokens_per_micro_batch <= 0:
        return [padded_sft_batch(b, pad_id) for b in batches]
    items = [x for b in batches for x in b]
    lengths = [len(x) for x in items]
    if not t.padding_free:
        return [padded_sft_batch([items[i] for i in idx], pad_id)
                for idx in token_budget_batches(lengths, t.max_tokens_per_micro_batch)]
    width = max(lengths)
    micro = []
    for rows in packed_micro_batches(lengths, width, t.max_tokens_per_micro_batch, len(batches)):
        members = [i for row in rows for i in row]
        local = {i: k for k, i in enumerate(members)}
        micro.append(pack_documents([items[i] for i in members], pad_id, width, [[local[i] for i in row] for row in rows]))
    return micro


def token_budget_groups(batches: list[list], cost, cfg: RunConfig) -> list[list]:
    """An update's units (pairs, KTO rows) regrouped into micro-batches of at most `train.max_tokens_per_micro_batch`
    tokens of padded cost, `cost(unit)` being a unit's rows x width upper bound; the batches as drawn when it is 0.
    The losses are normalized by the whole update's counts (`totals`), so the grouping changes only the memory and
    the padding, not the update."""
    budget = cfg.train.max_tokens_per_micro_batch
    if budget <= 0:
        return batches
    units = [u for b in batches for u in b]
    return [[units[i] for i in idx] for idx in token_budget_batches([cost(u) for u in units], budget)]


def pair_cost(chosen_len: int, rejected_len: int) -> int:
    """A pair's padded cost: its two sequences padded to the longer (and a shared-prompt row is never longer)."""
    return 2 * max(chosen_len, rejected_len)


def describe_model(model) -> dict:
    trainable, total = count_parameters(model)
    return {"params/trainable": trainable, "params/total": total}


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))


class DatasetAlgorithm:
    """Plumbing shared by algorithms that walk a dataset with a BatchOrder (`self.order`), train `self.model`
    and export it with `self.tokenizer`: the data position is their resumable state."""

    updates_per_step = 1
    monitor = None  # online algorithms set a FailureMonitor

    def early_stop(self) -> bool:
        """Whether the update just run ends this iteration (PPO's trust region); never, by default."""
        return False

    @property
    def device(self) -> torch.device:
        """Where the trained model (and so every batch of its forward passes) lives."""
        from posttrain.devices import module_device

        return module_device(self.model)

    def modules(self) -> dict:
        return {"policy": self.model}

    def state_dict(self) -> dict:
        return {"order": self.order.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state["order"])

    def export(self, out_dir: Path, state_dict: dict | None = None) -> None:
        from posttrain.models.loading import export_model

        export_model(self.model, self.tokenizer, out_dir, state_dict=state_dict)


__all__ = [
    "DatasetAlgorithm", "once_metrics", "report_degenerate",
    "autocast_context", "run_device", "describe_model", "encode_all", "load_policy_and_tokenizer", "load_splits", "make_order",
    "padded_sft_batch", "setup_run", "write_json",
]


def report_degenerate(cfg: RunConfig, name: str, dropped: list[Record]) -> None:
    """Add the count (and the first few places) to data_report.json (rank 0 only: ranks writing the same file
    at once read each other's half-written JSON); warn when any were dropped."""
    from posttrain.train.distributed import context

    path = Path(cfg.train.output_dir) / "data_report.json"
    if context().is_main:
        report = json.loads(path.read_text()) if path.exists() else {}
        report.setdefault(name, {}).update(degenerate_dropped=len(dropped), first_degenerate=[r.where for r in dropped[:5]])
        write_json(path, report)
    if dropped:
        log.warning("%s data: dropped %d pairs whose chosen == rejected (first: %s)", name, len(dropped),
                    ", ".join(r.where for r in dropped[:5]))


def once_metrics(model, ref_metrics: dict) -> dict:
    """Logged with the first step of a process: parameter counts, models held, what the reference pass did."""
    return {**describe_model(model), "models_in_memory": 1, **ref_metrics}

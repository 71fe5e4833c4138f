"""Each kind of malformed input gives one clear error naming file, line and field."""

import json

import pytest

from posttrain.data.collate import BatchOrder, apply_length_policy, padding_fraction
from posttrain.data.chat import Encoded
from posttrain.data.formats import DataError, load_dataset_records

GOOD_PREF = {"prompt": "p", "chosen": "a", "rejected": "b"}


def write_lines(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


@pytest.mark.parametrize(
    "lines, kind, message",
    [
        ([GOOD_PREF, "{not json"], "preference", r"data.jsonl:2: not valid JSON"),
        ([GOOD_PREF, {"prompt": "p", "chosen": "a", "rejectd": "b"}], "preference", r":2: missing field 'rejected'.*'rejectd'"),
        ([{"prompt": "p", "chosen": 3, "rejected": "b"}], "preference", r":1: field 'chosen': expected a string or a list of messages, got int"),
        ([{"prompt": "", "chosen": "a", "rejected": "b"}], "preference", r":1: field 'prompt': empty string"),
        ([{"messages": [{"role": "wizard", "content": "x"}]}], "sft", r":1: field 'messages\[0\].role': unknown role 'wizard'"),
        ([{"messages": [{"role": "user", "content": "x"}]}], "sft", r":1: field 'messages': no assistant message"),
        ([{"prompt": "p", "completion": "c", "label": "yes"}], "unpaired", r":1: field 'label': expected true/false"),
        ([[1, 2]], "sft", r":1: expected a JSON object, got list"),
        ([{"text": "x"}], "prompts", r":1: missing field 'prompt'"),
    ],
)
def test_malformed_records(tmp_path, lines, kind, message):
    path = write_lines(tmp_path / "data.jsonl", lines)
    with pytest.raises(DataError, match=message):
        load_dataset_records(path, kind)


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty"):
        load_dataset_records(str(tmp_path / "empty.jsonl"), "sft")
    with pytest.raises(DataError, match="no such file"):
        load_dataset_records(str(tmp_path / "nope.jsonl"), "sft")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown data format"):
        load_dataset_records(str(tmp_path / "x.csv"), "sft")


def test_json_parquet_and_saved_hf_dataset_read_the_same_records(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [GOOD_PREF, {"prompt": [{"role": "user", "content": "q"}], "chosen": "x", "rejected": "y"}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows[:1]), tmp_path / "d.parquet")
    datasets.Dataset.from_list(rows[:1]).save_to_disk(str(tmp_path / "hf"))
    assert [r.data for r in load_dataset_records(str(tmp_path / "d.json"), "preference")] == rows
    assert load_dataset_records(str(tmp_path / "d.parquet"), "preference")[0].data == GOOD_PREF
    assert load_dataset_records(str(tmp_path / "hf"), "preference")[0].data == GOOD_PREF
    bad = [GOOD_PREF, {"prompt": "p", "chosen": None, "rejected": "b"}]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(DataError, match=r"bad.json\[1\]: field 'chosen'"):
        load_dataset_records(str(tmp_path / "bad.json"), "preference")


def test_length_policy_drop_truncate_and_counting():
    enc = Encoded(list(range(10)), [-100] * 6 + [6, 7, 8, 9], prompt_len=6)
    assert apply_length_policy(enc, 10, "drop") is enc
    assert apply_length_policy(enc, 8, "drop") is None
    cut = apply_length_policy(enc, 8, "truncate")
    assert cut.input_ids == list(range(8)) and cut.labels[-2:] == [6, 7]
    assert apply_length_policy(enc, 6, "truncate") is None  # no completion token would survive


def test_batch_order_is_deterministic_resumable_and_groups_lengths():
    lengths = [5, 50, 6, 51, 7, 52, 8, 53] * 4
    a = BatchOrder(lengths, 4, seed=1)
    first = [a.next() for _ in range(5)]
    state = a.state_dict()
    rest = [a.next() for _ in range(6)]  # crosses an epoch boundary
    b = BatchOrder(lengths, 4, seed=1)
    b.load_state_dict(state)
    assert [b.next() for _ in range(6)] == rest
    assert sorted(i for batch in first[:8] for i in batch) == sorted(set(i for batch in first[:8] for i in batch))
    grouped = BatchOrder(lengths, 4, seed=1)
    ungrouped = BatchOrder(lengths, 4, seed=1, group_by_length=False)
    waste = lambda o: sum(padding_fraction([lengths[i] for i in o.next()]) for _ in range(8)) / 8  # noqa: E731
    assert waste(grouped) < 0.1 < waste(ungrouped)

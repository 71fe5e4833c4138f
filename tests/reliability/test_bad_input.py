"""Bad input in every data format (JSONL, JSON, Parquet, saved HF dataset) gives one clear line naming the file, the
line or row and the field, or an explicit counted drop; never a traceback, through the CLI too (issue 7, point 1)."""

import json
import logging
import re

import pytest

from posttrain.cli import main
from posttrain.data.chat import encode_messages, encode_prompt_completion
from posttrain.data.formats import DataError, load_dataset_records
from tiny import addition_sft_rows, prompt_rows, tiny_model_dir, write_jsonl

FORMATS = ["jsonl", "json", "parquet", "hf"]
GOOD = {
    "preference": {"prompt": "p", "chosen": "a", "rejected": "b"},
    "sft": {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    "unpaired": {"prompt": "p", "completion": "c", "label": True},
    "prompts": {"prompt": "p", "answer": "1"},
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "m")


def write_dataset(fmt: str, folder, rows: list[dict]) -> tuple[str, list[str]]:
    """Write rows in `fmt`; returns (path, the location prefix of each row as errors spell it)."""
    if fmt == "jsonl":
        path = write_jsonl(folder / "d.jsonl", rows)
        return path, [f"{path}:{i + 1}" for i in range(len(rows))]
    if fmt == "json":
        path = folder / "d.json"
        path.write_text(json.dumps(rows, indent=1))
        return str(path), [f"{path}[{i}]" for i in range(len(rows))]
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = folder / "d.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        import datasets

        path = folder / "hf"
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return str(path), [f"{path}[row {i}]" for i in range(len(rows))]


def one_line_error(spec: str, kind: str) -> str:
    with pytest.raises(DataError) as info:
        load_dataset_records(spec, kind)
    message = str(info.value)
    assert "\n" not in message and message.startswith(spec), message
    return message


# (kind, bad record, expected message after "<where>: ")
CASES = {
    "missing column": ("preference", {"prompt": "p", "chosen": "a"}, r"missing field 'rejected' for preference data"),
    "misspelt column": ("preference", {"prompt": "p", "chosen": "a", "rejectd": "b"},
                        r"missing field 'rejected' .*found 'rejectd': misspelt\?"),
    "int for text": ("preference", {"prompt": "p", "chosen": 3, "rejected": "b"},
                     r"field 'chosen': expected a string or a list of messages, got int"),
    "string label": ("unpaired", {"prompt": "p", "completion": "c", "label": "yes"}, r"field 'label': expected true/false"),
    "string for messages": ("sft", {"messages": "hello"}, r"field 'messages': expected a non-empty list"),
    "empty string": ("preference", {"prompt": "", "chosen": "a", "rejected": "b"}, r"field 'prompt': empty string"),
    "blank completion": ("sft", {"prompt": "p", "completion": " \t\n"}, r"field 'completion': empty string"),
    "empty assistant turn": ("sft", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
                             r"field 'messages\[1\].content': empty string"),
    "unknown role": ("sft", {"messages": [{"role": "wizard", "content": "q"}, {"role": "assistant", "content": "a"}]},
                     r"field 'messages\[0\].role': unknown role 'wizard'"),
    "misspelt role key": ("sft", {"messages": [{"rol": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
                          r"field 'messages\[0\]"),
    "no assistant turn": ("sft", {"messages": [{"role": "user", "content": "q"}]}, r"field 'messages': no assistant message"),
    "missing prompt": ("prompts", {"question": "q", "answer": "1"}, r"missing field 'prompt' for prompt data"),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", list(CASES))
def test_bad_record_names_file_row_and_field(tmp_path, fmt, case):
    """Row formats get the bad record after two good ones; columnar formats hold one schema, so all rows are bad."""
    kind, bad, message = CASES[case]
    rows = [GOOD[kind], GOOD[kind], bad] if fmt in ("jsonl", "json") else [bad] * 3
    spec, where = write_dataset(fmt, tmp_path, rows)
    bad_at = where[2] if fmt in ("jsonl", "json") else where[0]
    got = one_line_error(spec, kind)
    assert got.startswith(bad_at + ": "), got
    assert re.search(message, got), got


@pytest.mark.parametrize("fmt", ["parquet", "hf"])
def test_columnar_null_is_reported_at_its_row(tmp_path, fmt):
    """A value missing from one row of a Parquet/HF table is a null at that row: named by its row number."""
    spec, where = write_dataset(fmt, tmp_path, [GOOD["preference"], GOOD["preference"], {"prompt": "p", "chosen": "a"}])
    got = one_line_error(spec, "preference")
    assert got == f"{where[2]}: field 'rejected': expected a string or a list of messages, got NoneType"


def test_non_json_lines(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps(GOOD["prompts"]) + "\n" + "{'prompt': 'single quotes'}\n")
    assert one_line_error(str(jsonl), "prompts").startswith(f"{jsonl}:2: not valid JSON")
    whole = tmp_path / "d.json"
    whole.write_text('[\n {"prompt": "p"},\n {"prompt": "q",}\n]\n')
    assert one_line_error(str(whole), "prompts").startswith(f"{whole}:3: not valid JSON")
    deep = tmp_path / "deep.jsonl"
    deep.write_text("[" * 200_000 + "]" * 200_000 + "\n")  # RecursionError inside json, not a syntax error
    assert one_line_error(str(deep), "prompts") == f"{deep}:1: not valid JSON (nested too deeply)"


def test_bytes_that_are_not_utf8_name_their_line(tmp_path):
    jsonl = tmp_path / "latin1.jsonl"
    jsonl.write_bytes(json.dumps(GOOD["prompts"]).encode() + b"\n" + '{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    assert one_line_error(str(jsonl), "prompts").startswith(f"{jsonl}:2: not valid UTF-8 (byte 0xe9")
    whole = tmp_path / "latin1.json"
    whole.write_bytes(b'[\n{"prompt": "p"},\n{"prompt": "caf\xe9"}]')
    assert one_line_error(str(whole), "prompts").startswith(f"{whole}:3: not valid UTF-8")


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    for name in ("bom.jsonl", "bom.json"):
        path = tmp_path / name
        text = json.dumps(GOOD["prompts"]) + "\n" if name.endswith("l") else json.dumps([GOOD["prompts"]])
        path.write_text(text, encoding="utf-8-sig")
        assert [r.data for r in load_dataset_records(str(path), "prompts")] == [GOOD["prompts"]]


def _empty_inputs(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n  \n\n")
    (tmp_path / "empty.json").write_text("")
    (tmp_path / "list.json").write_text("[]")
    (tmp_path / "empty.parquet").write_bytes(b"")
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 this is not parquet")
    pq.write_table(pa.Table.from_pylist([], schema=pa.schema([("prompt", pa.string())])), tmp_path / "rows0.parquet")
    datasets.Dataset.from_dict({"prompt": []}).save_to_disk(str(tmp_path / "hf0"))
    (tmp_path / "not_a_dataset").mkdir()
    return {
        "empty.jsonl": "the dataset is empty", "blank.jsonl": "the dataset is empty", "empty.json": "the dataset is empty",
        "list.json": "the dataset is empty", "empty.parquet": "not a readable Parquet file",
        "junk.parquet": "not a readable Parquet file", "rows0.parquet": "the dataset is empty",
        "hf0": "cannot read the saved dataset, empty or damaged",
        "not_a_dataset": "a folder, but not a dataset saved with `save_to_disk`",
    }


def test_empty_and_unreadable_inputs_in_every_format(tmp_path):
    for name, message in _empty_inputs(tmp_path).items():
        got = one_line_error(str(tmp_path / name), "prompts")
        assert got.startswith(f"{tmp_path / name}: {message}"), got


ODD = "zero\u200bwidth \u200fRTL\u202e override \u05e9\u05dc\u05d5\u05dd e\u0301 emoji \U0001f600\U0001f469\u200d\U0001f467 \ufeff"


@pytest.mark.parametrize("fmt", FORMATS)
def test_odd_unicode_loads_and_encodes(tmp_path, fmt, tok):
    """Zero-width, bidi controls, combining marks and emoji are ordinary text: read intact, tokenized without error."""
    messages = [{"role": "user", "content": ODD}, {"role": "assistant", "content": ODD}]
    rows = [{"prompt": ODD, "completion": ODD}, {"messages": messages}]
    rows = rows if fmt in ("jsonl", "json") else rows[:1]  # one schema per columnar table
    spec, _ = write_dataset(fmt, tmp_path, rows)
    records = load_dataset_records(spec, "sft")
    assert records[0].data["prompt"] == ODD
    enc = encode_prompt_completion(tok, ODD, ODD)
    assert len(enc.input_ids) > len(ODD) and enc.labels[-1] == tok.eos_token_id
    if len(records) > 1:
        trained = [t for t in encode_messages(tok, records[1].data["messages"]).labels if t != -100]
        assert trained[-1] == tok.eos_token_id


@pytest.mark.parametrize("field", ["prompt", "completion"])
def test_lone_surrogate_escape_is_a_clear_error(tmp_path, field):
    """JSON accepts "\\ud800" but no tokenizer can encode it: refused at validation, not deep in the tokenizer."""
    row = {"prompt": "p", "completion": "c"}
    line = json.dumps(row).replace(f'"{row[field]}"', '"a\\ud800b"')
    jsonl = tmp_path / "s.jsonl"
    jsonl.write_text(json.dumps(row) + "\n" + line + "\n")
    expected = f"{jsonl}:2: field '{field}': invalid Unicode (lone surrogate U+D800 at character 1)"
    assert one_line_error(str(jsonl), "sft") == expected
    whole = tmp_path / "s.json"
    whole.write_text("[" + line + "]")
    assert one_line_error(str(whole), "sft").startswith(f"{whole}[0]: field '{field}': invalid Unicode")
    messages = tmp_path / "m.jsonl"
    messages.write_text('{"messages": [{"role": "user", "content": "\\udfff"}, {"role": "assistant", "content": "a"}]}\n')
    assert "field 'messages[0].content': invalid Unicode" in one_line_error(str(messages), "sft")


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_five_megabyte_line_is_read(tmp_path, fmt):
    big = "x" * (5 << 20)
    spec, _ = write_dataset(fmt, tmp_path, [{"prompt": "p", "completion": big}, {"prompt": "q", "completion": "c"}])
    records = load_dataset_records(spec, "sft")
    assert len(records) == 2 and records[0].data["completion"] == big


@pytest.mark.parametrize("fmt", FORMATS)
def test_duplicated_rows_are_kept_and_counted(tmp_path, fmt, caplog):
    """Documented in formats.py: duplicates are kept (up-weighting is legitimate) and logged with their count."""
    a, b = {"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"}
    spec, where = write_dataset(fmt, tmp_path, [a, b, a, a, {"prompt": "a", "answer": "3"}])
    with caplog.at_level(logging.WARNING, logger="posttrain"):
        records = load_dataset_records(spec, "prompts")
    assert [r.data for r in records] == [a, b, a, a, {"prompt": "a", "answer": "3"}]
    assert f"2 duplicated records kept (first: {where[2]} repeats {where[0]})" in caplog.text


def _sft_run(out, model_dir, data, *extra):
    return main(["sft", "--model", model_dir, "--data", data, "--output-dir", str(out), "--max-steps", "1",
                 "model.autocast=none", "train.progress=false", "train.tensorboard=false", "data.eval_fraction=0", *extra])


def test_overlong_examples_are_dropped_or_truncated_and_counted(tmp_path, model_dir):
    """A prompt over max_length (and a 100 kB line): counted in data_report.json with where it came from."""
    rows = addition_sft_rows(8)
    rows[3] = {"prompt": "long " * 40, "completion": "short"}
    rows[6] = {"prompt": "q", "completion": "y" * 100_000}
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    assert _sft_run(tmp_path / "drop", model_dir, data, "data.max_length=64") == 0
    report = json.loads((tmp_path / "drop" / "data_report.json").read_text())["train"]
    assert (report["kept"], report["dropped"], report["truncated"]) == (6, 2, 0)
    assert report["first_overlong"] == [f"{data}:4", f"{data}:7"]
    assert _sft_run(tmp_path / "cut", model_dir, data, "data.max_length=64", "data.overlong=truncate") == 0
    report = json.loads((tmp_path / "cut" / "data_report.json").read_text())["train"]
    # the 200-token prompt leaves no room for a completion token: dropped even under `truncate` (prompts over the limit: TRL #3569)
    assert (report["kept"], report["dropped"], report["truncated"]) == (7, 1, 1)


def test_overlong_rl_prompts_are_dropped_and_counted(tmp_path, model_dir):
    from posttrain.train.grpo import GRPO
    from tiny import run_config

    rows = prompt_rows(12)
    rows[5]["prompt"] = "a long prompt " * 20
    data = write_jsonl(tmp_path / "p.jsonl", rows)
    cfg = run_config("grpo", tmp_path / "run", model_dir, data, "data.max_prompt_length=40", "data.eval_fraction=0",
                     "algo.reward.functions=[tiny:vowel_reward]", "algo.sampling.prompts_per_step=2", "algo.sampling.num_generations=2")
    algo = GRPO(cfg)
    assert len(algo.collector.prompts) == 11
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())["train_prompts"]
    assert report["dropped"] == 1 and report["first_overlong"] == [f"{data}:6"]


def test_identical_chosen_and_rejected_are_dropped_and_counted_by_posttrain_dpo(tmp_path, model_dir):
    rows = [{"prompt": f"{i}+1=", "chosen": f"ok {i + 1}", "rejected": f"no {i + 2}"} for i in range(17)]
    rows += [{"prompt": "same", "chosen": "yes", "rejected": "yes"}, {"prompt": "ws", "chosen": "yes", "rejected": " yes "},
             {"prompt": "msgs", "chosen": [{"role": "assistant", "content": "x"}],
              "rejected": [{"role": "assistant", "content": "x"}]}]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    code = main(["dpo", "--model", model_dir, "--data", data, "--output-dir", str(tmp_path / "dpo"), "--max-steps", "1",
                 "model.autocast=none", "train.progress=false", "train.tensorboard=false", "data.eval_fraction=0",
                 "train.batch_size=4"])
    assert code == 0
    report = json.loads((tmp_path / "dpo" / "data_report.json").read_text())["train"]
    assert report["degenerate_dropped"] == 3 and report["kept"] == 17
    assert report["first_degenerate"] == [f"{data}:18", f"{data}:19", f"{data}:20"]


def test_odd_unicode_trains_through_the_cli(tmp_path, model_dir):
    rows = [{"prompt": ODD, "completion": f"{ODD} {i}"} for i in range(4)]
    assert _sft_run(tmp_path / "run", model_dir, write_jsonl(tmp_path / "u.jsonl", rows)) == 0
    assert (tmp_path / "run" / "final" / "config.json").exists()


def _cli_cases(tmp_path) -> list[tuple[str, str]]:
    """(data path, expected one-line message) across the formats and the failure kinds above."""
    out = []
    for fmt in FORMATS:
        folder = tmp_path / fmt
        folder.mkdir()
        spec, where = write_dataset(fmt, folder, [CASES["unknown role"][1]] * 2)
        out.append((spec, f"{where[0]}: field 'messages[0].role': unknown role 'wizard'"))
    surrogate = tmp_path / "s.jsonl"
    surrogate.write_text('{"prompt": "p", "completion": "\\ud83d"}\n')
    out.append((str(surrogate), f"{surrogate}:1: field 'completion': invalid Unicode"))
    latin = tmp_path / "l.jsonl"
    latin.write_bytes(b'{"prompt": "p", "completion": "\xff"}\n')
    out.append((str(latin), f"{latin}:1: not valid UTF-8"))
    for name, message in _empty_inputs(tmp_path).items():
        out.append((str(tmp_path / name), f"{tmp_path / name}: {message}"))
    return out


def test_cli_reports_each_bad_input_in_one_line_without_traceback(tmp_path, model_dir, capsys):
    cases = _cli_cases(tmp_path)
    capsys.readouterr()
    for spec, message in cases:
        assert _sft_run(tmp_path / "out", model_dir, spec) == 2, spec
        err = capsys.readouterr().err
        assert "Traceback" not in err, err
        # progress bars of the model loader may precede it; the error is one line, the last one
        errors = [line for line in err.splitlines() if line.startswith("posttrain")]
        assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
        assert errors[0].startswith(f"posttrain sft: error: {message}"), err

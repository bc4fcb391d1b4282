"""Reading rows: bundled datasets, JSONL/JSON/parquet/CSV files, saved datasets, and the errors of each."""

from __future__ import annotations

import json
import warnings

import datasets
import pytest

from rlhf.data.bundled import DATASETS
from rlhf.data.errors import BadRowReport, DataError, SkippedRowsWarning
from rlhf.data.formats import detect_format
from rlhf.data.loading import column_names, load_rows, looks_local

BUNDLED_FORMATS = {
    "sft_prompt_completion": "prompt_completion",
    "sft_mixed": "prompt_completion",
    "sft_messages": "messages",
    "sft_alpaca": "alpaca",
    "preference": "preference",
    "preference_chat": "preference",
    "unpaired": "unpaired",
    "prompts": "prompt",
}
ROWS = [
    {"prompt": "Describe the cat.", "completion": "The cat is warm.", "label": True},
    {"prompt": "Describe the dog.", "completion": "The dog is cold.", "label": False},
]


def write_lines(path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_bundled_names_cover_every_dataset():
    assert set(BUNDLED_FORMATS) == set(DATASETS)


@pytest.mark.parametrize("name", sorted(BUNDLED_FORMATS))
@pytest.mark.parametrize("split", ["train", "test"])
def test_bundled_loads_and_detects_its_format(name, split):
    rows, source = load_rows(f"bundled:{name}", split)
    assert len(rows) == (512 if split == "train" else 64)
    assert source.name.endswith(f"{name}.{split}.jsonl")
    assert source.line_numbers == tuple(range(1, len(rows) + 1))
    assert detect_format(column_names(rows)) == BUNDLED_FORMATS[name]


def test_bundled_unknown_name_or_split():
    with pytest.raises(DataError, match=r"unknown bundled dataset.*known"):
        load_rows("bundled:nope", "train")
    with pytest.raises(DataError, match=r"unknown split: 'dev'; available: \['test', 'train'\]"):
        load_rows("bundled:preference", "dev")


def test_jsonl_skips_blank_lines_and_keeps_line_numbers(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(ROWS[0]), "", "  ", json.dumps(ROWS[1])])
    rows, source = load_rows(path, "train")
    assert rows == ROWS
    assert source.line_numbers == (1, 4)
    assert source.locate(1) == (4, "line")


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", [json.dumps(ROWS[0]), "", '{"prompt": "x", "completion": '])
    with pytest.raises(DataError) as info:
        load_rows(path, "train")
    message = str(info.value)
    assert message.startswith(f"{path} line 3: malformed JSON")
    assert info.value.row == 3 and info.value.row_kind == "line" and info.value.source == path


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", [json.dumps(ROWS[0]), "[1, 2]"])
    with pytest.raises(DataError, match=r"train.jsonl line 2: not a JSON object: got list"):
        load_rows(path, "train")


def test_malformed_lines_in_skip_mode_are_counted(tmp_path):
    path = write_lines(tmp_path / "train.jsonl", ["{oops", json.dumps(ROWS[0]), "nope", json.dumps(ROWS[1]), "3"])
    report = BadRowReport(path)
    rows, source = load_rows(path, "train", report=report)
    assert rows == ROWS and source.line_numbers == (2, 4)
    assert report.counts == {"malformed JSON": 2, "not a JSON object": 1}
    with pytest.warns(SkippedRowsWarning) as record:
        report.warn(kept=len(rows))
    assert len(record) == 1
    text = str(record[0].message)
    assert "skipped 3 bad row(s), kept 2" in text
    assert "2 x malformed JSON" in text and "line 1" in text and "1 x not a JSON object" in text


def test_no_warning_when_nothing_skipped():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BadRowReport("x").warn(kept=3)


def test_json_list_and_json_lines_content(tmp_path):
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps(ROWS))
    rows, source = load_rows(str(listed), "train")
    assert rows == ROWS and source.line_numbers is None and source.locate(1) == (1, "row")

    as_lines = write_lines(tmp_path / "lines.json", [json.dumps(r) for r in ROWS])
    rows, source = load_rows(as_lines, "train")
    assert rows == ROWS and source.line_numbers == (1, 2)


def test_json_that_is_not_a_list(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('"text"')
    with pytest.raises(DataError, match="expected a JSON list of objects"):
        load_rows(str(path), "train")
    path.write_text('[{"a": 1}, 5]')
    with pytest.raises(DataError, match=r"d.json row 1 \(0-based\): not a JSON object"):
        load_rows(str(path), "train")


@pytest.mark.parametrize("suffix", ["parquet", "csv"])
def test_parquet_and_csv_round_trip(tmp_path, suffix):
    path = str(tmp_path / f"d.{suffix}")
    dataset = datasets.Dataset.from_list(ROWS)
    getattr(dataset, f"to_{suffix}")(path)
    rows, source = load_rows(path, "train")
    assert list(rows) == ROWS
    assert source.name == path
    assert detect_format(column_names(rows)) == "unpaired"


def test_csv_empty_cell_is_none(tmp_path):
    path = str(tmp_path / "alpaca.csv")
    datasets.Dataset.from_list(
        [
            {"instruction": "Say hi.", "input": None, "output": "Hi."},
            {"instruction": "Echo.", "input": "x", "output": "x"},
        ]
    ).to_csv(path)
    rows, _ = load_rows(path, "train")
    assert next(iter(rows))["input"] is None


def test_save_to_disk_dataset_dict(tmp_path):
    path = str(tmp_path / "saved")
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:1])}
    ).save_to_disk(path)
    rows, source = load_rows(path, "test")
    assert list(rows) == ROWS[:1] and source.name == f"{path}[test]"
    with pytest.raises(DataError, match=r"unknown split: 'dev'; available: \['test', 'train'\]"):
        load_rows(path, "dev")


def test_save_to_disk_single_dataset(tmp_path):
    path = str(tmp_path / "saved")
    datasets.Dataset.from_list(ROWS).save_to_disk(path)
    rows, _ = load_rows(path, "train")
    assert list(rows) == ROWS
    with pytest.raises(DataError, match="unknown split"):
        load_rows(path, "test")


def test_directory_that_is_not_a_saved_dataset(tmp_path):
    with pytest.raises(DataError, match="not a dataset directory"):
        load_rows(str(tmp_path), "train")


def test_single_file_has_only_a_train_split(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps(ROWS[0])])
    with pytest.raises(DataError, match="single file holds only the 'train' split"):
        load_rows(path, "test")


@pytest.mark.parametrize("path", ["data/missing.jsonl", "missing.parquet", "./missing", "/abs/dir/x", "a/b/c"])
def test_missing_local_path(path):
    with pytest.raises(DataError, match="no such file") as info:
        load_rows(path, "train")
    assert info.value.source == path


def test_local_versus_hub_ids():
    assert not looks_local("trl-lib/ultrafeedback_binarized")
    assert not looks_local("allenai/llama-3.1-tulu-3-8b-preference-mixture")
    assert not looks_local("imdb")
    assert looks_local("data/train.jsonl") and looks_local("~/d") and looks_local("a/b/c")


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("hello")
    with pytest.raises(DataError, match="unsupported file type"):
        load_rows(str(path), "train")


def test_unreachable_hub_dataset_is_one_clear_error(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'org/name' on the Hub (LocalEntryNotFoundError)\nlong traceback text")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as info:
        load_rows("org/name", "train")
    message = str(info.value)
    assert message.startswith("org/name: neither a local file/directory nor a reachable hub dataset")
    assert "long traceback" not in message
    assert info.value.__suppress_context__


def test_hub_unknown_split(monkeypatch):
    def unknown_split(*args, **kwargs):
        raise ValueError("Unknown split \"dev\". Should be one of ['train', 'test'].")

    monkeypatch.setattr(datasets, "load_dataset", unknown_split)
    with pytest.raises(DataError, match=r"org/name: unknown split: .*one of \['train', 'test'\]"):
        load_rows("org/name", "dev")

"""Reading raw rows from wherever a dataset lives.

``load_rows(path, split)`` accepts, in this order of recognition:

* ``bundled:NAME`` — a JSONL file shipped with rlhf (:mod:`rlhf.data.bundled`);
* an existing local ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` file;
* an existing directory written by ``datasets`` ``save_to_disk`` (a ``DatasetDict`` gives the split);
* anything else that does not look local: a hub dataset id, read with ``datasets.load_dataset``.

A single file holds one split, named ``train`` as in ``datasets.load_dataset("json", data_files=...)``;
asking it for another split is an error rather than silently evaluating on the training rows.

JSONL is parsed here line by line (blank lines ignored) so that a malformed line is reported
with its file and line number; other formats go through ``datasets``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf.data.errors import BadRowReport, DataError, Source

if TYPE_CHECKING:
    import datasets

Rows = Sequence[dict[str, Any]]
"""Rows as read: a ``list[dict]`` (JSON, JSONL) or a ``datasets.Dataset`` (iterating gives dicts)."""

BUNDLED_PREFIX = "bundled:"
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
SINGLE_FILE_SPLIT = "train"


def load_rows(path: str, split: str, *, report: BadRowReport | None = None) -> tuple[Rows, Source]:
    """Read the rows of ``split`` of the dataset at ``path``.

    Args:
        path: ``bundled:NAME``, a local file or saved-dataset directory, or a hub dataset id.
        split: split to read; a single file only has ``train``.
        report: in skip mode, malformed JSON lines are recorded here and skipped instead of raising.

    Returns:
        ``(rows, source)``: ``source.name`` names the file or dataset in errors and, for JSONL,
        ``source.line_numbers`` maps each row to its line.

    Raises:
        DataError: no such file, unknown split, malformed content, unreachable hub dataset.
    """
    if path.startswith(BUNDLED_PREFIX):
        return _load_bundled(path[len(BUNDLED_PREFIX) :], split, report)
    local = Path(path).expanduser()
    if local.is_dir():
        return _load_saved_dataset(local, split)
    if local.is_file():
        _check_single_file_split(local, split)
        return _load_file(local, report)
    if looks_local(path):
        raise DataError("no such file or directory", source=path)
    return _load_hub(path, split)


def looks_local(path: str) -> bool:
    """Whether ``path`` is meant as a local path rather than a hub id like ``org/name``.

    Local: starts with ``/``, ``.`` or ``~``, has a data-file suffix, or has more than one ``/``
    (a hub id has at most one, so a single slash alone does not make a path local).
    """
    return (
        path.startswith(("/", ".", "~")) or path.lower().endswith(LOCAL_SUFFIXES) or path.count("/") > 1 or "\\" in path
    )


def _load_bundled(name: str, split: str, report: BadRowReport | None) -> tuple[Rows, Source]:
    from rlhf.data.bundled import DATASETS as BUNDLED
    from rlhf.data.bundled import SIZES, bundled_path

    if name not in BUNDLED:
        raise DataError(
            "unknown bundled dataset", detail=f"{name!r}; known: {sorted(BUNDLED)}", source=f"bundled:{name}"
        )
    if split not in SIZES:
        raise DataError("unknown split", detail=f"{split!r}; available: {sorted(SIZES)}", source=f"bundled:{name}")
    return _load_file(bundled_path(name, split), report)


def _check_single_file_split(path: Path, split: str) -> None:
    if split != SINGLE_FILE_SPLIT:
        raise DataError(
            "unknown split",
            detail=f"{split!r}; a single file holds only the {SINGLE_FILE_SPLIT!r} split "
            f"(point eval_path at a held-out file and read its {SINGLE_FILE_SPLIT!r} split)",
            source=str(path),
        )


def _load_file(path: Path, report: BadRowReport | None) -> tuple[Rows, Source]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path, path.read_text(encoding="utf-8"), report)
    if suffix == ".json":
        return _read_json(path, report)
    if suffix in (".parquet", ".csv"):
        return _read_with_datasets(path, suffix[1:]), Source(str(path))
    raise DataError("unsupported file type", detail=f"{suffix!r}; use one of {LOCAL_SUFFIXES}", source=str(path))


def _read_jsonl(path: Path, text: str, report: BadRowReport | None) -> tuple[list[dict], Source]:
    rows: list[dict] = []
    line_numbers: list[int] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            reason, detail = "malformed JSON", f"{err.msg} at column {err.colno}"
        else:
            if isinstance(row, dict):
                rows.append(row)
                line_numbers.append(number)
                continue
            reason, detail = "not a JSON object", f"got {type(row).__name__}"
        error = DataError(reason, detail=detail, source=str(path), row=number, row_kind="line")
        if report is None:
            raise error
        report.record(error)
    return rows, Source(str(path), tuple(line_numbers))


def _read_json(path: Path, report: BadRowReport | None) -> tuple[list[dict], Source]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # several top-level values: JSON-lines content in a .json file
            return _read_jsonl(path, text, report)
        raise DataError("malformed JSON", detail=str(err), source=str(path)) from None
    if isinstance(data, dict):  # a single object is JSON-lines content with one line
        return _read_jsonl(path, text, report)
    if not isinstance(data, list):
        raise DataError("expected a JSON list of objects", detail=f"got {type(data).__name__}", source=str(path))
    rows: list[dict] = []
    for index, row in enumerate(data):
        if isinstance(row, dict):
            rows.append(row)
            continue
        error = DataError("not a JSON object", detail=f"got {type(row).__name__}", source=str(path), row=index)
        if report is None:
            raise error
        report.record(error)
    return rows, Source(str(path))


def _read_with_datasets(path: Path, builder: str) -> datasets.Dataset:
    import datasets

    try:
        return datasets.load_dataset(builder, data_files=str(path), split=SINGLE_FILE_SPLIT)
    except Exception as err:  # any reader failure is a bad file; keep the first line only
        raise DataError(f"cannot read {builder} file", detail=_first_line(err), source=str(path)) from None


def _load_saved_dataset(path: Path, split: str) -> tuple[Rows, Source]:
    import datasets

    try:
        saved = datasets.load_from_disk(str(path))
    except Exception as err:
        raise DataError(
            "not a dataset directory",
            detail=f"expected one written by datasets' save_to_disk ({_first_line(err)})",
            source=str(path),
        ) from None
    if isinstance(saved, datasets.DatasetDict):
        if split not in saved:
            raise DataError("unknown split", detail=f"{split!r}; available: {sorted(saved)}", source=str(path))
        return saved[split], Source(f"{path}[{split}]")
    if split != SINGLE_FILE_SPLIT:
        raise DataError(
            "unknown split",
            detail=f"{split!r}; a saved single Dataset holds only {SINGLE_FILE_SPLIT!r}",
            source=str(path),
        )
    return saved, Source(str(path))


def _load_hub(path: str, split: str) -> tuple[Rows, Source]:
    import datasets

    try:
        dataset = datasets.load_dataset(path, split=split)
    except ValueError as err:
        if "split" in str(err).lower():  # e.g. 'Unknown split "x". Should be one of ['train', 'test'].'
            raise DataError("unknown split", detail=_first_line(err), source=path) from None
        raise _unreachable(path, err) from None
    except Exception as err:  # network, auth, missing repo: one clear line, no deep traceback
        raise _unreachable(path, err) from None
    if not isinstance(dataset, datasets.Dataset):
        raise DataError("not a map-style dataset", detail=f"got {type(dataset).__name__}", source=path)
    return dataset, Source(f"{path}[{split}]")


def _unreachable(path: str, err: BaseException) -> DataError:
    return DataError(
        "neither a local file/directory nor a reachable hub dataset",
        detail=f"{type(err).__name__}: {_first_line(err)}",
        source=path,
    )


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def column_names(rows: Rows) -> list[str]:
    """Columns of ``rows``: a Dataset's columns, or the union of the keys of plain rows in first-seen order."""
    names = getattr(rows, "column_names", None)
    if names is not None:
        return list(names)
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)

"""Errors of the data layer, where they happened, and the report of rows skipped in skip mode.

Every bad-data error names the source (file or dataset id), the row, and the field, e.g.
``data/train.jsonl line 17, field 'chosen': empty response``. JSONL sources are located by
1-based *line* number (what an editor shows); every other source by 0-based *row* index
(what ``dataset[i]`` takes), and the message says which.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Literal

from cluster.errors import UserError


class DataError(UserError, ValueError):
    """A bad row or a dataset that cannot be read.

    Attributes:
        reason: short category of the problem (``"empty response"``), used to count skipped rows.
        detail: optional specifics (``"613 tokens > max_length 512"``).
        source: file path or dataset id, when known.
        row: 1-based line number when ``row_kind == "line"`` (JSONL), else 0-based row index.
        row_kind: ``"line"`` or ``"row"``.
        field: the column the problem is in, when there is one.
    """

    def __init__(
        self,
        reason: str,
        *,
        detail: str | None = None,
        source: str | None = None,
        row: int | None = None,
        row_kind: Literal["row", "line"] = "row",
        field: str | None = None,
    ) -> None:
        self.reason = reason
        self.detail = detail
        self.source = source
        self.row = row
        self.row_kind = row_kind
        self.field = field
        super().__init__(self._message())

    def _message(self) -> str:
        where = []
        if self.source is not None:
            where.append(self.source)
        if self.row is not None:
            where.append(f"line {self.row}" if self.row_kind == "line" else f"row {self.row} (0-based)")
        location = " ".join(where)
        if self.field is not None:
            location = f"{location}, field '{self.field}'" if location else f"field '{self.field}'"
        text = self.reason if self.detail is None else f"{self.reason}: {self.detail}"
        return f"{location}: {text}" if location else text

    def located(self, source: Source, index: int, field: str | None = None) -> DataError:
        """This error placed at row ``index`` of ``source`` (a field already set is kept unless ``field`` is given)."""
        row, row_kind = source.locate(index)
        return DataError(
            self.reason,
            detail=self.detail,
            source=source.name,
            row=row,
            row_kind=row_kind,
            field=field if field is not None else self.field,
        )


class ChatTemplateError(UserError, ValueError):
    """The tokenizer's chat template cannot be used to mask a conversation (missing or not prefix-consistent).

    Not a bad row: it concerns every conversational row, so skip mode never skips it.
    """


@dataclass(frozen=True)
class Source:
    """Where rows came from: a display name, plus the 1-based line number of each row for JSONL files.

    ``line_numbers[i]`` is the line of row ``i``; blank and skipped lines make it differ from ``i + 1``.
    """

    name: str
    line_numbers: tuple[int, ...] | None = None

    def locate(self, index: int) -> tuple[int, Literal["row", "line"]]:
        """``(number, kind)`` naming row ``index``: its line for JSONL, else the 0-based index itself."""
        if self.line_numbers is not None and 0 <= index < len(self.line_numbers):
            return self.line_numbers[index], "line"
        return index, "row"

    def __str__(self) -> str:
        return self.name


class SkippedRowsWarning(UserWarning):
    """Rows were skipped because ``on_bad_row='skip'``; the message has the counts by reason."""


class BadRowReport:
    """Counts rows skipped in skip mode, by reason, and emits one summary warning.

    Usage: ``record`` each :class:`DataError` of a skipped row, then ``warn(kept=...)`` once at the end.
    The warning names each reason with its count and the first row that had it, so a skipped row can be
    found; nothing is dropped silently.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.counts: Counter[str] = Counter()
        self.first: dict[str, str] = {}

    def record(self, error: DataError) -> None:
        """Count one skipped row."""
        self.counts[error.reason] += 1
        self.first.setdefault(error.reason, str(error))

    @property
    def total(self) -> int:
        """Number of rows skipped so far."""
        return sum(self.counts.values())

    def summary(self, kept: int) -> str:
        """One line: how many rows were skipped and why, and how many were kept."""
        reasons = "; ".join(
            f"{count} x {reason} (first: {self.first[reason]})" for reason, count in self.counts.most_common()
        )
        return f"{self.source}: skipped {self.total} bad row(s), kept {kept} (on_bad_row='skip'): {reasons}"

    def warn(self, kept: int, stacklevel: int = 3) -> None:
        """Emit the summary as one :class:`SkippedRowsWarning`, if any row was skipped.

        ``stacklevel`` 3 attributes it to the caller of the function that calls ``warn``.
        """
        if self.total:
            warnings.warn(self.summary(kept), SkippedRowsWarning, stacklevel=stacklevel)

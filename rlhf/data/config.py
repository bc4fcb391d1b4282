"""Typed configuration of the data a job reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class DataConfig:
    """Where the data comes from and how it becomes token sequences."""

    path: str = field(
        default="bundled:sft_prompt_completion",
        metadata={
            "help": "dataset: a hub id, a local .json/.jsonl/.parquet/.csv file, a saved `datasets` "
            "directory, or bundled:NAME for a dataset shipped with rlhf"
        },
    )
    split: str = field(default="train", metadata={"help": "split to train on"})
    eval_path: str | None = field(
        default=None, metadata={"help": "held-out dataset (same forms as path); empty: use eval_split of path"}
    )
    eval_split: str | None = field(
        default=None, metadata={"help": "split of path (or eval_path) for evaluation; empty: no evaluation"}
    )
    format: Literal["auto", "prompt_completion", "messages", "alpaca", "text", "preference", "unpaired", "prompt"] = (
        field(default="auto", metadata={"help": "row format; auto recognises it from the columns"})
    )
    max_length: int = field(default=512, metadata={"help": "maximum tokens per sequence (prompt + response)"})
    max_prompt_length: int | None = field(
        default=None, metadata={"help": "maximum prompt tokens; longer prompts are bad rows (empty: no limit)"}
    )
    truncation: Literal["response", "error"] = field(
        default="response",
        metadata={
            "help": "over-long rows: `response` cuts response tokens from the end (the prompt is kept whole; a "
            "prompt that leaves no room for a response is a bad row); `error` treats any over-long row as bad"
        },
    )
    on_bad_row: Literal["error", "skip"] = field(
        default="error",
        metadata={
            "help": "bad rows (malformed, missing field, empty response, too long): stop, or skip with a counted warning"
        },
    )
    packing: bool = field(
        default=False,
        metadata={
            "help": "padding-free batches, attention kept per example: sft packs examples into sequences, "
            "dpo runs each micro-batch's chosen and rejected sequences as one row"
        },
    )
    max_rows: int | None = field(default=None, metadata={"help": "use at most this many rows (empty: all)"})
    shuffle_seed: int = field(default=0, metadata={"help": "seed of the shuffle of training rows"})

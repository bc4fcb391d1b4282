"""Metrics from the workers to the driver: a small actor the rank-0 worker writes to.

The driver polls it while the trainer runs, shows a progress bar with rate and ETA,
appends every record to ``metrics.jsonl``, writes TensorBoard scalars to
``tensorboard/``, and at the end draws the curves to ``curves.png``. It works the same on one machine or
many, since nothing depends on a shared filesystem.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from pathlib import Path
from typing import Any

from rlhf import console

log = logging.getLogger(__name__)


class MetricsSink:
    """Holds metric records until the driver drains them (used as a Ray actor).

    Records are numbered as they arrive; the driver says how many it has written
    (:meth:`written`), so a worker can wait until its records are on disk before it takes a
    checkpoint (:meth:`rlhf.jobs.worker.Reporter.flush`).
    """

    def __init__(self) -> None:
        self._records: list[dict[str, Any]] = []
        self._received = 0
        self._written = 0

    def put(self, record: dict[str, Any]) -> int:
        """Add one record (a flat dict of numbers and strings); its number, counting from 1."""
        self._records.append(record)
        self._received += 1
        return self._received

    def drain(self) -> list[dict[str, Any]]:
        """Return and forget the records received since the last drain."""
        records, self._records = self._records, []
        return records

    def written(self, count: int | None = None) -> int:
        """How many records the driver has written; ``count`` (from the driver) sets it."""
        if count is not None:
            self._written = count
        return self._written


class RunLog:
    """A run's record on the driver: progress bar, ``metrics.jsonl``, TensorBoard scalars, and ``curves.png`` at the end.

    ``write`` takes flat records with a ``kind`` (``train``, ``eval``, ...) and a ``step``;
    numbers of train and eval records become TensorBoard scalars ``<kind>/<name>``, and
    ``postfix`` names the train metrics shown next to the bar.
    """

    def __init__(
        self,
        output_dir: Path,
        total_steps: int | None,
        description: str,
        postfix: tuple[str, ...] = ("loss", "grad_norm"),
        panels: list[tuple[str, str]] | None = None,
        initial_step: int = 0,
    ) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from tqdm.auto import tqdm

        self.output_dir = output_dir
        self.metrics_path = output_dir / "metrics.jsonl"
        self.description = description
        self.postfix = postfix
        self.panels = panels
        self.records: list[dict[str, Any]] = []
        _drop_torn_line(self.metrics_path)
        self.tensorboard = SummaryWriter(str(output_dir / "tensorboard"))
        self.bar = tqdm(
            total=total_steps,
            initial=initial_step,
            desc=description,
            unit="step",
            dynamic_ncols=True,
            file=console.stream(),
        )

    def write(self, records: list[dict[str, Any]]) -> None:
        """Append ``records`` to the file, TensorBoard and the bar."""
        if not records:
            return
        with self.metrics_path.open("a") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
        for record in records:
            self.records.append(record)
            if record.get("kind") in ("train", "eval"):
                for key, value in record.items():
                    if isinstance(value, int | float) and key not in ("step", "total_steps"):
                        self.tensorboard.add_scalar(f"{record['kind']}/{key}", value, record["step"])
            if record.get("kind") == "train":
                if self.bar.total is None and "total_steps" in record:
                    self.bar.total = record["total_steps"]
                self.bar.n = record["step"]
                shown = {k: record[k] for k in self.postfix if k in record}
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
                self.bar.refresh()

    def close(self) -> None:
        """Close the bar and TensorBoard and draw the curves of the whole run (this file's history)."""
        self.bar.close()
        self.tensorboard.close()
        from rlhf.jobs.plots import PANELS, plot_curves

        history = read_records(self.metrics_path)
        plot_curves(
            history, self.output_dir / "curves.png", f"{self.description}: {self.output_dir}", self.panels or PANELS
        )


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (none when it does not exist), without a line a crash cut short."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            records.append(json.loads(line))
    return records


def _drop_torn_line(path: Path) -> None:
    """Cut a last line without its newline (a process killed mid-append) so that appended records start a line."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with path.open("rb") as handle:
        handle.seek(-1, 2)
        if handle.read(1) == b"\n":
            return
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    log.warning("%s: dropping its last line, cut short by an earlier run (%d bytes)", path, len(data) - keep)
    with path.open("r+b") as handle:
        handle.truncate(keep)


class ProgressMonitor:
    """Driver side of the Ray Train jobs: polls a :class:`MetricsSink` actor in a thread into a :class:`RunLog`."""

    def __init__(self, sink: Any, output_dir: Path, total_steps: int | None, description: str) -> None:
        self.sink = sink
        self.log = RunLog(output_dir, total_steps, description)
        self._written = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def records(self) -> list[dict[str, Any]]:
        """Every record received so far."""
        return self.log.records

    def __enter__(self) -> ProgressMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()
        self.log.close()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self._poll()

    def _poll(self) -> None:
        import ray

        try:
            records = ray.get(self.sink.drain.remote(), timeout=30)
        except Exception:  # the cluster is shutting down; the last poll after fit() catches up
            return
        self.log.write(records)
        if records:
            self._written += len(records)
            self.sink.written.remote(self._written)  # on disk now: checkpoints after them may be taken

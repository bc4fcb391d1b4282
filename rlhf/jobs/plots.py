"""Curves of a run as PNG, drawn from its metric records at the end of the run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# (record kind, metric) pairs worth a panel, in order; those a run does not have are skipped
PANELS = [
    ("train", "loss"),
    ("eval", "eval_loss"),
    ("eval", "eval_accuracy"),
    ("eval", "eval_rewards/accuracy"),
    ("eval", "eval_rewards/margin"),
    ("train", "grad_norm"),
    ("train", "lr"),
    ("train", "items_per_second"),
]


def plot_curves(
    records: list[dict[str, Any]], path: Path, title: str, panels: list[tuple[str, str]] | None = None
) -> Path | None:
    """Write one PNG with a panel per available ``(kind, metric)`` of ``panels`` (default :data:`PANELS`) against
    the step; None when there is nothing to draw."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = []
    for kind, key in panels or PANELS:
        points = sorted({r["step"]: r[key] for r in records if r.get("kind") == kind and key in r}.items())
        if len(points) >= 2:
            series.append((key, points))
    if not series:
        return None
    columns = min(3, len(series))
    rows = (len(series) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
    for axis, (key, points) in zip(axes.flat, series, strict=False):
        steps, values = zip(*points, strict=True)
        axis.plot(steps, values, marker="o" if len(points) < 12 else None, markersize=3)
        axis.set_title(key)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(series) :]:
        axis.axis("off")
    figure.suptitle(title)
    figure.tight_layout()
    from rlhf.jobs.rundir import atomic_open

    with atomic_open(path, "wb") as handle:  # a curve file is whole or absent, like every run artefact
        figure.savefig(handle, dpi=100, format="png")
    plt.close(figure)
    return path

"""An evaluation report rendered as a markdown table and as a bar chart.

A report is a plain dict:

    {"model": str, "baseline": str | None, "dataset": str, "rows": int, "samples_per_prompt": int,
     "metrics": {name: {"value": float, "low": float | None, "high": float | None, "n": int}}}

with metric names such as "exact_match", "token_f1", "format", "reward", "self_consistency", "win_rate".
"""

from __future__ import annotations

from pathlib import Path


def _title(report: dict) -> str:
    baseline = report.get("baseline")
    return f"{report['model']} vs {baseline}" if baseline else str(report["model"])


def _interval(metric: dict) -> str:
    low, high = metric.get("low"), metric.get("high")
    if low is None or high is None:
        return "-"
    return f"[{low:.3f}, {high:.3f}]"


def markdown(report: dict) -> str:
    """The report as a header line and a `| metric | value | 95% interval | n |` table (values to 3 decimals)."""
    header = (
        f"**{_title(report)}** on {report['dataset']}: {report['rows']} rows, "
        f"{report['samples_per_prompt']} samples per prompt"
    )
    lines = [header, "", "| metric | value | 95% interval | n |", "|---|---|---|---|"]
    for name, metric in report["metrics"].items():
        lines.append(f"| {name} | {metric['value']:.3f} | {_interval(metric)} | {metric['n']} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> Path:
    """Write a horizontal bar chart of the metric values, with interval error bars where given, to `path` (PNG).

    Metrics on different scales (a reward can be negative or above 1) share one axis; each bar is annotated with
    its value so that small bars stay readable.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    names = list(report["metrics"])
    metrics = [report["metrics"][name] for name in names]
    values = [metric["value"] for metric in metrics]
    # asymmetric error bars; a metric without an interval gets zero-length bars
    errors = [
        [metric["value"] - metric["low"] if metric.get("low") is not None else 0.0 for metric in metrics],
        [metric["high"] - metric["value"] if metric.get("high") is not None else 0.0 for metric in metrics],
    ]
    figure, axes = plt.subplots(figsize=(7, 1.2 + 0.5 * len(names)))
    try:
        positions = range(len(names))
        axes.barh(positions, values, xerr=errors, capsize=4, color="tab:blue", alpha=0.8)
        axes.set_yticks(list(positions), names)
        axes.invert_yaxis()  # first metric on top, as in the markdown table
        axes.axvline(0.0, color="black", linewidth=0.8)
        for position, value, low_error, high_error in zip(positions, values, *errors, strict=True):
            # label past the end of the bar and its error bar: right of positive bars, left of negative ones
            if value >= 0:
                anchor, offset, align = value + high_error, (4, 0), "left"
            else:
                anchor, offset, align = value - low_error, (-4, 0), "right"
            axes.annotate(
                f"{value:.3f}", (anchor, position), xytext=offset, textcoords="offset points", va="center", ha=align
            )
        axes.margins(x=0.2)  # room for the labels inside the axes
        axes.set_title(_title(report))
        axes.set_xlabel(f"{report['dataset']} ({report['rows']} rows)")
        figure.tight_layout()
        figure.savefig(path, format="png")
    finally:
        plt.close(figure)
    return Path(path)

"""``make bench``: run every benchmark and write ``benchmarks/RESULTS.md``."""

from __future__ import annotations

import datetime
import logging

from benchmarks import sft
from benchmarks.common import RESULTS, machine, matmul_peak_flops


def main() -> None:
    """Run the benchmarks side by side and write the results file."""
    import os

    import transformers

    logging.basicConfig(level=logging.WARNING)
    transformers.logging.set_verbosity_error()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from rlhf.models.loading import resolve

    model_dir = resolve("tiny")
    peak = matmul_peak_flops()
    sections = [
        "# Benchmark results",
        "",
        f"Written by `make bench` on {datetime.date.today().isoformat()}; machine: {machine()}; "
        f"measured fp32 matmul peak: {peak / 1e9:,.1f} GFLOP/s. Shared machines are noisy: "
        "compare the ratios measured within one run, not absolute figures across runs.",
        "",
        sft.report(model_dir, peak),
        "",
    ]
    RESULTS.write_text("\n".join(sections))
    print(RESULTS.read_text())


if __name__ == "__main__":
    main()

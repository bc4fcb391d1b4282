"""``make bench``: run every benchmark and write ``benchmarks/RESULTS.md``.

``python -m benchmarks.run --quick`` runs a few steps of each (a smoke test; its figures mean
little); ``--only dpo`` (or ``sft``, ``grpo``, ``update``, ``serve``, ``scaling``) runs one benchmark. Either prints the sections
and leaves the results file alone.
"""

from __future__ import annotations

import argparse
import datetime
import logging

from benchmarks import dpo, grpo, policy_update, scaling, serve, sft
from benchmarks.common import RESULTS, machine, matmul_peak_flops

BENCHMARKS = {
    "sft": sft.report,
    "dpo": dpo.report,
    "grpo": grpo.report,
    "update": policy_update.report,
    "serve": serve.report,
    "scaling": scaling.report,
}
QUICK_STEPS, QUICK_WARMUP = 20, 5
QUICK = {
    "serve": {"seconds": 4.0, "rounds": 1},
    "dpo": {"steps": QUICK_STEPS, "warmup": QUICK_WARMUP, "repeats": 1},
    "sft": {"steps": QUICK_STEPS, "warmup": QUICK_WARMUP, "repeats": 1},
    "grpo": {"steps": 3, "rounds": 1},
    "update": {"rounds": 2},
    "scaling": {"steps": 2, "warmup": 1},
}  # benchmarks not measured in steps: their own quick arguments


def main() -> None:
    """Run the benchmarks side by side and write the results file."""
    import os

    import transformers

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a few steps each; print, do not write RESULTS.md")
    parser.add_argument("--only", choices=sorted(BENCHMARKS), action="append", help="run only these benchmarks")
    options = parser.parse_args()

    logging.basicConfig(level=logging.WARNING)
    transformers.logging.set_verbosity_error()
    # inherited by the processes that run each side (see benchmarks.common.isolated)
    quiet = {"TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1"}
    quiet |= {"HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
    for name, value in quiet.items():
        os.environ.setdefault(name, value)
    from rlhf.models.loading import resolve

    model_dir = resolve("tiny")
    peak = matmul_peak_flops()
    quick_steps = {"steps": QUICK_STEPS, "warmup": QUICK_WARMUP}
    sections = [
        "# Benchmark results",
        "",
        f"Written by `make bench` on {datetime.date.today().isoformat()}; machine: {machine()}; "
        f"measured fp32 matmul peak: {peak / 1e9:,.1f} GFLOP/s. Shared machines are noisy: "
        "compare the ratios measured within one run, not absolute figures across runs.",
    ]
    print("\n".join(sections), flush=True)
    for name, report in BENCHMARKS.items():
        if options.only is None or name in options.only:
            length = QUICK.get(name, quick_steps) if options.quick else {}
            sections += ["", report(model_dir, peak, **length)]
            print(sections[-1], flush=True)  # each section as it is done: a later failure loses only the rest
    text = "\n".join([*sections, ""])
    if options.quick or options.only:
        return
    RESULTS.write_text(text)
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()

"""Shared pieces of the benchmarks: the machine's matmul peak, model FLOPs, the results file."""

from __future__ import annotations

import platform
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "RESULTS.md"


def matmul_peak_flops(size: int = 1024, repeats: int = 20) -> float:
    """Measured fp32 matmul FLOP/s of this machine with all torch threads (best of ``repeats``)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def training_flops_per_token(model_dir: str, sequence_length: int) -> float:
    """Model FLOPs of one trained token: 6 x (non-embedding weights incl. the LM head) + attention scores."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_config(config)
    weights = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    attention = 12 * config.num_hidden_layers * config.hidden_size * sequence_length
    return 6 * weights + attention


def machine() -> str:
    """A one-line description of this machine."""
    import os

    import torch

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"

"""Data generation and evaluation: batch generation, synthetic data, judges, best-of-n, iterative DPO, eval."""

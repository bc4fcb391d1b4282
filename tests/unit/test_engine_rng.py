"""The random generators' states in a checkpoint load with ``torch.load(..., weights_only=True)``.

Before: the RNG file held NumPy's state as a pickled array, so resuming read it with ``weights_only=False``,
which runs whatever a (possibly tampered) checkpoint file holds. The DeepSpeed part of the checkpoint is stood
in (it is exercised in tests/distributed/test_engine.py); the RNG file is the engine's own.
"""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rlhf.engine import TrainingEngine


def _engine() -> TrainingEngine:
    """A TrainingEngine whose DeepSpeed engine only says where its checkpoint is."""
    engine = TrainingEngine.__new__(TrainingEngine)
    engine.rank = 0
    engine.engine = SimpleNamespace(
        save_checkpoint=lambda directory, tag, client_state: None,
        load_checkpoint=lambda directory, tag: (directory, {"step": 3}),
    )
    return engine


def _draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def test_the_rng_file_loads_with_weights_only_and_restores_every_generator(tmp_path: Path) -> None:
    engine = _engine()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    engine.save_checkpoint(tmp_path)
    state = torch.load(tmp_path / "rng_rank0.pt", weights_only=True)
    assert set(state) == {"python", "numpy", "torch", "cuda"}
    expected = _draws()
    random.seed(10), np.random.seed(20), torch.manual_seed(30)
    assert engine.load_checkpoint(tmp_path) == {"step": 3}
    assert _draws() == expected
    assert [p.name for p in tmp_path.iterdir()] == ["rng_rank0.pt"]  # no temporary file left behind


def test_an_rng_file_of_the_old_format_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    """The earlier format cannot be read safely; it is refused, naming the file and what to do, not loaded."""
    old = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(), "cuda": None}
    torch.save(old, tmp_path / "rng_rank0.pt")
    with pytest.raises(ValueError, match=r"rng_rank0\.pt: this RNG state cannot be read with .*weights_only=True"):
        _engine().load_checkpoint(tmp_path)

"""Where the jobs' example configurations live (rlhf/configs/<job>.yaml): the CLI, the demo and the tests read them
from here."""

from __future__ import annotations

from pathlib import Path

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "configs"

"""Ray Train settings for the job tests (the shared cluster fixture is in tests/conftest.py)."""

from __future__ import annotations

import os

# Ray Train's controller registers reported checkpoints (and notices dead workers) at this
# interval, 2 s by default. The tiny models here train a step in ~0.1 s, so the tests poll
# 10x faster to keep "a checkpoint is durable within a step of being written" true, as it
# is with real step times.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

"""An RL run's checkpoints: ``checkpoints/step-N`` with every trainable group's part and the driver's state.

``state.json`` is written last and whole (renamed into place), so a directory with a readable one
is a complete checkpoint; resuming reads the newest such directory.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf.jobs.rundir import write_json

if TYPE_CHECKING:
    from rlhf.rl.roles import Roles

log = logging.getLogger(__name__)


def _checkpoint_dirs(output_dir: Path) -> list[tuple[int, Path]]:
    """``(step, directory)`` of every ``checkpoints/step-N``, newest first."""
    found = []
    for directory in (output_dir / "checkpoints").glob("step-*"):
        step = directory.name.removeprefix("step-")
        if step.isdigit() and directory.is_dir():
            found.append((int(step), directory))
    return sorted(found, reverse=True)


def latest_checkpoint(output_dir: Path, warn: bool = False) -> tuple[Path, dict[str, Any]] | None:
    """The newest complete checkpoint and its driver state.

    A newer checkpoint without a readable ``state.json`` was cut short and is passed over (``warn``: with a warning
    naming it).
    """
    for _, directory in _checkpoint_dirs(output_dir):
        try:
            state = json.loads((directory / "state.json").read_text())
            if not isinstance(state, dict) or not isinstance(state.get("step"), int):
                raise ValueError(f"no step in {state!r:.80}")
        except (OSError, ValueError) as exc:
            if warn:
                reason = "no state.json" if isinstance(exc, FileNotFoundError) else f"unreadable state.json: {exc}"
                log.warning("checkpoint %s is incomplete (%s); resuming from an earlier one", directory, reason)
            continue
        return directory, state
    return None


def checkpoint(roles: Roles, output_dir: Path, state: dict[str, Any], keep: int, timeout_s: float) -> Path:
    """Save every trainable group and the driver's state under ``checkpoints/step-N``; keep the newest ``keep``.

    A directory left at this step, or at a later one, by an earlier attempt (a run resumed from before it) is removed
    first: its ``state.json`` must not vouch for shards this run writes, or count among the kept.
    """
    directory = output_dir / "checkpoints" / f"step-{state['step']}"
    for step, old in _checkpoint_dirs(output_dir):
        if step >= state["step"]:
            (old / "state.json").unlink(missing_ok=True)  # first: what is left of it is then never loaded
            shutil.rmtree(old, ignore_errors=True)
    calls = [group.save(directory / group.role, timeout_s) for group in roles.trainable()]
    for call in calls:
        call.result()
    write_json(directory / "state.json", state)
    for _, old in _checkpoint_dirs(output_dir)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return directory


def restore(roles: Roles, directory: Path, timeout_s: float) -> None:
    """Load a checkpoint written by :func:`checkpoint` into the groups."""
    calls = [group.restore(directory / group.role, timeout_s) for group in roles.trainable()]
    for call in calls:
        call.result()

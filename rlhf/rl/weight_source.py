"""The policy's parameters as vLLM's weight-transfer API reads them (a ``WeightSource``), under Hugging Face names.

Unsharded parameters (ZeRO 0-2) are read in place. ZeRO-3 parameters are partitioned
over the policy's ranks: :class:`ZeroGatheredSource` gathers one layer at a time (every
rank must iterate it together, since gathering is a collective) and yields copies, so at
most one layer is held whole at once. A policy with LoRA adapters is sent as the full model
the replicas serve: :class:`MergedLoraSource` yields each adapted weight with its adapters'
delta added, under the base model's names (a tied output layer is not a parameter of its
own, so it is not sent; the replicas refresh it from the embeddings).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

import torch
from vllm.distributed.weight_transfer.base import ModuleSource, ParamMeta, WeightSource, layerwise_groups

if TYPE_CHECKING:
    from peft import PeftModel


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


class MergedLoraSource(WeightSource):
    """The base weights of a peft LoRA model with its active adapters merged in, under the base model's names."""

    def __init__(self, module: torch.nn.Module) -> None:
        self._module = module

    def _named(self) -> Iterator[tuple[str, torch.nn.Parameter, Any]]:
        """``(name, base parameter, LoRA layer or None)`` of every base parameter, adapters' own left out."""
        from peft.tuners.lora import LoraLayer

        base = cast("PeftModel", self._module).get_base_model()  # the module is a peft model (see the class)
        adapted = {name: module for name, module in base.named_modules() if isinstance(module, LoraLayer)}
        for name, param in base.named_parameters():
            owner, _, leaf = name.rpartition(".")
            if owner in adapted or any(part.startswith("lora_") for part in name.split(".")):
                continue  # the adapters' own parameters
            layer_name = owner.removesuffix(".base_layer")
            layer = adapted.get(layer_name) if owner.endswith(".base_layer") else None
            yield (f"{layer_name}.{leaf}" if layer is not None else name), param, layer if leaf == "weight" else None

    def metadata(self) -> list[ParamMeta]:
        """Name, dtype and shape of every weight sent, in the order of iteration."""
        return [ParamMeta(name, param.dtype, tuple(param.shape)) for name, param, _ in self._named()]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        with torch.no_grad():
            for name, param, layer in self._named():
                if layer is None or layer.merged:
                    yield name, param.detach()
                else:
                    deltas = [layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A]
                    yield name, (param.detach() + sum(deltas)) if deltas else param.detach()


def weight_source(module: torch.nn.Module, zero_stage: int) -> WeightSource:
    """The ``WeightSource`` of a training engine's module."""
    from rlhf.models.loading import is_peft

    if is_peft(module):
        if zero_stage == 3:
            raise ValueError("a LoRA policy is sent to the replicas unsharded: use engine.zero_stage 0-2 with LoRA")
        return MergedLoraSource(module)
    return ZeroGatheredSource(module) if zero_stage == 3 else ModuleSource(module)

"""A causal LM's logits at the positions a loss scores only.

A loss over labels (SFT's next-token NLL, the sequence log-probs of DPO and KTO) reads the logits of the positions
that predict a scored label; the prompt's positions and the padding past every row's end need none. On a real
vocabulary (49k-150k) the output layer and the softmax over it are a large share of a step, so transformers'
``logits_to_keep`` (the positions whose logits the model computes) is given those positions. A model whose forward
has no ``logits_to_keep`` computes them all, and the same positions are taken from its logits.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch

from rlhf.algos.logprobs import IGNORE_INDEX, scored_positions


@functools.cache
def _forward_takes_logits_to_keep(module_type: Any) -> bool:
    forward = getattr(module_type, "forward", None)  # None: a plain callable, computing every position's logits
    return forward is not None and "logits_to_keep" in inspect.signature(forward).parameters


def takes_logits_to_keep(model: Callable[..., Any]) -> bool:
    """Whether the causal LM under ``model`` (a DeepSpeed engine, a PEFT wrapper, or the model) can compute the
    logits of some positions only (transformers' ``logits_to_keep``)."""
    module: Any = getattr(model, "module", model)
    base = getattr(module, "get_base_model", None)
    module = base() if callable(base) else module
    module_type: Any = type(module)
    return _forward_takes_logits_to_keep(module_type)


def label_logits(
    model: Callable[..., Any], inputs: dict[str, torch.Tensor], labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The logits that predict the scored labels, computed at those positions only where the model can.

    Args:
        model: a causal LM (or its engine or PEFT wrapper), called with ``inputs`` and ``use_cache=False``.
        inputs: the model's inputs (``input_ids`` and ``attention_mask`` or ``position_ids``).
        labels: [B, T], aligned with the input ids, ``ignore_index`` where not scored.

    Returns:
        logits [B, K, V] at the K positions of :func:`~rlhf.algos.logprobs.scored_positions`, the labels they
        predict [B, K] (``labels[:, positions + 1]``), and the positions [K]: pass the first two to the losses
        with ``shifted=True``.
    """
    positions = scored_positions(labels, ignore_index)
    if takes_logits_to_keep(model):
        logits = model(**inputs, use_cache=False, logits_to_keep=positions).logits
    else:
        logits = model(**inputs, use_cache=False).logits[:, positions]
    return logits, labels[:, positions + 1], positions

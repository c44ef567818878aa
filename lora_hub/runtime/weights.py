"""Merging into a base layer's weight, and restoring the weight exactly.

Restoring never subtracts: merging first copies the original tensors aside (for 8-bit layers the int8 codes and
row scales, for 4-bit layers the packed weight and its quantization state), and unmerging copies them back. So
any number of merge/unmerge cycles leaves the weights bit for bit as they were, and a merge always starts from the
original weights, never from the last merge. The merged values are written into the original storage, so a merged
model computes on the very memory the base model did (freshly allocated weights measured 10-15% slower on CPU).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class Snapshot:
    """What a merge changed, to put back: tensors to copy back into, and attributes to set back."""

    copies: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    attributes: list[tuple[Any, str, Any]] = field(default_factory=list)


def restore(snapshot: Snapshot) -> None:
    """Puts back exactly what a merge changed."""
    for target, original in snapshot.copies:
        target.copy_(original)
    for holder, name, value in snapshot.attributes:
        setattr(holder, name, value)


def merge_float(layer: nn.Module, add: Callable[[torch.Tensor], None]) -> Snapshot:
    """Backs up a float layer's weight, then lets `add` update it in place."""
    weight = layer.weight.data
    snapshot = Snapshot(copies=[(weight, weight.clone())])
    add(weight)
    return snapshot


def merge_delta(layer: nn.Module, kind: str, delta: torch.Tensor) -> Snapshot:
    """Adds `delta` (float32, shaped like the stored weight) to a quantized layer's weight; returns what restores
    it."""
    return {"int8": _merge_int8, "4bit": _merge_4bit}[kind](layer, delta)


def _merge_int8(layer: nn.Module, delta: torch.Tensor) -> Snapshot:
    """Dequantizes the original codes, adds the delta, and requantizes row-wise (LLM.int8()), in place."""
    import bitsandbytes.functional as bnbf

    weight, state = layer.weight, layer.state
    codes = state.CB if state.CB is not None else weight.data
    scales = state.SCB if state.SCB is not None else weight.SCB
    snapshot = Snapshot(copies=[(codes, codes.clone()), (scales, scales.clone())])
    merged = bnbf.int8_vectorwise_dequant(codes, scales).float() + delta.to(codes.device)
    new_codes, new_scales, _ = bnbf.int8_vectorwise_quant(merged.to(torch.float16))  # as Int8Params quantizes
    codes.copy_(new_codes)
    scales.copy_(new_scales)
    return snapshot


def _merge_4bit(layer: nn.Module, delta: torch.Tensor) -> Snapshot:
    """Dequantizes the original 4-bit weight, adds the delta, and quantizes it again with the same settings. The
    original parameter, and a copy of its quantization state (which bitsandbytes may repack in place), are kept."""
    import bitsandbytes as bnb

    weight = layer.weight
    snapshot = Snapshot(copies=[(weight.data, weight.data.clone())],
                        attributes=[(layer, "weight", weight),
                                    (weight, "quant_state", copy.deepcopy(weight.quant_state))])
    dense = bnb.functional.dequantize_4bit(weight.data, copy.deepcopy(weight.quant_state)).float()
    dense += delta.to(weight.device)
    layer.weight = bnb.nn.Params4bit(dense.to(weight.quant_state.dtype), requires_grad=False,
                                     quant_type=weight.quant_type, blocksize=weight.blocksize,
                                     compress_statistics=weight.compress_statistics,
                                     quant_storage=weight.quant_storage).to(weight.device)
    return snapshot


def replace_attribute(holder: Any, name: str, value: Any) -> Snapshot:
    """Sets holder.<name> to `value` (a new parameter: for weights shared with another layer, or of another shape),
    keeping the old object to put back."""
    snapshot = Snapshot(attributes=[(holder, name, getattr(holder, name))])
    setattr(holder, name, value)
    return snapshot


def dequantized(layer: nn.Module, kind: str) -> torch.Tensor:
    """The weight of a quantized layer as floats (as stored, (out, in)): int8 codes times their row scales, or the
    4-bit weight dequantized with its state."""
    if kind == "int8":
        import bitsandbytes.functional as bnbf

        state = layer.state
        codes = state.CB if state.CB is not None else layer.weight.data
        scales = state.SCB if state.SCB is not None else layer.weight.SCB
        return bnbf.int8_vectorwise_dequant(codes, scales)
    if kind == "4bit":
        import bitsandbytes as bnb

        return bnb.functional.dequantize_4bit(layer.weight.data, copy.deepcopy(layer.weight.quant_state))
    return layer.weight

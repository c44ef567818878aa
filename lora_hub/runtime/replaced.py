"""Modules that adapters replace rather than adapt (PEFT's modules_to_save, such as a task head): the original and
one copy per adapter that replaces it, chosen by the selection the LoRA layers share."""

from __future__ import annotations

import torch
from torch import nn

from .selection import Mode, Selection


class ReplacedModule(nn.Module):
    """A module that some adapters replace (PEFT's modules_to_save, such as a task head): it runs the active
    adapter's copy, or the original when no active adapter replaces it; with routed rows, each row its own."""

    def __init__(self, original: nn.Module, selection: Selection) -> None:
        super().__init__()
        self.original = original
        self.variants = nn.ModuleDict()
        self.selection = selection
        self.pinned: int | None = None

    def forward(self, x: torch.Tensor, *args, **kwargs):
        selection = self.selection
        if self.pinned is not None:
            return self.variants[str(self.pinned)](x, *args, **kwargs)
        if selection.mode is Mode.LANES:
            chosen = [s for s in selection.lane_slots if str(s) in self.variants]
            return (self.variants[str(chosen[0])] if chosen else self.original)(x, *args, **kwargs)
        if selection.mode is Mode.ROWS:
            return self._rows(x, selection.row_slots, selection.row_weights, *args, **kwargs)
        return self.original(x, *args, **kwargs)

    def _rows(self, x: torch.Tensor, slots: list[int], weights: list[float], *args, **kwargs):
        keys = [str(s) if w and str(s) in self.variants else None for s, w in zip(slots, weights, strict=True)]
        result = None
        for key in dict.fromkeys(keys):
            index = torch.tensor([i for i, k in enumerate(keys) if k == key], device=x.device)
            out = (self.variants[key] if key else self.original)(x.index_select(0, index), *args, **kwargs)
            if result is None:
                result = out.new_empty((x.shape[0], *out.shape[1:]))
            result.index_copy_(0, index, out)
        return result

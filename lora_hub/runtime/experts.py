"""LoRA on the 3-D expert parameters of mixture-of-experts blocks (PEFT's target_parameters): one update per expert,
applied by computing the block with its parameters plus the selected updates, as PEFT does.

    ExpertsModule          wraps a block's experts module (Mixtral's MixtralExperts, Qwen3-MoE's, ...)
      params[name]         an ExpertParamLayer per adapted parameter, with the slots of every adapter:
        lora_A  (slots, experts * rank, in)    rows e * rank + k   (expert-major, as PEFT stores them)
        lora_B  (slots, out, rank * experts)   columns k * E + e  (rank-major, as PEFT stores them)

A lower-rank adapter is zero-padded within each expert's block of rows and columns, so the layout (and PEFT's
pairing of rows and columns) holds at every rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .layers import SlotLayer
from .selection import Mode, Selection
from .weights import Snapshot


class ExpertParamLayer(SlotLayer):
    """The slots of one expert parameter (see the module docs). Its module computes; this holds and merges."""

    def __init__(self, owner: nn.Module, name: str, selection: Selection, lora_A: torch.Tensor,
                 lora_B: torch.Tensor, *, experts: int, transposed: bool) -> None:
        super().__init__(selection, "experts", lora_A, lora_B)
        self.param_name = name
        self.experts = experts
        self.transposed = transposed
        self._owner = [owner]  # the experts module (a list: not a submodule of this one)

    @property
    def base_layer(self) -> nn.Module:
        return self._owner[0]

    @property
    def rank(self) -> int:
        return self.lora_A.shape[1] // self.experts

    def reserve(self, slots: int, rank: int) -> None:
        old_slots, old_rank = self.slots, self.rank
        if (slots, rank) == (old_slots, old_rank):
            return
        keep_slots, keep_rank = min(slots, old_slots), min(rank, old_rank)
        e, out_f, in_f = self.experts, self.out_features, self.in_features
        a = self.lora_A.new_zeros(slots, e, rank, in_f)
        b = self.lora_B.new_zeros(slots, out_f, rank, e)
        if keep_slots and keep_rank:
            a[:keep_slots, :, :keep_rank] = self.lora_A[:keep_slots].view(keep_slots, e, old_rank, in_f)[
                :, :, :keep_rank]
            b[:keep_slots, :, :keep_rank] = self.lora_B[:keep_slots].view(keep_slots, out_f, old_rank, e)[
                :, :, :keep_rank]
        self.lora_A, self.lora_B = a.reshape(slots, e * rank, in_f), b.reshape(slots, out_f, rank * e)
        self.scaling = torch.cat([self.scaling[:keep_slots], self.scaling.new_zeros(slots - keep_slots)])
        self._scalings = self._scalings[:keep_slots] + [0.0] * (slots - keep_slots)

    def write(self, slot: int, lora_A: torch.Tensor | None, lora_B: torch.Tensor | None, scaling: float,
              enable_lora: tuple[bool, ...] | None, *, rank: int) -> None:
        e, padded = self.experts, self.rank
        a = self.lora_A[slot].view(e, padded, self.in_features)
        b = self.lora_B[slot].view(self.out_features, padded, e)
        a.zero_()
        b.zero_()
        a[:, :rank].copy_(lora_A.reshape(e, rank, self.in_features))
        b[:, :rank].copy_(lora_B.reshape(self.out_features, rank, e))
        self.set_scaling(slot, scaling)

    def write_features(self, slot: int, **_: object) -> None:
        """Expert modules have no biases, DoRA or base weights (FORMAT.md section 6)."""

    def expert_update(self, slots: Sequence[int], weights: Sequence[float], dtype: torch.dtype) -> torch.Tensor:
        """sum_k weights[k] * scaling * delta_k, shaped like the parameter ((experts, out, in), or (experts, in,
        out) when transposed), computed in `dtype`."""
        e, padded = self.experts, self.rank
        total = None
        for slot, weight in zip(slots, weights, strict=True):
            coefficient = self._scalings[slot] * weight
            if not coefficient:
                continue
            a = self.lora_A[slot].view(e, padded, self.in_features).to(dtype)
            b = self.lora_B[slot].view(self.out_features, padded, e).to(dtype)
            delta = torch.einsum("ore,eri->eoi", b, a) * coefficient
            total = delta if total is None else total + delta
        if total is None:
            return None
        return total.transpose(-2, -1) if self.transposed else total

    def merge(self, slots: Sequence[int], weights: Sequence[float]) -> Snapshot:
        param = getattr(self.base_layer, self.param_name)
        snapshot = Snapshot(copies=[(param.data, param.data.clone())])
        update = self.expert_update(slots, weights, torch.float32)
        if update is not None:
            param.data.copy_((param.data.float() + update).to(param.dtype))
        return snapshot


class ExpertsModule(nn.Module):
    """A mixture-of-experts block's experts module, computed with its adapted parameters plus the selected
    updates (lanes: the weighted sum; rows: each row's adapter, the rows of one adapter together)."""

    def __init__(self, base_layer: nn.Module, selection: Selection) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.selection = selection
        self.params = nn.ModuleDict()

    def forward(self, *args, **kwargs):
        selection = self.selection
        if selection.mode is Mode.OFF or not len(self.params):
            return self.base_layer(*args, **kwargs)
        if selection.mode is Mode.LANES:
            return self._call(selection.lane_slots, selection.lane_weights, args, kwargs)
        return self._rows(args, kwargs)

    def _call(self, slots: Sequence[int], weights: Sequence[float], args, kwargs):
        replaced = {}
        for name, layer in self.params.items():
            param = getattr(self.base_layer, name)
            update = layer.expert_update(slots, weights, param.dtype)
            if update is not None:
                replaced[name] = param + update
        if not replaced:
            return self.base_layer(*args, **kwargs)
        return torch.func.functional_call(self.base_layer, replaced, args, kwargs)

    def _rows(self, args, kwargs):
        """Routed rows: the block flattens (batch, tokens) into its first dimension, each row's tokens together; the
        tokens of the rows of one adapter are computed with that adapter's parameters."""
        selection = self.selection
        slots, weights = selection.row_slots, selection.row_weights
        hidden = args[0]
        batch = len(slots)
        if hidden.shape[0] % batch:
            raise ValueError(f"the experts see {hidden.shape[0]} tokens, not a multiple of the {batch} routed rows")
        per_row = hidden.shape[0] // batch
        total = hidden.shape[0]
        result = None
        groups: dict[tuple[int, float], list[int]] = {}
        for row, key in enumerate(zip(slots, weights, strict=True)):
            groups.setdefault(key if key[1] else (-1, 0.0), []).append(row)
        for (slot, weight), rows in groups.items():
            index = torch.cat([torch.arange(r * per_row, (r + 1) * per_row, device=hidden.device) for r in rows])

            def pick(value, index=index):
                return value.index_select(0, index) if isinstance(value, torch.Tensor) and value.dim() and \
                    value.shape[0] == total else value

            part_args = tuple(pick(a) for a in args)
            part_kwargs = {k: pick(v) for k, v in kwargs.items()}
            out = self._call([slot], [weight], part_args, part_kwargs) if slot >= 0 else \
                self.base_layer(*part_args, **part_kwargs)
            if result is None:
                result = out.new_zeros((total, *out.shape[1:]))
            result.index_copy_(0, index, out)
        return result

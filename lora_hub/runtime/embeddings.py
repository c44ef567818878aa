"""The LoRA path around an embedding layer, with the two things adapters change there besides a low-rank update:
the whole embedding matrix they may bring (PEFT saves it with embedding LoRA, a resized vocabulary included), and
replacement rows for some tokens (PEFT's trainable tokens). A tied output projection shows the same rows in its
logits (`OutputRows`, used by LoraLayer).

    lora_A      (slots, rank, vocabulary)
    lora_B      (slots, width, rank)
    base_weights {slot: (vocabulary', width)}      kept only where it differs from the layer's own
    tokens       {slot: (sorted indices, rows)}
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import SlotLayer, _same
from .selection import Mode, Selection
from .weights import Snapshot, merge_float, replace_attribute


class TokenRows:
    """Replacement rows of some tokens, per slot: the indices sorted, and their rows in that order."""

    def __init__(self) -> None:
        self.by_slot: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def set(self, slot: int, indices: Sequence[int], rows: torch.Tensor, device: torch.device,
            dtype: torch.dtype) -> None:
        order = sorted(range(len(indices)), key=lambda i: indices[i])
        index = torch.tensor([indices[i] for i in order], dtype=torch.long, device=device)
        self.by_slot[slot] = (index, rows.to(device, dtype)[torch.tensor(order, device=device)])

    def renumber(self, slots: Sequence[int]) -> None:
        self.by_slot = {new: self.by_slot[old] for new, old in enumerate(slots) if old in self.by_slot}

    def apply(self, fn) -> None:
        self.by_slot = {s: (index, fn(rows)) for s, (index, rows) in self.by_slot.items()}

    def lookup(self, result: torch.Tensor, tokens: torch.Tensor, slot: int) -> torch.Tensor:
        """`result` (an embedding lookup of `tokens`) with the slot's tokens replaced by their rows."""
        index, rows = self.by_slot[slot]
        position = torch.searchsorted(index, tokens).clamp_(max=index.numel() - 1)
        hit = index[position] == tokens
        return torch.where(hit[..., None], rows[position].to(result.dtype), result)

    def logits(self, result: torch.Tensor, h: torch.Tensor, slot: int, bias: torch.Tensor | None) -> torch.Tensor:
        """`result` (logits over the vocabulary) with the slot's tokens computed from their rows (a tied output
        projection sees the embedding's replacement rows)."""
        index, rows = self.by_slot[slot]
        values = h.to(rows.dtype) @ rows.T
        if bias is not None:
            values = values + bias[index]
        result = result.clone()
        result[..., index] = values.to(result.dtype)
        return result


class EmbeddingLoraLayer(SlotLayer):
    """An nn.Embedding plus the LoRA paths, base matrices and token rows of every resident adapter (FORMAT.md
    section 8): y = E[x] + s * (A^T[x] @ B^T), with E the slot's own matrix if it brings one and its token rows
    replacing theirs."""

    def __init__(self, base_layer: nn.Embedding, selection: Selection, kind: str, lora_A: torch.Tensor,
                 lora_B: torch.Tensor) -> None:
        super().__init__(selection, kind, lora_A, lora_B)
        self.base_layer = base_layer
        self.tokens = TokenRows()
        self.tied = False

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self.tokens.apply(fn)
        return self

    def reserve(self, slots: int, rank: int) -> None:
        super().reserve(slots, rank)
        self.tokens.by_slot = {s: v for s, v in self.tokens.by_slot.items() if s < slots}

    def select_slots(self, slots: Sequence[int]) -> None:
        super().select_slots(slots)
        self.tokens.renumber(slots)

    def clear(self, slot: int) -> None:
        super().clear(slot)
        self.tokens.by_slot.pop(slot, None)

    def write_features(self, slot: int, *, bias: torch.Tensor | None, magnitude: torch.Tensor | None,
                       base_weight: torch.Tensor | None) -> None:
        self.base_weights.pop(slot, None)
        self.tokens.by_slot.pop(slot, None)  # the adapter's own token rows, if any, are written after this
        if base_weight is not None and not _same(base_weight, self.base_layer.weight):
            self.base_weights[slot] = base_weight.to(self.lora_A.device, self.base_layer.weight.dtype)

    def write_tokens(self, slot: int, indices: Sequence[int], rows: torch.Tensor) -> None:
        self.tokens.set(slot, indices, rows, self.lora_A.device, self.base_layer.weight.dtype)

    # --- computing ---------------------------------------------------------------------------------------------

    def _lookup(self, x: torch.Tensor, slot: int | None) -> torch.Tensor:
        layer = self.base_layer
        weight = self.base_weights.get(slot, layer.weight) if slot is not None else layer.weight
        result = F.embedding(x, weight, layer.padding_idx, layer.max_norm, layer.norm_type, layer.scale_grad_by_freq,
                             layer.sparse)
        if slot is not None and slot in self.tokens.by_slot:
            result = self.tokens.lookup(result, x, slot)
        return result

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        selection = self.selection
        if selection.mode is Mode.OFF or self.slots == 0:
            return self.base_layer(x)
        device = self.lora_A.device
        if selection.mode is Mode.LANES:
            slots, weights = selection.lane_slots, selection.lane_weights
            result = self._lookup(x, slots[0] if len(slots) == 1 else None)
            for slot, weight in zip(slots, weights, strict=True):  # stacked: the tokens of at most one adapter
                if len(slots) > 1 and slot in self.tokens.by_slot:
                    result = self.tokens.lookup(result, x, slot)
                coefficient = self._scalings[slot] * weight
                if coefficient:
                    after_a = F.embedding(x, self.lora_A[slot].T)
                    result = result + ((after_a @ self.lora_B[slot].T) * coefficient).to(result.dtype)
            return result
        index, weight = selection.rows(device)
        slots = selection.row_slots
        if x.shape[0] != len(slots):
            raise ValueError(f"the batch has {x.shape[0]} rows but route() was given {len(slots)} adapters")
        rows = [self._lookup(x[i], slot if selection.row_weights[i] else None) for i, slot in enumerate(slots)]
        if len({r.shape[-1] for r in rows}) > 1:
            raise ValueError("route() mixes adapters with different embedding widths")
        result = torch.stack(rows)
        after_a = self.lora_A.index_select(0, index).transpose(1, 2)[torch.arange(len(slots), device=device)[:, None],
                                                                      x.reshape(len(slots), -1)]
        coefficient = (self.scaling.index_select(0, index) * weight).to(after_a.dtype)
        delta = torch.bmm(after_a, self.lora_B.index_select(0, index).transpose(1, 2)) * coefficient[:, None, None]
        return result + delta.reshape(result.shape).to(result.dtype)

    # --- merging -----------------------------------------------------------------------------------------------

    def merge(self, slots: Sequence[int], weights: Sequence[float]) -> Snapshot:
        """Folds the weighted slots into the embedding matrix: the update (transposed: the matrix is (vocabulary,
        width)), the matrix a slot brings, and its token rows. A shared (tied) or resized matrix becomes a new
        parameter; otherwise it is written in place. Returns what restores it."""
        layer = self.base_layer
        replaced = [s for s in slots if s in self.base_weights]
        tokens = [s for s in slots if s in self.tokens.by_slot]
        source = self.base_weights[replaced[0]] if replaced else layer.weight
        update = self.update(slots, weights).T
        target = source.float() + update
        for slot in tokens:
            index, rows = self.tokens.by_slot[slot]
            target[index] = rows.float()
        if replaced or (self.tied and not tokens) or target.shape != layer.weight.shape:
            return replace_attribute(layer, "weight", nn.Parameter(target.to(layer.weight.dtype),
                                                                   requires_grad=False))
        return merge_float(layer, lambda w: w.copy_(target.to(w.dtype)))


class OutputRows:
    """For an output projection tied to an embedding: the token rows each slot gives that embedding, which the
    projection's logits use too (as PEFT's trainable tokens do on tied weights)."""

    def __init__(self, embedding: EmbeddingLoraLayer) -> None:
        self.embedding = embedding

    def applies(self, slots: Sequence[int]) -> bool:
        return any(s in self.embedding.tokens.by_slot for s in slots)

    def lanes(self, result: torch.Tensor, h: torch.Tensor, slots: Sequence[int],
              bias: torch.Tensor | None) -> torch.Tensor:
        for slot in slots:
            if slot in self.embedding.tokens.by_slot:
                result = self.embedding.tokens.logits(result, h, slot, bias)
        return result

    def rows(self, result: torch.Tensor, h: torch.Tensor, slots: Sequence[int],
             weights: Sequence[float], bias: torch.Tensor | None) -> torch.Tensor:
        batch = len(slots)
        shaped, hidden = result.reshape(batch, -1, result.shape[-1]), h.reshape(batch, -1, h.shape[-1])
        rows = [self.embedding.tokens.logits(shaped[i], hidden[i], slot, bias)
                if weights[i] and slot in self.embedding.tokens.by_slot else shaped[i]
                for i, slot in enumerate(slots)]
        return torch.stack(rows).reshape(result.shape)

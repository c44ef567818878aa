"""The LoRA path around one linear base layer, and the slot buffers that every kind of path shares.

A `LoraLayer` wraps a base layer (nn.Linear, transformers' Conv1D, bitsandbytes Linear8bitLt or Linear4bit) without
changing it. Every adapter resident on the model has a slot in each layer's fixed buffers:

    lora_A      (slots, rank, in)    zero-padded to the largest rank loaded on this layer
    lora_B      (slots, out, rank)   enable_lora modules stored in their block-diagonal plain form
    scaling     (slots,)             alpha / r, or alpha / sqrt(r)
    lora_bias   (slots, out)         only once an adapter with a lora_B bias is loaded here
    dora_scale  (slots, out)         only once a DoRA adapter is loaded here: m / ||W + s B A|| per output row
    base_weights {slot: weight}      weights that adapters bring for the base layer (PEFT's saved lm_head)

The `Selection` (selection.py), one object shared by every layer, says which slots to apply. Switching writes its
small index and weight tensors in place: no module is rebuilt, no buffer is reallocated. Adapters without biases,
DoRA or base weights never allocate the optional buffers and run exactly the plain path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .selection import Grouping, Mode, Selection
from .weights import Snapshot, dequantized, merge_delta, merge_float, replace_attribute


def layer_kind(layer: nn.Module) -> str | None:
    """'linear', 'conv1d', 'int8', '4bit' or 'embedding' for layers a LoRA path can wrap, else None. bitsandbytes
    is recognised by class, without importing it."""
    from transformers.pytorch_utils import Conv1D

    cls = type(layer)
    if cls.__module__.startswith("bitsandbytes"):
        return {"Linear8bitLt": "int8", "Linear4bit": "4bit"}.get(cls.__name__)
    if isinstance(layer, nn.Linear):
        return "linear"
    if isinstance(layer, Conv1D):
        return "conv1d"
    if isinstance(layer, nn.Embedding):
        return "embedding"
    return None


def compute_dtype(layer: nn.Module, default: torch.dtype) -> torch.dtype:
    """The dtype the LoRA path computes in: the base weight's when it is a float, else the dtype the quantized layer
    computes in (its compute_dtype or bias), else `default` (the model's)."""
    weight = layer.weight
    if weight.is_floating_point() and weight.element_size() > 1:
        return weight.dtype
    for candidate in (getattr(layer, "compute_dtype", None), getattr(getattr(layer, "bias", None), "dtype", None)):
        if isinstance(candidate, torch.dtype) and candidate.is_floating_point:
            return candidate
    return default


def features(layer: nn.Module, kind: str) -> tuple[int, int]:
    """(in_features, out_features) of a layer of `kind`; Conv1D stores its weight as (in, out), an embedding is
    (vocabulary, width)."""
    if kind == "conv1d":
        rows, cols = layer.weight.shape
        return rows, cols
    if kind == "embedding":
        return layer.num_embeddings, layer.embedding_dim
    return layer.in_features, layer.out_features


def allocate(base_layer: nn.Module, kind: str, dtype: torch.dtype, slots: int, rank: int,
             dims: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The lora_A (slots, rank, in) and lora_B (slots, out, rank) buffers of a layer around `base_layer`, on its
    device (`dims` overrides (in, out) for adapters that bring a resized base weight). A single slot is about to be
    written in full by the load that wraps the layer; more slots belong to other adapters, which must read as
    zero here."""
    in_features, out_features = dims or features(base_layer, kind)
    device = base_layer.weight.device
    create = torch.empty if slots == 1 else torch.zeros
    return (create(slots, rank, in_features, device=device, dtype=dtype),
            create(slots, out_features, rank, device=device, dtype=dtype))


def destinations(lora_A: torch.Tensor, lora_B: torch.Tensor, slot: int, rank: int,
                 enable_lora: tuple[bool, ...] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Views of `slot` of a layer's buffers that an adapter's lora_A and lora_B of rank `rank` can be read into as
    stored: lora_A's rows always; lora_B only for a plain module of the padded rank (else it is rearranged, so
    None)."""
    b = lora_B[slot] if enable_lora is None and rank == lora_A.shape[1] else None
    return lora_A[slot, :rank], b


class SlotLayer(nn.Module):
    """What every kind of LoRA path keeps per slot: lora_A, lora_B, the scaling and the base weights adapters bring,
    grown by loads, renumbered by unloads, written in place. Subclasses compute with them (forward) and merge
    them."""

    def __init__(self, selection: Selection, kind: str, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
        super().__init__()
        self.selection = selection
        self.kind = kind
        self.in_features, self.out_features = lora_A.shape[2], lora_B.shape[1]
        selection.register(lora_A.device)
        self.register_buffer("lora_A", lora_A, persistent=False)
        self.register_buffer("lora_B", lora_B, persistent=False)
        slots = lora_A.shape[0]
        self.register_buffer("scaling", torch.zeros(slots, device=lora_A.device, dtype=torch.float32),
                             persistent=False)
        # _scalings: the same values on the host, so that eager forwards never read a device. base_weights: {slot:
        # weight} for adapters that bring their own base weight, kept where it differs from the layer's. Plain
        # attributes set in one step: nn.Module.__setattr__ costs ~5 us each, and a load wraps every layer.
        vars(self).update(_scalings=[0.0] * slots, base_weights={})
        self._scalings: list[float]
        self.base_weights: dict[int, torch.Tensor]

    def _apply(self, fn, recurse: bool = True):
        """Moving or converting the model replaces the buffers: the selection learns their device, and the runtime
        forgets anything that pointed into the old ones."""
        super()._apply(fn, recurse)
        self.base_weights = {slot: fn(w) for slot, w in self.base_weights.items()}
        self.selection.moved(self.lora_A.device)
        return self

    @property
    def rank(self) -> int:
        return self.lora_A.shape[1]

    @property
    def slots(self) -> int:
        return self.lora_A.shape[0]

    def reserve(self, slots: int, rank: int) -> None:
        """Resizes the buffers to `slots` x `rank`, keeping what fits. Loading calls it; switching never does."""
        old_slots, old_rank = self.lora_A.shape[:2]
        if (slots, rank) == (old_slots, old_rank):
            return
        keep_slots, keep_rank = min(slots, old_slots), min(rank, old_rank)
        a = self.lora_A.new_zeros(slots, rank, self.in_features)
        b = self.lora_B.new_zeros(slots, self.out_features, rank)
        a[:keep_slots, :keep_rank] = self.lora_A[:keep_slots, :keep_rank]
        b[:keep_slots, :, :keep_rank] = self.lora_B[:keep_slots, :, :keep_rank]
        self.lora_A, self.lora_B = a, b
        if slots != old_slots:
            self.scaling = _resized(self.scaling, slots, 0.0)
        self._scalings = self._scalings[:keep_slots] + [0.0] * (slots - keep_slots)
        for slot in [s for s in self.base_weights if s >= slots]:  # in place, as for every per-slot attribute
            del self.base_weights[slot]

    def select_slots(self, slots: Sequence[int]) -> None:
        """Keeps only `slots`, renumbered 0..len-1, and frees the rest (unloading)."""
        index = torch.tensor(list(slots), dtype=torch.long, device=self.lora_A.device)
        self.lora_A = self.lora_A.index_select(0, index)
        self.lora_B = self.lora_B.index_select(0, index)
        self.scaling = self.scaling.index_select(0, index)
        self._scalings = [self._scalings[s] for s in slots]
        self.base_weights = {new: self.base_weights[old] for new, old in enumerate(slots) if old in self.base_weights}

    def write(self, slot: int, lora_A: torch.Tensor | None, lora_B: torch.Tensor | None, scaling: float,
              enable_lora: tuple[bool, ...] | None, *, rank: int) -> None:
        """Copies one adapter's factors (rank `rank`) into `slot`, converting to this layer's device and dtype on
        the way. A factor given as None is already in place (read into the views of `destinations`); the padding
        is zeroed either way."""
        if lora_A is None and lora_B is None and enable_lora is None and rank == self.lora_A.shape[1]:
            self.set_scaling(slot, scaling)  # read in place as stored: only the scaling is left
            return
        a, b = self.lora_A[slot], self.lora_B[slot]
        padded = a.shape[0]
        if lora_A is not None:
            a[:rank].copy_(lora_A)
        if rank < padded:  # zero the padding only: a slot is overwritten, never cleared first
            a[rank:].zero_()
        if enable_lora is None:
            if lora_B is not None:
                b[:, :rank].copy_(lora_B)
            if rank < padded:
                b[:, rank:].zero_()
        else:  # block-diagonal plain form: slice s of the output reads columns g*r..(g+1)*r
            b.zero_()
            groups = sum(enable_lora)
            r, n = rank // groups, self.out_features // len(enable_lora)
            for g, s in enumerate(i for i, flag in enumerate(enable_lora) if flag):
                self.lora_B[slot, s * n:(s + 1) * n, g * r:(g + 1) * r].copy_(lora_B[g * n:(g + 1) * n])
        self.set_scaling(slot, scaling)

    def set_scaling(self, slot: int, scaling: float) -> None:
        if self._scalings[slot] != scaling:  # the host copy always equals the tensor: an equal value is in place
            self.scaling[slot] = scaling
            self._scalings[slot] = scaling

    def clear(self, slot: int) -> None:
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.scaling[slot] = 0.0
        self._scalings[slot] = 0.0
        self.base_weights.pop(slot, None)

    def update(self, slots: Sequence[int], weights: Sequence[float]) -> torch.Tensor:
        """sum_k weights[k] * scaling * B_k @ A_k in float32, in (out, in) orientation."""
        delta = None
        for slot, weight in zip(slots, weights, strict=True):
            term = (self.lora_B[slot].float() @ self.lora_A[slot].float()) * (self._scalings[slot] * weight)
            delta = term if delta is None else delta + term
        return delta

    def extra_repr(self) -> str:
        return f"kind={self.kind}, slots={self.slots}, rank={self.rank}"


class LoraLayer(SlotLayer):
    """A linear base layer plus the LoRA paths of every resident adapter. The base layer is never modified by the
    path; only merging (see runtime.weights) changes its weight, reversibly."""

    def __init__(self, base_layer: nn.Module, selection: Selection, kind: str, lora_A: torch.Tensor,
                 lora_B: torch.Tensor) -> None:
        """Wraps `base_layer` (of `kind`, see `layer_kind`) around the buffers that `allocate` made for it."""
        super().__init__(selection, kind, lora_A, lora_B)
        self.base_layer = base_layer
        # Plain attributes, set in one step (see SlotLayer). lora_bias (slots, out) and dora_scale (slots, out) exist
        # once an adapter brings them; tied: the base weight is shared with another layer (a tied lm_head), so merges
        # never write into it; output_rows: for an output projection tied to an embedding, the embedding's token
        # rows (embeddings.OutputRows).
        vars(self).update(lora_bias=None, dora_scale=None, _dora=[False] * self.slots, tied=False, output_rows=None)
        self.lora_bias: torch.Tensor | None
        self.dora_scale: torch.Tensor | None
        self._dora: list[bool]
        self.tied: bool
        self.output_rows: Any

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        for name in ("lora_bias", "dora_scale"):
            if getattr(self, name) is not None:
                setattr(self, name, fn(getattr(self, name)))
        return self

    # --- slots -------------------------------------------------------------------------------------------------

    def reserve(self, slots: int, rank: int) -> None:
        super().reserve(slots, rank)
        if self.lora_bias is not None:
            self.lora_bias = _resized(self.lora_bias, slots, 0.0)
        if self.dora_scale is not None:
            self.dora_scale = _resized(self.dora_scale, slots, 1.0)
        # in place: assigning attributes of an nn.Module costs more than the rest of a plain layer's reserve
        del self._dora[slots:]
        self._dora.extend([False] * (slots - len(self._dora)))

    def select_slots(self, slots: Sequence[int]) -> None:
        index = torch.tensor(list(slots), dtype=torch.long, device=self.lora_A.device)
        super().select_slots(slots)
        if self.lora_bias is not None:
            self.lora_bias = self.lora_bias.index_select(0, index)
        if self.dora_scale is not None:
            self.dora_scale = self.dora_scale.index_select(0, index)
        self._dora = [self._dora[s] for s in slots]

    def clear(self, slot: int) -> None:
        super().clear(slot)
        if self.lora_bias is not None:
            self.lora_bias[slot].zero_()
        if self.dora_scale is not None:
            self.dora_scale[slot].fill_(1.0)
        self._dora[slot] = False

    def write_features(self, slot: int, *, bias: torch.Tensor | None, magnitude: torch.Tensor | None,
                       base_weight: torch.Tensor | None) -> None:
        """The parts of a slot beyond its factors (after `write`): the lora_B bias, the base weight the adapter
        brings (kept only where it differs from the layer's own), and the DoRA scale, computed once from the weight
        the slot applies to (PEFT recomputes it on every forward; it only changes when that weight does)."""
        if bias is None and magnitude is None and base_weight is None and self.lora_bias is None and \
                not self._dora[slot] and slot not in self.base_weights:
            return  # a plain adapter, and nothing left from another in this slot
        if bias is not None:
            if self.lora_bias is None:
                self.lora_bias = self.lora_A.new_zeros(self.slots, self.out_features)
            self.lora_bias[slot].copy_(bias)
        elif self.lora_bias is not None:
            self.lora_bias[slot].zero_()
        self.base_weights.pop(slot, None)
        if base_weight is not None and not _same(base_weight, self.base_layer.weight):
            self.base_weights[slot] = base_weight.to(self.lora_A.device, self._weight_dtype())
        self._dora[slot] = magnitude is not None
        if magnitude is not None:
            if self.dora_scale is None:
                self.dora_scale = torch.ones(self.slots, self.out_features, device=self.lora_A.device,
                                             dtype=torch.float32)
            updated = self._oriented(slot) + self.update([slot], [1.0])
            self.dora_scale[slot] = magnitude.float().to(self.lora_A.device) / torch.linalg.norm(updated, dim=1)
        elif self.dora_scale is not None:
            self.dora_scale[slot].fill_(1.0)

    def _weight_dtype(self) -> torch.dtype:
        weight = self.base_layer.weight
        return weight.dtype if weight.is_floating_point() and weight.element_size() > 1 else self.lora_A.dtype

    def _oriented(self, slot: int | None) -> torch.Tensor:
        """The weight slot `slot` applies to (its own base weight, or the layer's, dequantized), float32, (out, in)."""
        weight = self.base_weights.get(slot) if slot is not None else None
        if weight is None:
            weight = self.base_layer.weight if self.kind in ("linear", "conv1d") else \
                dequantized(self.base_layer, self.kind)
        weight = weight.float()
        return weight.T if self.kind == "conv1d" else weight

    # --- merging -----------------------------------------------------------------------------------------------

    def merge(self, slots: Sequence[int], weights: Sequence[float]) -> Snapshot:
        """Folds the weighted slots into the base layer (its weight and bias); returns what restores them. A DoRA
        slot is merged alone with weight 1 (the runtime refuses anything else)."""
        replaced = [s for s in slots if s in self.base_weights]
        dora = [s for s in slots if self._dora[s]]
        if not replaced and not dora and not self.tied and self.output_rows is None:  # the update added in place
            if self.kind in ("linear", "conv1d"):
                snapshot = merge_float(self.base_layer, lambda w: self._add_update_(w, slots, weights))
            else:
                snapshot = merge_delta(self.base_layer, self.kind, self.update(slots, weights))
            self._merge_bias(slots, weights, None, snapshot)
            return snapshot
        source = self._oriented(replaced[0] if replaced else None)
        if dora:
            updated = source + self.update(slots, weights)
            target = updated * self.dora_scale[dora[0]][:, None]
        else:
            target = source + self.update(slots, weights)
        if self.output_rows is not None:
            for slot in slots:
                if slot in self.output_rows.embedding.tokens.by_slot:
                    index, rows = self.output_rows.embedding.tokens.by_slot[slot]
                    target[index] = rows.float()
        target = target.T if self.kind == "conv1d" else target
        snapshot = self._set_weight(target, replaced=bool(replaced))
        self._merge_bias(slots, weights, dora[0] if dora else None, snapshot)
        return snapshot

    def _set_weight(self, target: torch.Tensor, *, replaced: bool) -> Snapshot:
        layer = self.base_layer
        if self.kind in ("int8", "4bit"):
            if replaced:
                raise ValueError("an adapter that brings its own base weight cannot be merged into a quantized layer")
            return merge_delta(layer, self.kind, target - dequantized(layer, self.kind).float())
        weight = layer.weight
        if self.tied or replaced or target.shape != weight.shape:  # a shared or replaced weight: a new parameter
            return replace_attribute(layer, "weight", nn.Parameter(target.to(weight.dtype), requires_grad=False))
        return merge_float(layer, lambda w: w.copy_(target.to(w.dtype)))

    def _merge_bias(self, slots: Sequence[int], weights: Sequence[float], dora_slot: int | None,
                    snapshot: Snapshot) -> None:
        if self.lora_bias is None:
            return
        added = sum((self.lora_bias[s].float() * (self._scalings[s] * w) for s, w in zip(slots, weights, strict=True)),
                    torch.zeros(self.out_features, device=self.lora_A.device))
        if not bool(added.any()):
            return
        layer = self.base_layer
        bias = getattr(layer, "bias", None)
        if dora_slot is not None:
            added = added * self.dora_scale[dora_slot]
        if bias is None:
            snapshot.attributes.append((layer, "bias", None))
            layer.bias = nn.Parameter(added.to(self._weight_dtype()), requires_grad=False)
        else:
            snapshot.copies.append((bias.data, bias.data.clone()))
            bias.data.copy_((bias.data.float() + added).to(bias.dtype))

    def _add_update_(self, weight: torch.Tensor, slots: Sequence[int], weights: Sequence[float]) -> None:
        """Adds the weighted updates to `weight` (the base weight as stored) in place: one addmm_ per adapter for
        float32, else a float32 update added and rounded once."""
        if weight.dtype != torch.float32:
            delta = self.update(slots, weights)
            weight.copy_((weight.float() + (delta.T if self.kind == "conv1d" else delta)).to(weight.dtype))
            return
        for slot, w in zip(slots, weights, strict=True):
            a, b = self.lora_A[slot].float(), self.lora_B[slot].float()
            alpha = self._scalings[slot] * w
            if self.kind == "conv1d":
                weight.addmm_(a.T, b.T, alpha=alpha)
            else:
                weight.addmm_(b, a, alpha=alpha)

    # --- computing ---------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        selection = self.selection
        if selection.mode is Mode.OFF or self.slots == 0:
            return self.base_layer(x, *args, **kwargs)
        if self.base_weights or self.dora_scale is not None or self.lora_bias is not None:
            result = self._forward_features(x, *args, **kwargs)
        else:
            result = self._forward_plain(x, *args, **kwargs)
        rows = self.output_rows
        if rows is not None:
            bias = getattr(self.base_layer, "bias", None)
            if selection.mode is Mode.LANES and rows.applies(selection.lane_slots):
                result = rows.lanes(result, x, selection.lane_slots, bias)
            elif selection.mode is Mode.ROWS and rows.applies(selection.row_slots):
                result = rows.rows(result, x, selection.row_slots, selection.row_weights, bias)
        return result

    def _forward_plain(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        selection = self.selection
        result = self.base_layer(x, *args, **kwargs)
        h = x if x.dtype == self.lora_A.dtype else x.to(self.lora_A.dtype)
        device = self.lora_A.device
        if selection.mode is Mode.LANES:
            delta = self._lanes(h, *selection.lanes(device))
        else:
            plan = selection.grouped(device)
            if plan is not None and result.dtype == h.dtype and not result.requires_grad and result.is_contiguous():
                return self._grouped_into(result, h, plan)
            delta = self._rows(h, *selection.rows(device))
        if delta.dtype == result.dtype and not result.requires_grad:
            return result.add_(delta)  # the base layer's fresh output, added to in place: no third tensor
        return (result + delta).to(result.dtype)  # one rounding when the path computes wider than the base

    def _forward_features(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The path with biases, DoRA scales or adapter-brought base weights (FORMAT.md section 8):
        y = c * (base(x) - beta + s * (x A^T B^T + b)) + beta, with c = 1 outside DoRA."""
        selection = self.selection
        device = self.lora_A.device
        h = x if x.dtype == self.lora_A.dtype else x.to(self.lora_A.dtype)
        if selection.mode is Mode.LANES:
            index, weight = selection.lanes(device)
            slots = selection.lane_slots
            result = self._base(x, slots[0] if len(slots) == 1 else None, *args, **kwargs)
            delta = self._lanes(h, index, weight)
            if self.lora_bias is not None:
                delta = delta + (self.lora_bias.index_select(0, index) *
                                 (self.scaling.index_select(0, index) * weight)[:, None].to(delta.dtype)).sum(0)
            scale = self.dora_scale.index_select(0, index).prod(0) if self._applies_dora(slots) else None
        else:
            index, weight = selection.rows(device)
            result = self._base_rows(x, selection.row_slots, selection.row_weights, *args, **kwargs)
            delta = self._rows(h, index, weight)
            batch = index.numel()
            if self.lora_bias is not None:
                bias = self.lora_bias.index_select(0, index) * (self.scaling.index_select(0, index) *
                                                                weight)[:, None].to(delta.dtype)
                delta = (delta.reshape(batch, -1, self.out_features) + bias[:, None]).reshape(delta.shape)
            scale = None
            if self._applies_dora(selection.row_slots):  # rows of the bare model (weight 0) are not rescaled
                scale = torch.where(weight[:, None] != 0, self.dora_scale.index_select(0, index), 1.0)[:, None]
        if scale is None:
            return (result + delta).to(result.dtype)
        beta = getattr(self.base_layer, "bias", None)
        beta = 0.0 if beta is None else beta.to(result.dtype)
        shaped = result.reshape(scale.shape[0], -1, self.out_features) if scale.dim() == 3 else result
        inner = (shaped - beta) + delta.reshape(shaped.shape).to(result.dtype)
        return (inner * scale.to(result.dtype) + beta).reshape(result.shape)

    def _applies_dora(self, slots: Sequence[int]) -> bool:
        return self.dora_scale is not None and (torch.compiler.is_compiling() or any(self._dora[s] for s in slots))

    def _base(self, x: torch.Tensor, slot: int | None, *args, **kwargs) -> torch.Tensor:
        """The base layer's output, with the weight slot `slot` brings if it brings one."""
        weight = self.base_weights.get(slot) if slot is not None else None
        if weight is None:
            return self.base_layer(x, *args, **kwargs)
        weight = weight.T if self.kind == "conv1d" else weight
        return F.linear(x.to(weight.dtype), weight, getattr(self.base_layer, "bias", None))

    def _base_rows(self, x: torch.Tensor, slots: Sequence[int], weights: Sequence[float], *args,
                   **kwargs) -> torch.Tensor:
        """The base output of routed rows: rows whose adapter brings a base weight computed with it."""
        chosen = [slot if weight and slot in self.base_weights else None for slot, weight in zip(slots, weights,
                                                                                                 strict=True)]
        if all(slot is None for slot in chosen):
            return self.base_layer(x, *args, **kwargs)
        batch = len(slots)
        rows = x.reshape(batch, -1, x.shape[-1])
        outputs = [self._base(rows[i], slot, *args, **kwargs) for i, slot in enumerate(chosen)]
        widths = {o.shape[-1] for o in outputs}
        if len(widths) > 1:
            raise ValueError("route() mixes adapters whose base weights have different output sizes (a resized "
                             "vocabulary): their rows cannot share one batch")
        return torch.stack(outputs).reshape(*x.shape[:-1], widths.pop())

    def _lanes(self, h: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        selection = self.selection
        if len(selection.lane_slots) == 1 and not torch.compiler.is_compiling():
            # Eager, one adapter: views of its slot and a host scalar, the very ops PEFT runs. Compiled graphs take
            # the tensor-indexed path below, whose inputs stay the same tensors across switches.
            slot = selection.lane_slots[0]
            coefficient = self._scalings[slot] * selection.lane_weights[0]
            return F.linear(F.linear(h, self.lora_A[slot]), self.lora_B[slot]).mul_(coefficient)
        a = self.lora_A.index_select(0, index)
        b = self.lora_B.index_select(0, index)
        coefficient = self.scaling.index_select(0, index) * weight
        if index.numel() == 1:
            return F.linear(F.linear(h, a[0]), b[0]) * coefficient
        inner = torch.einsum("...i,kri->...kr", h, a) * coefficient.to(h.dtype)[:, None]
        return torch.einsum("...kr,kor->...o", inner, b)

    def _grouped_into(self, result: torch.Tensor, h: torch.Tensor, plan: Grouping) -> torch.Tensor:
        """Adds each group's update into `result` (the base layer's fresh output): each adapter's factors once (a view
        when the slots are consecutive, else one gather per group, never one per row), two batched matmuls over the
        groups, the scaling on the rank-wide product, and the last matmul accumulating into the output where the rows
        allow a view."""
        batch = plan.batch
        if h.shape[0] != batch and (h.dim() != 2 or h.shape[0] % batch):
            raise ValueError(f"the batch has {h.shape[0]} rows but route() was given {batch} adapters")
        rows = h.reshape(batch, -1, h.shape[-1])
        tokens = rows.shape[1]
        if plan.first is not None:  # consecutive slots: views of the buffers, nothing copied
            end = plan.first + plan.groups
            a, b = self.lora_A[plan.first:end].transpose(1, 2), self.lora_B[plan.first:end].transpose(1, 2)
            scale = self.scaling[plan.first:end].to(h.dtype)[:, None, None]
        else:
            a = self.lora_A.index_select(0, plan.slots).transpose(1, 2)
            b = self.lora_B.index_select(0, plan.slots).transpose(1, 2)
            scale = self.scaling.index_select(0, plan.slots).to(h.dtype)[:, None, None]
        if plan.contiguous:  # the batch as (groups, rows x tokens, features): no copy, the update added in the matmul
            x = rows.view(plan.groups, plan.size * tokens, rows.shape[-1])
            inner = torch.bmm(x, a).mul_(scale)
            result.view(plan.groups, plan.size * tokens, self.out_features).baddbmm_(inner, b)
            return result
        # a group's rows are apart: they are gathered (padded to the largest group), and the valid outputs added back
        x = rows.index_select(0, plan.gather).view(plan.groups, plan.size * tokens, rows.shape[-1])
        out = torch.bmm(torch.bmm(x, a).mul_(scale), b).view(plan.groups * plan.size, tokens, self.out_features)
        if plan.valid.numel() != out.shape[0]:
            out = out.index_select(0, plan.valid)
        result.view(batch, tokens, self.out_features).index_add_(0, plan.rows, out)
        return result

    def _rows(self, h: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Each batch row with its own slot. Models that flatten (batch, tokens) before a layer (OPT's MLP) keep
        each row's tokens contiguous, so any input whose leading size is a multiple of the batch is viewed as
        (batch, tokens, features)."""
        batch = index.numel()
        if h.shape[0] != batch and (h.dim() != 2 or h.shape[0] % batch):
            raise ValueError(f"the batch has {h.shape[0]} rows but route() was given {batch} adapters")
        rows = h.reshape(batch, -1, h.shape[-1])
        a = self.lora_A.index_select(0, index)
        b = self.lora_B.index_select(0, index)
        coefficient = (self.scaling.index_select(0, index) * weight).to(h.dtype)
        out = torch.bmm(torch.bmm(rows, a.transpose(1, 2)), b.transpose(1, 2)) * coefficient[:, None, None]
        return out.reshape(*h.shape[:-1], self.out_features)


def _resized(tensor: torch.Tensor, slots: int, fill: float) -> torch.Tensor:
    """`tensor` (slots first) with `slots` entries: kept where they fit, `fill` for new ones."""
    out = tensor.new_full((slots, *tensor.shape[1:]), fill)
    keep = min(slots, tensor.shape[0])
    out[:keep] = tensor[:keep]
    return out


def _same(candidate: torch.Tensor, weight: Any) -> bool:
    """Whether an adapter's base weight equals the layer's own (PEFT saves the embedding matrices unchanged too)."""
    if not isinstance(weight, torch.Tensor) or tuple(candidate.shape) != tuple(weight.shape) or \
            not weight.is_floating_point() or weight.device.type == "meta":
        return False
    return torch.equal(candidate.to(weight.device, weight.dtype), weight)

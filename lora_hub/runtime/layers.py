"""The LoRA path around one base layer, and the selection that all such paths share.

A `LoraLayer` wraps a base layer (nn.Linear, transformers' Conv1D, bitsandbytes Linear8bitLt or Linear4bit) without
changing it. Every adapter resident on the model has a slot in each layer's fixed buffers:

    lora_A   (slots, rank, in)    zero-padded to the largest rank loaded on this layer
    lora_B   (slots, out, rank)   enable_lora modules stored in their block-diagonal plain form
    scaling  (slots,)             alpha / r, or alpha / sqrt(r)

The `Selection`, one object shared by every layer, says which slots to apply: none, some with weights (lanes,
stacked adapters) or one per batch row (rows, mixed batches). Switching writes the selection's small index and
weight tensors in place: no module is rebuilt, no buffer is reallocated, and the tensors a compiled graph or a CUDA
graph captured stay the same ones.
"""

from __future__ import annotations

import enum
import weakref
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class Mode(enum.Enum):
    OFF = "off"
    LANES = "lanes"
    ROWS = "rows"


class Selection:
    """Which slots the LoRA paths apply, with what weight; one instance is shared by all layers of a runtime.

    Its index and weight tensors exist once per device that has a layer, created or refreshed when the selection
    changes, never during a forward pass: a compiled graph sees the same tensors, with new contents, after a switch
    (only a change in the number of stacked adapters or rows changes their shape).
    """

    def __init__(self) -> None:
        self._listeners: list[weakref.WeakMethod] = []
        self.mode = Mode.OFF
        self._devices: set[torch.device] = set()
        self._lanes: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._rows: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.lane_slots: list[int] = []
        self.lane_weights: list[float] = []
        self.row_slots: list[int] = []
        self.row_weights: list[float] = []

    def register(self, device: torch.device) -> None:
        """Adds a device that layers live on (called when a layer is wrapped)."""
        if device not in self._devices:
            self._devices.add(device)
            _store(self._lanes, {device}, self.lane_slots, [1.0] * len(self.lane_slots))
            _store(self._rows, {device}, self.row_slots, self.row_weights)

    def on_move(self, method: Callable[[], None]) -> None:
        """Calls `method` (held weakly) whenever a layer's buffers are replaced by a move or a conversion of the
        model (`model.to(...)`, `.half()`)."""
        self._listeners.append(weakref.WeakMethod(method))

    def moved(self, device: torch.device) -> None:
        """A layer's buffers now live on `device` (LoraLayer._apply)."""
        self.register(device)
        for listener in self._listeners:
            method = listener()
            if method is not None:
                method()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_listeners"] = []  # a copy or a pickle of the model belongs to no runtime
        return state

    def set_lanes(self, slots: Sequence[int], weights: Sequence[float]) -> None:
        self.lane_slots, self.lane_weights = list(slots), list(weights)
        _store(self._lanes, self._devices, self.lane_slots, self.lane_weights)
        self.mode = Mode.LANES if slots else Mode.OFF

    def set_rows(self, slots: Sequence[int], weights: Sequence[float]) -> None:
        self.row_slots, self.row_weights = list(slots), list(weights)
        _store(self._rows, self._devices, self.row_slots, self.row_weights)
        self.mode = Mode.ROWS

    def lanes(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return self._lanes[device]

    def rows(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return self._rows[device]


def _store(cache: dict, devices: set[torch.device], slots: list[int], weights: list[float]) -> None:
    """Writes slots and weights into each device's tensors: in place when the length is unchanged."""
    index_values = torch.tensor(slots, dtype=torch.long)
    weight_values = torch.tensor(weights, dtype=torch.float32)
    for device in devices:
        index, weight = cache.get(device, (None, None))
        if index is not None and index.numel() == len(slots):
            index.copy_(index_values)
            weight.copy_(weight_values)
        else:
            cache[device] = (index_values.to(device), weight_values.to(device))


def layer_kind(layer: nn.Module) -> str | None:
    """'linear', 'conv1d', 'int8' or '4bit' for layers a LoRA path can wrap, else None. bitsandbytes is recognised
    by class, without importing it."""
    from transformers.pytorch_utils import Conv1D

    cls = type(layer)
    if cls.__module__.startswith("bitsandbytes"):
        return {"Linear8bitLt": "int8", "Linear4bit": "4bit"}.get(cls.__name__)
    if isinstance(layer, nn.Linear):
        return "linear"
    if isinstance(layer, Conv1D):
        return "conv1d"
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
    """(in_features, out_features) of a layer of `kind`; Conv1D stores its weight as (in, out)."""
    if kind == "conv1d":
        rows, cols = layer.weight.shape
        return rows, cols
    return layer.in_features, layer.out_features


def allocate(base_layer: nn.Module, kind: str, dtype: torch.dtype, slots: int,
             rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The lora_A (slots, rank, in) and lora_B (slots, out, rank) buffers of a LoraLayer around `base_layer`, on
    its device. A single slot is about to be written in full by the load that wraps the layer; more slots belong to
    other adapters, which must read as zero here."""
    in_features, out_features = features(base_layer, kind)
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


class LoraLayer(nn.Module):
    """A base layer plus the LoRA paths of every resident adapter. The base layer is never modified by the path;
    only merging (see runtime.weights) changes its weight, reversibly."""

    def __init__(self, base_layer: nn.Module, selection: Selection, kind: str, lora_A: torch.Tensor,
                 lora_B: torch.Tensor) -> None:
        """Wraps `base_layer` (of `kind`, see `layer_kind`) around the buffers that `allocate` made for it."""
        super().__init__()
        self.base_layer = base_layer
        self.selection = selection
        self.kind = kind
        self.in_features, self.out_features = features(base_layer, kind)
        selection.register(lora_A.device)
        self.register_buffer("lora_A", lora_A, persistent=False)
        self.register_buffer("lora_B", lora_B, persistent=False)
        slots = lora_A.shape[0]
        self.register_buffer("scaling", torch.zeros(slots, device=lora_A.device, dtype=torch.float32),
                             persistent=False)
        self._scalings = [0.0] * slots  # the same values on the host, so that eager forwards never read a device

    def _apply(self, fn, recurse: bool = True):
        """Moving or converting the model replaces the buffers: the selection learns their device, and the runtime
        forgets anything that pointed into the old ones."""
        super()._apply(fn, recurse)
        self.selection.moved(self.lora_A.device)
        return self

    @property
    def rank(self) -> int:
        return self.lora_A.shape[1]

    def reserve(self, slots: int, rank: int) -> None:
        """Resizes the buffers to `slots` x `rank`, keeping what fits. Loading calls it; switching never does."""
        old_slots, old_rank = self.lora_A.shape[:2]
        if (slots, rank) == (old_slots, old_rank):
            return
        keep_slots, keep_rank = min(slots, old_slots), min(rank, old_rank)
        a = self.lora_A.new_zeros(slots, rank, self.in_features)
        b = self.lora_B.new_zeros(slots, self.out_features, rank)
        s = self.scaling.new_zeros(slots)
        a[:keep_slots, :keep_rank] = self.lora_A[:keep_slots, :keep_rank]
        b[:keep_slots, :, :keep_rank] = self.lora_B[:keep_slots, :, :keep_rank]
        s[:keep_slots] = self.scaling[:keep_slots]
        self.lora_A, self.lora_B, self.scaling = a, b, s
        self._scalings = self._scalings[:keep_slots] + [0.0] * (slots - keep_slots)

    def select_slots(self, slots: Sequence[int]) -> None:
        """Keeps only `slots`, renumbered 0..len-1, and frees the rest (unloading)."""
        index = torch.tensor(list(slots), dtype=torch.long, device=self.lora_A.device)
        self.lora_A = self.lora_A.index_select(0, index)
        self.lora_B = self.lora_B.index_select(0, index)
        self.scaling = self.scaling.index_select(0, index)
        self._scalings = [self._scalings[s] for s in slots]

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

    def delta_weight(self, slots: Sequence[int], weights: Sequence[float]) -> torch.Tensor:
        """sum_k weights[k] * scaling * B_k @ A_k in float32, shaped like the base weight ((in, out) for Conv1D)."""
        delta = None
        for slot, weight in zip(slots, weights, strict=True):
            term = (self.lora_B[slot].float() @ self.lora_A[slot].float()) * (self._scalings[slot] * weight)
            delta = term if delta is None else delta + term
        return delta.T if self.kind == "conv1d" else delta

    def add_delta_(self, weight: torch.Tensor, slots: Sequence[int], weights: Sequence[float]) -> None:
        """Adds the weighted deltas to `weight` (the base weight as stored) in place: one addmm_ per adapter for
        float32, else a float32 delta added and rounded once."""
        if weight.dtype != torch.float32:
            weight.copy_((weight.float() + self.delta_weight(slots, weights)).to(weight.dtype))
            return
        for slot, w in zip(slots, weights, strict=True):
            a, b = self.lora_A[slot].float(), self.lora_B[slot].float()
            alpha = self._scalings[slot] * w
            if self.kind == "conv1d":
                weight.addmm_(a.T, b.T, alpha=alpha)
            else:
                weight.addmm_(b, a, alpha=alpha)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        selection = self.selection
        if selection.mode is Mode.OFF or self.lora_A.shape[0] == 0:
            return result
        h = x if x.dtype == self.lora_A.dtype else x.to(self.lora_A.dtype)
        device = self.lora_A.device
        if selection.mode is Mode.LANES:
            delta = self._lanes(h, *selection.lanes(device))
        else:
            delta = self._rows(h, *selection.rows(device))
        if delta.dtype == result.dtype and not result.requires_grad:
            return result.add_(delta)  # the base layer's fresh output, added to in place: no third tensor
        return (result + delta).to(result.dtype)  # one rounding when the path computes wider than the base

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

    def extra_repr(self) -> str:
        return f"kind={self.kind}, slots={self.lora_A.shape[0]}, rank={self.rank}"

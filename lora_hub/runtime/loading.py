"""Filling an adapter's slot in the wrapped layers of a runtime: reading its factors into the slot buffers, building
the layers a load wraps while the read runs, and keeping how a slot was read for the next file of the same layout.

    load(name, file) -> fill(slot, adapter, layers, new, wrap) -> SlotReads (kept by the runtime, per slot)
    load(name, same-layout file) -> SlotReads.load(slot, adapter): the reads again, no destinations worked out
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from operator import is_, itemgetter
from typing import NamedTuple

import torch

from ..adapter import Adapter
from ..tensors import FileTensors, ReadPlan
from .layers import LoraLayer, destinations


class NewLayer(NamedTuple):
    """A module about to be wrapped: its kind and the buffers its LoraLayer will hold. They are allocated first, so
    that a load can read into them while the layers are being built."""

    kind: str
    lora_A: torch.Tensor
    lora_B: torch.Tensor


@dataclass(frozen=True)
class SlotReads:
    """How the last lora-hub file loaded into a slot was read: every factor straight into the slot's buffers. The
    next file of the same layout loaded into that slot (a replacement, typically: adapters of one shape share their
    layout) is read the same way, without working the destinations out again. The runtime forgets it when it
    reallocates buffers or wraps layers; buffers replaced behind its back (`model.to(...)`) are noticed by
    `fits`."""

    plan: ReadPlan
    layers: tuple[tuple[str, LoraLayer], ...]
    """Each layer the adapter touches."""
    others: tuple[LoraLayer, ...]
    buffer_dicts: tuple[dict[str, torch.Tensor | None], ...]
    """The buffer dicts of `layers` (each module's own: reallocating a buffer, or `model.to(...)`, refills it)."""
    read_into: tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]
    """The lora_A and the lora_B buffers of `layers` that the plan reads into."""

    @classmethod
    def of(cls, plan: ReadPlan, layers: Mapping[str, LoraLayer], modules: Iterable[str]) -> SlotReads:
        touched = tuple((path, layers[path]) for path in modules)
        paths = {path for path, _ in touched}
        others = tuple(layer for path, layer in layers.items() if path not in paths)
        buffer_dicts = tuple(layer._buffers for _, layer in touched)
        return cls(plan, touched, others, buffer_dicts, _held(buffer_dicts))

    def fits(self, adapter: Adapter) -> bool:
        """Same tensor layout (so the same modules and ranks), no factor that needs rearranging, and the layers
        still hold the buffers read into."""
        tensors = adapter.tensors
        return (isinstance(tensors, FileTensors) and tensors.layout == self.plan.layout and not adapter.config.features
                and all(spec.enable_lora is None for spec in adapter.config.distinct_specs)
                and self._still_held())

    def _still_held(self) -> bool:
        """The layers still hold the very buffers the plan reads into (by identity, in bulk)."""
        (held_a, held_b), (read_a, read_b) = _held(self.buffer_dicts), self.read_into
        return all(map(is_, held_a, read_a)) and all(map(is_, held_b, read_b))

    def load(self, slot: int, adapter: Adapter, *, same_specs: bool = False) -> None:
        """Reads the adapter into `slot` (`same_specs`: its modules' specs are those of the adapter the slot holds,
        so the scalings stand)."""
        adapter.tensors.read_planned(self.plan)
        if not same_specs:
            modules = adapter.modules
            for path, layer in self.layers:
                layer.set_scaling(slot, modules[path].scaling)
        for layer in self.others:
            layer.clear(slot)


def fill(slot: int, adapter: Adapter, layers: Mapping[str, LoraLayer], new: Mapping[str, NewLayer],
         wrap: Callable[[Mapping[str, NewLayer]], None]) -> SlotReads | None:
    """Puts the adapter's factors into `slot` of every layer (and clears the slot in the layers it does not touch),
    calling wrap(new) to build the `new` layers on the way (`layers` holds them afterwards). A lora-hub file is read
    in one pass of positioned reads, straight into the slot where the factors fit as stored, in the background
    while the new layers are built.

    Returns:
        How the slot was read, when every factor fitted as stored (for the next file of the same layout); else None.
    """
    tensors = adapter.tensors
    names = {path: adapter.config.lora_tensor_names(path) for path in adapter.modules}
    into: dict[str, torch.Tensor] = {}
    read: dict[str, torch.Tensor | None] = {}
    wait = None
    if isinstance(tensors, FileTensors):
        for path, spec in adapter.modules.items():
            a_name, b_name = names[path]
            holder = new.get(path) or layers[path]
            into[a_name], b_view = destinations(holder.lora_A, holder.lora_B, slot, spec.r * spec.groups,
                                                spec.enable_lora)
            if b_view is not None:
                into[b_name] = b_view
        plan = tensors.plan([name for pair in names.values() for name in pair], into)
        if new:
            wait = tensors.start_reading(plan)
        else:
            tensors.read_planned(plan)
        read = {n: None if t is into.get(n) else t for n, t in plan.targets.items()}
    try:
        wrap(new)
    finally:
        if wait is not None:
            wait()
    for path, layer in layers.items():
        spec = adapter.modules.get(path)
        if spec is None:
            layer.clear(slot)
            continue
        a_name, b_name = names[path]
        a = read[a_name] if a_name in read else adapter.lora_A(path)
        b = read[b_name] if b_name in read else adapter.lora_B(path)
        layer.write(slot, a, b, spec.scaling, spec.enable_lora, rank=spec.r * spec.groups)
        if spec.bias or spec.dora or spec.replaces_base:
            layer.write_features(slot, bias=adapter.lora_bias(path), magnitude=adapter.magnitude(path),
                                 base_weight=adapter.base_weight(path))
        else:  # clears what another adapter left in the slot
            layer.write_features(slot, bias=None, magnitude=None, base_weight=None)
    for module, indices in adapter.config.trainable_tokens.items():
        layers[module].write_tokens(slot, indices, adapter.token_rows(module))
    if read and all(t is None for t in read.values()) and not adapter.config.features:
        return SlotReads.of(plan, layers, adapter.modules)
    return None


def _held(buffer_dicts: tuple[dict[str, torch.Tensor | None], ...]) -> tuple[tuple[torch.Tensor, ...], ...]:
    """The lora_A and the lora_B buffers that layers hold now, from their buffer dicts."""
    return tuple(map(itemgetter("lora_A"), buffer_dicts)), tuple(map(itemgetter("lora_B"), buffer_dicts))

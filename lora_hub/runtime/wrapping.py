"""What a runtime adds to a live model: the modules it wraps, in place and once, and their slot buffers.

    layers      {path: LoraLayer | EmbeddingLoraLayer | ExpertParamLayer}   one LoRA path per adapted module
    experts     {path: ExpertsModule}      the module that owns expert parameters, wrapped to apply theirs
    replaced    {path: ReplacedModule}     modules that adapters replace (modules_to_save), one variant per slot
    modules     {path: nn.Module}          the original modules, as they were before wrapping

Buffers hold `capacity` slots of every layer's rank. `reserve` grows them for an adapter (one allocation per layer
that has to grow) and allocates the layers it needs that are not wrapped yet; `wrap` puts those in place. Whenever
buffers are reallocated or layers added, `on_change` is called (the runtime forgets the reads it worked out).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .. import constants as C
from ..adapter import Adapter
from ..basemodel import describe_base
from ..errors import RuntimeStateError
from .embeddings import EmbeddingLoraLayer, OutputRows
from .experts import ExpertParamLayer, ExpertsModule
from .layers import LoraLayer, allocate, compute_dtype, layer_kind
from .loading import NewLayer
from .replaced import ReplacedModule
from .selection import Selection


class WrappedModel:
    """The wrapped modules of one live model, and the original ones (see the module docs)."""

    def __init__(self, model: nn.Module, selection: Selection, *, capacity: int, max_rank: int | None,
                 dtype: torch.dtype | None, on_change: Callable[[], None]) -> None:
        self.modules = dict(model.named_modules())  # the original modules by path; wrapping keeps their parents
        if any(isinstance(m, (LoraLayer, ReplacedModule)) for m in self.modules.values()):
            raise RuntimeStateError("the model already has lora-hub layers: detach() the other runtime first")
        self.model = model
        self.selection = selection
        self.info = describe_base(model)
        self.layers: dict[str, LoraLayer] = {}
        self.experts: dict[str, ExpertsModule] = {}  # by the path of the experts module they wrap
        self.replaced: dict[str, ReplacedModule] = {}
        self.capacity = capacity
        self.max_rank = max_rank
        self._path_dtype = dtype
        self._dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        self._on_change = on_change

    # --- buffers -----------------------------------------------------------------------------------------------

    def reserve(self, adapter: Adapter) -> dict[str, NewLayer]:
        """Sizes every wrapped layer for the capacity and the adapter's ranks, with one allocation per layer that has
        to grow and none for the others, and allocates the buffers of the modules the adapter needs that are not
        wrapped yet (returned, for `wrap`).

        Raises:
            RuntimeStateError: A resident adapter has another vocabulary at a module this one adapts, or a module
                lora-hub cannot wrap.
        """
        needed = {m: s.r * s.groups for m, s in adapter.modules.items()}
        for module in adapter.config.trainable_tokens:  # the embedding, and a head tied to it, carry the rows
            needed.setdefault(module, 0)
            for head, owner in self.info.tied.items():
                if owner == module:
                    needed.setdefault(head, 0)
        dims = {m: (s.in_features, s.out_features) for m, s in adapter.modules.items() if s.kind != "experts"}
        for path, layer in self.layers.items():
            if path in dims and dims[path] != (layer.in_features, layer.out_features):
                raise RuntimeStateError(
                    f"'{path}' holds adapters of in={layer.in_features}, out={layer.out_features}, and this one is "
                    f"in={dims[path][0]}, out={dims[path][1]} (a resized vocabulary): adapters with different "
                    "vocabularies cannot be resident together; unload the others first")
        for path, layer in self.layers.items():
            rank = max(layer.rank, needed.get(path, 0))
            if (layer.slots, layer.rank) != (self.capacity, rank):
                layer.reserve(self.capacity, rank)
                self._on_change()
        return self.allocate([m for m in needed if m not in self.layers], needed, dims)

    def resolve(self, targets: Iterable[str]) -> list[str]:
        """Module paths for targets given as paths or trailing names ("q_proj")."""
        paths = []
        for target in targets:
            matched = [p for p in self.info.layers if p == target or p.endswith("." + target)]
            if not matched:
                raise RuntimeStateError(f"target '{target}' matches no linear layer of the model")
            paths += matched
        return list(dict.fromkeys(paths))

    def allocate(self, paths: Sequence[str], ranks: Mapping[str, int],
                 dims: Mapping[str, tuple[int, int]] | None = None) -> dict[str, NewLayer]:
        """The buffers of the layers that will wrap `paths` (modules, or expert parameters); nothing is wrapped yet.

        Raises:
            RuntimeStateError: A module lora-hub cannot wrap.
        """
        new = {}
        for path in paths:
            info = self.info.layers.get(path)
            rank = self.max_rank or ranks.get(path, 0)
            if info is not None and info.kind == "experts":
                owner = self.modules[path.rpartition(".")[0]]
                param = getattr(owner, path.rpartition(".")[2])
                dtype = self._path_dtype or (param.dtype if param.is_floating_point() else self._dtype)
                create = torch.empty if self.capacity == 1 else torch.zeros
                new[path] = NewLayer("experts", create(self.capacity, info.experts * rank, info.in_features,
                                                       device=param.device, dtype=dtype),
                                     create(self.capacity, info.out_features, rank * info.experts,
                                            device=param.device, dtype=dtype))
                continue
            base = self.modules[path]
            kind = layer_kind(base)
            if kind is None:
                raise RuntimeStateError(f"'{path}' is a {type(base).__name__}, which lora-hub cannot wrap")
            dtype = self._path_dtype or compute_dtype(base, self._dtype)
            new[path] = NewLayer(kind, *allocate(base, kind, dtype, self.capacity, rank, (dims or {}).get(path)))
        return new

    # --- wrapping ----------------------------------------------------------------------------------------------

    def wrap(self, new: Mapping[str, NewLayer]) -> None:
        """Puts the layers allocated by `reserve` or `allocate` in place of their modules."""
        for path, parts in new.items():
            if parts.kind == "experts":
                layer = self._wrap_expert(path, parts)
            else:
                cls = EmbeddingLoraLayer if parts.kind == "embedding" else LoraLayer
                layer = cls(self.modules[path], self.selection, parts.kind, parts.lora_A, parts.lora_B)
                layer.tied = path in self.info.tied or path in self.info.tied.values()
                self.set(path, layer)
            self.layers[path] = layer
        for head, owner in self.info.tied.items():  # a tied head shows the embedding's token rows in its logits
            layer, embedding = self.layers.get(head), self.layers.get(owner)
            if isinstance(layer, LoraLayer) and isinstance(embedding, EmbeddingLoraLayer) and \
                    layer.output_rows is None:
                layer.output_rows = OutputRows(embedding)
        if new:
            self._on_change()

    def _wrap_expert(self, path: str, parts: NewLayer) -> ExpertParamLayer:
        owner_path, _, name = path.rpartition(".")
        module = self.experts.get(owner_path)
        if module is None:
            module = self.experts[owner_path] = ExpertsModule(self.modules[owner_path], self.selection)
            self.set(owner_path, module)
        info = self.info.layers[path]
        layer = ExpertParamLayer(module.base_layer, name, self.selection, parts.lora_A, parts.lora_B,
                                 experts=info.experts, transposed=info.transposed)
        module.params[name] = layer
        return layer

    def load_replacements(self, slot: int, adapter: Adapter) -> frozenset[str]:
        """Writes the modules the adapter replaces (modules_to_save) into `slot`, wrapping them the first time.
        Returns their paths."""
        for module in self.replaced.values():
            module.variants.pop(str(slot), None)
        config = adapter.config
        for owner in config.modules_to_save:
            if owner not in self.replaced:
                wrapper = ReplacedModule(self.modules[owner], self.selection)
                self.set(owner, wrapper)
                self.replaced[owner] = wrapper
            wrapper = self.replaced[owner]
            variant = copy.deepcopy(wrapper.original)
            tensors = dict(variant.named_parameters()) | dict(variant.named_buffers())
            with torch.no_grad():
                for name in adapter.tensors:  # names first: only this module's tensors are read
                    if config.replacement_owner(name) == owner:
                        tensors[name[len(C.TENSOR_PREFIX) + len(owner) + 1:]].copy_(adapter.tensors[name])
            wrapper.variants[str(slot)] = variant
        return frozenset(config.modules_to_save)

    def clear(self, slot: int) -> None:
        """Empties `slot` in every layer and replaced module."""
        for layer in self.layers.values():
            layer.clear(slot)
        for module in self.replaced.values():
            module.variants.pop(str(slot), None)

    def renumber(self, mapping: Mapping[int, int]) -> None:
        """Keeps the slots in `mapping` (old -> new, in the new order) and drops the others."""
        for layer in self.layers.values():
            layer.select_slots(list(mapping))
        self._on_change()
        for module in self.replaced.values():
            module.variants = nn.ModuleDict({str(mapping[int(k)]): v for k, v in module.variants.items()})
            if module.pinned is not None:
                module.pinned = mapping[module.pinned]
        self.capacity = len(mapping)

    def pin(self, slots: Sequence[int] | None) -> None:
        """Makes each replaced module apply the variant of the first of `slots` that has one (while merged), or
        none (None)."""
        for module in self.replaced.values():
            module.pinned = next((s for s in slots if str(s) in module.variants), None) if slots else None

    def set(self, path: str, module: nn.Module) -> None:
        parent, _, child = path.rpartition(".")
        setattr(self.modules[parent] if parent else self.model, child, module)

    @contextlib.contextmanager
    def unwrapped(self) -> Iterator[None]:
        """Temporarily the plain model (with merged weights, and replaced modules in place), for saving."""
        wrapped = {path: layer for path, layer in self.layers.items() if not isinstance(layer, ExpertParamLayer)}
        wrapped.update(self.experts)
        for path, layer in wrapped.items():
            self.set(path, layer.base_layer)
        for path, module in self.replaced.items():
            self.set(path, module.variants[str(module.pinned)] if module.pinned is not None else module.original)
        try:
            yield
        finally:
            for path, layer in wrapped.items():
                self.set(path, layer)
            for path, module in self.replaced.items():
                self.set(path, module)

    def restore(self) -> None:
        """Puts every original module back and forgets the wrapped ones."""
        for path, layer in self.layers.items():
            if not isinstance(layer, ExpertParamLayer):
                self.set(path, layer.base_layer)
        for path, module in self.experts.items():
            self.set(path, module.base_layer)
        for path, module in self.replaced.items():
            self.set(path, module.original)
        self.layers.clear()
        self.experts.clear()
        self.replaced.clear()

"""Adapters on a live transformers model: attach once, then load, switch, stack, route, merge and unmerge.

    adapters = lora_hub.attach(model)             # any device, 8-bit included; nothing is copied
    adapters.load("sql", "sql.safetensors")       # checked against the model first, then straight to each layer
    adapters.use("sql")                           # switch: small tensors written in place, no module rebuilt
    adapters.use({"sql": 0.5, "chat": 0.5})       # stack with weights
    with adapters.route(["sql", None, "chat"]):   # one adapter per batch row
        logits = model(input_ids).logits
    adapters.merge("sql"); adapters.unmerge()     # fold in for zero overhead; unmerge restores the base bit for bit

Limits, for compiled models and CUDA graphs: switching between resident adapters, changing weights and routing
rows never reallocates or rebuilds anything. Loading may: a load that needs more slots than exist, a larger rank
than a layer holds, or a module not yet wrapped grows the buffers or wraps the module. Pass `max_adapters`,
`max_rank` and `targets` to `attach` to fix all three up front; loads within them never reallocate (lower-rank
adapters are zero-padded to `max_rank`, which costs compute as in PEFT's hotswap). Changing the number of stacked
adapters, or turning adapters off and on, changes which code path runs (a recompile for torch.compile).

Loading a lora-hub file reads the factors with positioned reads straight into the slot's buffers (one copy from
the page cache); the layers a load wraps are built while the read runs in the background. A replacement with the
same tensor layout (adapters of one shape share it) reuses the reads worked out for the slot. The model may be
moved or converted after attaching (`model.to(...)`): the paths follow their layers, and nothing is kept that
points into the old buffers.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..adapter import Adapter, AdapterConfig
from ..basemodel import LiveBase
from ..errors import AdapterMismatchError, AdapterNotFoundError, LoraHubWarning, RuntimeStateError
from ..findings import Finding, Severity
from ..validate import check_base
from .hostcache import HostCache
from .layers import LoraLayer
from .loading import SlotReads, fill
from .selection import Selection
from .weights import Snapshot, restore
from .wrapping import WrappedModel

Choice = str | Mapping[str, float] | None
"""What to use: an adapter name, {name: weight} to stack, or None for the bare base model."""


@dataclass
class _Resident:
    slot: int
    config: AdapterConfig
    source: str | None
    replaced: frozenset[str] = field(default_factory=frozenset)
    """Modules whose weights the adapter replaces (modules to save, its own base weights, token rows): two adapters
    that replace the same module cannot be stacked."""
    dora: bool = False
    warnings: tuple[Finding, ...] = ()
    """What checking it against the model warned of."""


def _fit_alike(config: AdapterConfig, other: AdapterConfig) -> bool:
    """Whether the base tier of validation reads the same of both configs (for tensors of one layout): the same
    modules, trainable tokens, modules to save and declared base model. (Configs read from files share the specs of
    equal module entries, so the modules compare by identity.)"""
    return (config.modules == other.modules and config.trainable_tokens == other.trainable_tokens
            and config.modules_to_save == other.modules_to_save and config.base_model == other.base_model)


class AdapterRuntime:
    """The adapters attached to one live model: which are resident, which are in use, and what is merged.

    Create it with `lora_hub.attach(model)`. The model keeps its identity: modules are wrapped in place, once.
    """

    def __init__(self, model: nn.Module, *, targets: Iterable[str] | None = None, max_adapters: int | None = None,
                 max_rank: int | None = None, dtype: torch.dtype | None = None, max_resident: int | None = None,
                 host_cache_bytes: int | None = None) -> None:
        if max_resident is not None:
            if isinstance(max_resident, bool) or not isinstance(max_resident, int) or max_resident < 1:
                raise ValueError(f"max_resident must be a positive integer, got {max_resident!r}")
            if max_adapters is not None and max_adapters != max_resident:
                raise ValueError("max_resident fixes the slots itself: give max_adapters or max_resident, not both")
            max_adapters = max_resident
        self.model = model
        self.lock = threading.RLock()
        """Held by every change of the runtime, and by `serving` around a forward pass: threads that serve the
        model take it (through `serving`, or directly) so that no change lands in the middle of their forward."""
        self.max_resident = max_resident
        self._recent: OrderedDict[str, None] = OrderedDict()  # resident names, least recently used first
        self._sources: dict[str, Any] = {}  # what each name was loaded from, to load it again on demand
        self._held: Counter[str] = Counter()  # names that open using()/route()/serving() blocks need resident
        self._host: HostCache | None = None
        if host_cache_bytes is not None:
            device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
            self._host = HostCache(host_cache_bytes, pin=device.type == "cuda" and torch.cuda.is_available())
        self.selection = Selection()
        self._wrapped = WrappedModel(model, self.selection, capacity=max_adapters or 0, max_rank=max_rank, dtype=dtype,
                                     on_change=self._forget_reads)
        self._fixed_capacity = max_adapters is not None
        self._resident: dict[str, _Resident] = {}
        self._active: dict[str, float] | None = None
        self._merged: tuple[dict[str, float], dict[str, Snapshot]] | None = None
        self._reads: dict[int, SlotReads] = {}  # by slot; forgotten whenever buffers are reallocated or moved
        self.selection.on_move(self._forget_reads)
        self._detached = False
        if targets is not None:
            self._wrapped.wrap(self._wrapped.allocate(self._wrapped.resolve(targets), {}))

    # --- what is here ------------------------------------------------------------------------------------------

    @property
    def layers(self) -> dict[str, LoraLayer]:
        """The wrapped layers by module path (expert parameters by parameter path)."""
        return self._wrapped.layers

    @property
    def adapters(self) -> list[str]:
        """The names of the resident adapters."""
        return list(self._resident)

    @property
    def active(self) -> dict[str, float] | None:
        """What the unmerged paths apply: {name: weight}, or None for the bare base model."""
        return dict(self._active) if self._active else None

    @property
    def merged(self) -> dict[str, float] | None:
        """What is merged into the base weights, or None."""
        return dict(self._merged[0]) if self._merged else None

    def __repr__(self) -> str:
        return (f"AdapterRuntime({len(self.layers)} layers, adapters={self.adapters}, active={self.active}, "
                f"merged={self.merged})")

    # --- loading -----------------------------------------------------------------------------------------------

    def load(self, name: str, source: Adapter | str | os.PathLike[str], *, allow_pickle: bool = False,
             **convert_options: Any) -> None:
        """Makes an adapter resident under `name` (replacing, in place, one already there under that name).

        Args:
            name: The name to use it by.
            source: An Adapter, a lora-hub file, a PEFT folder, or any layout `convert_adapter` reads; or a name
                in the local registry; or a Hub repo id (`namespace/name[@revision]`), pulled first.
            allow_pickle: Allow pickle checkpoints (weights_only, on the CPU).
            convert_options: For `convert_adapter`; `verify=True` checks a lora-hub file's bytes against its
                recorded checksum first (not done by default: a load writes nothing, and a hot swap would pay a full
                hash of the file).

        Raises:
            AdapterMismatchError: The adapter does not fit this model (the base tier of validation found errors);
                nothing was changed.
            RuntimeStateError: Adapters are merged (unmerge first), or the runtime is detached.
            And the errors of `convert_adapter`.
        """
        self._check_alive()
        if self._merged:
            raise RuntimeStateError(f"cannot load '{name}' while adapters are merged: unmerge() first")
        adapter = source if isinstance(source, Adapter) else self._convert(source, allow_pickle, convert_options)
        if self._host is not None and not isinstance(source, Adapter):
            adapter = self._host.put(name, adapter)  # read once, here, outside the lock
        with self.lock:
            self._load(name, adapter)
            self._sources[name] = source if isinstance(source, Adapter) else (source, allow_pickle, convert_options)

    def _load(self, name: str, adapter: Adapter, keep: set[str] | None = None) -> None:
        """Puts a read adapter into a slot (evicting within a resident budget), under the lock."""
        self._check_alive()
        if self._merged:
            raise RuntimeStateError(f"cannot load '{name}' while adapters are merged: unmerge() first")
        before = self._resident.get(name)
        reads = self._fitting_reads(before.slot, adapter) if before is not None else None
        alike = reads is not None and _fit_alike(adapter.config, before.config)  # tensors of one layout, too
        if alike:
            warned = before.warnings  # the base tier would find what it found for the adapter it replaces
        else:
            warned = self._check_fit(name, adapter)
        for finding in warned:
            warnings.warn(LoraHubWarning(f"adapter '{name}': {finding.code}: {finding.message}"), stacklevel=3)
        limit = self._wrapped.max_rank
        too_wide = [m for m, s in adapter.modules.items() if limit is not None and s.r * s.groups > limit]
        if too_wide:
            spec = adapter.modules[too_wide[0]]
            raise RuntimeStateError(f"adapter '{name}': '{too_wide[0]}' has rank {spec.r * spec.groups}, over "
                                    f"max_rank={limit}; nothing was changed")
        if name not in self._resident and self.max_resident is not None and len(self._resident) >= self.max_resident:
            self._evict(keep={name} | (keep or set()))
        if before is None:
            slot = self._free_slot()
            reads = self._fitting_reads(slot, adapter)  # a slot freed by an adapter of the same layout, say
        else:
            slot = before.slot
        new = self._wrapped.reserve(adapter) if reads is None else {}  # a fitting plan: every buffer is as needed
        try:
            if reads is not None:
                reads.load(slot, adapter, same_specs=alike)
            else:
                kept = fill(slot, adapter, self.layers, new, self._wrapped.wrap)
                if kept is not None:
                    self._reads[slot] = kept
        except BaseException:  # half-written (the file changed under us): the slot is emptied
            for layer in self.layers.values():
                layer.clear(slot)
            if name in self._resident:  # an adapter being replaced is gone, not half there
                self.unload(name)
            raise
        # embedding matrices equal to the layer's own are not kept, and do not clash with other adapters
        brought = [m for m, s in adapter.modules.items() if s.replaces_base
                   and (m not in self.layers or slot in self.layers[m].base_weights)]
        replaced = self._wrapped.load_replacements(slot, adapter) | frozenset(
            brought + list(adapter.config.trainable_tokens))
        dora = any(s.dora for s in adapter.modules.values())
        self._resident[name] = _Resident(slot, adapter.config, adapter.source, replaced, dora, warned)
        self._touch([name])
        if self._active and name in self._active and before is not None and before.replaced != replaced:
            self.use(self._active)  # in use, and now replacing other modules: checked against the others again

    def unload(self, name: str) -> None:
        """Removes an adapter and frees its memory (unless `max_adapters` fixed the capacity, then its slot is
        zeroed for reuse). An active adapter is first removed from the selection. A name unloaded is forgotten: it
        is no longer loaded again on demand (an evicted one is)."""
        with self.lock:
            self._unload(name)
            self._sources.pop(name, None)
            if self._host is not None:
                self._host.discard(name)

    def _unload(self, name: str) -> None:
        self._check_alive()
        resident = self._get(name)
        if self._merged and name in self._merged[0]:
            raise RuntimeStateError(f"'{name}' is merged: unmerge() before unloading it")
        if self._active and name in self._active:
            rest = {n: w for n, w in self._active.items() if n != name} or None
            if self._merged:
                self._active = rest  # what unmerge() goes back to
            else:
                self.use(rest)
        self._wrapped.clear(resident.slot)
        del self._resident[name]
        self._recent.pop(name, None)
        if not self._fixed_capacity:
            self._compact()

    # --- switching ---------------------------------------------------------------------------------------------

    def use(self, choice: Choice) -> None:
        """Selects what the model computes: an adapter name, {name: weight} to stack several (the deltas add up,
        each times its weight), or None for the bare base model. Writes a few small tensors; nothing else changes.

        A DoRA adapter rescales each output row of the whole weight, so it has no weighted or stacked meaning: it
        applies alone, with weight 1 (routing it to some rows of a batch is fine). Replaced modules, base weights an
        adapter brings and token rows apply whatever the weight, like PEFT's modules_to_save.

        Raises:
            RuntimeStateError: An unknown name, or adapters are merged (unmerge first).
            ValueError: A weight that is not a finite number, two stacked adapters replacing the same module, or a
                DoRA adapter stacked or weighted.
        """
        with self.lock:
            self._check_alive()
            if self._merged:
                raise RuntimeStateError("adapters are merged into the weights: unmerge() before use()")
            names = _names(choice)
            self._ensure(names)
            weights = self._weights(choice)
            if weights:
                self._check_replacements(weights)
                self.selection.set_lanes([self._resident[n].slot for n in weights], list(weights.values()))
            else:
                self.selection.set_lanes([], [])
            self._active = weights or None
            self._touch(names)

    @contextlib.contextmanager
    def using(self, choice: Choice) -> Iterator[AdapterRuntime]:
        """`use(choice)` for the duration of a with block, then back to what was in use before. Within a resident
        budget, the adapters it uses are not evicted while the block runs."""
        with self.lock:
            previous = self._active
            self.use(choice)
            held = _names(choice)
            self._held.update(held)
        try:
            yield self
        finally:
            with self.lock:
                self._release(held)
                self.use(previous)

    @contextlib.contextmanager
    def serving(self, choice: Choice) -> Iterator[AdapterRuntime]:
        """`using(choice)` while holding the runtime's lock, for the forward passes of one request in a serving
        process: other threads may load, evict and switch, but never in the middle of this block's forwards.

        Example:
            >>> with adapters.serving("acme/sql-lora"):    # loaded on demand, evicting within max_resident
            ...     logits = model(input_ids).logits
        """
        with self.lock, self.using(choice):
            yield self

    @contextlib.contextmanager
    def route(self, rows: Sequence[str | None]) -> Iterator[AdapterRuntime]:
        """Within the with block, row i of each batch uses adapter rows[i] (None: the bare base model). One forward
        pass computes every row with its own adapter. Names that are not resident are loaded on demand (within a
        resident budget, which must hold all of them), and are not evicted while the block runs.

        Raises:
            RuntimeStateError: An unknown name, no adapter resident, adapters are merged, or more distinct adapters
                than `max_resident`.
        """
        with self.lock:
            self._check_alive()
            if self._merged:
                raise RuntimeStateError("adapters are merged into the weights: unmerge() before route()")
            names = list(dict.fromkeys(n for n in rows if n is not None))
            if self.max_resident is not None and len(names) > self.max_resident:
                raise RuntimeStateError(f"the batch routes to {len(names)} adapters, over max_resident="
                                        f"{self.max_resident}")
            self._ensure(names)
            if not self._resident:
                raise RuntimeStateError("no adapter is loaded")
            spare = next(iter(self._resident.values())).slot
            slots = [self._get(n).slot if n is not None else spare for n in rows]
            previous = self._active
            self.selection.set_rows(slots, [0.0 if n is None else 1.0 for n in rows])
            self._held.update(names)
            self._touch(names)
        try:
            yield self
        finally:
            with self.lock:
                self._release(names)
                self.use(previous)

    # --- merging -----------------------------------------------------------------------------------------------

    def merge(self, choice: Choice = None, *, progress: Callable[[int, int], None] | None = None) -> None:
        with self.lock:
            self._merge(choice, progress=progress)

    def _merge(self, choice: Choice = None, *, progress: Callable[[int, int], None] | None = None) -> None:
        """Folds adapters into the base weights, for inference at exactly the base model's cost: `choice` as in
        `use` (by default what is in use). A merge always starts from the original weights.

        For 8-bit layers the original int8 codes are dequantized, the delta added, and the result requantized; for
        4-bit layers likewise. `unmerge` puts the originals back, so nothing drifts however many cycles are run.

        Args:
            progress: Called as progress(done, total) after each layer.

        Raises:
            RuntimeStateError: Nothing to merge.
        """
        self._check_alive()
        weights = self._weights(choice) if choice is not None else self._active
        if not weights:
            raise RuntimeStateError("nothing to merge: give an adapter (or weights), or use() one first")
        self._check_replacements(weights)
        active = self._active
        if self._merged:
            self.unmerge()
        snapshots: dict[str, Snapshot] = {}
        touched = {m for n in weights for m in (*self._resident[n].config.modules,
                                               *self._resident[n].config.trainable_tokens)}
        targeted = [(path, layer) for path, layer in self.layers.items()
                    if path in touched or (getattr(layer, "output_rows", None) is not None and
                                           layer.output_rows.applies([self._resident[n].slot for n in weights]))]
        slots, factors = [self._resident[n].slot for n in weights], list(weights.values())
        try:
            for done, (path, layer) in enumerate(targeted, 1):
                with torch.no_grad():
                    snapshots[path] = layer.merge(slots, factors)
                if progress is not None:
                    progress(done, len(targeted))
        except BaseException:
            for snapshot in reversed(snapshots.values()):  # nothing half-merged
                restore(snapshot)
            raise
        self._wrapped.pin(slots)
        self.selection.set_lanes([], [])
        self._active = active
        self._merged = (dict(weights), snapshots)

    def unmerge(self) -> None:
        """Restores the base weights exactly as they were, and what was in use before merging."""
        with self.lock:
            self._unmerge()

    def _unmerge(self) -> None:
        self._check_alive()
        if not self._merged:
            return
        for snapshot in reversed(self._merged[1].values()):
            restore(snapshot)
        self._wrapped.pin(None)
        self._merged = None
        self.use(self._active)

    def save_merged(self, directory: str | os.PathLike[str], choice: Choice = None, **save_options: Any) -> None:
        """Writes the model with `choice` (default: what is merged, else what is in use) merged in, as a transformers
        model folder (`save_pretrained`). The runtime's state is the same afterwards."""
        with self.lock:
            self._save_merged(directory, choice, **save_options)

    def _save_merged(self, directory: str | os.PathLike[str], choice: Choice, **save_options: Any) -> None:
        self._check_alive()
        previous = self.merged
        if choice is not None or previous is None:
            self.merge(choice)
        try:
            with self._wrapped.unwrapped():
                self.model.save_pretrained(directory, **save_options)
        finally:
            if previous is None:
                self.unmerge()
            elif choice is not None:
                self.merge(previous)

    def detach(self) -> nn.Module:
        """Unmerges, puts every original module back, and frees the adapters. Returns the model."""
        with self.lock:
            return self._detach()

    def _detach(self) -> nn.Module:
        self._check_alive()
        self.unmerge()
        self._wrapped.restore()
        self._resident.clear()
        self._reads.clear()
        self._recent.clear()
        self._sources.clear()
        self._detached = True
        return self.model

    # --- internals ---------------------------------------------------------------------------------------------

    def _forget_reads(self) -> None:
        self._reads.clear()

    def _check_alive(self) -> None:
        if self._detached:
            raise RuntimeStateError("this runtime was detached from its model; attach() again")

    def _get(self, name: str) -> _Resident:
        try:
            return self._resident[name]
        except KeyError:
            raise RuntimeStateError(f"no adapter '{name}' is loaded (loaded: {', '.join(self._resident) or 'none'})"
                                    ) from None

    def _weights(self, choice: Choice) -> dict[str, float]:
        if choice is None:
            return {}
        weights = {choice: 1.0} if isinstance(choice, str) else dict(choice)
        for name, weight in weights.items():
            self._get(name)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ValueError(f"the weight of '{name}' must be a finite number, got {weight!r}")
        return {name: float(weight) for name, weight in weights.items()}

    def _check_replacements(self, weights: Mapping[str, float]) -> None:
        for name, weight in weights.items():
            if self._resident[name].dora and (len(weights) > 1 or weight != 1.0):
                raise ValueError(f"'{name}' is a DoRA adapter: it rescales the whole weight of each module, so it "
                                 "applies alone and with weight 1 (stacking or weighting it has no defined meaning; "
                                 "route() may give it some rows of a batch)")
        seen: dict[str, str] = {}
        for name in weights:
            for module in self._resident[name].replaced:
                if module in seen:
                    raise ValueError(f"'{seen[module]}' and '{name}' both replace '{module}': they cannot be stacked")
                seen[module] = name

    def _convert(self, source, allow_pickle: bool, options: dict) -> Adapter:
        from ..convert import convert_adapter

        # convert_adapter takes a registry name or a Hub id too (see hub.resolve). Loading never writes an adapter,
        # so a lora-hub file's checksum is not re-hashed on every load (a hot swap would pay a full hash); pass
        # verify=True to check it, as pull and validate do. The live model is the reference for what a PEFT adapter
        # needs of its base (expert order, a base-modifying init's factors).
        options = {"verify": False, "reference_base": self._reference, **options}
        return convert_adapter(source, allow_pickle=allow_pickle, **options)

    @property
    def _reference(self) -> LiveBase:
        """The model as it was before wrapping: its description and original modules, for reading a base."""
        return LiveBase(self._wrapped.info, self._wrapped.modules)

    def _fitting_reads(self, slot: int, adapter: Adapter) -> SlotReads | None:
        """How the last file loaded into `slot` was read, if the adapter can be read the same way."""
        reads = self._reads.get(slot)
        return reads if reads is not None and reads.fits(adapter) else None

    def _check_fit(self, name: str, adapter: Adapter) -> tuple[Finding, ...]:
        """The base tier of validation against this model: raises on errors, returns the warnings."""
        shapes = adapter.tensor_shapes()
        findings = check_base(adapter.config, self._wrapped.info, shapes)
        errors = [f for f in findings if f.severity is Severity.ERROR and f.code != "FAN_IN_FAN_OUT_MISMATCH"]
        if errors:
            detail = "; ".join(f"{f.code}: {f.message}" for f in errors[:3])
            raise AdapterMismatchError(f"adapter '{name}' does not fit this model, which was left unchanged: {detail}",
                                       findings=errors, path=adapter.source)
        return tuple(f for f in findings if f.severity is Severity.WARNING)

    def _touch(self, names: Iterable[str]) -> None:
        for name in names:
            if name in self._resident:
                self._recent[name] = None
                self._recent.move_to_end(name)

    def _release(self, names: Iterable[str]) -> None:
        self._held.subtract(names)
        for name in [n for n, count in self._held.items() if count <= 0]:
            del self._held[name]

    def _ensure(self, names: Sequence[str]) -> None:
        """Loads on demand the names that are not resident: from the host tier, else from what they were loaded
        from before, else as a registry name or Hub id (or path)."""
        for name in names:
            if not isinstance(name, str) or name in self._resident:
                continue
            adapter = self._host.get(name) if self._host is not None else None
            source = self._sources.get(name)
            if adapter is None and isinstance(source, Adapter):
                adapter = source
            elif adapter is None:
                path, allow_pickle, options = source if source is not None else (name, False, {})
                try:
                    adapter = self._convert(path, allow_pickle, options)
                except AdapterNotFoundError:
                    if source is None:
                        self._get(name)  # neither loaded nor a path, registry name or Hub id: "no adapter loaded"
                    raise
                self._sources[name] = (path, allow_pickle, options)
                if self._host is not None:
                    adapter = self._host.put(name, adapter)
            self._load(name, adapter, keep=set(names))

    def _evict(self, keep: set[str]) -> None:
        """Unloads the least recently used resident adapter that nothing needs (not in use, merged, held, or in
        `keep`); it stays known, to be loaded again on demand."""
        busy = set(keep) | set(self._active or ()) | set(self._merged[0] if self._merged else ()) | set(self._held)
        victim = next((n for n in self._recent if n not in busy), None)
        if victim is None:
            raise RuntimeStateError(f"all {self.max_resident} resident adapters are needed (in use, merged, or held "
                                    "by a using(), route() or serving() block): raise max_resident, or release one")
        self._unload(victim)

    def _free_slot(self) -> int:
        """The lowest free slot; growing the capacity (for the next reserve) when every slot is used."""
        used = {r.slot for r in self._resident.values()}
        slot = next(i for i in range(len(used) + 1) if i not in used)
        if slot >= self._wrapped.capacity:
            if self._fixed_capacity:
                raise RuntimeStateError(f"all {self._wrapped.capacity} adapter slots are in use (max_adapters); "
                                        "unload one")
            self._wrapped.capacity = slot + 1
        return slot

    def _compact(self) -> None:
        """Renumbers the slots 0..n-1 and shrinks the buffers to n: unloading frees the memory."""
        order = sorted(self._resident.values(), key=lambda resident: resident.slot)
        mapping = {resident.slot: new for new, resident in enumerate(order)}
        self._wrapped.renumber(mapping)
        for resident in order:
            resident.slot = mapping[resident.slot]
        if not self._merged:  # while merged the paths are off; unmerge() selects again
            self.use(self._active)


def _names(choice: Choice) -> list[str]:
    if choice is None:
        return []
    return [choice] if isinstance(choice, str) else list(choice)


def attach(model: nn.Module, *, targets: Iterable[str] | None = None, max_adapters: int | None = None,
           max_rank: int | None = None, dtype: torch.dtype | None = None, max_resident: int | None = None,
           host_cache_bytes: int | None = None) -> AdapterRuntime:
    """Attaches a runtime to a live model, so that adapters can be loaded, switched, stacked, routed and merged.

    Args:
        model: A transformers model (or any nn.Module), on any device, full precision or bitsandbytes 8-bit/4-bit.
        targets: Module paths or trailing names ("q_proj") to wrap now; by default each load wraps what it needs.
        max_adapters: Fix the number of slots, so that loads never reallocate (see the module docs).
        max_rank: Fix every layer's rank; lower-rank adapters are zero-padded to it.
        dtype: The dtype of the LoRA paths; by default each base layer's compute dtype. torch.float32 on a bf16 or
            fp16 model computes the paths as PEFT does by default (more precise, twice the adapter memory).
        max_resident: A resident budget: at most this many adapters in the slots (fixed, as with max_adapters).
            Loading past it evicts the least recently used adapter that nothing needs; use(), route() and
            serving() load names that are not resident on demand (evicted ones from where they came, others as a
            registry name or Hub id).
        host_cache_bytes: A host tier for a resident budget: adapters read from disk stay in host memory (pinned
            on a CUDA model) up to this many bytes, so loading an evicted one again reads no file.

    Returns:
        The runtime; `runtime.detach()` restores the original modules.

    Example:
        >>> adapters = lora_hub.attach(model)
        >>> adapters.load("sql", "sql.safetensors")
        >>> adapters.use("sql")
    """
    return AdapterRuntime(model, targets=targets, max_adapters=max_adapters, max_rank=max_rank, dtype=dtype,
                          max_resident=max_resident, host_cache_bytes=host_cache_bytes)

"""Making one adapter from several: task arithmetic, multi-task mixes, LoraHub-style composition.

Every method is a small registered object (`METHODS`) with a name and a reference. The default methods act on the
update each adapter makes, dW = scaling * B @ A, so that the result is the weighted combination of the updates
itself: `cat` and `linear` exactly (rank = the sum of the ranks), `svd`, `ties`, `dare_linear`, `dare_ties` and
`magnitude_prune` followed by a truncated SVD back to low rank. The `*_ab` methods are PEFT's `add_weighted_adapter`
(and LoRAX's) versions, which combine the A and B factors separately: not a linear combination of the updates (the
cross terms B_i A_j remain), and only for equal ranks; they are kept for compatibility and reproduce PEFT's output.

Features (spec/FORMAT.md): embedding modules combine like linear ones (their update is a matrix too); lora_bias
adds up (sum of w_i * scaling_i * bias_i) in the exact and SVD methods; embedding matrices and trainable tokens that
an adapter brings are carried over like modules_to_save, and two sources that bring different ones for one module
cannot be combined. DoRA and expert parameters are refused by name: a weighted sum of DoRA updates is not a DoRA
update (each rescales its own adapted weight), and the methods work on 2-D updates.

Sources are read lazily and combined one module at a time, so memory holds one module's deltas, never the model's.
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

from .adapter import Adapter, AdapterConfig, BaseModelRef, ModuleSpec
from .errors import BaseModelMismatchError, ChecksumMismatchError, CombineError

if TYPE_CHECKING:
    import torch

MajoritySign = Literal["total", "frequency"]
LOWRANK_MIN_DIM = 4096  # full deltas at least this large on both sides use torch.svd_lowrank
LOWRANK_OVERSAMPLE = 16
LOWRANK_ITERATIONS = 6


@dataclass(frozen=True)
class Method:
    """One way of combining adapters.

    Attributes:
        name: The name `combine` and `lora-hub merge` take.
        reference: Where the method comes from (a paper or the code it reproduces).
        summary: One line on what it computes.
        space: "delta" (on the updates dW) or "ab" (on the A and B factors separately, as PEFT does).
        exact: The result's update is exactly the weighted sum of the sources' updates.
        low_rank: The result goes back to a chosen rank by truncated SVD (so `rank` applies).
        prune: How task tensors are pruned before merging: None, "magnitude" or "random" (needs `density`).
        sign_election: Conflicting signs are resolved by majority (TIES), and kept values averaged.
    """

    name: str
    reference: str
    summary: str
    space: Literal["delta", "ab"]
    exact: bool = False
    low_rank: bool = False
    prune: Literal["magnitude", "random"] | None = None
    sign_election: bool = False

    @property
    def uses_density(self) -> bool:
        return self.prune is not None


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Adds a method to `METHODS` (its name must be new)."""
    if method.name in METHODS:
        raise ValueError(f"a combination method called {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


_PEFT = "https://github.com/huggingface/peft/blob/main/src/peft/tuners/lora/model.py (add_weighted_adapter)"
_TIES = "https://arxiv.org/abs/2306.01708 (TIES-Merging, Yadav et al. 2023)"
_DARE = "https://arxiv.org/abs/2311.03099 (DARE, Yu et al. 2023)"
for _method in (
    Method("cat", _PEFT + ", combination_type='cat'", "sum of w_i * dW_i, exact; rank = sum of the ranks", "delta",
           exact=True),
    Method("linear", "https://arxiv.org/abs/2212.04089 (task arithmetic, Ilharco et al. 2023)",
           "sum of w_i * dW_i, exact (the same result as cat)", "delta", exact=True),
    Method("svd", _PEFT + ", combination_type='svd'", "sum of w_i * dW_i, truncated SVD to `rank`", "delta",
           low_rank=True),
    Method("ties", _TIES, "per-source magnitude pruning to `density`, sign election, mean of agreeing values; SVD",
           "delta", low_rank=True, prune="magnitude", sign_election=True),
    Method("dare_linear", _DARE, "random drop to `density` with rescaling, weighted sum; SVD", "delta",
           low_rank=True, prune="random"),
    Method("dare_ties", _DARE, "random drop to `density` with rescaling, TIES sign election; SVD", "delta",
           low_rank=True, prune="random", sign_election=True),
    Method("magnitude_prune", _PEFT + ", combination_type='magnitude_prune_svd'",
           "per-source magnitude pruning to `density`, weighted sum; SVD", "delta", low_rank=True,
           prune="magnitude"),
    Method("linear_ab", _PEFT + ", combination_type='linear'",
           "A and B averaged separately with sqrt weights: approximate (cross terms), equal ranks only", "ab"),
    Method("ties_ab", _PEFT + ", combination_type='ties'", "TIES on A and B separately (PEFT)", "ab",
           prune="magnitude", sign_election=True),
    Method("dare_linear_ab", _PEFT + ", combination_type='dare_linear'", "DARE on A and B separately (PEFT)", "ab",
           prune="random"),
    Method("dare_ties_ab", _PEFT + ", combination_type='dare_ties'", "DARE-TIES on A and B separately (PEFT)", "ab",
           prune="random", sign_election=True),
    Method("magnitude_prune_ab", _PEFT + ", combination_type='magnitude_prune'",
           "magnitude pruning on A and B separately (PEFT)", "ab", prune="magnitude"),
):
    register(_method)


@dataclass(frozen=True)
class ModuleReport:
    """What `combine` did to one module.

    Attributes:
        module: Its path. sources: How many sources adapt it. rank: The result's rank.
        energy: For low-rank methods, the fraction of the combined update's squared Frobenius norm that the kept
            singular values hold (1.0 = nothing lost); None otherwise.
        lowrank: The randomized `torch.svd_lowrank` was used (large module) instead of a full SVD.
        done, total: This is module `done` of `total`.
    """

    module: str
    sources: int
    rank: int
    energy: float | None = None
    lowrank: bool = False
    done: int = 0
    total: int = 0


def combine(adapters: Sequence[Adapter | str | os.PathLike[str]], weights: Sequence[float] | None = None, *,
            method: str = "cat", rank: int | None = None, density: float | None = None,
            majority_sign: MajoritySign = "total", seed: int | torch.Generator | None = None, force: bool = False,
            order: Sequence[str] | None = None, device: str | torch.device | None = None,
            on_module: Callable[[ModuleReport], None] | None = None) -> Adapter:
    """One adapter from several.

    Args:
        adapters: Adapters, or anything `convert_adapter` reads, or registry names or Hub ids.
        weights: One weight per adapter (default: all 1.0); negative weights subtract.
        method: A name in `METHODS`: cat, linear, svd, ties, dare_linear, dare_ties, magnitude_prune, or the A/B
            variants linear_ab, ties_ab, dare_linear_ab, dare_ties_ab, magnitude_prune_ab.
        rank: For low-rank methods, the result's rank (per module at most min(out, in)); default: the largest
            rank among the sources of each module.
        density: For pruning methods, the fraction of values kept, in (0, 1].
        majority_sign: For TIES methods: elect the sign by "total" mass or by "frequency".
        seed: For DARE methods, the seed of the random drops (default: a fresh one, recorded in the provenance), or
            a torch.Generator to draw them from (its state is then not recorded).
        force: Combine adapters whose declared base models differ.
        order: For DARE methods, the order in which modules draw their masks (default: sorted). With the model's
            module order (`[name for name, _ in model.named_modules()]`) and a generator in the state of PEFT's
            global one, the DARE A/B methods reproduce PEFT's add_weighted_adapter bit for bit.
        device: Where to compute (default: where the source tensors are).
        on_module: Called with a `ModuleReport` after each module.

    Returns:
        The combined adapter, in memory; its config's `provenance` records the method, its parameters and each
        source's name, tensor sha256 and weight. Save it with `save_adapter`.

    Raises:
        CombineError: Bad arguments, or sources that cannot be combined (see the message).
        BaseModelMismatchError: The sources declare different base models (and not `force`).
    """
    import torch

    from .format import tensors_digest

    chosen = _method(method)
    sources = [_read(a) for a in adapters]
    labels = [_name(s, given, i) for i, (s, given) in enumerate(zip(sources, adapters, strict=True))]
    if not sources:
        raise CombineError("give at least one adapter to combine")
    weights = [1.0] * len(sources) if weights is None else [float(w) for w in weights]
    _check_arguments(chosen, sources, weights, rank, density, majority_sign)
    _check_features(chosen, sources)
    if not force:
        _check_bases(sources)
    if isinstance(seed, torch.Generator):
        generator, seed = seed, None
    else:
        if chosen.prune == "random" and seed is None:
            seed = secrets.randbits(63)
        generator = torch.Generator(device=device or "cpu")
        if seed is not None:
            generator.manual_seed(seed)
    modules = sorted({m for s in sources for m in s.modules})
    if order is not None:
        position = {name: i for i, name in enumerate(order)}
        modules.sort(key=lambda m: (position.get(m, len(position)), m))
    replaced = _replacements(sources)
    tokens, carried = _carried(sources)
    tensors: dict[str, torch.Tensor] = dict(replaced[1]) | carried
    specs: dict[str, ModuleSpec] = {}
    energies: list[float] = []
    dtype = _output_dtype(sources)
    for done, module in enumerate(modules, 1):
        present = [(s, w) for s, w in zip(sources, weights, strict=True) if module in s.modules]
        spec, a, b, report = _combine_module(chosen, module, present, rank, density, majority_sign, generator,
                                             device)
        bias = _bias(module, present, device) if any(s.modules[module].bias for s, _ in present) else None
        brought = any(s.modules[module].replaces_base for s, _ in present)
        spec = specs[module] = replace(spec, bias=bias is not None, replaces_base=brought)
        names = spec.tensor_names(module)
        tensors[names.lora_A], tensors[names.lora_B] = a.to(dtype).contiguous(), b.to(dtype).contiguous()
        if bias is not None:
            tensors[names.bias] = bias.to(dtype).contiguous()
        if report.energy is not None:
            energies.append(report.energy)
        if on_module is not None:
            on_module(replace(report, done=done, total=len(modules)))
    provenance = {
        "method": chosen.name,
        "reference": chosen.reference,
        "parameters": {"rank": rank, "density": density, "seed": seed,
                       "majority_sign": majority_sign if chosen.sign_election else None},
        "sources": [{"name": label, "sha256": s.config.tensors_sha256 or tensors_digest(s), "weight": w}
                    for s, label, w in zip(sources, labels, weights, strict=True)],
        "tool": f"lora-hub {_version()}",
    }
    if energies:
        provenance["energy"] = {"min": min(energies), "mean": sum(energies) / len(energies)}
    first = sources[0].config
    config = AdapterConfig(modules=specs, modules_to_save=replaced[0], base_model=_base(first.base_model, specs),
                           trainable_tokens=tokens, task_type=first.task_type,
                           tags=tuple(sorted({t for s in sources for t in s.config.tags})),
                           license=first.license if all(s.config.license == first.license for s in sources) else None,
                           provenance=provenance)
    return Adapter(config, tensors)


def _method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise CombineError(f"unknown combination method {name!r}: use one of {', '.join(METHODS)}") from None


def _read(source: Adapter | str | os.PathLike[str]) -> Adapter:
    """A source to combine: a corrupt one (bytes that fail their checksum) is refused, never mixed into a new file
    with a fresh checksum."""
    from .format import verify_checksum

    if isinstance(source, Adapter):
        verify_checksum(source)
        if source.checksum_mismatch is not None:
            raise ChecksumMismatchError("the adapter was read despite a checksum mismatch (forced); corrupt bytes "
                                        "are not combined into a new adapter", path=source.source)
        return source
    from .convert import convert_adapter
    from .hub import locate

    return convert_adapter(locate(source))


def _check_arguments(method: Method, sources: list[Adapter], weights: list[float], rank: int | None,
                     density: float | None, majority_sign: str) -> None:
    if len(weights) != len(sources):
        raise CombineError(f"{len(weights)} weight(s) for {len(sources)} adapter(s): give one weight per adapter")
    if not all(math.isfinite(w) for w in weights):
        raise CombineError(f"weights must be finite numbers, got {weights}")
    if rank is not None:
        if not method.low_rank:
            kept = "is the sum of the sources' ranks" if method.exact else "is the sources' rank"
            raise CombineError(f"{method.name} does not take a rank (its rank {kept}): use svd (or ties, dare_*, "
                               "magnitude_prune) to choose one")
        if not isinstance(rank, int) or rank < 1:
            raise CombineError(f"rank must be an integer >= 1, got {rank!r}")
    if method.uses_density:
        if density is None:
            raise CombineError(f"{method.name} needs a density, the fraction of values kept, in (0, 1]")
        if not (isinstance(density, (int, float)) and 0 < density <= 1):
            raise CombineError(f"density must be in (0, 1], got {density!r}")
    elif density is not None:
        raise CombineError(f"{method.name} does not prune: density applies to ties, dare_*, magnitude_prune")
    if majority_sign not in ("total", "frequency"):
        raise CombineError(f"majority_sign must be 'total' or 'frequency', got {majority_sign!r}")


def _check_features(method: Method, sources: list[Adapter]) -> None:
    """Refuses, by name, the features that have no meaning in a combination (see the module docs)."""
    for i, source in enumerate(sources, 1):
        for module, spec in source.modules.items():
            if spec.dora:
                raise CombineError(f"adapter {i} uses DoRA ('{module}'): DoRA rescales each adapted weight by its own "
                                   "magnitude, so a weighted sum of DoRA adapters is not a DoRA adapter; apply it "
                                   "alone (or merge it into the base model first) and combine the others")
            if spec.kind == "experts":
                raise CombineError(f"adapter {i} adapts expert parameters ('{module}'), which lora-hub does not "
                                   "combine into one adapter; stack the adapters at run time instead "
                                   "(Runtime.use({name: weight, ...}))")
            if spec.bias and (method.space == "ab" or method.prune is not None):
                raise CombineError(f"adapter {i} has a lora_bias ('{module}'): {method.name} has no rule for biases; "
                                   "use cat, linear or svd, where the biases add up with the updates")


def _carried(sources: list[Adapter]) -> tuple[dict[str, tuple[int, ...]], dict[str, torch.Tensor]]:
    """The trainable tokens and the embedding matrices the sources bring, carried into the result unchanged: one
    source per module for tokens; the same matrix (bit for bit) from every source that brings one."""
    import torch

    tokens: dict[str, tuple[int, ...]] = {}
    owners: dict[str, int] = {}
    tensors: dict[str, torch.Tensor] = {}
    for i, source in enumerate(sources):
        for module, indices in source.config.trainable_tokens.items():
            if module in owners:
                raise CombineError(f"adapters {owners[module] + 1} and {i + 1} both bring trainable tokens for "
                                   f"'{module}': replaced rows cannot be combined; drop them from one of them")
            owners[module], tokens[module] = i, indices
            name = source.config.token_tensor_name(module)
            tensors[name] = source.tensors[name]
        for module, spec in source.modules.items():
            if not spec.replaces_base:
                continue
            name = spec.tensor_names(module).base
            weight = source.tensors[name]
            if name in tensors and not torch.equal(tensors[name], weight):
                raise CombineError(f"two adapters bring different embedding matrices for '{module}' (a resized or "
                                   "changed vocabulary each): they cannot be combined")
            tensors[name] = weight
    return tokens, tensors


def _bias(module: str, present, device) -> torch.Tensor:
    """The lora_bias of the combination, at scaling 1: sum of w_i * scaling_i * bias_i."""
    total = None
    for adapter, weight in present:
        bias = adapter.lora_bias(module)
        if bias is None:
            continue
        spec = adapter.modules[module]
        part = bias.to(device=device, dtype=_compute_dtype(bias)) * (weight * spec.scaling)
        total = part if total is None else total + part
    return total


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """Sources are combined in float32, or wider when they are stored wider."""
    import torch

    return torch.promote_types(tensor.dtype, torch.float32)


def _check_bases(sources: list[Adapter]) -> None:
    refs = [(i, s.config.base_model) for i, s in enumerate(sources) if s.config.base_model is not None]
    for field in ("model_type", "name"):
        values = {getattr(ref, field) for _, ref in refs if getattr(ref, field)}
        if len(values) > 1:
            raise BaseModelMismatchError(f"the adapters declare different base models ({field}: "
                                         f"{', '.join(sorted(values))}): combining them is meaningless unless they "
                                         "are the same model; pass force=True (--force) if they are")
    targets: dict[frozenset[str], str] = {}
    for i, ref in refs:
        if ref.fingerprint:
            key = frozenset(sources[i].modules)
            if targets.setdefault(key, ref.fingerprint) != ref.fingerprint:
                raise BaseModelMismatchError("two adapters target the same modules of base models with different "
                                             "fingerprints (module shapes): pass force=True (--force) only if they "
                                             "are the same model")


def _replacements(sources: list[Adapter]) -> tuple[tuple[str, ...], dict[str, torch.Tensor]]:
    owners: dict[str, int] = {}
    tensors: dict[str, torch.Tensor] = {}
    for i, source in enumerate(sources):
        for module in source.config.modules_to_save:
            if module in owners:
                raise CombineError(f"'{module}' is replaced (modules_to_save) by adapters {owners[module] + 1} and "
                                   f"{i + 1}: replaced weights cannot be combined; drop it from one of them")
            owners[module] = i
        tensors.update(source.replacement_tensors())
    lora_modules = {m for s in sources for m in s.modules}
    clash = sorted(m for m in owners if any(x == m or x.startswith(m + ".") or m.startswith(x + ".")
                                            for x in lora_modules))
    if clash:
        raise CombineError(f"'{clash[0]}' is replaced by one adapter and adapted by another: they cannot be combined")
    return tuple(sorted(owners)), tensors


def _output_dtype(sources: list[Adapter]) -> torch.dtype:
    import torch

    dtype = None
    for source in sources:
        for module in source.modules:
            a = source.lora_A(module)
            dtype = a.dtype if dtype is None else torch.promote_types(dtype, a.dtype)
            break
    return dtype if dtype is not None and dtype.is_floating_point else torch.float32


def _combine_module(method: Method, module: str, present: list[tuple[Adapter, float]], rank: int | None,
                    density: float | None, majority_sign: str, generator, device):
    specs = [s.modules[module] for s, _ in present]
    first = specs[0]
    for spec in specs[1:]:
        if (spec.in_features, spec.out_features, spec.fan_in_fan_out, spec.kind) != \
                (first.in_features, first.out_features, first.fan_in_fan_out, first.kind):
            raise CombineError(f"module '{module}': the adapters disagree on its shape or layout "
                               f"({first.kind} {first.out_features}x{first.in_features}, fan_in_fan_out="
                               f"{first.fan_in_fan_out} vs {spec.kind} {spec.out_features}x{spec.in_features}, "
                               f"fan_in_fan_out={spec.fan_in_fan_out}): they were made for different base models")
    if method.space == "ab":
        return _combine_ab(method, module, present, density, majority_sign, generator, device)
    if method.exact:
        return _concatenate(module, present, device)
    return _combine_deltas(method, module, present, rank, density, majority_sign, generator, device)


def _factors(adapter: Adapter, module: str, device) -> tuple[torch.Tensor, torch.Tensor, ModuleSpec]:
    """A module's A, B (float32 or wider, on `device`) and spec, with enable_lora expanded to the plain form."""

    from .convert.peft_export import expand_enable_lora

    spec = adapter.modules[module]
    if spec.enable_lora is not None:
        part = Adapter(AdapterConfig(modules={module: spec}),
                       {n: adapter.tensors[n] for n in adapter.config.lora_tensor_names(module)}, _checked=True)
        part = expand_enable_lora(part)
        spec, a, b = part.modules[module], part.lora_A(module), part.lora_B(module)
    else:
        a, b = adapter.lora_A(module), adapter.lora_B(module)
    compute = _compute_dtype(a)
    return a.to(device=device, dtype=compute), b.to(device=device, dtype=compute), spec


def _plain(template: ModuleSpec, r: int) -> ModuleSpec:
    """A plain module of rank r with scaling 1 (alpha = r), on the same base layer."""
    return ModuleSpec(r=r, alpha=r, in_features=template.in_features, out_features=template.out_features,
                      fan_in_fan_out=template.fan_in_fan_out, kind=template.kind)


def _concatenate(module: str, present, device):
    """cat / linear: A = [w_i s_i A_i], B = [B_i] (PEFT's cat), so B @ A = sum w_i dW_i exactly."""
    import torch

    a_parts, b_parts = [], []
    for adapter, weight in present:
        a, b, spec = _factors(adapter, module, device)
        a_parts.append(a * weight * spec.scaling)
        b_parts.append(b)
    a, b = torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1)
    return _plain(spec, a.shape[0]), a, b, ModuleReport(module, len(present), a.shape[0])


def _combine_deltas(method: Method, module: str, present, rank, density, majority_sign, generator, device):
    import torch

    first = present[0][0].modules[module]
    target = rank if rank is not None else max(s.modules[module].r * s.modules[module].groups for s, _ in present)
    out_features, in_features = first.out_features, first.in_features
    target = min(target, out_features, in_features)
    if method.prune is None:
        # The sum of low-rank updates has rank <= sum r_i: an exact SVD through QR of the stacked factors, cheap.
        _, a, b, _ = _concatenate(module, present, device)
        qb, rb = torch.linalg.qr(b)
        qa, ra = torch.linalg.qr(a.T)
        u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
        u, vh = qb @ u, vh @ qa.T
        lowrank = False
        total = float((s.double() ** 2).sum())
    else:
        deltas = []
        for adapter, _ in present:
            a, b, spec = _factors(adapter, module, device)
            deltas.append((b @ a) * spec.scaling)
        weights = torch.tensor([w for _, w in present], dtype=deltas[0].dtype, device=deltas[0].device)
        delta = _merge(method, deltas, weights, density, majority_sign, generator)
        del deltas
        total = float((delta.double() ** 2).sum())
        lowrank = min(out_features, in_features) >= LOWRANK_MIN_DIM and target + LOWRANK_OVERSAMPLE < \
            min(out_features, in_features)
        if lowrank:
            u, s, v = torch.svd_lowrank(delta, q=target + LOWRANK_OVERSAMPLE, niter=LOWRANK_ITERATIONS)
            vh = v.T
        else:
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    target = min(target, s.shape[0])  # the sum of a few low-rank updates may have fewer singular values
    u, s, vh = u[:, :target], s[:target], vh[:target]
    kept = float((s.double() ** 2).sum())
    energy = 1.0 if total == 0 else min(1.0, kept / total)
    b = u * s
    return _plain(first, target), vh.contiguous(), b.contiguous(), ModuleReport(module, len(present), target, energy,
                                                                                 lowrank)


def _combine_ab(method: Method, module: str, present, density, majority_sign, generator, device):
    """PEFT's A/B combination: A_i weighted by sign(w s) sqrt|w s|, B_i by sqrt|w s|, each merged by the method's
    rule. Equal ranks only; the result keeps the rank, and its scaling is 1."""
    import torch

    ranks = {s.modules[module].r for s, _ in present}
    flags = {s.modules[module].enable_lora for s, _ in present}
    if len(ranks) > 1 or len(flags) > 1:
        raise CombineError(f"{method.name} combines A and B tensor by tensor, so every adapter needs the same rank "
                           f"and enable_lora at '{module}' (ranks {sorted(ranks)}): use linear (exact) or svd")
    a_list, b_list, weights_a, weights_b = [], [], [], []
    for adapter, weight in present:
        spec = adapter.modules[module]
        a, b = adapter.lora_A(module), adapter.lora_B(module)
        compute = _compute_dtype(a)
        a_list.append(a.to(device=device, dtype=compute))
        b_list.append(b.to(device=device, dtype=compute))
        scaled = weight * spec.scaling
        weights_a.append(math.sqrt(abs(scaled)) * (1 if scaled >= 0 else -1))
        weights_b.append(math.sqrt(abs(scaled)))
    a = _merge(method, a_list, torch.tensor(weights_a).to(a_list[0].device), density, majority_sign, generator)
    b = _merge(method, b_list, torch.tensor(weights_b).to(b_list[0].device), density, majority_sign, generator)
    first = present[0][0].modules[module]
    spec = ModuleSpec(r=first.r, alpha=first.r, in_features=first.in_features, out_features=first.out_features,
                      fan_in_fan_out=first.fan_in_fan_out, enable_lora=first.enable_lora, kind=first.kind)
    return spec, a, b, ModuleReport(module, len(present), first.r)


def _merge(method: Method, tensors: list[torch.Tensor], weights: torch.Tensor, density: float | None,
           majority_sign: str, generator) -> torch.Tensor:
    """The merge rule on task tensors, in PEFT's operation order (peft.utils.merge_utils) so that A/B results
    match it bit for bit."""
    import torch

    if method.prune is not None and density < 1:
        if method.prune == "magnitude":
            tensors = [_magnitude_prune(t, density) for t in tensors]
        else:  # drawn where the generator lives, so a seed gives the same masks whatever device computes
            tensors = [torch.bernoulli(torch.full(t.shape, density, dtype=t.dtype, device=generator.device),
                                       generator=generator).to(t.device) * t / density for t in tensors]
    stacked = torch.stack(tensors, dim=0)
    weighted = stacked * weights.view(weights.shape + (1,) * (stacked.dim() - 1))
    if not method.sign_election:
        return weighted.sum(dim=0)
    sign = stacked.sign()
    mass = stacked.sum(dim=0) if majority_sign == "total" else sign.sum(dim=0)
    mask = sign == torch.where(mass >= 0, 1, -1)
    return (weighted * mask).sum(dim=0) / torch.clamp(mask.sum(dim=0), min=1.0)


def _magnitude_prune(tensor: torch.Tensor, density: float) -> torch.Tensor:
    import torch

    mask = torch.zeros_like(tensor).reshape(-1)
    keep = torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True)
    mask[keep[1]] = 1
    return tensor * mask.reshape(tensor.shape)


def _base(first: BaseModelRef | None, specs: Mapping[str, ModuleSpec]) -> BaseModelRef | None:
    """The first source's base model, with the fingerprint recomputed for the combined module set."""
    from .basemodel import fingerprint

    if first is None:
        return None
    if first.fingerprint is None:
        return first
    return replace(first, fingerprint=fingerprint({m: s.delta_shape for m, s in specs.items()}))


def _name(adapter: Adapter, given: Adapter | str | os.PathLike[str], index: int) -> str:
    """The adapter's own name, else the name it was given by (a file, folder, registry name or Hub id)."""
    if adapter.config.name:
        return adapter.config.name
    if not isinstance(given, Adapter):
        return os.path.basename(os.path.normpath(os.fspath(given))) or os.fspath(given)
    return f"adapter {index + 1}"


def _version() -> str:
    from . import __version__

    return __version__


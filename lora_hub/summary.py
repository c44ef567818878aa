"""A summary of one adapter for people and scripts (`lora-hub inspect`): base model, modules grouped by settings
(kind and features among them), targets, features, dtypes and sizes. For a lora-hub file it comes from the header
alone, so it costs the same for any size.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .adapter import AdapterConfig
from .convert.layouts import Layout, detect_layout


@dataclass(frozen=True)
class ModuleGroup:
    """Modules that share every setting, and how many there are."""

    count: int
    r: int
    alpha: float
    scaling: float
    rslora: bool
    fan_in_fan_out: bool
    enable_lora: list[bool] | None
    kind: str = "linear"
    """linear, embedding or experts (FORMAT.md, module kinds)."""
    experts: int | None = None
    features: list[str] = field(default_factory=list)
    """The module features of the group: lora_bias, dora, base_weights."""


@dataclass(frozen=True)
class AdapterSummary:
    """What `lora-hub inspect` prints. `to_dict` gives the JSON form."""

    path: str
    layout: str
    format_version: int | None
    base_model: dict[str, str | None] | None
    task_type: str | None
    module_count: int
    groups: list[ModuleGroup]
    targets: dict[str, int]
    dtypes: dict[str, int]
    tensor_count: int
    parameters: int
    size_bytes: int
    modules_to_save: list[str]
    tensors_sha256: str | None
    features: list[str] = field(default_factory=list)
    """The format features the adapter uses (FORMAT.md; empty for a plain adapter)."""
    trainable_tokens: dict[str, int] = field(default_factory=dict)
    """Embedding module -> how many token rows the adapter replaces."""
    descriptive: dict[str, Any] = field(default_factory=dict)
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(source: str | os.PathLike[str], *, allow_pickle: bool = False, **options: Any) -> AdapterSummary:
    """Summarises the adapter at `source`, in any layout `convert_adapter` reads.

    A lora-hub file is summarised from its header without reading tensor data; other layouts are converted in
    memory first (the summary then describes the converted adapter), with `options` passed to `convert_adapter`
    (alpha and enable_lora for loralib checkpoints, base, ...).

    Raises:
        The errors of `read_header` and `convert_adapter`.
    """
    from .format import adapter_header
    from .hub import locate

    source = locate(source)  # a path, a registry name, or a Hub id (pulled)
    detected = detect_layout(source)
    if detected.layout is Layout.LORA_HUB:
        header = adapter_header(detected.header)
        index = header.tensors.index()
        return _summary(detected.weights, "lora-hub", header.format_version, header.config, index,
                        header.safetensors.file_size)
    from .adapter import tensor_index
    from .convert import convert_adapter

    adapter = convert_adapter(source, allow_pickle=allow_pickle, **options)
    index = tensor_index(adapter.tensors)  # from the header, for tensors still in their file
    return _summary(detected.weights, detected.description, None, adapter.config, index,
                    detected.weights.stat().st_size)


def _summary(path: Path, layout: str, version: int | None, config: AdapterConfig,
             index: Mapping[str, tuple[str, tuple[int, ...]]], size: int) -> AdapterSummary:
    specs = config.modules
    settings: Counter[tuple] = Counter()
    example = {}
    for spec in specs.values():
        key = (spec.r, spec.alpha, spec.rslora, spec.fan_in_fan_out, spec.enable_lora, spec.kind, spec.experts or 0,
               tuple(sorted(spec.features - {"embedding", "experts"})))
        settings[key] += 1
        example.setdefault(key, spec)
    groups = [
        ModuleGroup(count, s.r, s.alpha, s.scaling, s.rslora, s.fan_in_fan_out,
                    list(s.enable_lora) if s.enable_lora else None, s.kind, s.experts, list(key[-1]))
        for key, count in sorted(settings.items(), key=lambda kv: (-kv[1], kv[0][0]))
        for s in (example[key],)
    ]
    lora_names = {n for m in specs for n in config.lora_tensor_names(m)}
    descriptive = {k: v for k, v in (("name", config.name), ("description", config.description),
                                     ("license", config.license), ("task", config.task),
                                     ("tags", list(config.tags))) if v}
    return AdapterSummary(
        path=os.fspath(path),
        layout=layout,
        format_version=version,
        base_model=config.base_model.to_dict() if config.base_model else None,
        task_type=config.task_type,
        module_count=len(specs),
        groups=groups,
        targets=dict(sorted(Counter(m.rsplit(".", 1)[-1] for m in specs).items())),
        dtypes=dict(sorted(Counter(dtype for dtype, _ in index.values()).items())),
        tensor_count=len(index),
        parameters=sum(math.prod(shape) for name, (_, shape) in index.items() if name in lora_names),
        size_bytes=size,
        modules_to_save=list(config.modules_to_save),
        tensors_sha256=config.tensors_sha256,
        features=sorted(config.features),
        trainable_tokens={m: len(indices) for m, indices in config.trainable_tokens.items()},
        descriptive=descriptive,
        modules={name: spec.to_dict() for name, spec in specs.items()},
    )

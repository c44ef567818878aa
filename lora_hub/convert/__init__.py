"""Readers for the adapter layouts people have (one module per layout), and the writers to PEFT, llama.cpp and
mlx-lm.

`convert_adapter` detects the layout of a file or folder and reads it into an `Adapter`: lora-hub files, PEFT folders
(safetensors, or the legacy pickle on opt-in), early-PEFT MergedLinear checkpoints, loralib state dicts, llama.cpp's
GGUF adapters and mlx-lm's adapter folders.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from ..adapter import Adapter
from .layouts import Detected as Detected
from .layouts import Layout as Layout
from .layouts import detect_layout as detect_layout
from .llamacpp import from_gguf as from_gguf
from .llamacpp import to_gguf as to_gguf
from .loralib import from_loralib as from_loralib
from .mlxlm import from_mlx as from_mlx
from .mlxlm import to_mlx as to_mlx
from .peft import from_peft as from_peft
from .peft import read_peft
from .peft_export import expand_enable_lora as expand_enable_lora
from .peft_export import peft_config as peft_config
from .peft_export import to_peft as to_peft

if TYPE_CHECKING:
    from ..basemodel import BaseSource

__all__ = [
    "Detected",
    "Layout",
    "convert_adapter",
    "detect_layout",
    "expand_enable_lora",
    "from_gguf",
    "from_loralib",
    "from_mlx",
    "from_peft",
    "peft_config",
    "to_gguf",
    "to_mlx",
    "to_peft",
]


def convert_adapter(
    source: str | os.PathLike[str],
    *,
    base: BaseSource | None = None,
    allow_pickle: bool = False,
    alpha: float | Mapping[str, float] | None = None,
    r: int | None = None,
    enable_lora: Sequence[bool] | Mapping[str, Sequence[bool]] | None = None,
    fan_in_fan_out: bool | None = None,
    verify: bool = True,
    force: bool = False,
    reference_base: BaseSource | None = None,
    initial: str | os.PathLike[str] | None = None,
) -> Adapter:
    """Reads an adapter in any layout lora-hub knows into an Adapter.

    Args:
        source: A lora-hub file, a PEFT folder (or its weights file), a loralib checkpoint, a llama.cpp GGUF
            adapter, or an mlx-lm adapter folder; or a registry name or Hub repo id (see `lora_hub.hub.resolve`).
        base: The base model (a model folder, config.json, cached Hub id, config or model; see `describe_base`).
            When given, every module is checked against it, fan_in_fan_out comes from the layer kinds, and the
            base model's type and fingerprint are recorded. GGUF adapters need it (or one they declare) to map
            llama.cpp's tensor names back.
        allow_pickle: Allow pickle checkpoints (.bin, .pt), loaded with weights_only=True on the CPU.
        alpha, r, enable_lora, fan_in_fan_out: What loralib checkpoints do not record (see `from_loralib`).
        verify: Check a lora-hub file's bytes against its recorded checksum now (one streamed read). Without it the
            check still happens before anything is written from the adapter (`save_adapter`).
        force: Read a lora-hub file whose bytes fail its checksum anyway (see `verify_checksum`).
        reference_base: A base model used only to read what a PEFT adapter needs of it when `base` is not given:
            the order of expert parameters (PEFT names them by it), the weights that a base-modifying init (PiSSA,
            OLoRA) was computed from.
        initial: The initial adapter of a base-modifying init (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA), as PEFT saves
            it before training: the adapter is converted to its exactly equivalent plain form with its factors.

    Raises:
        AdapterNotFoundError, UnsupportedLayoutError, UnknownLayoutError, LfsPointerError, PickleRefusedError,
        UnsafePickleError, WeightsMissingError, ConfigMissingError, PeftConfigError, UnsupportedFeatureError,
        ParameterRequiredError, ModuleConflictError, BaseModelError, BaseModelMismatchError, and the format errors
        of `read_header` for lora-hub files; ChecksumMismatchError for a corrupt lora-hub file.

    Example:
        >>> adapter = lora_hub.convert_adapter("./peft-adapter", base="./tiny-llama")
        >>> lora_hub.save_adapter(adapter, "adapter.safetensors")
    """
    if not os.path.exists(source):
        from ..hub import locate

        source = locate(source)  # a registry name or a Hub id (pulled); a missing path stays AdapterNotFoundError
    detected = detect_layout(source)
    if detected.layout in (Layout.GGUF, Layout.MLX):  # names and kinds come from the base model
        read = from_gguf if detected.layout is Layout.GGUF else from_mlx
        where = detected.weights if detected.layout is Layout.GGUF else detected.weights.parent
        return read(where, base=base if base is not None else reference_base)
    if detected.layout is Layout.LORALIB:
        source = detected.weights if detected.header is None else detected.header
        return from_loralib(source, alpha=alpha, r=r, enable_lora=enable_lora,
                            fan_in_fan_out=fan_in_fan_out, base=base, allow_pickle=allow_pickle)
    if detected.layout is not Layout.LORA_HUB:
        return read_peft(detected, base=base, allow_pickle=allow_pickle, reference=reference_base, initial=initial)
    from ..basemodel import describe_base, fit_to_base
    from ..format import adapter_header, load_adapter, verify_checksum

    adapter = load_adapter(adapter_header(detected.header))
    if verify or force:
        verify_checksum(adapter, force=force)
    if base is not None:
        config = fit_to_base(adapter.config, describe_base(base, task_type=adapter.config.task_type))
        adapter = adapter.derived(config, adapter.tensors)
    return adapter

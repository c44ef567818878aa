"""Recognising adapter layouts from file names, magic bytes and tensor names, without unpickling anything.

`detect_layout` answers with a `Detected` for the layouts lora-hub reads, and raises the specific error for the
ones it recognises but does not read (diffusers, kohya, MLX, GGUF, Git LFS pointers, ...) or does not recognise.
"""

from __future__ import annotations

import enum
import json
import os
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import constants as C
from ..errors import (
    AdapterNotFoundError,
    ConfigMissingError,
    LfsPointerError,
    PeftConfigError,
    UnknownLayoutError,
    UnsupportedFeatureError,
    UnsupportedLayoutError,
    WeightsMissingError,
)
from ..format import SafetensorsHeader, read_exactly, read_safetensors_header
from ..jsontext import is_json_int, is_json_number, read_json_object
from .mlxlm import MLX_WEIGHTS, is_mlx_config, read_mlx_config

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_DIFFUSERS_FILES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights.bin")
_LFS_MAGIC = b"version https://git-lfs.github.com/spec"


class Layout(str, enum.Enum):
    """The adapter layouts lora-hub reads."""

    LORA_HUB = "lora-hub"
    PEFT = "peft"
    PEFT_MERGED_LINEAR = "peft-merged-linear"
    """Early PEFT (0.2) MergedLinear checkpoints: enable_lora in the config, lora_B stored as a Conv1d weight."""
    LORALIB = "loralib"
    GGUF = "gguf"
    """llama.cpp LoRA adapters (general.type adapter, adapter.type lora)."""
    MLX = "mlx-lm"
    """mlx-lm adapter folders: adapters.safetensors and its adapter_config.json (lora_parameters)."""


class FileKind(str, enum.Enum):
    SAFETENSORS = "safetensors"
    PICKLE = "pickle"
    NPZ = "npz"
    GGUF = "gguf"
    LFS_POINTER = "git-lfs-pointer"
    JSON = "json"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Detected:
    """A readable adapter: its layout, the weights file, the PEFT config beside it (if any), and the file kind."""

    layout: Layout
    weights: Path
    config: Path | None
    kind: FileKind
    peft_config: Mapping[str, Any] | None = None
    header: SafetensorsHeader | None = None
    """The checked safetensors header of `weights`, when it is a safetensors file (read once, here)."""

    @property
    def description(self) -> str:
        return f"{self.layout.value} ({self.weights.name}, {self.kind.value})"


def detect_layout(source: str | os.PathLike[str]) -> Detected:
    """Names the layout of an adapter file or folder.

    Raises:
        AdapterNotFoundError: Nothing at `source`, or a folder with no adapter in it.
        UnsupportedLayoutError, LfsPointerError, WeightsMissingError, UnknownLayoutError, UnsupportedFeatureError,
        PeftConfigError: A layout lora-hub does not read, with what it is and what to do.
    """
    path = Path(source)
    if not path.exists():
        raise AdapterNotFoundError("no such file or folder", path=path)
    if path.is_dir():
        return _detect_folder(path)
    if path.name == PEFT_CONFIG:
        return _detect_folder(path.parent)
    config = path.parent / PEFT_CONFIG
    return _detect_file(path, config if config.is_file() else None)


def sniff(path: Path) -> FileKind:
    """The kind of file, from its first bytes (and a zip's member names)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        head = read_exactly(fd, 64)
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    if len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= size - 8:
        return FileKind.SAFETENSORS  # first: a length prefix may well start with 0x80, like a pickle
    if head.startswith(_LFS_MAGIC):
        return FileKind.LFS_POINTER
    if head.startswith(b"GGUF"):
        return FileKind.GGUF
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except zipfile.BadZipFile:
            return FileKind.UNKNOWN
        if any(n.endswith("data.pkl") for n in names):
            return FileKind.PICKLE
        return FileKind.NPZ if names and all(n.endswith(".npy") for n in names) else FileKind.UNKNOWN
    if head[:1] == b"\x80":
        return FileKind.PICKLE
    if path.suffix == ".safetensors":
        return FileKind.SAFETENSORS  # the header reader then says precisely what is wrong
    if head.lstrip()[:1] == b"{":
        return FileKind.JSON
    return FileKind.UNKNOWN


def read_peft_config(path: Path) -> dict:
    """Reads adapter_config.json (bounded, BOM and CRLF tolerated) and refuses what is not a LoRA config.

    Raises:
        PeftConfigError: Unreadable, not a JSON object, or over MAX_PEFT_CONFIG_BYTES.
        UnsupportedFeatureError: Another PEFT method (prefix tuning, IA3, ...).
        PeftConfigError: An mlx-lm adapter config.
    """
    config = read_json_object(path, limit=C.MAX_PEFT_CONFIG_BYTES, error=PeftConfigError)
    if is_mlx_config(config):
        raise PeftConfigError("an mlx-lm adapter config (lora_parameters), not PEFT's: mlx-lm's weights are "
                              f"{MLX_WEIGHTS}", path=path)
    _check_peft_types(config, path)
    peft_type = config.get("peft_type", "LORA" if "r" in config else None)
    if peft_type != "LORA":
        raise UnsupportedFeatureError(
            f"peft_type is {peft_type!r}: only LoRA adapters can be converted (prefix tuning, IA3, prompt tuning and "
            "other PEFT methods have no low-rank update to carry)", path=path)
    return config


def _strings(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


_PEFT_TYPES: dict[str, tuple[str, Callable[[object], bool]]] = {
    "peft_type": ("a string", lambda v: isinstance(v, str)),
    "r": ("a positive integer", lambda v: is_json_int(v) and v > 0),
    "lora_alpha": ("a number", is_json_number),
    "target_modules": ("a regex string or a list of module names", lambda v: isinstance(v, str) or _strings(v)),
    "modules_to_save": ("a list of module names", _strings),
    "rank_pattern": ("an object of pattern -> positive integer",
                     lambda v: isinstance(v, dict) and all(is_json_int(x) and x > 0 for x in v.values())),
    "alpha_pattern": ("an object of pattern -> number",
                      lambda v: isinstance(v, dict) and all(is_json_number(x) for x in v.values())),
    "enable_lora": ("a list of booleans", lambda v: isinstance(v, list) and all(isinstance(x, bool) for x in v)),
    "fan_in_fan_out": ("true or false", lambda v: isinstance(v, bool)),
    "use_rslora": ("true or false", lambda v: isinstance(v, bool)),
    "use_dora": ("true or false", lambda v: isinstance(v, bool)),
    "task_type": ("a string", lambda v: isinstance(v, str)),
    "base_model_name_or_path": ("a string", lambda v: isinstance(v, str)),
    "revision": ("a string", lambda v: isinstance(v, str)),
    "bias": ("a string", lambda v: isinstance(v, str)),
}
"""The types of the adapter_config.json keys lora-hub reads; null means PEFT's default for every one of them."""


def _check_peft_types(config: Mapping[str, Any], path: Path) -> None:
    for key, (expected, valid) in _PEFT_TYPES.items():
        value = config.get(key)
        if value is not None and not valid(value):
            raise PeftConfigError(f"'{key}' must be {expected}, got {json.dumps(value)[:80]}", path=path)


_PEFT_SUFFIXES = (C.LORA_A_SUFFIX, C.LORA_B_SUFFIX, ".lora_embedding_A", ".lora_embedding_B",
                  ".token_adapter.trainable_tokens_delta")
"""The tensor names that only PEFT writes (under its base_model.model. prefix)."""


def classify_names(names: Iterable[str]) -> str | None:
    """The layout that tensor names follow: 'peft', 'loralib', 'diffusers', 'kohya', or None when unrecognised."""
    names = list(names)
    if any(n.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for n in names):
        return "kohya"
    if any(".processor." in n or n.startswith(("unet.", "text_encoder.")) or "transformer_blocks." in n
           for n in names):
        return "diffusers"
    if any(n.endswith(_PEFT_SUFFIXES) and n.startswith(C.TENSOR_PREFIX) for n in names):
        return "peft"
    if any(n.endswith((".lora_A", ".lora_B")) for n in names):
        return "loralib"
    if any(n.endswith((".lora_down.weight", ".lora_up.weight", ".lora.down.weight")) for n in names):
        return "kohya"
    return None


def _detect_folder(folder: Path) -> Detected:
    config = folder / PEFT_CONFIG
    if (folder / MLX_WEIGHTS).is_file():
        return _detect_file(folder / MLX_WEIGHTS, config if config.is_file() else None)
    for name in PEFT_WEIGHTS:
        if (folder / name).is_file():
            return _detect_file(folder / name, config if config.is_file() else None)
    for name in _DIFFUSERS_FILES:
        if (folder / name).is_file():
            return _detect_file(folder / name, None)
    if config.is_file():
        read_peft_config(config)
        raise WeightsMissingError(
            f"{PEFT_CONFIG} is here but neither {' nor '.join(PEFT_WEIGHTS)}: the adapter's weights are missing "
            "(download them too)", path=folder)
    candidates = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".npz", ".gguf"))
    if len(candidates) == 1:
        return _detect_file(candidates[0], None)
    if not candidates:
        raise AdapterNotFoundError("the folder holds no adapter file (.safetensors, .bin, .pt)", path=folder)
    raise AdapterNotFoundError(
        f"the folder holds several candidate files ({', '.join(p.name for p in candidates[:5])}); name one",
        path=folder)


def _detect_file(path: Path, config: Path | None) -> Detected:
    kind = sniff(path)
    if kind is FileKind.LFS_POINTER:
        raise LfsPointerError("a Git LFS pointer, not the file it points to: fetch the content (`git lfs pull`, or "
                              "download the file from the Hub)", path=path)
    if kind is FileKind.GGUF:
        return Detected(Layout.GGUF, path, None, kind)
    if kind is FileKind.NPZ:
        raise UnsupportedLayoutError("a NumPy .npz archive (the adapters.npz of early MLX examples); mlx-lm writes "
                                     "adapters.safetensors, which lora-hub reads: load it in mlx and save it as "
                                     "safetensors (mx.save_safetensors)", layout="mlx", path=path)
    if path.name == MLX_WEIGHTS:
        if config is None:
            raise ConfigMissingError(f"mlx-lm adapter weights without {PEFT_CONFIG} beside them: the rank, scale and "
                                     "keys are unknown; put the adapter's adapter_config.json next to the file",
                                     path=path)
        read_mlx_config(config)
        return Detected(Layout.MLX, path, config, kind)
    header = read_safetensors_header(path) if kind is FileKind.SAFETENSORS else None
    if header is not None and C.METADATA_FORMAT_VERSION in header.metadata:
        return Detected(Layout.LORA_HUB, path, None, kind, header=header)  # a PEFT config beside it is derived
    if path.name in _DIFFUSERS_FILES:
        raise UnsupportedLayoutError(
            "a diffusers LoRA (pytorch_lora_weights.*) for a diffusion model; lora-hub adapts transformers models",
            layout="diffusers", path=path)
    peft_config = read_peft_config(config) if config is not None else None
    if header is not None:
        return _detect_safetensors(path, header, config, peft_config)
    if kind is FileKind.PICKLE:
        if peft_config is not None:
            layout = Layout.PEFT_MERGED_LINEAR if peft_config.get("enable_lora") else Layout.PEFT
            return Detected(layout, path, config, kind, peft_config)
        return Detected(Layout.LORALIB, path, None, kind)
    what = "a JSON file" if kind is FileKind.JSON else "a file of no known kind"
    raise UnknownLayoutError(f"{what}, not an adapter in any layout lora-hub knows (lora-hub, PEFT, loralib)",
                             path=path)


def _detect_safetensors(path: Path, header: SafetensorsHeader, config: Path | None,
                        peft_config: Mapping[str, Any] | None) -> Detected:
    family = classify_names(header.tensors)
    meta = header.metadata
    if family in ("diffusers", "kohya") or any(k.startswith("ss_") for k in meta) or "ai-toolkit" in meta.get(
            "software", ""):
        where = family or "kohya"
        raise UnsupportedLayoutError(
            f"a {where} LoRA for a diffusion model (tensors such as {_sample(header.tensors)}); lora-hub adapts "
            "transformers models", layout=where, path=path)
    if family == "peft":
        if peft_config is None:
            raise _config_missing(path)
        layout = Layout.PEFT_MERGED_LINEAR if peft_config.get("enable_lora") else Layout.PEFT
        return Detected(layout, path, config, FileKind.SAFETENSORS, peft_config, header)
    if family == "loralib":
        return Detected(Layout.LORALIB, path, None, FileKind.SAFETENSORS, header=header)
    what = "no tensors" if not header.tensors else f"tensors such as {_sample(header.tensors)}"
    raise UnknownLayoutError(f"a safetensors file with {what}: no LoRA layout that lora-hub knows (lora_A/lora_B "
                             "pairs) matches; if it is a model checkpoint, it is not an adapter", path=path)


def _config_missing(path: Path) -> ConfigMissingError:
    return ConfigMissingError(
        f"PEFT-style tensors without {PEFT_CONFIG} beside them: alpha and the other settings are unknown; put the "
        "adapter's adapter_config.json next to the file", path=path)


def _sample(names: Iterable[str]) -> str:
    return ", ".join(list(names)[:2])

"""Reading a foreign weights file into name -> tensor: safetensors read on access, and pickle checkpoints
(.bin, .pt) only when the caller opts in, then with `torch.load(weights_only=True, map_location="cpu")`, which
accepts tensors and plain containers and nothing that could run code.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConversionError, PickleRefusedError, UnknownLayoutError, UnsafePickleError
from ..format import SafetensorsHeader, read_safetensors_header
from .layouts import FileKind

if TYPE_CHECKING:
    import torch


def load_weights(path: Path, kind: FileKind, *, allow_pickle: bool,
                 header: SafetensorsHeader | None = None) -> Mapping[str, torch.Tensor]:
    """The tensors of a safetensors file (whose checked header may be given) or a pickle file, by name.

    Raises:
        PickleRefusedError: A pickle file and `allow_pickle` is False.
        UnsafePickleError: The pickle holds objects that weights_only loading refuses.
        UnknownLayoutError: The pickle holds something other than a flat dict of tensors.
    """
    if kind is FileKind.SAFETENSORS:
        from ..tensors import FileTensors

        header = header or read_safetensors_header(path)
        return FileTensors(path, header.data_offset, header.tensors, identity=header.identity)
    return load_pickle(path, allow_pickle=allow_pickle)


def load_pickle(path: Path, *, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """Loads a pickle checkpoint of tensors, on the CPU, if and only if the caller opted in."""
    if not allow_pickle:
        raise PickleRefusedError(
            "a pickle checkpoint; lora-hub does not unpickle files by default because unpickling can run arbitrary "
            "code. If you trust the file, opt in with allow_pickle=True (CLI: --allow-pickle): it is then loaded with "
            "torch.load(weights_only=True) on the CPU, which accepts only tensors and plain containers", path=path)
    import torch

    try:
        with open(path, "rb") as f:  # a file object: torch.load must not pick a reader by the name's suffix
            state = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        detail = text.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in text else text
        detail = " ".join(detail.split("Check the documentation")[0].split())[:200] or type(e).__name__
        raise UnsafePickleError(
            f"weights-only loading refused the pickle ({detail}): it holds objects other than tensors and plain "
            "containers, or bytes that are not a valid pickle; lora-hub will not load it with full unpickling",
            path=path) from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ConversionError(f"the pickle checkpoint is corrupt or truncated: {e}", path=path) from e
    if isinstance(state, dict) and len(state) == 1 and isinstance(next(iter(state.values())), dict):
        state = next(iter(state.values()))  # {"state_dict": {...}} and similar wrappers
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise UnknownLayoutError("the pickle does not hold a flat dict of name -> tensor", path=path)
    return state

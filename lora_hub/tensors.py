"""Tensor bytes: safetensors dtype names, lazily memory-mapped tensors for reading, raw bytes for writing.

A `MappedTensors` maps the file once (copy-on-write, so writing to a tensor never touches the file) and creates each
tensor on first access as a view of the mapping: nothing is read from disk until a page is touched, and moving a
tensor to its device with `.to(device, dtype)` copies straight from the page cache.
"""

from __future__ import annotations

import mmap
import sys
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from . import constants as C

if TYPE_CHECKING:
    import os

    import torch

    from .format import TensorInfo


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name such as "BF16"."""
    import torch

    return getattr(torch, C.DTYPES[name][1])


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype, such as "BF16" for torch.bfloat16.

    Raises:
        ValueError: The dtype has no safetensors name (complex, quantized, ...).
    """
    wanted = str(dtype).removeprefix("torch.")
    for name, (_, attr) in C.DTYPES.items():
        if attr == wanted:
            return name
    raise ValueError(f"dtype {dtype} cannot be stored: supported dtypes are {', '.join(C.DTYPES)}")


class MappedTensors(Mapping[str, "torch.Tensor"]):
    """Read-only mapping of tensor name -> tensor over one memory-mapped safetensors file.

    Args:
        path: The file; its header must already have been read and checked.
        data_offset: Where the buffer starts (8 + header length).
        infos: The tensors of the header.
    """

    def __init__(self, path: str | os.PathLike[str], data_offset: int, infos: Mapping[str, TensorInfo]) -> None:
        self._infos = infos
        self._data_offset = data_offset
        self._cache: dict[str, torch.Tensor] = {}
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor = self._cache.get(name)
        if tensor is None:
            tensor = self._cache[name] = self._materialise(self._infos[name])
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, from the header."""
        return {name: info.shape for name, info in self._infos.items()}

    def _materialise(self, info: TensorInfo) -> torch.Tensor:
        import torch

        dtype = torch_dtype(info.dtype)
        start = self._data_offset + info.begin
        if info.numel == 0:
            return torch.empty(info.shape, dtype=dtype)
        if start % C.DTYPES[info.dtype][0] or sys.byteorder != "little":
            raw = bytearray(self._map[start:start + info.nbytes])
            tensor = torch.frombuffer(raw, dtype=torch.uint8)
            if sys.byteorder != "little":
                tensor = tensor.view(-1, C.DTYPES[info.dtype][0]).flip(-1).reshape(-1)
            return tensor.view(dtype).reshape(info.shape)
        return torch.frombuffer(self._map, dtype=dtype, count=info.numel, offset=start).reshape(info.shape)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's elements as little-endian bytes in row-major order, without copying when it is already a
    contiguous CPU tensor.

    Raises:
        ValueError: The tensor lives on the meta device and has no data.
    """
    import torch

    if tensor.device.type == "meta":
        raise ValueError("a tensor on the meta device has no data to write")
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    raw = flat.view(torch.uint8)
    if sys.byteorder != "little" and flat.element_size() > 1:
        raw = raw.view(-1, flat.element_size()).flip(-1).reshape(-1)
    return memoryview(raw.numpy()).cast("B")

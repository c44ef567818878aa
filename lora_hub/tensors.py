"""Tensor bytes: safetensors dtype names, lazily memory-mapped tensors for reading, raw bytes for writing.

A `MappedTensors` maps the file once (copy-on-write, so writing to a tensor never touches the file) and creates each
tensor on first access as a view of the mapping: nothing is read from disk until a page is touched, and moving a
tensor to its device with `.to(device, dtype)` copies straight from the page cache. `read` goes one step further
for tensors whose destination is already allocated in host memory: positioned reads put the bytes straight into it,
one copy from the page cache, and a file cut short is detected instead of read as zeros.
"""

from __future__ import annotations

import mmap
import os
import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from . import constants as C

if TYPE_CHECKING:
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
        self._path = os.fspath(path)
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

    def read(self, names: Iterable[str], into: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Reads tensors with positioned reads, never through the mapping (so a file cut short after its header
        was read is an error, not zeros or a SIGBUS): each straight into its tensor in `into` where it fits as
        stored (a contiguous host tensor of its dtype and shape), else into a new host tensor. One vectored read
        per run of adjacent tensors, in file order.

        Returns:
            Name -> the tensor holding it: the one from `into` when it was used.

        Raises:
            FileTruncatedError: The file is shorter than when its header was read.
        """
        import torch

        from .errors import FileTruncatedError

        out: dict[str, torch.Tensor] = {}
        for name in names:
            info = self._infos[name]
            dtype = torch_dtype(info.dtype)
            target = into.get(name)
            if target is None or not (target.device.type == "cpu" and target.dtype == dtype
                                      and target.shape == info.shape and target.is_contiguous()):
                target = torch.empty(info.shape, dtype=dtype)
            out[name] = target
        if not out:
            return out
        if not hasattr(os, "preadv") or sys.byteorder != "little":  # then through the mapping after all
            for name, target in out.items():
                target.copy_(self[name])
            return out
        runs: list[list[str]] = []
        for name in sorted(out, key=lambda n: self._infos[n].begin):
            if runs and self._infos[runs[-1][-1]].end == self._infos[name].begin and len(runs[-1]) < _IOV_MAX:
                runs[-1].append(name)
            else:
                runs.append([name])
        fd = os.open(self._path, os.O_RDONLY)
        try:
            for run in runs:
                views = [memoryview(out[n].numpy()).cast("B") for n in run if self._infos[n].nbytes]
                offset = self._data_offset + self._infos[run[0]].begin
                expected = sum(len(v) for v in views)
                done = os.preadv(fd, views, offset) if views else 0
                while 0 < done < expected:  # a short read (signals, huge runs): continue where it stopped
                    views, done, expected, offset = _advance(views, done), 0, expected - done, offset + done
                    done = os.preadv(fd, views, offset)
                if done != expected:
                    raise FileTruncatedError(f"the file ended while reading {run[0]}: it changed after its header "
                                             "was read", path=self._path)
        finally:
            os.close(fd)
        return out

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


_IOV_MAX = 1024  # the POSIX minimum of IOV_MAX on Linux: buffers per vectored read


def _advance(views: list[memoryview], count: int) -> list[memoryview]:
    """The buffers left after `count` bytes were filled."""
    out = []
    for view in views:
        if count >= len(view):
            count -= len(view)
            continue
        out.append(view[count:])
        count = 0
    return out


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

"""Streaming statistics of tensor contents, for the full validation tier: one pass over a file's buffer in chunks of
fixed size, hashing it in a second thread while each tensor is measured (non-finite values, largest magnitude).

Memory is two chunk buffers and one float32 work buffer whatever the file size; no tensor is ever materialised
whole. A chunk never splits an element: it ends on an element boundary of the tensor it ends in. Statistics use
numpy's single-threaded reductions, which leave the other core to the hash (torch's thread pool would take both).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from . import constants as C

if TYPE_CHECKING:
    import torch

    from .format import SafetensorsHeader

CHUNK_BYTES = 4 * 1024 * 1024
_NUMPY = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
          "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8,
          "BOOL": np.uint8}


@dataclass
class TensorStats:
    """What the scan measured of one tensor."""

    dtype: str
    numel: int
    nonfinite: int = 0
    absmax: float = 0.0

    @property
    def all_zero(self) -> bool:
        return self.numel > 0 and self.nonfinite == 0 and self.absmax == 0.0


@dataclass(frozen=True)
class ScanResult:
    stats: dict[str, TensorStats]
    sha256: str | None


def scan_file(header: SafetensorsHeader, *, checksum: bool, chunk_bytes: int = CHUNK_BYTES) -> ScanResult:
    """Measures every tensor of a checked safetensors file, and hashes its buffer when `checksum` is true.

    Raises:
        OSError: The file cannot be read, or shrank since its header was read.
    """
    ordered = sorted(header.tensors.items(), key=lambda item: (item[1].begin, item[1].end))
    stats = {name: TensorStats(info.dtype, info.numel) for name, info in ordered}
    work = np.empty(chunk_bytes // 2, dtype=np.float32)  # a whole chunk of 2-byte floats, widened
    buffers = [bytearray(chunk_bytes), bytearray(chunk_bytes)]
    pending: list[Future | None] = [None, None]
    digest = hashlib.sha256() if checksum else None
    position, first, size, turn = 0, 0, header.buffer_size, 0
    with open(header.path, "rb", buffering=0) as f, ThreadPoolExecutor(max_workers=1) as hasher:
        f.seek(header.data_offset)
        while position < size:
            end = _chunk_end(ordered, first, position, min(position + chunk_bytes, size))
            if pending[turn] is not None:
                pending[turn].result()
            view = memoryview(buffers[turn])[:end - position]
            _read_exactly(f, view)
            if digest is not None:
                pending[turn] = hasher.submit(digest.update, view)
            while first < len(ordered) and ordered[first][1].end <= position:
                first += 1
            index = first
            while index < len(ordered) and ordered[index][1].begin < end:
                name, info = ordered[index]
                lo, hi = max(info.begin, position), min(info.end, end)
                if hi > lo:
                    _accumulate(stats[name], _as_numbers(view[lo - position:hi - position], info.dtype, work))
                if info.end > end:
                    break
                index += 1
            position, turn = end, 1 - turn
        for future in pending:
            if future is not None:
                future.result()
    return ScanResult(stats, digest.hexdigest() if digest is not None else None)


def scan_tensors(tensors: Mapping[str, torch.Tensor], *, chunk_bytes: int = CHUNK_BYTES) -> ScanResult:
    """Measures tensors already in memory (a pickle checkpoint), in bounded slices."""
    from .tensors import dtype_name, tensor_bytes

    work = np.empty(chunk_bytes // 2, dtype=np.float32)
    stats = {}
    for name, tensor in tensors.items():
        dtype = dtype_name(tensor.dtype)
        stats[name] = TensorStats(dtype, tensor.numel())
        raw, step = tensor_bytes(tensor), chunk_bytes - chunk_bytes % C.DTYPES[dtype][0]
        for start in range(0, len(raw), step):
            _accumulate(stats[name], _as_numbers(raw[start:start + step], dtype, work))
    return ScanResult(stats, None)


def _as_numbers(raw: memoryview, dtype: str, work: np.ndarray) -> np.ndarray:
    """The elements in `raw` as a numpy array whose min and max are meaningful: float32 for 2-byte and 1-byte
    floats (widened into `work`), the native type otherwise."""
    if dtype == "BF16":
        bits = np.frombuffer(raw, dtype=np.uint16)
        widened = work[:bits.size].view(np.uint32)
        np.left_shift(bits, 16, out=widened, dtype=np.uint32)
        return widened.view(np.float32)
    if dtype in ("F8_E4M3", "F8_E5M2"):
        import torch

        from .tensors import torch_dtype

        return torch.frombuffer(bytearray(raw), dtype=torch_dtype(dtype)).float().numpy()
    values = np.frombuffer(raw, dtype=_NUMPY[dtype])
    if dtype == "F16":
        np.copyto(work[:values.size], values)
        return work[:values.size]
    return values


def _accumulate(stats: TensorStats, values: np.ndarray) -> None:
    """Adds one slice of a tensor to its statistics. Non-finite values show up in min/max for free; they are counted
    exactly only when present."""
    if values.size == 0:
        return
    lo, hi = float(values.min()), float(values.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        finite = np.isfinite(values)
        stats.nonfinite += int(values.size - np.count_nonzero(finite))
        values = values[finite]
        if values.size == 0:
            return
        lo, hi = float(values.min()), float(values.max())
    stats.absmax = max(stats.absmax, -lo, hi)


def _chunk_end(ordered, first: int, position: int, end: int) -> int:
    """Moves `end` back to an element boundary of the tensor it falls inside, if any."""
    index = first
    while index < len(ordered) and ordered[index][1].end < end:
        index += 1
    if index < len(ordered):
        info = ordered[index][1]
        if info.begin < end < info.end:
            itemsize = C.DTYPES[info.dtype][0]
            end = max(info.begin + (end - info.begin) // itemsize * itemsize, position + itemsize)
    return end


def _read_exactly(f, view: memoryview) -> None:
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise OSError("the file is shorter than its header says (it changed while being read)")
        done += n

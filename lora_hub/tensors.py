"""Tensor bytes: safetensors dtype names, lazily memory-mapped tensors for reading, raw bytes for writing.

A `MappedTensors` maps the file once (copy-on-write, so writing to a tensor never touches the file) and creates each
tensor on first access as a view of the mapping: nothing is read from disk until a page is touched, and moving a
tensor to its device with `.to(device, dtype)` copies straight from the page cache. A `ReadPlan` goes one step
further for tensors whose destination is already allocated in host memory: positioned reads put the bytes straight
into it, one copy from the page cache, and a file cut short is detected instead of read as zeros. A plan is made
once and serves every file of the same layout.
"""

from __future__ import annotations

import mmap
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from . import constants as C
from .errors import FileTruncatedError

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

    @property
    def layout(self) -> Mapping[str, TensorInfo]:
        """Every tensor's dtype, shape and buffer range, from the header: what a `ReadPlan` is made for."""
        return self._infos

    def plan(self, names: Iterable[str], into: Mapping[str, torch.Tensor]) -> ReadPlan:
        """Works out how to read tensors `names` with positioned reads, never through the mapping (so that a file
        cut short after its header was read is an error, not zeros or a SIGBUS): each straight into its tensor in
        `into` where it fits as stored (a contiguous host tensor of its dtype and shape), else into a new host
        tensor (`ReadPlan.targets` says which); one vectored read per run of adjacent tensors, in file order.
        Nothing is read until `read_planned` or `start_reading`."""
        import torch

        targets: dict[str, torch.Tensor] = {}
        infos = self._infos
        for name in names:
            info = infos[name]
            dtype = torch_dtype(info.dtype)
            target = into.get(name)
            if target is None or not (target.is_cpu and target.dtype == dtype
                                      and target.shape == info.shape and target.is_contiguous()):
                target = torch.empty(info.shape, dtype=dtype)
            targets[name] = target
        if not _POSITIONED_READS:
            return ReadPlan(infos, targets, ())
        order = sorted((n for n in targets if infos[n].nbytes), key=lambda n: infos[n].begin)
        return ReadPlan(infos, targets, tuple(_runs(order, infos, targets)))

    def read_planned(self, plan: ReadPlan) -> None:
        """Carries out a plan made by `plan` on this file or on any file of the same layout.

        Raises:
            ValueError: The plan was made for another layout.
            FileTruncatedError: The file is shorter than when its header was read.
        """
        self._check_layout(plan)
        if not _POSITIONED_READS:  # then through the mapping after all
            for name, target in plan.targets.items():
                target.copy_(self[name])
            return
        fd = os.open(self._path, os.O_RDONLY)
        try:
            self._read_runs(fd, plan.runs)
        finally:
            os.close(fd)

    def start_reading(self, plan: ReadPlan) -> Callable[[], None]:
        """Starts `read_planned(plan)` in a background thread (positioned reads release the GIL, so the caller's
        Python runs meanwhile) and returns the function that waits for it and raises what it raised. Call it
        before touching the targets, and on every path (an error of your own included): until it returns, the
        thread may be writing into them.

        Raises:
            ValueError: The plan was made for another layout (at once; errors of the reads come from the wait).
        """
        self._check_layout(plan)
        if not _POSITIONED_READS:
            self.read_planned(plan)
            return lambda: None
        # The file is opened here, so that the thread's only call that lets go of the GIL is the read itself: each
        # time it does, taking the GIL back can wait for the caller's Python (up to the switch interval, 5 ms).
        fd = os.open(self._path, os.O_RDONLY)
        try:
            wait = _in_background(self._read_runs, fd, plan.runs)
        except BaseException:
            os.close(fd)
            raise

        def finish() -> None:
            try:
                wait()
            finally:
                os.close(fd)

        return finish

    def _check_layout(self, plan: ReadPlan) -> None:
        if plan.layout is not self._infos and plan.layout != self._infos:
            raise ValueError("the read plan was made for a file with another tensor layout")

    def _read_runs(self, fd: int, runs: Sequence[_Run]) -> None:
        for run in runs:
            views, offset, expected = run.views, self._data_offset + run.begin, run.end - run.begin
            done = os.preadv(fd, views, offset)
            while 0 < done < expected:  # a short read (signals, huge runs): continue where it stopped
                views, done, expected, offset = _advance(views, done), 0, expected - done, offset + done
                done = os.preadv(fd, views, offset)
            if done != expected:
                raise FileTruncatedError(f"the file ended while reading {run.first}: it changed after its header was "
                                         "read", path=self._path)

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
_POSITIONED_READS = hasattr(os, "preadv") and sys.byteorder == "little"


class _Run(NamedTuple):
    """Adjacent tensors read with one vectored read: the buffer range [begin, end) into `views`."""

    first: str
    begin: int
    end: int
    views: tuple[memoryview, ...]


def _runs(order: Sequence[str], infos: Mapping[str, TensorInfo],
          targets: Mapping[str, torch.Tensor]) -> Iterator[_Run]:
    """The vectored reads of tensors sorted by position: one per stretch of adjacent ones (of at most _IOV_MAX)."""
    start = 0
    for i in range(1, len(order) + 1):
        if i == len(order) or infos[order[i - 1]].end != infos[order[i]].begin or i - start == _IOV_MAX:
            group = order[start:i]
            yield _Run(group[0], infos[group[0]].begin, infos[group[-1]].end,
                       tuple(memoryview(targets[n].numpy()).cast("B") for n in group))
            start = i


def _in_background(function: Callable[..., None], *args: Any) -> Callable[[], None]:
    """Runs function(*args) in a new thread; returns the function that waits for it and raises what it
    raised. The wait outlasts even Ctrl-C, so that no thread is left writing behind the caller's back."""
    import threading

    failure: list[BaseException] = []

    def work() -> None:
        try:
            function(*args)
        except BaseException as e:  # handed to the waiting thread
            failure.append(e)

    thread = threading.Thread(target=work, name="lora-hub-read", daemon=True)
    thread.start()

    def wait() -> None:
        interrupted = None
        while thread.is_alive():
            try:
                thread.join()
            except BaseException as e:
                interrupted = e
        if interrupted is not None:
            raise interrupted
        if failure:
            raise failure[0]

    return wait


@dataclass(frozen=True, eq=False)
class ReadPlan:
    """The reads that fill a set of host tensors from a file: made once by `MappedTensors.plan`, then usable for
    any file of the same layout (same tensor names, dtypes, shapes and buffer ranges; the canonical writer gives
    every adapter of the same shape the same one), for as long as `targets` are the tensors to fill."""

    layout: Mapping[str, TensorInfo]
    targets: Mapping[str, torch.Tensor]
    runs: tuple[_Run, ...]


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

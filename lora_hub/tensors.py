"""Tensor bytes: safetensors dtype names, tensors read from a file on access, raw bytes for writing.

A `FileTensors` holds the file open (so a file renamed over it later does not change what is read) and reads each
tensor with a positioned read when it is asked for, into memory of its own: nothing is read until then, a file cut
short afterwards is a `FileTruncatedError` (never a SIGBUS, as a memory mapping gives), and writing to a tensor never
touches the file. A `ReadPlan` goes one step further for tensors whose destination is already allocated in host
memory: positioned reads put the bytes straight into it, one copy from the page cache. A plan is made once and
serves every file of the same layout.
"""

from __future__ import annotations

import os
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from . import constants as C
from .atomicfile import IOV_MAX, after
from .errors import FileChangedError, FileTruncatedError

if TYPE_CHECKING:
    import torch

    from .format import FileIdentity, TensorInfo


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


class FileTensors(Mapping[str, "torch.Tensor"]):
    """Read-only mapping of tensor name -> tensor over one safetensors file, each tensor read when it is asked for
    (a fresh tensor each time: nothing is kept, so reading a large file module by module stays small).

    Args:
        path: The file; its header must already have been read and checked.
        data_offset: Where the buffer starts (8 + header length).
        infos: The tensors of the header.
        identity: The file as its header was read (`SafetensorsHeader.identity`): a file replaced or changed since
            is refused rather than read with the old header's offsets.

    Raises:
        AdapterNotFoundError: The file is gone. FileChangedError: It is not the file the header was read from.
    """

    def __init__(self, path: str | os.PathLike[str], data_offset: int, infos: Mapping[str, TensorInfo], *,
                 identity: FileIdentity | None = None, checksum: str | None = None) -> None:
        from .errors import AdapterNotFoundError

        self._path = os.fspath(path)
        self._infos = infos
        self._data_offset = data_offset
        self.checksum = checksum
        """The sha256 of the buffer that the file records (`tensors_sha256`), if any."""
        self._digest: str | None = None
        try:
            fd = os.open(self._path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError as e:
            raise AdapterNotFoundError("the file is gone since its header was read", path=self._path) from e
        self._fd = fd
        self._closer = weakref.finalize(self, os.close, fd)
        if identity is not None and _identity(os.fstat(fd)) != identity:
            self.close()
            raise FileChangedError("the file was replaced or changed after its header was read: read it again",
                                   path=self._path)

    def close(self) -> None:
        """Closes the file (also done when the object is collected)."""
        self._closer()

    def digest(self) -> str:
        """The sha256 of the whole buffer (every tensor's bytes, in file order), read in bounded chunks; computed
        once."""
        if self._digest is None:
            import hashlib

            digest = hashlib.sha256()
            chunk = bytearray(_HASH_CHUNK)
            position, end = 0, max((info.end for info in self._infos.values()), default=0)
            while position < end:
                view = memoryview(chunk)[:min(_HASH_CHUNK, end - position)]
                self._read_runs(self._fd, (_Run("the buffer", position, position + len(view), (view,)),))
                digest.update(view)
                position += len(view)
            self._digest = digest.hexdigest()
        return self._digest

    def intact(self) -> bool | None:
        """Whether the bytes match the recorded checksum (None when the file records none)."""
        return None if self.checksum is None else self.digest() == self.checksum

    def __getitem__(self, name: str) -> torch.Tensor:
        import torch

        info = self._infos[name]
        tensor = torch.empty(info.shape, dtype=torch_dtype(info.dtype))
        if info.nbytes:
            raw = tensor.view(-1).view(torch.uint8)
            self._read_runs(self._fd, (_Run(name, info.begin, info.end, (memoryview(raw.numpy()).cast("B"),)),))
            if not _STRAIGHT_READS and tensor.element_size() > 1:
                swapped = raw.view(-1, tensor.element_size()).flip(-1).reshape(-1)
                tensor = swapped.view(tensor.dtype).reshape(info.shape)
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
    def nbytes(self) -> int:
        """The bytes of every tensor, from the header."""
        return sum(info.nbytes for info in self._infos.values())

    @property
    def layout(self) -> Mapping[str, TensorInfo]:
        """Every tensor's dtype, shape and buffer range, from the header: what a `ReadPlan` is made for."""
        return self._infos

    def plan(self, names: Iterable[str], into: Mapping[str, torch.Tensor]) -> ReadPlan:
        """Works out how to read tensors `names` with positioned reads: each straight into its tensor in `into`
        where it fits as stored (a contiguous host tensor of its dtype and shape), else into a new host tensor
        (`ReadPlan.targets` says which); one vectored read per run of adjacent tensors, in file order. Nothing is
        read until `read_planned` or `start_reading`."""
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
        if not _STRAIGHT_READS:
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
        if not _STRAIGHT_READS:  # bytes must be swapped: tensor by tensor
            for name, target in plan.targets.items():
                target.copy_(self[name])
            return
        self._read_runs(self._fd, plan.runs)

    def start_reading(self, plan: ReadPlan) -> Callable[[], None]:
        """Starts `read_planned(plan)` in a background thread (positioned reads release the GIL, so the caller's
        Python runs meanwhile) and returns the function that waits for it and raises what it raised. Call it
        before touching the targets, and on every path (an error of your own included): until it returns, the
        thread may be writing into them.

        Raises:
            ValueError: The plan was made for another layout (at once; errors of the reads come from the wait).
        """
        self._check_layout(plan)
        if not _STRAIGHT_READS:
            self.read_planned(plan)
            return lambda: None
        # The file is already open, so the thread's only call that lets go of the GIL is the read itself: each time
        # it does, taking the GIL back can wait for the caller's Python (up to the switch interval, 5 ms).
        return _in_background(self._read_runs, self._fd, plan.runs)

    def _check_layout(self, plan: ReadPlan) -> None:
        if plan.layout is not self._infos and plan.layout != self._infos:
            raise ValueError("the read plan was made for a file with another tensor layout")

    def _read_runs(self, fd: int, runs: Sequence[_Run]) -> None:
        for run in runs:
            views, offset, expected = run.views, self._data_offset + run.begin, run.end - run.begin
            done = _preadv(fd, views, offset)
            while 0 < done < expected:  # a short read (signals, huge runs): continue where it stopped
                views, done, expected, offset = after(views, done), 0, expected - done, offset + done
                done = _preadv(fd, views, offset)
            if done != expected:
                raise FileTruncatedError(f"the file ended while reading {run.first}: it changed after its header was "
                                         "read", path=self._path)


class RenamedTensors(Mapping[str, "torch.Tensor"]):
    """Some tensors of another mapping under names of their own (PEFT's nested expert names as parameter paths):
    read through it on access, described from its header."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], names: Mapping[str, str]) -> None:
        self._tensors = tensors
        self._names = dict(names)  # new name -> name in `tensors`

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[self._names[name]]

    def original(self, name: str) -> str:
        """The name a tensor has in the mapping underneath."""
        return self._names[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = getattr(self._tensors, "shapes", None)
        if shapes is None:
            return {new: tuple(self._tensors[old].shape) for new, old in self._names.items()}
        return {new: shapes[old] for new, old in self._names.items()}

    @property
    def layout(self) -> Mapping[str, TensorInfo] | None:
        layout = getattr(self._tensors, "layout", None)
        return None if layout is None else {new: layout[old] for new, old in self._names.items()}


_HASH_CHUNK = 4 * 1024 * 1024
_STRAIGHT_READS = sys.byteorder == "little"
"""Whether file bytes can go straight into tensors (the format is little-endian)."""


def _preadv(fd: int, views: Sequence[memoryview], offset: int) -> int:
    """os.preadv where the platform has it; else the same with a lock around seek and read (Windows)."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, views, offset)
    with _SEEK_LOCK:
        os.lseek(fd, offset, os.SEEK_SET)
        done = 0
        for view in views:
            data = os.read(fd, len(view))
            view[:len(data)] = data
            done += len(data)
            if len(data) < len(view):
                break
        return done


_SEEK_LOCK = threading.Lock()


def _identity(stat: os.stat_result) -> FileIdentity:
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


class _Run(NamedTuple):
    """Adjacent tensors read with one vectored read: the buffer range [begin, end) into `views`."""

    first: str
    begin: int
    end: int
    views: tuple[memoryview, ...]


def _runs(order: Sequence[str], infos: Mapping[str, TensorInfo],
          targets: Mapping[str, torch.Tensor]) -> Iterator[_Run]:
    """The vectored reads of tensors sorted by position: one per stretch of adjacent ones (of at most IOV_MAX)."""
    start = 0
    for i in range(1, len(order) + 1):
        if i == len(order) or infos[order[i - 1]].end != infos[order[i]].begin or i - start == IOV_MAX:
            group = order[start:i]
            yield _Run(group[0], infos[group[0]].begin, infos[group[-1]].end,
                       tuple(memoryview(targets[n].numpy()).cast("B") for n in group))
            start = i


def _in_background(function: Callable[..., None], *args: Any) -> Callable[[], None]:
    """Runs function(*args) in a new thread; returns the function that waits for it and raises what it
    raised. The wait outlasts even Ctrl-C, so that no thread is left writing behind the caller's back."""
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

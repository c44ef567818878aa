"""The byte layout of a lora-hub file (spec/FORMAT.md): header parsing without torch, the canonical writer, and the
lazily memory-mapped reader.

    8 bytes   N, u64 little-endian
    N bytes   header: one JSON object, UTF-8, padded with spaces
    rest      buffer: tensor bytes, contiguous, no holes, little-endian, row-major

Every size read from the file is bounded before anything is allocated: the header is read only after its length is
checked against MAX_HEADER_BYTES and the file size, and tensor bytes are never read here at all.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import struct
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from itertools import chain, repeat
from operator import eq, itemgetter, mul, sub
from pathlib import Path
from stat import S_ISDIR
from typing import Any, NamedTuple

from . import constants as C
from .adapter import FEATURES, Adapter, AdapterConfig, check_tensor_index, tensor_index
from .errors import (
    AdapterNotFoundError,
    BufferHoleError,
    ChecksumMismatchError,
    ChecksumMismatchWarning,
    FeatureUnknownError,
    FileTruncatedError,
    FormatVersionError,
    HeaderEncodingError,
    HeaderJSONError,
    HeaderSchemaError,
    HeaderTooLargeError,
    LimitExceededError,
    LoraHubError,
    MetadataError,
    NotLoraHubFileError,
    OffsetOutOfRangeError,
    OffsetOverlapError,
    TensorDtypeError,
    TensorSizeError,
    TooManyTensorsError,
)
from .jsontext import canonical_json, members_in_text, natural_rows, quick_read, strict_loads

_VERSION = re.compile(r"[1-9][0-9]{0,8}")
_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})
_ITEMSIZE = {name: size for name, (size, _) in C.DTYPES.items()}


class TensorInfo(NamedTuple):
    """One tensor of the header: dtype name, shape, and its [begin, end) byte range in the buffer. (A named tuple:
    a header holds thousands, made and compared on every load.)"""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


FileIdentity = tuple[int, int, int, int]
"""(device, inode, size, modification time in ns) of a file when its header was read."""


class TensorTable(Mapping[str, TensorInfo]):
    """A header's tensors, name -> TensorInfo, held as the columns the header was checked as (names, dtypes, shapes,
    begins, ends, in the header's order). The TensorInfo records are made when one is first asked for: a check that
    needs only names, dtypes and shapes (the header tier of validation) reads the columns."""

    __slots__ = ("names", "dtypes", "shapes", "begins", "ends", "_infos")

    def __init__(self, names: list[str], dtypes: list[str], shapes: list[tuple[int, ...]], begins: list[int],
                 ends: list[int]) -> None:
        self.names, self.dtypes, self.shapes, self.begins, self.ends = names, dtypes, shapes, begins, ends
        self._infos: dict[str, TensorInfo] | None = None

    @classmethod
    def of(cls, infos: Mapping[str, TensorInfo]) -> TensorTable:
        """The table of name -> TensorInfo records (as the strict reading makes them)."""
        return cls(list(infos), *map(list, zip(*infos.values(), strict=True))) if infos else cls([], [], [], [], [])

    @property
    def infos(self) -> dict[str, TensorInfo]:
        if self._infos is None:  # TensorInfos made with no Python call each
            columns = zip(self.dtypes, self.shapes, self.begins, self.ends, strict=True)
            self._infos = dict(zip(self.names, map(tuple.__new__, repeat(TensorInfo), columns), strict=True))
        return self._infos

    def __getitem__(self, name: str) -> TensorInfo:
        return self.infos[name]

    def __contains__(self, name: object) -> bool:
        return name in self.infos

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, TensorTable):
            return (self.names, self.dtypes, self.shapes, self.begins, self.ends) == \
                (other.names, other.dtypes, other.shapes, other.begins, other.ends) or self.infos == other.infos
        return self.infos == other if isinstance(other, Mapping) else NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"TensorTable({self.infos!r})"

    def index(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """name -> (dtype, shape), as `check_tensor_index` takes it."""
        return dict(zip(self.names, zip(self.dtypes, self.shapes, strict=True), strict=True))

    def shapes_by_name(self) -> dict[str, tuple[int, ...]]:
        """name -> shape."""
        return dict(zip(self.names, self.shapes, strict=True))


@dataclass(frozen=True)
class SafetensorsHeader:
    """A checked safetensors header: every tensor's range is inside the file, and the ranges tile the buffer."""

    path: str
    file_size: int
    header_size: int
    metadata: Mapping[str, str]
    tensors: TensorTable
    identity: FileIdentity | None = None
    """The file the header was read from: tensors are read from that file only (see `tensors.FileTensors`)."""

    @property
    def data_offset(self) -> int:
        return 8 + self.header_size

    @property
    def buffer_size(self) -> int:
        return self.file_size - self.data_offset


@dataclass(frozen=True)
class AdapterHeader:
    """A checked lora-hub header: the safetensors header plus the parsed config, consistent with each other."""

    safetensors: SafetensorsHeader
    config: AdapterConfig
    format_version: int

    @property
    def path(self) -> str:
        return self.safetensors.path

    @property
    def tensors(self) -> TensorTable:
        return self.safetensors.tensors


def read_safetensors_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Reads and checks the header of any safetensors file, reading at most 8 + MAX_HEADER_BYTES bytes.

    Raises:
        AdapterNotFoundError: No such file.
        FileTruncatedError, HeaderTooLargeError, HeaderEncodingError, HeaderJSONError, HeaderSchemaError,
        TooManyTensorsError, TensorDtypeError, TensorSizeError, OffsetOutOfRangeError, OffsetOverlapError,
        BufferHoleError, LimitExceededError: The file breaks the safetensors layout (FORMAT.md, "Layout").
    """
    path = os.fspath(path)
    try:  # os-level reads: no file object or buffer is made for the two reads a header takes
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    except FileNotFoundError as e:
        raise AdapterNotFoundError("no such file", path=path) from e
    except IsADirectoryError as e:
        raise AdapterNotFoundError("is a directory; give the adapter file inside it", path=path) from e
    try:
        stat = os.fstat(fd)
        if S_ISDIR(stat.st_mode):
            raise AdapterNotFoundError("is a directory; give the adapter file inside it", path=path)
        size = stat.st_size
        if size < 8:
            raise FileTruncatedError(
                f"the file is {size} bytes long; a safetensors file starts with an 8-byte header length", path=path)
        prefix = read_exactly(fd, 8)
        if len(prefix) != 8:
            raise FileTruncatedError("the file shrank while it was being read", path=path)
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > C.MAX_HEADER_BYTES:
            raise HeaderTooLargeError(
                f"the header length prefix is {header_size:,} bytes, over the limit of {C.MAX_HEADER_BYTES:,}; "
                "the file is corrupt or not a safetensors file", path=path)
        if 8 + header_size > size:
            raise FileTruncatedError(
                f"the header length prefix is {header_size:,} bytes but only {size - 8:,} bytes follow; "
                "the file is truncated (re-download it)", path=path)
        raw = read_exactly(fd, header_size)
    finally:
        os.close(fd)
    if len(raw) != header_size:
        raise FileTruncatedError("the file shrank while it was being read", path=path)
    try:
        metadata, tensors = _parse_header(raw, buffer_size=size - 8 - header_size)
    except LoraHubError as e:
        e.locate(path)
        raise
    identity = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    return SafetensorsHeader(path, size, header_size, metadata, tensors, identity)


def read_exactly(fd: int, count: int) -> bytes:
    """The next `count` bytes of an open file, fewer only where it ends."""
    parts = []
    while count > 0:
        part = os.read(fd, count)
        if not part:
            break
        parts.append(part)
        count -= len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def read_header(path: str | os.PathLike[str]) -> AdapterHeader:
    """Reads and checks a lora-hub file's header and config without reading tensor data or importing torch.

    Raises:
        NotLoraHubFileError: A valid safetensors file without lora-hub metadata.
        FormatVersionError: The file is from a newer format version.
        MetadataError, ConfigError, MissingTensorError, UnexpectedTensorError, ShapeMismatchError,
        RankMismatchError, TensorDtypeError, LimitExceededError: The config is invalid or contradicts the tensors.
        And every error of `read_safetensors_header`.

    Example:
        >>> header = lora_hub.read_header("sql.safetensors")
        >>> {spec.r for spec in header.config.modules.values()}
        {16}
    """
    return adapter_header(read_safetensors_header(path))


def adapter_header(header: SafetensorsHeader) -> AdapterHeader:
    """The lora-hub reading of an already checked safetensors header (see `read_header`)."""
    try:
        config, version = _adapter_config(header)
        check_tensor_index(config, header.tensors.index())
    except LoraHubError as e:
        e.locate(header.path)
        raise
    return AdapterHeader(header, config, version)


def load_adapter(path: str | os.PathLike[str] | AdapterHeader) -> Adapter:
    """Opens a lora-hub file (or the file of an already read header). Tensors are read when they are asked for
    (see `tensors.FileTensors`).

    Raises:
        FileChangedError: A header was given, and its file has been replaced or changed since it was read.
        Every error of `read_header`.

    Example:
        >>> adapter = lora_hub.load_adapter("sql.safetensors")
        >>> adapter.lora_A("model.layers.0.self_attn.q_proj").shape
        torch.Size([16, 64])
    """
    from .tensors import FileTensors

    header = path if isinstance(path, AdapterHeader) else read_header(path)
    tensors = FileTensors(header.path, header.safetensors.data_offset, header.tensors,
                          identity=header.safetensors.identity, checksum=header.config.tensors_sha256)
    return Adapter(header.config, tensors, source=header.path, _checked=True)


def verify_checksum(adapter: Adapter, *, force: bool = False) -> None:
    """Checks a file-backed adapter's tensor bytes against the tensors_sha256 its file records (one streamed read,
    done once per opened file). Adapters not read from a lora-hub file, or from one without a checksum, pass.

    Args:
        force: Read a corrupt file anyway: a ChecksumMismatchWarning instead of the error, and the adapter is
            marked (`Adapter.checksum_mismatch`), so that what is written from it keeps the mismatching checksum.

    Raises:
        ChecksumMismatchError: The bytes do not match, and `force` is False.
    """
    from .tensors import FileTensors

    tensors = adapter.tensors
    if adapter.checksum_mismatch is not None or not isinstance(tensors, FileTensors) or tensors.intact() is not False:
        return
    what = f"the tensor bytes hash to {tensors.digest()}, but the file records {tensors.checksum}: the file is corrupt"
    if not force:
        raise ChecksumMismatchError(f"{what}. Re-download or re-export it; nothing was written from it. To read it "
                                    "anyway pass force=True (CLI: --force): files written from it then keep the "
                                    "mismatching checksum", path=adapter.source)
    warnings.warn(ChecksumMismatchWarning(f"'{adapter.source}': {what}; read anyway (forced), and files written from "
                                          "it keep the mismatching checksum"), stacklevel=3)
    adapter.checksum_mismatch = tensors.checksum


def save_adapter(adapter: Adapter, path: str | os.PathLike[str], *, checksum: bool = True) -> Path:
    """Writes `adapter` as a canonical lora-hub file, atomically.

    The same adapter gives the same bytes whatever order its tensors were inserted in (FORMAT.md, "Canonical
    writer"). The file appears at `path` only when complete; an interrupted save leaves any old file untouched.

    Args:
        adapter: The adapter to write.
        path: Destination file; missing parent folders are created.
        checksum: Record the sha256 of the tensor bytes in the config (`tensors_sha256`).

    Returns:
        The path written.

    Raises:
        MissingTensorError, UnexpectedTensorError, ShapeMismatchError, ...: The tensors do not fit the config.
        ValueError: A tensor has a dtype safetensors cannot store, or lives on the meta device.
        ChecksumMismatchError: The tensors come from a lora-hub file whose bytes do not match its checksum (never
            laundered into a file with a fresh one; see `verify_checksum` to read such a file anyway).
    """
    from .atomicfile import atomic_write
    from .tensors import FileTensors

    verify_checksum(adapter)
    index = tensor_index(adapter.tensors)
    check_tensor_index(adapter.config, index)
    order = _buffer_order(index)
    entries: dict[str, Any] = {}
    offset = 0
    for name in order:
        dtype, shape = index[name]
        size = math.prod(shape) * C.DTYPES[dtype][0]
        entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    tensors = adapter.tensors
    if adapter.checksum_mismatch is not None:
        digest = adapter.checksum_mismatch  # the corruption stays detectable in what is written
    elif not checksum:
        digest = None
    elif isinstance(tensors, FileTensors) and all(tensors.layout[n].begin == entries[n]["data_offsets"][0]
                                                  for n in order):
        digest = tensors.digest()  # the file is laid out as written here: same bytes, same hash (verified above)
    else:
        digest = _digest(adapter, order)
    config = replace(adapter.config, tensors_sha256=digest)
    header = _canonical_header(entries, config)
    return atomic_write(path, _file_chunks(header, adapter, order))


def _digest(adapter: Adapter, order: list[str]) -> str:
    """sha256 of the tensor bytes in `order`, one tensor in memory at a time."""
    from .tensors import tensor_bytes

    digest = hashlib.sha256()
    for name in order:
        digest.update(tensor_bytes(adapter.tensors[name]))
    return digest.hexdigest()


def _file_chunks(header: bytes, adapter: Adapter, order: list[str]):
    from .tensors import tensor_bytes

    yield struct.pack("<Q", len(header))
    yield header
    for name in order:
        yield tensor_bytes(adapter.tensors[name])


def tensors_digest(adapter: Adapter) -> str:
    """The sha256 of the adapter's tensor bytes in canonical buffer order: the `tensors_sha256` that `save_adapter`
    records, computed one tensor at a time."""
    return _digest(adapter, _buffer_order(tensor_index(adapter.tensors)))


def _buffer_order(index: Mapping[str, tuple[str, tuple[int, ...]]]) -> list[str]:
    """Canonical order of the buffer: by dtype alignment, largest first, then by name."""
    return sorted(index, key=lambda name: (-C.DTYPES[index[name][0]][0], name))


def is_canonical(header: AdapterHeader) -> bool:
    """Whether the file's header is byte for byte what `save_adapter` writes for the same content (FORMAT.md,
    "Canonical writer"): tensor order, offsets, metadata, canonical JSON and padding."""
    infos = header.tensors
    entries: dict[str, Any] = {}
    offset = 0
    for name in _buffer_order({n: (info.dtype, info.shape) for n, info in infos.items()}):
        info = infos[name]
        if info.begin != offset:
            return False
        entries[name] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": [info.begin, info.end]}
        offset = info.end
    with open(header.path, "rb") as f:
        f.seek(8)
        raw = f.read(header.safetensors.header_size)
    return raw == _canonical_header(entries, header.config)


def _canonical_header(entries: dict[str, Any], config: AdapterConfig) -> bytes:
    features = config.features
    metadata = {
        C.METADATA_FORMAT: "pt",
        C.METADATA_FORMAT_VERSION: "2" if features else "1",
        C.METADATA_CONFIG: config.to_json(),
    }
    if features:
        metadata[C.METADATA_FEATURES] = ",".join(features)
    header = canonical_json({**entries, "__metadata__": metadata}).encode("ascii")
    return header + b" " * (-len(header) % 8)


def _parse_header(raw: bytes, *, buffer_size: int) -> tuple[dict[str, str], TensorTable]:
    if raw.count(b"{") > C.MAX_HEADER_OBJECTS:
        raise TooManyTensorsError(f"the header holds {raw.count(b'{'):,} '{{' bytes, more than a header within the "
                                  f"limits can ({C.MAX_HEADER_OBJECTS:,}); it was not parsed")
    return _quick_header(raw, buffer_size) or _strict_header(raw, buffer_size)


def _strict_header(raw: bytes, buffer_size: int) -> tuple[dict[str, str], TensorTable]:
    """The header read and checked one object at a time: the reading whose verdict and messages stand."""
    if b"\x00" in raw:
        raise HeaderEncodingError(f"the header contains a NUL byte at offset {raw.index(0)}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HeaderEncodingError(f"the header is not valid UTF-8 (byte {e.start}: {e.reason})") from e
    body = text.rstrip(" ")
    if not body.startswith("{"):
        raise HeaderJSONError("the header must begin with '{'")
    try:
        obj = strict_loads(body)
    except ValueError as e:
        raise HeaderJSONError(f"the header is not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise HeaderJSONError("the header must be one JSON object")
    if not body.endswith("}"):
        raise HeaderEncodingError("the header may be padded only with spaces (0x20)")
    metadata = obj.pop("__metadata__", {})
    if metadata is None:  # what mlx writes (mx.save_safetensors); the safetensors library reads it as no metadata
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise HeaderSchemaError("__metadata__ must be an object whose values are all strings")
    if len(obj) > C.MAX_TENSORS:
        raise TooManyTensorsError(f"the header lists {len(obj):,} tensors, over the limit of {C.MAX_TENSORS:,}")
    tensors = {name: _tensor_info(name, entry, buffer_size) for name, entry in obj.items()}
    _check_tiling(tensors, buffer_size)
    return metadata, TensorTable.of(tensors)


def _quick_header(raw: bytes, buffer_size: int) -> tuple[dict[str, str], TensorTable] | None:
    """The header of `_strict_header` for a well-formed header, checked column by column (every dtype, every shape,
    every range at once) with no Python code per tensor; None for anything else, which `_strict_header` then reads
    and judges. Every check here is one of `_strict_header`'s, so a header accepted here is accepted there, with
    the same result."""
    body = raw.rstrip(b" ")
    if not body.startswith(b"{") or not body.endswith(b"}") or b"\x00" in body:
        return None
    try:
        obj, compact = quick_read(body, numbers_checked=True)  # a header's numbers all land in the rows checked below
    except ValueError:
        return None
    if type(obj) is not dict:
        return None
    members = len(obj)  # the top level's, "__metadata__" included
    metadata = obj.pop("__metadata__", {})
    if metadata is None:
        metadata = {}
    if type(metadata) is not dict or set(map(type, metadata.values())) - {str} or len(obj) > C.MAX_TENSORS:
        return None
    names, entries = list(obj), list(obj.values())
    if names and (not all(names) or max(map(len, names)) * 4 > C.MAX_NAME_BYTES):
        return None
    try:  # objects (others raise TypeError) of three keys, exactly dtype, shape and data_offsets; known dtypes
        if set(map(len, entries)) - {3}:
            return None
        dtypes = list(map(itemgetter("dtype"), entries))
        shapes = list(map(itemgetter("shape"), entries))
        offsets = list(map(itemgetter("data_offsets"), entries))
        if not _ITEMSIZE.keys() >= set(dtypes):
            return None
    except (KeyError, TypeError):
        return None
    # Dimensions of 16 digits or more (far beyond any tensor; the limit is 2**53-1) are left to the strict reading.
    if not natural_rows(shapes, max_width=C.MAX_NDIM, max_digits=15) or not natural_rows(offsets, width=2):
        return None
    # The tiling: by begin, the ranges start at 0, each where the one before ends, the last at the buffer's end (so
    # every offset lies within 0..buffer_size, below 2**53). Tensors of one dtype are written in name order, so the
    # header's own order usually is that order already.
    begins, ends = list(map(itemgetter(0), offsets)), list(map(itemgetter(1), offsets))
    if [0, *ends] != [*begins, buffer_size]:
        order = sorted(range(len(begins)), key=begins.__getitem__)
        if [0, *map(ends.__getitem__, order)] != [*map(begins.__getitem__, order), buffer_size]:
            return None
    # Each range holds its tensor's bytes (so begin <= end).
    if not all(map(eq, map(mul, map(math.prod, shapes), map(_ITEMSIZE.__getitem__, dtypes)), map(sub, ends, begins))):
        return None
    members += 3 * len(entries) + len(metadata)
    if not compact and members_in_text(body, chain(names, metadata, metadata.values())) != members:
        return None  # a duplicate key somewhere (or an escaped ':' this count cannot see)
    return metadata, TensorTable(names, dtypes, list(map(tuple, shapes)), begins, ends)


def _tensor_info(name: str, entry: object, buffer_size: int) -> TensorInfo:
    if not name or len(name) * 4 > C.MAX_NAME_BYTES and len(name.encode("utf-8")) > C.MAX_NAME_BYTES:
        raise LimitExceededError(f"tensor name {name[:80]!r} must be 1 to {C.MAX_NAME_BYTES} bytes long",
                                 tensor=name[:C.MAX_NAME_BYTES])
    if type(entry) is not dict or entry.keys() != _ENTRY_KEYS:
        raise HeaderSchemaError(f"tensor {name}: the entry must be an object with exactly the keys dtype, shape "
                                "and data_offsets", tensor=name)
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if type(dtype) is not str or dtype not in C.DTYPES:
        raise TensorDtypeError(f"tensor {name}: unknown dtype {dtype!r} (known: {', '.join(C.DTYPES)})",
                               tensor=name)
    if type(shape) is not list or not _json_ints(shape):
        raise HeaderSchemaError(f"tensor {name}: shape must be a list of integers from 0 to 2**53-1, got {shape!r}",
                                tensor=name)
    if len(shape) > C.MAX_NDIM:
        raise LimitExceededError(f"tensor {name}: {len(shape)} dimensions, over the limit of {C.MAX_NDIM}",
                                 tensor=name)
    if type(offsets) is not list or len(offsets) != 2 or not _json_ints(offsets):
        raise HeaderSchemaError(f"tensor {name}: data_offsets must be two integers from 0 to 2**53-1, got "
                                f"{offsets!r}", tensor=name)
    begin, end = offsets
    if begin > end or end > buffer_size:
        raise OffsetOutOfRangeError(
            f"tensor {name}: data_offsets [{begin}, {end}] do not lie within the {buffer_size:,}-byte buffer",
            tensor=name)
    expected = math.prod(shape) * C.DTYPES[dtype][0]
    if expected != end - begin:
        raise TensorSizeError(f"tensor {name}: shape {shape} of {dtype} needs {expected:,} bytes but data_offsets "
                              f"span {end - begin:,}", tensor=name)
    return TensorInfo(dtype, tuple(shape), begin, end)


def _check_tiling(tensors: Mapping[str, TensorInfo], buffer_size: int) -> None:
    """The tensors' ranges, sorted, must start at 0, follow each other without gaps or overlaps, and end at the end
    of the buffer."""
    expected, previous = 0, None
    for name, info in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if info.begin < expected:
            raise OffsetOverlapError(f"tensors {previous} and {name} overlap at buffer byte {info.begin:,}",
                                     tensor=name)
        if info.begin > expected:
            raise BufferHoleError(f"buffer bytes {expected:,} to {info.begin:,} belong to no tensor")
        expected, previous = info.end, name
    if expected != buffer_size:
        raise BufferHoleError(f"the last {buffer_size - expected:,} bytes of the buffer belong to no tensor")


def _adapter_config(header: SafetensorsHeader) -> tuple[AdapterConfig, int]:
    version = header.metadata.get(C.METADATA_FORMAT_VERSION)
    if version is None:
        peft_like = any(name.endswith(C.LORA_A_SUFFIX) for name in header.tensors)
        raise NotLoraHubFileError(
            "a safetensors file without lora-hub metadata ('lora_hub.format_version'); "
            + ("it looks like a PEFT adapter: convert it with `lora-hub convert` (give the folder that holds "
               "adapter_config.json)" if peft_like else "it is not a lora-hub adapter"))
    if not _VERSION.fullmatch(version):
        raise MetadataError(f"lora_hub.format_version must be a positive decimal integer, got {version[:40]!r}")
    if int(version) > C.FORMAT_VERSION:
        raise FormatVersionError(
            f"the file is lora-hub format version {version}; this reader supports version {C.FORMAT_VERSION} "
            "and older: upgrade lora-hub to read it")
    declared = _declared_features(header.metadata, int(version))
    text = header.metadata.get(C.METADATA_CONFIG)
    if text is None:
        raise MetadataError(f"the '{C.METADATA_CONFIG}' metadata key is missing")
    if len(text.encode("utf-8")) > C.MAX_CONFIG_BYTES:
        raise LimitExceededError(f"lora_hub.config is over the limit of {C.MAX_CONFIG_BYTES:,} bytes")
    config = AdapterConfig.from_json(text)
    if config.features != declared:
        used, listed = ", ".join(config.features) or "none", ", ".join(declared) or "none"
        raise MetadataError(f"the config uses the features {used} but lora_hub.features lists {listed}: a file "
                            "must declare exactly the features it uses (FORMAT.md section 4)")
    return config, int(version)


def _declared_features(metadata: Mapping[str, str], version: int) -> tuple[str, ...]:
    """The features a file declares (FORMAT.md section 4): none in version 1; in version 2 a list that must name
    only features this reader knows."""
    text = metadata.get(C.METADATA_FEATURES)
    if version < 2:
        if text is not None:
            raise MetadataError(f"'{C.METADATA_FEATURES}' belongs to format version 2 and later; this file is "
                                f"version {version}")
        return ()
    if text is None or not text:
        raise MetadataError(f"a version-2 file must list its features in '{C.METADATA_FEATURES}'")
    names = text.split(",")
    if len(text) > 4096 or names != sorted(set(names)):
        raise MetadataError(f"'{C.METADATA_FEATURES}' must be distinct feature names, sorted and comma-separated, "
                            f"got {text[:80]!r}")
    unknown = [name for name in names if name not in FEATURES]
    if unknown:
        raise FeatureUnknownError(
            f"the file needs the feature(s) {', '.join(repr(n[:40]) for n in unknown[:4])}, which this version of "
            f"lora-hub does not know (it knows {', '.join(FEATURES)}): upgrade lora-hub to read it")
    return tuple(names)


def _json_ints(values: list) -> bool:
    """Whether every value is a JSON integer (not a boolean) within 0..2**53-1."""
    for value in values:
        if type(value) is not int or not 0 <= value <= C.MAX_JSON_INT:
            return False
    return True

"""The host tier of a runtime with a resident budget: adapters read from disk are kept in host memory (pinned when
the model is on a CUDA device, so copies to it are asynchronous-capable and fast), the least recently used first out
when the byte budget is exceeded, as vLLM's max_cpu_loras does. Reloading an evicted adapter from here reads no file.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from ..adapter import Adapter


class HostCache:
    """Adapters by name, materialized in host memory, up to `max_bytes` in all. Safe to use from several threads:
    copies are made outside its lock, the bookkeeping under it."""

    def __init__(self, max_bytes: int, *, pin: bool) -> None:
        if max_bytes < 0:
            raise ValueError(f"host_cache_bytes must be 0 or more, got {max_bytes}")
        self.max_bytes = max_bytes
        self.pin = pin
        self._entries: OrderedDict[str, tuple[Adapter, int]] = OrderedDict()
        self.nbytes = 0
        self._lock = threading.Lock()

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, name: str) -> Adapter | None:
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                return None
            self._entries.move_to_end(name)
            return entry[0]

    def put(self, name: str, adapter: Adapter) -> Adapter:
        """Keeps `adapter` (read from wherever it lives now) under `name`, replacing an older one, and returns the
        host copy; one larger than the whole budget is returned as read, not kept."""
        from ..format import verify_checksum

        verify_checksum(adapter)  # the host copy no longer tells its file: check the bytes it came from
        tensors = {n: self._host(t) for n, t in adapter.tensors.items()}
        copy = adapter.derived(adapter.config, tensors)
        copy.source = adapter.source
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        with self._lock:
            self._discard(name)
            if size > self.max_bytes:
                return copy
            while self._entries and self.nbytes + size > self.max_bytes:
                self._discard(next(iter(self._entries)))
            self._entries[name] = (copy, size)
            self.nbytes += size
        return copy

    def discard(self, name: str) -> None:
        with self._lock:
            self._discard(name)

    def _discard(self, name: str) -> None:
        entry = self._entries.pop(name, None)
        if entry is not None:
            self.nbytes -= entry[1]

    def _host(self, tensor: torch.Tensor) -> torch.Tensor:
        host = tensor.detach().to("cpu", copy=True).contiguous()
        return host.pin_memory() if self.pin else host

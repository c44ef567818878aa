"""The selection that every LoRA path of a runtime shares: which slots apply, with what weight.

`Mode.OFF` computes the bare base model; `Mode.LANES` applies some slots to every row, each with a weight (one
adapter, or several stacked); `Mode.ROWS` applies one slot per batch row (mixed batches). Its index and weight
tensors exist once per device that has a layer, created or refreshed when the selection changes, never during a
forward pass: a compiled graph sees the same tensors, with new contents, after a switch.
"""

from __future__ import annotations

import enum
import weakref
from collections.abc import Callable, Sequence

import torch


class Mode(enum.Enum):
    OFF = "off"
    LANES = "lanes"
    ROWS = "rows"


class Selection:
    """Which slots the LoRA paths apply, with what weight; one instance is shared by all layers of a runtime.

    Its index and weight tensors exist once per device that has a layer, created or refreshed when the selection
    changes, never during a forward pass: a compiled graph sees the same tensors, with new contents, after a switch
    (only a change in the number of stacked adapters or rows changes their shape).
    """

    def __init__(self) -> None:
        self._listeners: list[weakref.WeakMethod] = []
        self.mode = Mode.OFF
        self._devices: set[torch.device] = set()
        self._lanes: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._rows: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.lane_slots: list[int] = []
        self.lane_weights: list[float] = []
        self.row_slots: list[int] = []
        self.row_weights: list[float] = []

    def register(self, device: torch.device) -> None:
        """Adds a device that layers live on (called when a layer is wrapped)."""
        if device not in self._devices:
            self._devices.add(device)
            _store(self._lanes, {device}, self.lane_slots, [1.0] * len(self.lane_slots))
            _store(self._rows, {device}, self.row_slots, self.row_weights)

    def on_move(self, method: Callable[[], None]) -> None:
        """Calls `method` (held weakly) whenever a layer's buffers are replaced by a move or a conversion of the
        model (`model.to(...)`, `.half()`)."""
        self._listeners.append(weakref.WeakMethod(method))

    def moved(self, device: torch.device) -> None:
        """A layer's buffers now live on `device` (LoraLayer._apply)."""
        self.register(device)
        for listener in self._listeners:
            method = listener()
            if method is not None:
                method()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_listeners"] = []  # a copy or a pickle of the model belongs to no runtime
        return state

    def set_lanes(self, slots: Sequence[int], weights: Sequence[float]) -> None:
        self.lane_slots, self.lane_weights = list(slots), list(weights)
        _store(self._lanes, self._devices, self.lane_slots, self.lane_weights)
        self.mode = Mode.LANES if slots else Mode.OFF

    def set_rows(self, slots: Sequence[int], weights: Sequence[float]) -> None:
        self.row_slots, self.row_weights = list(slots), list(weights)
        _store(self._rows, self._devices, self.row_slots, self.row_weights)
        self.mode = Mode.ROWS

    def lanes(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return self._lanes[device]

    def rows(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return self._rows[device]


def _store(cache: dict, devices: set[torch.device], slots: list[int], weights: list[float]) -> None:
    """Writes slots and weights into each device's tensors: in place when the length is unchanged."""
    index_values = torch.tensor(slots, dtype=torch.long)
    weight_values = torch.tensor(weights, dtype=torch.float32)
    for device in devices:
        index, weight = cache.get(device, (None, None))
        if index is not None and index.numel() == len(slots):
            index.copy_(index_values)
            weight.copy_(weight_values)
        else:
            cache[device] = (index_values.to(device), weight_values.to(device))

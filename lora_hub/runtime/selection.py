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
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Grouping:
    """The rows of a mixed batch grouped by adapter (Mode.ROWS), worked out once per route() on the host, so that a
    layer runs one pair of batched matmuls over groups (as Punica's SGMV and S-LoRA do) instead of copying an
    adapter's factors for every row.

    Groups are in the order of their first row; rows that use no adapter (weight 0) belong to none. When each group's
    rows are contiguous, in order, all groups equal in size and every row in one (`contiguous`), the batch is viewed
    as (groups, rows x tokens, features) with no copy and the update is added into the layer's output in the same
    matmul. Otherwise the rows are gathered into (groups, largest group) with padding, and the valid outputs added
    back by row.
    """

    batch: int
    groups: int
    size: int
    """Rows in the largest group (every group's, when contiguous)."""
    contiguous: bool
    slots: torch.Tensor
    """(groups,) the slot of each group."""
    gather: torch.Tensor
    """(groups * size,) the row that each padded position takes (padding repeats a group's first row)."""
    valid: torch.Tensor
    """The padded positions that are real rows, and `rows` the rows they are, in the same order."""
    rows: torch.Tensor
    first: int | None = None
    """When the groups' slots are consecutive and ascending, the first: the factors are then a view of the slot
    buffers, not a gather."""

    def to(self, device: torch.device) -> Grouping:
        move = {k: getattr(self, k).to(device) for k in ("slots", "gather", "valid", "rows")}
        return Grouping(self.batch, self.groups, self.size, self.contiguous, **move, first=self.first)


def grouping(slots: Sequence[int], weights: Sequence[float]) -> Grouping | None:
    """The grouping of a mixed batch, or None when a row has a weight other than 0 or 1 (each row then runs
    alone)."""
    if any(w not in (0.0, 1.0) for w in weights):
        return None
    members: dict[int, list[int]] = {}
    for row, (slot, weight) in enumerate(zip(slots, weights, strict=True)):
        if weight:
            members.setdefault(slot, []).append(row)
    if not members:
        return None
    size = max(len(rows) for rows in members.values())
    ordered = [row for rows in members.values() for row in rows]
    contiguous = ordered == list(range(len(slots))) and all(len(rows) == size for rows in members.values())
    gather, valid = [], []
    for g, rows in enumerate(members.values()):
        gather += rows + [rows[0]] * (size - len(rows))
        valid += range(g * size, g * size + len(rows))
    order = list(members)
    first = order[0] if order == list(range(order[0], order[0] + len(order))) else None
    return Grouping(len(slots), len(members), size, contiguous, torch.tensor(order, dtype=torch.long),
                    torch.tensor(gather, dtype=torch.long), torch.tensor(valid, dtype=torch.long),
                    torch.tensor(ordered, dtype=torch.long), first)


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
        self._groupings: dict[torch.device, Grouping | None] = {}

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
        plan = grouping(self.row_slots, self.row_weights)
        self._groupings = {device: plan.to(device) if plan is not None else None for device in self._devices}
        self.mode = Mode.ROWS

    def grouped(self, device: torch.device) -> Grouping | None:
        """The grouping of the current mixed batch on `device` (Mode.ROWS), or None."""
        return self._groupings.get(device)

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

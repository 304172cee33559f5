"""Which rank holds each expert of each MoE layer under expert parallelism, and how to choose it.

A placement maps every (MoE layer, expert) to the rank that holds its weights, or to NO_HOME for an expert that
pruning removed (no rank holds it, so routing must never reach it). Two ways to build one:

- `contiguous_placement`: each layer's experts in id order, cut into N blocks whose sizes differ by at most one
  (what placement is without measurements).
- `balanced_placement`: from measured routing (calibration counts or the engine's live expert-load counters,
  [layer, expert]), greedy bin packing: heaviest expert first onto the least-loaded rank, so every rank gets
  nearly the same routed tokens per layer. Every rank also holds nearly the same number of experts (at most
  ceil(K / N) of a layer's K experts with a home), so resident memory stays ~1/N as well.

The rule for N ranks: every rank must hold at least one expert of every MoE layer, so N may not exceed the
number of experts with a home in any layer. A rank without experts in a layer would still compute the right
result (it contributes zero), but it would be idle there: a configuration error, refused with a ValueError.

Under expert parallelism a step's MoE layer takes as long as its busiest rank (each layer ends in a collective),
so `load_imbalance` is the sum over layers of the busiest rank's load over the sum of the mean rank loads:
1.0 is perfect balance. Torch-free: load counts are any [layer][expert] numbers (numpy arrays, lists).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NO_HOME = -1
LoadCounts = Sequence[Sequence[float]]  # [layer, expert], rows indexed by decoder-layer index


class PlacementError(ValueError):
    """A placement file or value that cannot be used; the message names the source and the field."""


@dataclass(frozen=True)
class ExpertPlacement:
    """The rank holding each expert of each MoE layer: `owners[i][e]` for decoder layer `layers[i]` and expert
    e, NO_HOME for pruned experts. Validated on construction (ValueError naming the layer and field)."""

    num_ranks: int
    layers: tuple[int, ...]
    owners: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(layer) for layer in self.layers))
        object.__setattr__(self, "owners", tuple(tuple(int(o) for o in row) for row in self.owners))
        if self.num_ranks < 1:
            raise ValueError(f"num_ranks must be at least 1, got {self.num_ranks}")
        if len(set(self.layers)) != len(self.layers) or len(self.layers) != len(self.owners):
            raise ValueError(f"layers must be distinct and match owners one to one, got {list(self.layers)}")
        for layer, row in zip(self.layers, self.owners):
            bad = [o for o in row if not NO_HOME <= o < self.num_ranks]
            if bad:
                raise ValueError(f"layer {layer}: owners must be ranks 0..{self.num_ranks - 1} or {NO_HOME}, got {bad}")
            _check_fits(layer, sum(o != NO_HOME for o in row), len(row), self.num_ranks)
            idle = sorted(set(range(self.num_ranks)) - set(row))
            if idle:
                raise ValueError(f"layer {layer}: ranks {idle} hold no expert (every rank must hold at least one)")

    def owner_row(self, layer: int) -> tuple[int, ...]:
        """The owner rank of each expert of decoder layer `layer` (NO_HOME: pruned)."""
        try:
            return self.owners[self.layers.index(layer)]
        except ValueError:
            raise ValueError(f"layer {layer} is not in the placement (its layers: {list(self.layers)})") from None

    def local_experts(self, layer: int, rank: int) -> tuple[int, ...]:
        """The expert ids of decoder layer `layer` that `rank` holds, ascending."""
        return tuple(e for e, owner in enumerate(self.owner_row(layer)) if owner == rank)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: {"num_ranks": N, "layers": {"<layer>": [owner or null per expert]}}."""
        rows = {str(layer): [None if o == NO_HOME else o for o in row] for layer, row in zip(self.layers, self.owners)}
        return {"num_ranks": self.num_ranks, "layers": rows}


def _check_fits(layer: int, homed: int, num_experts: int, num_ranks: int) -> None:
    if homed < num_ranks:
        raise ValueError(
            f"{num_ranks} ranks do not fit layer {layer}: it has {homed} experts with a home ({num_experts} experts, "
            f"{num_experts - homed} pruned) and every rank must hold at least one; use at most {homed} ranks"
        )


def _homed(layer: int, num_experts: int, pruned: Mapping[int, Collection[int]] | None) -> list[int]:
    removed = set(pruned.get(layer, ())) if pruned else set()
    outside = sorted(e for e in removed if not 0 <= e < num_experts)
    if outside:
        raise ValueError(f"pruned experts {outside} of layer {layer} are not expert ids 0..{num_experts - 1}")
    return [e for e in range(num_experts) if e not in removed]


def contiguous_placement(
    layers: int | Sequence[int],
    num_experts: int,
    num_ranks: int,
    pruned: Mapping[int, Collection[int]] | None = None,
) -> ExpertPlacement:
    """Each layer's experts with a home, in id order, cut into `num_ranks` consecutive blocks (the first
    K mod N ranks get one more). `layers`: decoder-layer indices, or a count for 0..count-1; `pruned`: decoder
    layer -> expert ids without a home."""
    layer_ids = list(range(layers)) if isinstance(layers, int) else list(layers)
    owners = []
    for layer in layer_ids:
        homed = _homed(layer, num_experts, pruned)
        _check_fits(layer, len(homed), num_experts, num_ranks)
        row = [NO_HOME] * num_experts
        base, extra = divmod(len(homed), num_ranks)
        start = 0
        for rank in range(num_ranks):
            size = base + (rank < extra)
            for e in homed[start : start + size]:
                row[e] = rank
            start += size
        owners.append(tuple(row))
    return ExpertPlacement(num_ranks, tuple(layer_ids), tuple(owners))


def balanced_placement(
    load_counts: LoadCounts,
    num_ranks: int,
    layers: Sequence[int] | None = None,
    pruned: Mapping[int, Collection[int]] | None = None,
) -> ExpertPlacement:
    """Greedy bin packing per layer: experts by descending load (ties: lower id first), each onto the rank with
    the least load so far among those holding fewer than ceil(K / N) experts (ties: fewer experts, then lower
    rank). `load_counts` rows are decoder layers (ExpertLoad's layout); `layers` picks the MoE layers to place
    (default: every row); `pruned` as in contiguous_placement."""
    layer_ids = list(range(len(load_counts))) if layers is None else list(layers)
    owners = []
    for layer in layer_ids:
        if not 0 <= layer < len(load_counts):
            raise ValueError(f"layer {layer} has no row in the load counts ({len(load_counts)} rows)")
        counts = [float(c) for c in load_counts[layer]]
        if any(c < 0 for c in counts):
            raise ValueError(f"layer {layer}: load counts must not be negative")
        homed = _homed(layer, len(counts), pruned)
        _check_fits(layer, len(homed), len(counts), num_ranks)
        capacity = -(-len(homed) // num_ranks)
        loads, held = [0.0] * num_ranks, [0] * num_ranks
        row = [NO_HOME] * len(counts)
        for e in sorted(homed, key=lambda e: (-counts[e], e)):
            rank = min((r for r in range(num_ranks) if held[r] < capacity), key=lambda r: (loads[r], held[r], r))
            row[e] = rank
            loads[rank] += counts[e]
            held[rank] += 1
        owners.append(tuple(row))
    return ExpertPlacement(num_ranks, tuple(layer_ids), tuple(owners))


def rank_loads(placement: ExpertPlacement, load_counts: LoadCounts) -> list[list[float]]:
    """[placed layer, rank]: the routed load each rank carries per layer (layers in placement order)."""
    loads = []
    for layer, row in zip(placement.layers, placement.owners):
        counts = load_counts[layer]
        if len(counts) != len(row):
            raise ValueError(f"layer {layer}: {len(counts)} load counts for {len(row)} placed experts")
        per_rank = [0.0] * placement.num_ranks
        for e, owner in enumerate(row):
            if owner != NO_HOME:
                per_rank[owner] += float(counts[e])
        loads.append(per_rank)
    return loads


def load_imbalance(placement: ExpertPlacement, load_counts: LoadCounts) -> float:
    """Sum over layers of the busiest rank's load / sum of the mean rank loads (1.0 = even; 1.0 with no load)."""
    loads = rank_loads(placement, load_counts)
    mean = sum(sum(row) / len(row) for row in loads)
    return 1.0 if mean == 0 else sum(max(row) for row in loads) / mean


def save_placement(placement: ExpertPlacement, path: str | Path) -> None:
    Path(path).write_text(json.dumps(placement.to_dict(), indent=1) + "\n")


def load_placement(path: str | Path) -> ExpertPlacement:
    """Read a placement written by save_placement; PlacementError naming the file and field on any defect."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PlacementError(f"{path}: not a readable JSON placement ({exc})") from exc
    return placement_from_dict(data, str(path))


def placement_from_dict(data: object, source: str = "placement") -> ExpertPlacement:
    """The placement of a to_dict() value; PlacementError naming `source` and the field on any defect."""
    if not isinstance(data, dict):
        raise PlacementError(f"{source}: expected a JSON object with 'num_ranks' and 'layers'")
    num_ranks, rows = data.get("num_ranks"), data.get("layers")
    if not isinstance(num_ranks, int) or isinstance(num_ranks, bool):
        raise PlacementError(f"{source}: field 'num_ranks' must be an integer, got {num_ranks!r}")
    if not isinstance(rows, dict) or not rows:
        raise PlacementError(f"{source}: field 'layers' must be a non-empty object of layer -> owners")
    layers, owners = [], []
    for key, row in rows.items():
        if not key.isdigit():
            raise PlacementError(f"{source}: field 'layers' has key {key!r}; expected a decoder-layer index")
        if not isinstance(row, list) or not all(o is None or (isinstance(o, int) and o >= 0) for o in row):
            raise PlacementError(f"{source}: field 'layers.{key}' must be a list of ranks (or null for no home)")
        layers.append(int(key))
        owners.append(tuple(NO_HOME if o is None else o for o in row))
    try:
        return ExpertPlacement(num_ranks, tuple(layers), tuple(owners))
    except ValueError as exc:
        raise PlacementError(f"{source}: {exc}") from None

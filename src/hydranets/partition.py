"""Subtasks: partitions of the classes into B groups of visually similar classes."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .errors import HydraError


@dataclass
class Partition:
    """B subsets of class indices; disjoint unless ``overlap`` is set."""

    subsets: list[list[int]]
    num_classes: int
    class_names: list[str] | None = None
    method: str = "given"
    overlap: bool = False
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.subsets = [sorted(int(c) for c in s) for s in self.subsets]
        validate_subsets(self.subsets, self.num_classes, self.overlap)

    @property
    def num_subsets(self) -> int:
        return len(self.subsets)

    def membership(self) -> torch.Tensor:
        """(num_classes, B) 0/1 matrix: row c marks the subtasks that hold class c."""
        m = torch.zeros(self.num_classes, self.num_subsets)
        for b, s in enumerate(self.subsets):
            m[s, b] = 1.0
        return m

    def to_dict(self) -> dict:
        return {
            "num_classes": self.num_classes,
            "num_subsets": self.num_subsets,
            "method": self.method,
            "overlap": self.overlap,
            "subsets": self.subsets,
            "subset_names": [[self.class_names[c] for c in s] for s in self.subsets] if self.class_names else None,
            "class_names": self.class_names,
            "meta": self.meta,
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "Partition":
        try:
            d = json.loads(Path(path).read_text())
            return cls(d["subsets"], d["num_classes"], d.get("class_names"), d.get("method", "given"),
                       d.get("overlap", False), d.get("meta", {}))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise HydraError(f"cannot read partition file {path}: {e}") from None


def validate_subsets(subsets: Sequence[Sequence[int]], num_classes: int, overlap: bool = False) -> None:
    """Raise HydraError unless every class lies in exactly one subset (at least one with ``overlap``)."""
    if len(subsets) == 0 or any(len(s) == 0 for s in subsets):
        raise HydraError("partition has an empty subset; every branch needs at least one class")
    counts = [0] * num_classes
    for s in subsets:
        for c in s:
            if not 0 <= int(c) < num_classes:
                raise HydraError(f"partition names class {c}, outside 0..{num_classes - 1}; "
                                 "was it made for another data set?")
            counts[int(c)] += 1
    missing = [c for c, n in enumerate(counts) if n == 0]
    if missing:
        raise HydraError(f"partition leaves out {len(missing)} class(es), e.g. {missing[:5]}; "
                         "each class must belong to a subset")
    if not overlap:
        twice = [c for c, n in enumerate(counts) if n > 1]
        if twice:
            raise HydraError(f"partition puts class(es) {twice[:5]} in more than one subset; "
                             "use overlap=True to allow that")


def as_partition(partition: "Partition | Sequence[Sequence[int]]", num_classes: int) -> Partition:
    """Accept a Partition or plain lists of class indices."""
    if isinstance(partition, Partition):
        if partition.num_classes != num_classes:
            raise HydraError(f"partition is for {partition.num_classes} classes, the model has {num_classes}")
        return partition
    subsets = [list(s) for s in partition]
    overlap = sum(len(s) for s in subsets) > num_classes
    return Partition(subsets, num_classes, overlap=overlap)

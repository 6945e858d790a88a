"""Subtasks: partitions of the classes into B groups of visually similar classes."""
from __future__ import annotations

import json
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .checkpoint import atomic_write_text
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
        self.num_classes = _count(self.num_classes)
        self.subsets = [sorted(_class_index(c) for c in s) for s in self.subsets]
        validate_subsets(self.subsets, self.num_classes, self.overlap)
        if self.class_names is not None:
            self.class_names = [str(n) for n in self.class_names]
            if len(self.class_names) != self.num_classes:
                raise HydraError(f"partition has {len(self.class_names)} class names "
                                 f"for {self.num_classes} classes")

    @property
    def num_subsets(self) -> int:
        return len(self.subsets)

    @property
    def kind(self) -> str:
        """How the subsets were made, in words (method, and how they overlap)."""
        return self.method + (", overlapping" if self.overlap else "") + (
            " evenly" if self.meta.get("overlap_balanced") else "")

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
        """Write the partition as JSON, atomically: a failed write keeps the old file whole."""
        try:
            atomic_write_text(json.dumps(self.to_dict(), indent=1), path)
        except OSError as e:
            raise HydraError(f"cannot write partition file {path}: {e}") from None

    @classmethod
    def from_dict(cls, d: dict) -> "Partition":
        return cls(d["subsets"], d["num_classes"], d.get("class_names"), d.get("method", "given"),
                   d.get("overlap", False), d.get("meta", {}))

    @classmethod
    def load(cls, path: str | Path, expected_num_classes: int | None = None,
             expected_class_names: Sequence[str] | None = None) -> "Partition":
        """Read a partition saved by :meth:`save`; with ``expected_*`` also check it is for this data set."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise HydraError(f"cannot read partition file {path}: {e}") from None
        shape = HydraError(f"partition file {path} must hold a JSON object with \"subsets\" (a list of lists of "
                           f"class indices) and \"num_classes\", as `hydranets partition` writes it")
        if not (isinstance(data, dict) and "num_classes" in data and isinstance(data.get("subsets"), list)
                and all(isinstance(s, list) for s in data["subsets"])):
            raise shape
        try:
            part = cls.from_dict(data)
        except (KeyError, TypeError, AttributeError):
            raise shape from None
        except HydraError as e:
            raise HydraError(f"partition file {path}: {e}") from None
        if expected_num_classes is not None and part.num_classes != expected_num_classes:
            raise HydraError(f"partition file {path} is for another data set "
                             f"({part.num_classes} classes, this one has {expected_num_classes})")
        if expected_class_names is not None:
            expected = [str(n) for n in expected_class_names]
            if len(expected) != part.num_classes:
                raise HydraError(f"partition file {path} is for another data set "
                                 f"({part.num_classes} classes, this one has {len(expected)})")
            if part.class_names is not None and list(part.class_names) != expected:
                diff = next(i for i, (a, b) in enumerate(zip(part.class_names, expected)) if a != b)
                raise HydraError(f"partition file {path} is for another data set (class {diff} is "
                                 f"{part.class_names[diff]!r} there, {expected[diff]!r} here)")
        return part


def _whole(v: object, what: str) -> int:
    """``v`` as a plain int (numpy integers too; not bools, not floats such as 0.5 or 3.0)."""
    try:
        if isinstance(v, bool):
            raise TypeError
        return operator.index(v)
    except TypeError:
        raise HydraError(what.format(v=v)) from None


def _class_index(c: object) -> int:
    return _whole(c, "partition holds {v!r} where a class index (an integer) belongs")


def _count(n: object) -> int:
    return _whole(n, "num_classes must be an integer, got {v!r}")


def validate_subsets(subsets: Sequence[Sequence[int]], num_classes: int, overlap: bool = False) -> None:
    """Raise HydraError unless every class lies in exactly one subset (at least one with ``overlap``)."""
    if len(subsets) == 0 or any(len(s) == 0 for s in subsets):
        raise HydraError("partition has an empty subset; every branch needs at least one class")
    counts = [0] * num_classes
    for i, s in enumerate(subsets):
        if len(set(int(c) for c in s)) < len(s):
            raise HydraError(f"subset {i} names a class twice; list each class once per subset")
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
    """Accept a Partition or plain lists of class indices (disjoint; overlap needs a Partition)."""
    if isinstance(partition, Partition):
        if partition.num_classes != num_classes:
            raise HydraError(f"partition is for {partition.num_classes} classes, the model has {num_classes}")
        return partition
    return Partition([list(s) for s in partition], num_classes)


METHODS = ("kmeans", "spectral", "random")


def check_partition_seed(seed: object) -> None:
    """Refuse a seed that numpy cannot seed the partition's random numbers with: it must be an integer >= 0."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise HydraError(f"the partition seed (partition.seed, or partition --seed) must be an integer >= 0, "
                         f"got {seed!r}")


def _check_counts(num_classes: int, num_subsets: int) -> None:
    if isinstance(num_subsets, bool) or not isinstance(num_subsets, (int, np.integer)):
        raise HydraError(f"num_subsets must be an integer, got {num_subsets!r}")
    if num_classes < 1:
        raise HydraError(f"need at least one class to partition, got {num_classes}")
    if not 1 <= num_subsets <= num_classes:
        raise HydraError(f"num_subsets must be between 1 and the number of classes ({num_classes}), "
                         f"got {num_subsets}")


def _as_numpy(x: "np.ndarray | torch.Tensor | Sequence", name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = (x.double() if x.dtype == torch.bfloat16 else x).numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as e:
        raise HydraError(f"{name} is not an array: {e}") from None


def class_mean_outputs(probs: "np.ndarray | torch.Tensor", labels: "np.ndarray | torch.Tensor | Sequence[int]",
                       num_classes: int) -> np.ndarray:
    """(C, C) class descriptors: row c is the mean softmax output of a trained baseline over class c's images.

    Classes the baseline confuses get similar rows, which is what the paper clusters into subtasks.
    """
    p = _as_numpy(probs, "probs").astype(np.float64)
    y = _as_numpy(labels, "labels")
    if p.ndim != 2 or p.shape[1] != num_classes:
        raise HydraError(f"probs must have shape (N, {num_classes}), got {tuple(p.shape)}")
    if y.ndim != 1 or y.shape[0] != p.shape[0]:
        raise HydraError(f"labels must have shape ({p.shape[0]},) to match probs, got {tuple(y.shape)}")
    if y.size and (not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= num_classes):
        raise HydraError(f"labels must be integers in 0..{num_classes - 1}")
    y = y.astype(np.int64)
    counts = np.bincount(y, minlength=num_classes)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        raise HydraError(f"class(es) {empty[:5].tolist()} have no images; every class needs at least one "
                         "to get a descriptor")
    sums = np.zeros((num_classes, num_classes))
    np.add.at(sums, y, p)
    return sums / counts[:, None]


def _sq_dists(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    d = (x * x).sum(1)[:, None] - 2.0 * x @ c.T + (c * c).sum(1)[None, :]
    return np.maximum(d, 0.0)


def _kmeans_once(x: np.ndarray, k: int, rng: np.random.Generator, iters: int) -> tuple[np.ndarray, float]:
    n = x.shape[0]
    centroids = np.empty((k, x.shape[1]))
    centroids[0] = x[rng.integers(n)]
    closest = _sq_dists(x, centroids[:1])[:, 0]
    for j in range(1, k):
        total = closest.sum()
        i = rng.choice(n, p=closest / total) if total > 0 else rng.integers(n)
        centroids[j] = x[i]
        closest = np.minimum(closest, _sq_dists(x, centroids[j:j + 1])[:, 0])
    assign = None
    for _ in range(iters):
        d = _sq_dists(x, centroids)
        new = d.argmin(1)
        if assign is not None and np.array_equal(new, assign):
            break
        assign = new
        for j in range(k):
            members = x[assign == j]
            if len(members):
                centroids[j] = members.mean(0)
            else:
                far = d[np.arange(n), assign].argmax()
                centroids[j] = x[far]
                assign[far] = j
    d = _sq_dists(x, centroids)
    return centroids, float(d.min(1).sum())


def kmeans(x: np.ndarray, k: int, seeds: int = 10, seed: int = 0, iters: int = 300) -> tuple[np.ndarray, float]:
    """k-means (k-means++ init, Lloyd) with ``seeds`` restarts; returns the (k, D) centroids and inertia of the best."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or not np.isfinite(x).all():
        raise HydraError(f"k-means needs a finite 2-D array, got shape {x.shape}")
    _check_counts(x.shape[0], k)
    check_partition_seed(seed)
    if seeds < 1:
        raise HydraError(f"seeds must be at least 1, got {seeds}")
    rng = np.random.default_rng(seed)
    best: tuple[np.ndarray, float] | None = None
    for _ in range(seeds):
        c, inertia = _kmeans_once(x, k, rng, iters)
        if best is None or inertia < best[1] - 1e-12:
            best = (c, inertia)
    assert best is not None
    return best


def _balanced_sizes(num_classes: int, num_subsets: int) -> list[int]:
    base, extra = divmod(num_classes, num_subsets)
    return [base + (1 if b < extra else 0) for b in range(num_subsets)]


def balanced_assign(x: np.ndarray, centroids: np.ndarray) -> list[list[int]]:
    """Equal-size subsets: the closest (class, centroid) pairs first, each centroid up to C//B classes
    (C%B of them one more), so sizes differ by at most one."""
    d = _sq_dists(np.asarray(x, dtype=np.float64), np.asarray(centroids, dtype=np.float64))
    n, k = d.shape
    small, extra = n // k, n % k
    free = np.ones(n, dtype=bool)
    subsets: list[list[int]] = [[] for _ in range(k)]
    for flat in np.argsort(d, axis=None, kind="stable"):
        i, b = divmod(int(flat), k)
        if not free[i]:
            continue
        size = len(subsets[b])
        if size < small or (size == small and extra > 0):
            extra -= size == small
            subsets[b].append(i)
            free[i] = False
    return subsets


def balanced_kmeans(x: np.ndarray, k: int, seeds: int = 10, seed: int = 0, iters: int = 50
                    ) -> tuple[np.ndarray, list[list[int]], float]:
    """k-means whose assignment step is :func:`balanced_assign`; best of ``seeds`` restarts.

    Returns centroids, subsets and the inertia (sum of squared distances to the own centroid).
    """
    check_partition_seed(seed)
    if seeds < 1:
        raise HydraError(f"seeds must be at least 1, got {seeds}")
    best: tuple[np.ndarray, list[list[int]], float] | None = None
    for s in range(seeds):
        centroids, _ = kmeans(x, k, seeds=1, seed=seed + s)
        subsets = balanced_assign(x, centroids)
        for _ in range(iters):
            centroids = np.stack([x[sub].mean(0) for sub in subsets])
            new = balanced_assign(x, centroids)
            if [sorted(a) for a in new] == [sorted(a) for a in subsets]:
                break
            subsets = new
        inertia = float(sum(_sq_dists(x[sub], centroids[b:b + 1]).sum() for b, sub in enumerate(subsets)))
        if best is None or inertia < best[2] - 1e-12:
            best = (centroids, subsets, inertia)
    assert best is not None
    return best


def _add_second_nearest(x: np.ndarray, centroids: np.ndarray, subsets: list[list[int]],
                        balanced: bool = False) -> list[list[int]]:
    d = _sq_dists(x, centroids)
    first = np.empty(len(x), dtype=int)
    for b, s in enumerate(subsets):
        first[s] = b
    d[np.arange(len(x)), first] = np.inf
    second = _fill_evenly(d, first) if balanced else d.argmin(1)
    out = [list(s) for s in subsets]
    for c, b in enumerate(second):
        out[int(b)].append(c)
    return out


def _fill_evenly(d: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Each class's second subset: the nearest (by ``d``, inf at its own) with room, every subset taking
    C//B (C%B of them one more, the lowest-numbered that have that many classes outside them) second
    members; a class left with room only in its own subset swaps with the cheapest class that can take
    that room."""
    n, k = d.shape
    outside = n - np.bincount(first, minlength=k)
    base, extra = divmod(n, k)
    room = np.full(k, base)
    for b in np.flatnonzero(outside > base)[:extra]:
        room[b] += 1
    second = np.full(n, -1)
    for flat in np.argsort(d, axis=None, kind="stable"):
        c, b = divmod(int(flat), k)
        if second[c] < 0 and room[b] > 0 and np.isfinite(d[c, b]):
            second[c], room[b] = b, room[b] - 1
    for c in np.flatnonzero(second < 0):
        free = int(np.flatnonzero(room)[0])
        movable = np.flatnonzero((second >= 0) & (first != free))
        cost = d[movable, free] + d[c, second[movable]] - d[movable, second[movable]]
        if not np.isfinite(cost).any():
            raise HydraError("cannot give every class a second subtask evenly; use fewer subtasks")
        other = int(movable[np.argmin(cost)])
        second[c], second[other], room[free] = second[other], free, room[free] - 1
    return second


def _check_names(class_names: Sequence[str] | None, num_classes: int) -> list[str] | None:
    if class_names is None:
        return None
    names = [str(n) for n in class_names]
    if len(names) != num_classes:
        raise HydraError(f"got {len(names)} class names for {num_classes} classes")
    return names


def partition_kmeans(descriptors: "np.ndarray | torch.Tensor", num_subsets: int, seeds: int = 10, seed: int = 0,
                     overlap: bool = False, class_names: Sequence[str] | None = None,
                     overlap_balanced: bool = False) -> Partition:
    """The paper's subtasks: k-means the class descriptors into B centroids, then fill equal-size subsets.

    With ``overlap`` each class also joins the subset of its nearest other centroid, so it lies in exactly two;
    with ``overlap_balanced`` too, the nearest other one with room, so that every subset gets about 2C/B classes
    (the nearest alone can pile many classes onto one central subset).
    """
    x = _as_numpy(descriptors, "descriptors").astype(np.float64)
    if x.ndim != 2:
        raise HydraError(f"descriptors must be a (num_classes, D) array, got shape {x.shape}")
    num_classes = x.shape[0]
    _check_counts(num_classes, num_subsets)
    if overlap and num_subsets < 2:
        raise HydraError("overlap=True needs at least 2 subsets")
    if overlap_balanced and not overlap:
        raise HydraError("overlap_balanced spreads the second subtasks of overlap=True; set overlap too")
    names = _check_names(class_names, num_classes)
    centroids, subsets, inertia = balanced_kmeans(x, int(num_subsets), seeds=seeds, seed=seed)
    if overlap:
        subsets = _add_second_nearest(x, centroids, subsets, overlap_balanced)
    subsets.sort(key=min)
    meta = {"method": "kmeans", "seeds": int(seeds), "seed": int(seed), "inertia": inertia}
    return Partition(subsets, num_classes, names, "kmeans", overlap,
                     {**meta, "overlap_balanced": True} if overlap_balanced else meta)


def spectral_embedding(confusion: "np.ndarray | torch.Tensor", dim: int) -> np.ndarray:
    """(C, dim) unit-length rows from the normalised Laplacian's ``dim`` smallest eigenvectors of the confusion graph."""
    m = _as_numpy(confusion, "confusion").astype(np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise HydraError(f"confusion must be a square (C, C) matrix, got shape {m.shape}")
    if not np.isfinite(m).all() or (m < 0).any():
        raise HydraError("confusion matrix must hold finite, non-negative counts")
    rows = m.sum(1, keepdims=True)
    m = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    a = (m + m.T) / 2.0
    np.fill_diagonal(a, 0.0)
    deg = a.sum(1)
    inv_sqrt = np.where(deg > 0, 1.0 / np.sqrt(np.maximum(deg, 1e-300)), 0.0)
    lap = np.eye(len(a)) - inv_sqrt[:, None] * a * inv_sqrt[None, :]
    _, vecs = np.linalg.eigh(lap)
    emb = vecs[:, :dim]
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    return np.divide(emb, norms, out=np.zeros_like(emb), where=norms > 1e-12)


def partition_spectral(confusion: "np.ndarray | torch.Tensor", num_subsets: int, seed: int = 0,
                       class_names: Sequence[str] | None = None, seeds: int = 10) -> Partition:
    """Subtasks from a confusion matrix: classes often mistaken for each other share a subset.

    Rows are first turned into rates, so frequent classes do not dominate; then symmetrised,
    embedded with the normalised Laplacian and split by the same balanced k-means as the paper's method.
    """
    m = _as_numpy(confusion, "confusion")
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise HydraError(f"confusion must be a square (C, C) matrix, got shape {m.shape}")
    num_classes = m.shape[0]
    _check_counts(num_classes, num_subsets)
    names = _check_names(class_names, num_classes)
    emb = spectral_embedding(m, int(num_subsets))
    _, subsets, inertia = balanced_kmeans(emb, int(num_subsets), seeds=seeds, seed=seed)
    subsets = sorted(subsets, key=min)
    return Partition(subsets, num_classes, names, "spectral", False,
                     {"method": "spectral", "seeds": int(seeds), "seed": int(seed), "inertia": inertia})


def partition_random(num_classes: int, num_subsets: int, seed: int = 0,
                     class_names: Sequence[str] | None = None) -> Partition:
    """The control: classes shuffled into B subsets of balanced size, the same for the same seed."""
    _check_counts(num_classes, num_subsets)
    check_partition_seed(seed)
    names = _check_names(class_names, num_classes)
    order = np.random.default_rng(seed).permutation(num_classes)
    bounds = np.cumsum([0] + _balanced_sizes(num_classes, int(num_subsets)))
    subsets = [order[bounds[b]:bounds[b + 1]].tolist() for b in range(int(num_subsets))]
    return Partition(subsets, num_classes, names, "random", False, {"method": "random", "seed": int(seed)})


def make_partition(method: str, *, num_subsets: int, descriptors: "np.ndarray | torch.Tensor | None" = None,
                   confusion: "np.ndarray | torch.Tensor | None" = None, num_classes: int | None = None,
                   seed: int = 0, overlap: bool = False, overlap_balanced: bool = False,
                   class_names: Sequence[str] | None = None, seeds: int = 10) -> Partition:
    """Build subtasks by ``method`` ("kmeans" needs descriptors, "spectral" a confusion matrix, "random" neither)."""
    if method not in METHODS:
        raise HydraError(f"unknown partition method {method!r}; choose one of {', '.join(METHODS)}")
    if (overlap or overlap_balanced) and method != "kmeans":
        raise HydraError(f"overlapping subsets are only made by method 'kmeans', not {method!r}")
    check_partition_seed(seed)
    given = {"descriptors": descriptors, "confusion": confusion}
    if method == "kmeans":
        if descriptors is None:
            raise HydraError("partition method 'kmeans' needs descriptors (class_mean_outputs of a trained baseline)")
        part = partition_kmeans(descriptors, num_subsets, seeds=seeds, seed=seed, overlap=overlap,
                                class_names=class_names, overlap_balanced=overlap_balanced)
    elif method == "spectral":
        if confusion is None:
            raise HydraError("partition method 'spectral' needs a confusion matrix")
        part = partition_spectral(confusion, num_subsets, seed=seed, class_names=class_names, seeds=seeds)
    else:
        n = num_classes
        for arr in given.values():
            if n is None and arr is not None:
                n = int(_as_numpy(arr, "array").shape[0])
        if n is None and class_names is not None:
            n = len(class_names)
        if n is None:
            raise HydraError("partition method 'random' needs num_classes")
        part = partition_random(n, num_subsets, seed=seed, class_names=class_names)
    if num_classes is not None and part.num_classes != num_classes:
        raise HydraError(f"{method} partition input covers {part.num_classes} classes, expected {num_classes}")
    return part


def partition_filename(method: str, num_subsets: int, overlap: bool = False, overlap_balanced: bool = False,
                       seed: int = 0) -> str:
    """Where subtasks are saved by default: ``partition_<method>[_overlap[-balanced]]_b<B>[_seed<S>].json``."""
    kind = "_overlap-balanced" if overlap and overlap_balanced else "_overlap" if overlap else ""
    return f"partition_{method}{kind}_b{num_subsets}{f'_seed{seed}' if seed else ''}.json"


def format_partition(p: Partition) -> str:
    """A printable table of the subtasks: index, size and the classes of each."""
    names = p.class_names or [str(c) for c in range(p.num_classes)]
    lines = [f"{p.num_subsets} subtasks over {p.num_classes} classes ({p.kind})",
             f"{'subtask':>7}  {'size':>4}  classes"]
    for b, s in enumerate(p.subsets):
        lines.append(f"{b:>7}  {len(s):>4}  {', '.join(names[c] for c in s)}")
    return "\n".join(lines)

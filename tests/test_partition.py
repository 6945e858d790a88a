import json

import numpy as np
import pytest
import torch

from hydranets.errors import HydraError
from hydranets.partition import (
    Partition,
    class_mean_outputs,
    format_partition,
    make_partition,
    partition_kmeans,
    partition_random,
    partition_spectral,
)


def grouped_descriptors(groups: int = 4, per_group: int = 3, seed: int = 0) -> tuple[np.ndarray, list[set[int]]]:
    """Classes in well-separated groups, shuffled so group members are not adjacent."""
    rng = np.random.default_rng(seed)
    n = groups * per_group
    perm = rng.permutation(n)
    group_of = np.empty(n, dtype=int)
    group_of[perm] = np.repeat(np.arange(groups), per_group)
    x = 10.0 * np.eye(groups)[group_of] + rng.normal(0, 0.2, (n, groups))
    return x, [set(np.flatnonzero(group_of == g).tolist()) for g in range(groups)]


def assert_disjoint_cover(p: Partition) -> None:
    flat = [c for s in p.subsets for c in s]
    assert sorted(flat) == list(range(p.num_classes))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_recovers_obvious_groups(seed):
    x, groups = grouped_descriptors(seed=seed)
    p = partition_kmeans(x, 4, seed=seed)
    assert sorted(map(sorted, p.subsets)) == sorted(map(sorted, groups))
    assert p.method == "kmeans" and p.meta["seeds"] == 10
    spread = sum(((x[sorted(g)] - x[sorted(g)].mean(0)) ** 2).sum() for g in groups)  # about each group's mean
    assert p.meta["inertia"] == pytest.approx(spread)


def test_kmeans_balanced_sizes_and_disjoint():
    x = np.random.default_rng(0).random((10, 10))
    p = partition_kmeans(x, 3)
    assert sorted(len(s) for s in p.subsets) == [3, 3, 4]
    assert_disjoint_cover(p)
    assert p.membership().sum(1).tolist() == [1.0] * 10


def test_kmeans_accepts_torch_and_is_deterministic():
    x = np.random.default_rng(3).random((20, 20))
    a = partition_kmeans(torch.tensor(x), 5, seed=7)
    b = partition_kmeans(x, 5, seed=7)
    assert a.subsets == b.subsets and sorted(map(len, a.subsets)) == [4] * 5


def test_kmeans_overlap_every_class_twice():
    x, groups = grouped_descriptors()
    p = partition_kmeans(x, 4, overlap=True)
    assert p.overlap
    counts = p.membership().sum(1)
    assert counts.tolist() == [2.0] * 12
    for s in p.subsets:
        assert len(set(s)) == len(s)
        assert any(g <= set(s) for g in groups)


def hub_descriptors() -> tuple[np.ndarray, list[set[int]]]:
    """Five groups of three classes: one at the centre, the others around it, so that the centre is every outer
    class's second-nearest group."""
    centres = np.array([[0, 0], [10, 0], [0, 10], [-10, 0], [0, -10]], dtype=float)
    rng = np.random.default_rng(0)
    x = np.repeat(centres, 3, axis=0) + rng.normal(0, 0.1, (15, 2))
    return x, [set(range(3 * g, 3 * g + 3)) for g in range(5)]


def test_kmeans_overlap_balanced_spreads_the_second_subtasks():
    x, groups = hub_descriptors()
    nearest = partition_kmeans(x, 5, overlap=True)
    assert max(map(len, nearest.subsets)) == 15  # the centre's subset takes every outer class
    even = partition_kmeans(x, 5, overlap=True, overlap_balanced=True)
    assert [len(s) for s in even.subsets] == [6] * 5 and even.meta["overlap_balanced"]
    assert even.membership().sum(1).tolist() == [2.0] * 15
    assert all(any(g <= set(s) for s in even.subsets) for g in groups)  # the k-means subtasks, each widened
    assert "(kmeans, overlapping evenly)" in format_partition(even)
    with pytest.raises(HydraError, match="set overlap too"):
        partition_kmeans(x, 5, overlap_balanced=True)
    with pytest.raises(HydraError, match="only made by method 'kmeans'"):
        make_partition("random", num_subsets=5, num_classes=15, overlap_balanced=True)


def test_fill_evenly_swaps_a_class_left_with_room_only_in_its_own_subset():
    """Greedy filling gives classes 0 and 1 their nearest; class 2's only room is then its own subset, and one swap
    makes the cheapest valid assignment (checked against every valid one)."""
    from itertools import permutations

    from hydranets.partition import _fill_evenly
    d = np.array([[np.inf, 1, 9], [1, np.inf, 9], [3, 4, np.inf]])
    second = _fill_evenly(d.copy(), np.array([0, 1, 2]))
    valid = [p for p in permutations(range(3)) if all(p[c] != c for c in range(3))]
    best = min(valid, key=lambda p: sum(d[c, p[c]] for c in range(3)))
    assert second.tolist() == list(best) == [1, 2, 0]


@pytest.mark.parametrize("num_classes", [3, 5, 13])
def test_fill_evenly_two_subtasks_odd_classes(num_classes):
    """With B=2 every class's second subtask is the other one, so each subtask ends holding every class, whichever
    of the two got the extra class first."""
    part = partition_kmeans(np.random.default_rng(num_classes).random((num_classes, 6)), 2, overlap=True,
                            overlap_balanced=True)
    assert [s for s in part.subsets] == [list(range(num_classes))] * 2


def test_random_partition_deterministic_and_balanced():
    a, b, c = partition_random(10, 3, seed=5), partition_random(10, 3, seed=5), partition_random(10, 3, seed=6)
    assert a.subsets == b.subsets and a.subsets != c.subsets
    assert [len(s) for s in a.subsets] == [4, 3, 3]
    assert_disjoint_cover(a)


def test_spectral_recovers_blocks():
    rng = np.random.default_rng(0)
    perm = rng.permutation(12)
    block = np.kron(np.eye(3), np.ones((4, 4))) * 5 + np.eye(12) * 80
    confusion = block[np.ix_(perm, perm)] + rng.random((12, 12)) * 0.01
    p = partition_spectral(confusion, 3)
    groups = [set(np.flatnonzero(perm // 4 == g).tolist()) for g in range(3)]
    assert sorted(map(sorted, p.subsets)) == sorted(map(sorted, groups))
    assert p.method == "spectral"


def test_class_mean_outputs_by_hand():
    probs = np.array([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8]])
    labels = np.array([0, 0, 1, 2])
    d = class_mean_outputs(torch.tensor(probs), torch.tensor(labels), 3)
    np.testing.assert_allclose(d, [[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8]])


def test_make_partition_dispatch():
    x, groups = grouped_descriptors()
    assert make_partition("kmeans", num_subsets=4, descriptors=x).subsets == partition_kmeans(x, 4).subsets
    assert make_partition("random", num_subsets=4, num_classes=12, seed=1).subsets == \
        partition_random(12, 4, seed=1).subsets
    conf = np.kron(np.eye(2), np.ones((3, 3)))
    assert make_partition("spectral", num_subsets=2, confusion=conf).subsets == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize("call, match", [
    (lambda: partition_kmeans(np.eye(3), 4), "between 1 and"),
    (lambda: partition_random(5, 0), "between 1 and"),
    (lambda: make_partition("kmeans", num_subsets=5, descriptors=np.eye(4)), "between 1 and"),
    (lambda: make_partition("bogus", num_subsets=2, num_classes=4), "kmeans, spectral, random"),
    (lambda: make_partition("kmeans", num_subsets=2), "needs descriptors"),
    (lambda: class_mean_outputs(np.full((2, 3), 1 / 3), np.array([0, 2]), 3), r"class\(es\) \[1\] have no images"),
    (lambda: class_mean_outputs(np.ones((2, 3)), np.array([0, 5]), 3), "labels must be"),
    (lambda: partition_spectral(np.ones((3, 4)), 2), "square"),
    (lambda: partition_random(4, 2, class_names=["a"]), "class names"),
    (lambda: Partition([[0.5], [1]], 2), "holds 0.5 where a class index"),
    (lambda: Partition([["a"], [1]], 2), "holds 'a' where a class index"),
])
def test_errors(call, match):
    with pytest.raises(HydraError, match=match):
        call()


def test_save_load_round_trip_and_dataset_check(tmp_path):
    names = [f"class{i}" for i in range(10)]
    p = partition_kmeans(np.random.default_rng(0).random((10, 10)), 3, class_names=names)
    path = tmp_path / "partition.json"
    p.save(path)
    q = Partition.load(path, expected_num_classes=10, expected_class_names=names)
    assert (q.subsets, q.class_names, q.method, q.overlap, q.meta) == (p.subsets, names, "kmeans", False, p.meta)
    with pytest.raises(HydraError, match="is for another data set"):
        Partition.load(path, expected_num_classes=100)
    with pytest.raises(HydraError, match="is for another data set"):
        Partition.load(path, expected_class_names=names[::-1])
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(HydraError, match="cannot read partition file"):
        Partition.load(tmp_path / "bad.json")


def test_format_partition():
    p = Partition([[0, 2], [1]], 3, ["cat", "dog", "lynx"], method="kmeans")
    text = format_partition(p)
    lines = text.splitlines()
    assert "2 subtasks over 3 classes" in lines[0]
    assert lines[2].split() == ["0", "2", "cat,", "lynx"]
    assert lines[3].split() == ["1", "1", "dog"]
    assert "0, 1" in format_partition(Partition([[0, 1]], 2)).splitlines()[2]


def test_failed_save_keeps_the_saved_partition(tmp_path):
    """A write that fails part-way (here: the file-size limit, as a full disk would) leaves the old file whole."""
    resource = pytest.importorskip("resource")
    import signal
    path = tmp_path / "partition.json"
    saved = partition_random(200, 4, seed=1)
    saved.save(path)
    before = path.read_text()
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100, hard))
    try:
        with pytest.raises(HydraError, match="cannot write partition file"):
            partition_random(200, 5, seed=2).save(path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert path.read_text() == before
    assert Partition.load(path).subsets == saved.subsets
    assert [p.name for p in tmp_path.iterdir()] == ["partition.json"]


def test_save_into_a_new_folder(tmp_path):
    p = partition_random(6, 2)
    p.save(tmp_path / "new" / "partition.json")
    assert Partition.load(tmp_path / "new" / "partition.json").subsets == p.subsets


def test_numpy_num_classes_saves_as_json(tmp_path):
    p = partition_random(np.int64(6), np.int64(2), seed=3)
    assert type(p.num_classes) is int
    p.save(tmp_path / "p.json")
    assert json.loads((tmp_path / "p.json").read_text())["num_classes"] == 6
    assert Partition([[0, 1], [2]], torch.tensor(3)).num_classes == 3
    with pytest.raises(HydraError, match="num_classes must be an integer"):
        Partition([[0, 1], [2]], 3.0)


def test_class_mean_outputs_accepts_bfloat16():
    probs = torch.tensor([[0.75, 0.25], [0.5, 0.5], [0.125, 0.875]], dtype=torch.bfloat16)  # exact in bfloat16
    d = class_mean_outputs(probs, torch.tensor([0, 0, 1]), 2)
    np.testing.assert_array_equal(d, [[0.625, 0.375], [0.125, 0.875]])
    assert partition_kmeans(torch.eye(4, dtype=torch.bfloat16), 2).subsets == partition_kmeans(np.eye(4), 2).subsets


@pytest.mark.parametrize("call", [lambda: partition_kmeans(np.eye(4), 2, seeds=0),
                                  lambda: partition_spectral(np.eye(4), 2, seeds=0)])
def test_zero_seeds_is_an_error(call):
    with pytest.raises(HydraError, match="seeds must be at least 1"):
        call()


def test_load_of_a_binary_file_is_one_error(tmp_path):
    (tmp_path / "p.json").write_bytes(b"\xff\xfe\x00\x81 not json")
    with pytest.raises(HydraError, match="cannot read partition file"):
        Partition.load(tmp_path / "p.json")


def test_a_class_twice_in_one_subset_is_refused_even_with_overlap():
    with pytest.raises(HydraError, match="subset 1 names a class twice"):
        Partition([[0, 1, 2], [2, 3, 3]], 4, overlap=True)
    Partition([[0, 1, 2], [2, 3]], 4, overlap=True)


def test_an_invalid_partition_file_names_the_file(tmp_path):
    path = tmp_path / "p.json"
    Partition([[0, 1], [2, 3]], 4).save(path)
    path.write_text(path.read_text().replace("3", "9"))
    with pytest.raises(HydraError, match=f"partition file {path}: partition names class 9, outside 0..3"):
        Partition.load(path)

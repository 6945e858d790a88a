import pytest
import torch

from hydranets.evaluate import subtask_recall


def test_subtask_recall_ranks_subtasks_by_summed_probability():
    membership = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])  # subtasks {0, 1} and {2, 3}
    probs = torch.tensor([[0.50, 0.10, 0.20, 0.20],    # subtask 0 (0.6); label 1 is in it: hit
                          [0.10, 0.30, 0.35, 0.25],    # subtask 1 (0.6); label 1 is not: miss
                          [0.30, 0.00, 0.40, 0.30],    # subtask 1 (0.7); label 3 is: hit
                          [0.45, 0.00, 0.30, 0.25]])   # top class 0, but subtask 1 (0.55) wins; label 0: miss
    labels = torch.tensor([1, 1, 3, 0])
    assert subtask_recall(probs, labels, membership) == pytest.approx(50.0)
    assert subtask_recall(probs, labels, membership, k=2) == pytest.approx(100.0)

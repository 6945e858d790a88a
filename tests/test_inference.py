"""Batch norms folded into convolutions: the same function, fewer layers, the model left as it was."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from hydranets import build_hydranet, create_model, fold_batchnorms
from hydranets.hydranet import ghost_branch_norms
from helpers import trained_looking


def _count(model: nn.Module, kind: type) -> int:
    return sum(type(m) is kind for m in model.modules())


@pytest.mark.parametrize("name, kwargs, size, pairs", [
    # ResNet-8: the stem's conv, two per block (3 blocks), the two downsampling shortcuts
    ("resnet_cifar", {"depth": 8, "width": 0.5}, 16, 1 + 2 * 3 + 2),
    # ResSep: the input block's conv and separable conv (1 + 2), then per stage a block of two separable convs (4)
    # and its shortcut
    ("ressep", {"widths": (8, 16), "depth": 1}, 32, 3 + 2 * (4 + 1)),
    # DenseNet-BC: only the bottleneck's 1x1 conv is followed by a batch norm (BN-ReLU-conv elsewhere)
    ("densenet_bc", {"depth": 10, "growth": 4}, 16, 3),
])
def test_folded_backbones_compute_the_same_logits(name, kwargs, size, pairs):
    torch.manual_seed(0)
    model = trained_looking(create_model(name, num_classes=10, **kwargs))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded, count = fold_batchnorms(model)
    x = torch.randn(6, 3, size, size)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-4, rtol=1e-4)
    assert count == pairs
    assert _count(folded, nn.BatchNorm2d) == _count(model, nn.BatchNorm2d) - count
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not folded.training


def test_folded_resnet_has_no_batch_norm_left_and_runs_channels_last():
    model = trained_looking(create_model("resnet_cifar", num_classes=10, depth=8, width=0.5))
    folded, _ = fold_batchnorms(model)
    assert _count(folded, nn.BatchNorm2d) == 0
    x = torch.randn(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.allclose(folded.to(memory_format=torch.channels_last)(x), model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kwargs", [{}, {"share_branch_weights": True}])
def test_folded_hydranet_routes_and_scores_as_before(kwargs):
    torch.manual_seed(0)
    model = build_hydranet("resnet_cifar", 10, num_branches=3, topk=2, depth=8, width=0.5, shared_path=True,
                           partition=[[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]], **kwargs)
    ghost_branch_norms(model.branches, 4)  # evaluation-time plain batch norms: folded like the others
    model = trained_looking(model, seed=1)
    with torch.no_grad():
        model.shared.weight.normal_()
    folded, count = fold_batchnorms(model)
    # stem: the init conv, stage 1 (2), stage 2 (2 + a shortcut); the gate and each of the 3 branches: stage 3 (3)
    assert count == 6 + 3 * (1 + 3)
    x = torch.randn(12, 3, 16, 16)
    with torch.no_grad():
        want, got = model(x, return_gate=True), folded(x, return_gate=True)
        assert torch.equal(want.route, got.route)
        assert torch.allclose(got.gate_logits, want.gate_logits, atol=1e-4, rtol=1e-4)
        assert torch.allclose(got.logits, want.logits, atol=1e-4, rtol=1e-4)
        assert torch.allclose(folded(x[:1]), model(x[:1]), atol=1e-4, rtol=1e-4)  # batch-1 path


def test_batch_norm_without_running_statistics_is_left_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU())
    folded, count = fold_batchnorms(model)
    assert count == 0 and _count(folded, nn.BatchNorm2d) == 1


def test_compare_speed_times_each_model_folded_once(monkeypatch):
    import hydranets.cost as cost
    model = trained_looking(create_model("resnet_cifar", num_classes=10, depth=8, width=0.5))
    folds, timed = [], []

    def spy(m):
        folded, n = fold_batchnorms(m)
        folds.append(m)
        forward = folded.forward
        folded.forward = lambda x, **kw: timed.append(folded) or forward(x, **kw)
        return folded, n

    monkeypatch.setattr(cost, "fold_batchnorms", spy)
    speed = cost.compare_speed({"a": (model, {}), "b": (model, {})}, (3, 16, 16), 4, repeats=2, fold=True)
    assert folds == [model] and timed and all(m is not model for m in timed)
    assert set(speed) == {"a", "b"} and all(s["images_per_s"] > 0 for s in speed.values())
    folds.clear()
    cost.compare_speed({"a": (model, {})}, (3, 16, 16), 4, repeats=1)
    assert folds == []  # as trained unless asked


def test_folded_hydranet_with_shared_branch_weights_keeps_its_outputs_when_moved():
    torch.manual_seed(0)
    model = build_hydranet("resnet_cifar", 10, num_branches=3, topk=2, depth=8, width=0.5, share_branch_weights=True)
    model = trained_looking(model, seed=1)
    folded, _ = fold_batchnorms(model)
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        want = model(x)
        # a move re-ties shared branches; the folded convolutions each hold their own branch's batch norm
        moved = folded.to(memory_format=torch.channels_last)
        assert torch.allclose(moved(x), want, atol=1e-4, rtol=1e-4)
        assert torch.allclose(folded.double()(x.double()).float(), want, atol=1e-4, rtol=1e-4)


def test_pairs_with_forward_hooks_are_not_folded():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    spectral = trained_looking(nn.Sequential(nn.utils.spectral_norm(nn.Conv2d(4, 6, 3)), nn.BatchNorm2d(6)))
    hooked = trained_looking(nn.Sequential(nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6), nn.Conv2d(6, 5, 1), nn.BatchNorm2d(5)))
    hooked[0].register_forward_hook(lambda m, inputs, out: 2 * out)  # on the conv's output, before its batch norm
    seen = []
    hooked[3].register_forward_hook(lambda m, inputs, out: seen.append(out))  # the batch norm's output
    for model, pairs in ((spectral, 0), (hooked, 0)):
        folded, count = fold_batchnorms(model)
        with torch.no_grad():
            assert count == pairs and torch.allclose(folded(x), model(x), atol=1e-5, rtol=1e-5)
    assert len(seen) == 2  # the batch norm's hook ran in the folded copy too


class _ConvNorm(nn.Sequential):
    """A conv-norm-activation block as torchvision writes it: a Sequential subclass with Sequential's forward."""

    def __init__(self, cin: int, cout: int):
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class _Residual(nn.Sequential):
    """A Sequential subclass with its own forward (adds its input): its layers do not simply run in order."""

    def forward(self, x):
        return x + super().forward(x)


def test_sequential_subclasses_with_a_forward_of_their_own_are_folded_as_their_trace_shows():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    plain = trained_looking(nn.Sequential(_ConvNorm(4, 6), _ConvNorm(6, 4)))
    odd = trained_looking(nn.Sequential(_Residual(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)), nn.ReLU()))
    for model, pairs in ((plain, 2), (odd, 1)):  # its own forward (x + bn(conv(x))): torch.fx shows the pair
        folded, count = fold_batchnorms(model)
        with torch.no_grad():
            assert count == pairs and torch.allclose(folded(x), model(x), atol=1e-5, rtol=1e-5)
    assert isinstance(fold_batchnorms(plain)[0][0][1], nn.Identity)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_reduced_precision_model_is_folded_in_float32(dtype):
    """Its folded weights are the float32 fold of its own weights, rounded once (folding in bf16 rounds each step)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.01, 3.0)
        model[1].weight.normal_()
    low = model.to(dtype)
    expected = fold_batchnorms(copy.deepcopy(low).float())[0][0].weight.to(dtype)
    folded = fold_batchnorms(low)[0][0]
    assert folded.weight.dtype == dtype and torch.equal(folded.weight, expected)

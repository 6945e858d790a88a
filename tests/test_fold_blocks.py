"""Batch norms folded where a hand-written forward, traced by torch.fx, shows a conv feeding only its batch norm."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from hydranets import build_hydranet, fold_batchnorms
from helpers import load_benchmark, trained_looking

net_module = load_benchmark("fold_blocks_speed")
Block, mobile_net = net_module.Block, net_module.mobile_net


def _bns(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def _same(folded: nn.Module, model: nn.Module, *xs: torch.Tensor) -> bool:
    with torch.no_grad():
        return all(torch.allclose(folded(x), model(x), atol=1e-5, rtol=1e-5) for x in xs)


def test_hand_written_blocks_fold():
    small = trained_looking(nn.Sequential(Block(4, affine=False), nn.ReLU(), Block(4)))
    folded, count = fold_batchnorms(small)
    x = torch.randn(3, 4, 8, 8)
    assert count == 6 and _bns(folded) == 0 and _same(folded, small, x)
    assert isinstance(folded[0].bn1, nn.Identity) and folded[0].pw.bias is not None

    net = trained_looking(mobile_net())
    folded, count = fold_batchnorms(net)
    assert _bns(net) == 48 and count == 48 and _bns(folded) == 0
    assert _same(folded, net, torch.randn(4, 3, 32, 32))
    assert not folded.training


class _TwiceCalled(nn.Module):
    """Its conv runs twice, its output once into a norm and once not."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + self.conv(x)


class _OutputReused(nn.Module):
    """Its conv's output goes to the norm and is added after it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


class _NormReused(nn.Module):
    """One norm after two convs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2, self.bn = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv1(x)) * self.bn(self.conv2(x))


class _Aliased(nn.Module):
    """One conv under two names, called by the second (torch.fx names the call by the first)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(4, 4, 3, padding=1)
        self.second, self.bn = self.first, nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.second(x))


class _WeightRead(nn.Module):
    """Its forward also reads the conv's weight."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) * self.conv.weight.mean()


@pytest.mark.parametrize("odd", [_TwiceCalled, _OutputReused, _NormReused, _Aliased, _WeightRead])
def test_pairs_a_forward_uses_otherwise_are_not_folded(odd):
    model = trained_looking(nn.Sequential(odd(), Block(4)))  # the block beside it folds
    folded, count = fold_batchnorms(model)
    assert count == 3 and _bns(folded) == _bns(model) - 3
    assert all(type(a) is type(b) for a, b in zip(folded[0].modules(), model[0].modules()))
    assert _same(folded, model, torch.randn(2, 4, 8, 8))


class _Routed(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, but its children still fold."""

    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.block = Block(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x) if x.mean() > 0 else self.block(x)


def test_untraceable_module_has_its_children_folded():
    model = trained_looking(_Routed())
    with pytest.raises(torch.fx.proxy.TraceError):  # bool() of a traced value
        torch.fx.symbolic_trace(model)
    folded, count = fold_batchnorms(model)
    assert count == 1 + 3 and _bns(folded) == 0
    assert _same(folded, model, torch.randn(2, 4, 8, 8) + 1, torch.randn(2, 4, 8, 8) - 1)


def test_conv_also_registered_elsewhere_is_not_folded():
    model = _Routed()
    model.shared = model.block.pw  # the block's first conv, also under a name outside it
    model = trained_looking(model)
    folded, count = fold_batchnorms(model)
    assert count == 1 + 2 and isinstance(folded.block.bn1, nn.BatchNorm2d) and folded.shared is folded.block.pw
    assert _same(folded, model, torch.randn(2, 4, 8, 8) - 1)


@pytest.mark.parametrize("kwargs", [{}, {"share_branch_weights": True}])
def test_hydranet_folds_as_before(kwargs):
    torch.manual_seed(0)
    model = trained_looking(build_hydranet("resnet20", num_classes=10, num_branches=4, topk=1, **kwargs), seed=1)
    folded, count = fold_batchnorms(model)
    # stem: the init conv, stage 1 (3 blocks of 2), stage 2 (3 of 2 and a shortcut); the gate and each of the
    # 4 branches: stage 3 (3 of 2 and a shortcut); all of them in Sequentials, as before
    assert count == 1 + 6 + 7 + 5 * 7 and _bns(folded) == 0
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        want, got = model(x, return_gate=True), folded(x, return_gate=True)
        assert torch.equal(want.route, got.route)
        assert torch.allclose(got.logits, want.logits, atol=1e-5, rtol=1e-5)


def test_hydranet_of_hand_written_blocks_with_tied_branches():
    torch.manual_seed(0)
    model = build_hydranet(mobile_net(), 10, num_branches=3, topk=2, share_branch_weights=True)
    model = trained_looking(model, seed=2)  # each branch its own norms on the shared convolutions
    folded, count = fold_batchnorms(model)
    # stem: stages 0-4 (5 conv-bns, 12 blocks); the gate and each of the 3 branches: stage 5 (a conv-bn, 2 blocks)
    assert count == 5 + 3 * 12 + 4 * (1 + 3 * 2) and _bns(folded) == 0
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
        assert torch.allclose(folded(x), want, atol=1e-5, rtol=1e-5)
        moved = folded.to(memory_format=torch.channels_last)  # a move would re-tie branches still marked tied
        assert torch.allclose(moved(x), want, atol=1e-5, rtol=1e-5)


def test_structure_and_names_are_kept():
    model = trained_looking(mobile_net())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded, count = fold_batchnorms(model)
    names = dict(model.named_modules())
    assert list(dict(folded.named_modules())) == list(names)
    gone = {n for n, m in folded.named_modules() if isinstance(m, nn.Identity) and isinstance(names[n], nn.BatchNorm2d)}
    convs = {n for n, m in folded.named_modules() if isinstance(m, nn.Conv2d) and names[n].bias is None
             and m.bias is not None}
    assert len(gone) == len(convs) == count == 48
    kept = {k for k in before if k.rpartition(".")[0] not in gone}
    assert set(folded.state_dict()) == kept | {f"{n}.bias" for n in convs}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model itself is unchanged

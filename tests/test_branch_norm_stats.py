"""benchmarks/branch_norm_stats.py: untying shared branch norms and estimating each branch's statistics."""
import torch

from hydranets import build_hydranet
from helpers import load_benchmark

bns = load_benchmark("branch_norm_stats")


class _Centred(torch.nn.Linear):
    def forward(self, x):
        return super().forward(x - x.mean(0))


def _first_norm(branch):
    return branch[0][0].body[0][1]


def test_untie_then_each_branch_has_the_statistics_of_its_own_images():
    torch.manual_seed(0)
    model = build_hydranet("resnet20", num_classes=16, num_branches=4, topk=1, share_branch_weights=True,
                           share_branch_norms=True).eval()
    with torch.no_grad():
        _first_norm(model.branches[0]).running_mean.uniform_(-1, 1)
    model.gate[-1] = _Centred(model.gate[-1].in_features, 4)   # images spread over the branches
    assert _first_norm(model.branches[1]).running_mean is _first_norm(model.branches[0]).running_mean
    bns.untie_branch_norms(model)
    first = [_first_norm(b) for b in model.branches]
    assert len({id(m.running_mean) for m in first}) == 4 and len({id(m.weight) for m in first}) == 4
    torch.testing.assert_close(first[3].running_mean, first[0].running_mean)   # copies: same values
    conv = model.branches[0][0][0].body[0][0]
    assert model.branches[2][0][0].body[0][0].weight is conv.weight             # convolutions stay tied

    batches = [(torch.randn(24, 3, 32, 32), None) for _ in range(2)]
    with torch.no_grad():
        routes = [model(x, routing="topk", return_gate=True).route[:, 0] for x, _ in batches]
        expected = {}
        for b in range(4):   # the mean over each batch's images routed to b, averaged over the batches that had any
            means = [conv(model.stem(x)[r == b]).mean((0, 2, 3)) for (x, _), r in zip(batches, routes) if (r == b).any()]
            expected[b] = torch.stack(means).mean(0) if means else None
    bns.reestimate_branch_norms(model, batches, images=48)
    assert not any(m.training for m in model.modules())
    for b in range(4):
        if expected[b] is None:
            assert first[b].num_batches_tracked == 0
        else:
            torch.testing.assert_close(first[b].running_mean, expected[b], rtol=1e-4, atol=1e-5)
    assert sum(expected[b] is not None for b in range(4)) >= 2

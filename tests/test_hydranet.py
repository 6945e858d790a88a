import pytest
import torch

from hydranets import HydraError, HydraNet, Partition, build_hydranet, create_model
from hydranets.hydranet import GhostBatchNorm2d, ghost_branch_norms
from hydranets.cost import active_params, count_macs, count_params, model_macs

B = 8


@pytest.fixture
def hydra() -> HydraNet:
    torch.manual_seed(0)
    model = build_hydranet("resnet20", num_classes=16, num_branches=B, topk=2)
    for m in model.modules():  # non-trivial BN statistics, so eval differs from train
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def test_template_splits_before_last_stage(hydra):
    assert len(hydra.stem) == 3 and len(hydra.branches) == B
    assert hydra.branches[0][0][0].body[0][0].in_channels == 32   # stage 3 copy reads the stem's 32 channels
    assert hydra.branches[0][-1].out_features == 64                # projection to a common feature size
    assert hydra.gate[-1].out_features == B


def test_topk_with_all_branches_equals_soft(hydra):
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(hydra(x, routing="topk", topk=B), hydra(x, routing="soft"), rtol=1e-5, atol=1e-5)


def test_topk_equals_independent_computation(hydra):
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        out = hydra(x, routing="topk", topk=2)
        for i in range(5):
            feats = hydra.stem(x[i:i + 1])
            scores = hydra.gate(feats)[0]
            chosen = sorted(range(B), key=lambda b: -scores[b].item())[:2]
            combined = sum(torch.sigmoid(scores[b]) * hydra.branches[b](feats)[0] for b in chosen)
            torch.testing.assert_close(out[i], hydra.classifier(hydra.norm(combined[None]))[0], rtol=1e-4, atol=1e-5)


def test_unit_gate_weighting_sums_unscaled_branches_and_trains_the_gate_by_its_loss_only(hydra):
    hydra.gate_weighting = "none"
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        out = hydra(x, routing="topk", topk=2, return_gate=True)
        feats = hydra.stem(x)
        for i in range(5):
            combined = sum(hydra.branches[b](feats[i:i + 1])[0] for b in out.route[i].tolist())
            torch.testing.assert_close(out.logits[i], hydra.classifier(hydra.norm(combined[None]))[0],
                                       rtol=1e-4, atol=1e-5)
    hydra.train()
    hydra(x, routing="topk").sum().backward()
    assert hydra.gate[-1].weight.grad is None or not hydra.gate[-1].weight.grad.any()
    assert hydra.branches[int(out.route[0, 0])][-1].weight.grad.abs().sum() > 0


def test_each_branch_runs_once_on_only_its_images(hydra):
    calls = {b: [] for b in range(B)}
    for b, branch in enumerate(hydra.branches):
        branch.register_forward_hook(lambda m, inp, out, b=b: calls[b].append(inp[0].shape[0]))
    x = torch.randn(20, 3, 32, 32)
    with torch.no_grad():
        out = hydra(x, topk=2, return_gate=True)
    counts = torch.bincount(out.route.reshape(-1), minlength=B).tolist()
    assert out.route.shape == (20, 2)
    for b in range(B):
        assert calls[b] == ([counts[b]] if counts[b] else [])   # once with its images; never when empty
    assert sum(sum(c) for c in calls.values()) == 40


def test_forced_route_runs_those_branches(hydra):
    route = torch.tensor([[3], [3], [5]])
    calls = []
    for b, branch in enumerate(hydra.branches):
        branch.register_forward_hook(lambda m, inp, out, b=b: calls.append((b, inp[0].shape[0])))
    with torch.no_grad():
        hydra(torch.randn(3, 3, 32, 32), route=route)
    assert calls == [(3, 2), (5, 1)]


@pytest.mark.parametrize("k", range(1, B + 1))
def test_topk_macs_are_stem_gate_k_branches_combiner(hydra, k):
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        feats = hydra.stem(x)
        combined = torch.randn(8, hydra.num_features)
    expected = (count_macs(hydra.stem, x) + count_macs(hydra.gate, feats)
                + k * count_macs(hydra.branches[0], feats) + count_macs(hydra.classifier, combined))
    assert model_macs(hydra, (3, 32, 32), inputs=x, topk=k) == pytest.approx(expected, rel=1e-9)


def test_soft_routing_costs_all_branches(hydra):
    soft = model_macs(hydra, (3, 32, 32), batch_size=4, routing="soft")
    assert soft == pytest.approx(model_macs(hydra, (3, 32, 32), batch_size=4, topk=B), rel=1e-6)
    branch = count_macs(hydra.branches[0], hydra.stem(torch.randn(4, 3, 32, 32)))
    top1 = model_macs(hydra, (3, 32, 32), batch_size=4, topk=1)
    assert soft - top1 == pytest.approx((B - 1) * branch, rel=1e-3)


def test_default_routing_follows_mode(hydra):
    x = torch.randn(4, 3, 32, 32)
    assert hydra.train()(x, return_gate=True).route is None          # soft: no route
    assert hydra.eval()(x, return_gate=True).route.shape == (4, 2)   # top-k
    hydra.topk = 3
    assert hydra(x, return_gate=True).route.shape == (4, 3)


def test_a_topk_that_would_do_nothing_is_refused_not_ignored():
    torch.manual_seed(0)
    hydra = build_hydranet("resnet20", num_classes=16, num_branches=8, topk=2).train()
    x = torch.randn(4, 3, 32, 32)
    for kwargs, words in (({"topk": 1}, "topk=1 has no effect under soft routing"),
                          ({"topk": 9}, "topk must be an integer from 1 to the number of branches \\(8\\)"),
                          ({"topk": 1, "routing": "topk", "route": torch.zeros(4, 2, dtype=torch.long) + torch.arange(2)},
                           "topk=1 has no effect with a route given")):
        with pytest.raises(HydraError, match=words):
            hydra(x, **kwargs)
    assert hydra(x, routing="topk", topk=1, return_gate=True).route.shape == (4, 1)   # asked for, it runs
    assert hydra.eval()(x, topk=3, return_gate=True).route.shape == (4, 3)


def test_active_params():
    model = build_hydranet("resnet20", num_classes=10, num_branches=4, topk=1)
    per_branch = count_params(model.branches[0])
    assert active_params(model, 1) == count_params(model) - 3 * per_branch
    assert active_params(model, 4) == count_params(model)
    for k in (0, 5):
        with pytest.raises(HydraError, match="topk must be an integer from 1 to the number of branches"):
            active_params(model, k)


def test_partition_gives_gate_targets():
    p = Partition([[0, 2], [1, 3]], num_classes=4)
    model = build_hydranet("resnet20", num_classes=4, num_branches=2, topk=1, partition=p)
    assert model.gate_targets(torch.tensor([0, 1, 3])).tolist() == [[1, 0], [0, 1], [0, 1]]
    assert "membership" in model.state_dict()


def test_other_families_and_split():
    dense = build_hydranet("densenet_bc_40_k12", num_classes=10, num_branches=4, topk=1)
    assert dense(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    early = build_hydranet("resnet20", num_classes=10, num_branches=4, topk=2, split=2)
    assert len(early.stem) == 2 and len(early.branches[0]) == 2 + 4
    assert create_model("hydra_ressep_b8k2", num_classes=10)(torch.randn(2, 3, 64, 64)).shape == (2, 10)


@pytest.mark.parametrize("kwargs,match", [
    ({"topk": 9}, "topk must be an integer from 1 to the number of branches \\(8\\)"),
    ({"topk": 0}, "topk must be"),
    ({"num_branches": 20}, "exceeds the number of classes"),
    ({"split": 4}, "split must be a stage index from 1 to 3"),
    ({"partition": [[0, 1], [1, 2], [3, 4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]]}, "more than one subset"),
    ({"partition": [[c, c + 8] for c in range(4)]}, "leaves out"),
    ({"partition": [[c, c + 4, c + 8, c + 12] for c in range(4)]}, "partition has 4 subsets but num_branches is 8"),
    ({"partition": [[c] for c in range(8)]}, "leaves out 8 class"),
    ({"partition": [[c, c + 8] for c in range(7)] + [[7, 15, 16]]}, "outside 0..15"),
    ({"share_branch_norms": True}, "share_branch_norms ties .* set share_branch_weights too"),
    ({"gate_weighting": "relu"}, "gate_weighting must be 'sigmoid', 'softmax' or 'none', got 'relu'"),
])
def test_bad_settings_are_clear_errors(kwargs, match):
    with pytest.raises(HydraError, match=match):
        build_hydranet("resnet20", **{"num_classes": 16, "num_branches": 8, "topk": 2, **kwargs})


def test_overlapping_partition_is_allowed_when_asked():
    p = Partition([[0, 1, 2], [2, 3, 0]], num_classes=4, overlap=True)
    model = build_hydranet("resnet20", num_classes=4, num_branches=2, topk=1, partition=p)
    assert model.gate_targets(torch.tensor([0, 2])).tolist() == [[1, 1], [1, 1]]


def test_topk_setter_and_routing_checked(hydra):
    with pytest.raises(HydraError, match="topk must be"):
        hydra.topk = 9
    with pytest.raises(HydraError, match="routing must be one of soft, topk"):
        hydra(torch.randn(1, 3, 32, 32), routing="dense")


def test_widths_are_relative_to_the_backbone_width():
    model = build_hydranet("resnet20", num_classes=10, num_branches=2, topk=1, width=0.5, branch_width=0.5)
    stem_out = model.stem[-1][-1].body[-1][0].out_channels
    assert stem_out == 16                                        # 32 x 0.5
    assert model.branches[0][0][-1].body[-1][0].out_channels == 16  # 64 x 0.5 x 0.5


def test_dispatch_mixes_full_and_partial_branches(hydra):
    x = torch.randn(3, 3, 32, 32)
    route = torch.tensor([[0, 1], [0, 2], [1, 0]])   # branch 0 takes every image, 1 and 2 only some
    with torch.no_grad():
        out = hydra(x, route=route)
        feats = hydra.stem(x)
        s = torch.sigmoid(hydra.gate(feats))
        combined = torch.stack([sum(s[i, b] * hydra.branches[b](feats[i:i + 1])[0] for b in route[i].tolist())
                                for i in range(3)])
        torch.testing.assert_close(out, hydra.classifier(hydra.norm(combined)), rtol=1e-4, atol=1e-5)


def test_one_image_is_routed_like_a_row_of_a_batch(hydra):
    """Batch 1 takes a shortcut in the dispatch (no grouping): same result as the image inside a batch."""
    x = torch.randn(4, 3, 32, 32)
    route = torch.tensor([[2, 0], [0, 1], [3, 2], [1, 3]])
    with torch.no_grad():
        batched = hydra.eval()(x, route=route)
        for i in range(4):
            torch.testing.assert_close(hydra(x[i:i + 1], route=route[i:i + 1]), batched[i:i + 1], rtol=1e-4, atol=1e-5)
        single = hydra(x[:1], return_gate=True)  # its own top-k, as inference picks it
        assert single.route.shape == (1, hydra.topk)
        torch.testing.assert_close(single.logits, hydra(x, route=torch.cat([single.route, route[1:, :hydra.topk]]))[:1],
                                   rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- upcycling from a trained baseline
def _baseline_checkpoint(tmp_path, depth: int = 8, width: float = 0.5, num_classes: int = 6):
    from hydranets.checkpoint import atomic_save
    torch.manual_seed(1)
    base = create_model("resnet_cifar", num_classes=num_classes, depth=depth, width=width)
    with torch.no_grad():  # BN statistics that are not the identity, so a wrong copy shows
        for m in base.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    path = tmp_path / "baseline.pt"
    atomic_save({"model": base.state_dict(), "model_info": {}}, path)
    return base.eval(), path


def test_upcycle_makes_every_branch_the_baselines_tail(tmp_path):
    from hydranets.upcycle import init_stem_from
    base, path = _baseline_checkpoint(tmp_path)
    hyd = build_hydranet("resnet_cifar", 6, num_branches=3, topk=1, branch_width=1.0, gate_width=0.5,
                         depth=8, width=0.5)
    assert init_stem_from(hyd, str(path), upcycle=True) == ["branches"]
    hyd.eval()
    x = torch.randn(5, 3, 16, 16)
    expected = base.forward_features(x)
    feats = hyd.stem(x)
    for branch in hyd.branches:  # projection is the identity: the branch's output is the baseline's features
        torch.testing.assert_close(branch(feats), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hyd.classifier(expected), base(x), rtol=1e-5, atol=1e-5)


def test_stem_only_init_leaves_branches_fresh_and_upcycle_checks_widths(tmp_path):
    from hydranets.upcycle import init_stem_from
    base, path = _baseline_checkpoint(tmp_path)
    hyd = build_hydranet("resnet_cifar", 6, num_branches=2, topk=1, branch_width=1.0, depth=8, width=0.5)
    assert init_stem_from(hyd, str(path)) == []
    x = torch.randn(4, 3, 16, 16)
    hyd.eval()
    expected = x
    for stage in base.stages[:len(hyd.stem)]:
        expected = stage(expected)
    torch.testing.assert_close(hyd.stem(x), expected)
    assert not torch.allclose(hyd.branches[0](hyd.stem(x)), base.forward_features(x))
    narrow = build_hydranet("resnet_cifar", 6, num_branches=2, topk=1, branch_width=0.5, depth=8, width=0.5)
    with pytest.raises(HydraError, match=r"needs its tensor 0.0.body.0.0.weight \(16, 16, 3, 3\) \(the baseline has \(32, 16, 3, 3\)\).*width=1.0"):
        init_stem_from(narrow, str(path), upcycle=True)
    assert init_stem_from(narrow, str(path), upcycle=None) == []  # auto: where the widths fit
    assert init_stem_from(hyd, str(path), upcycle=None) == ["branches"]


def _hydranet_checkpoint(tmp_path, **kw):
    from hydranets.checkpoint import atomic_save
    torch.manual_seed(2)
    src = build_hydranet("resnet_cifar", 6, depth=8, width=0.5, branch_width=1.0, gate_width=1.0, **kw)
    with torch.no_grad():  # every tensor away from its initial value, so a part left uncopied shows
        for t in src.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.rand_like(t) * 0.5)
    path = tmp_path / "source.pt"
    atomic_save({"model": src.state_dict(), "model_info": {}}, path)
    return src.eval(), path


@pytest.mark.parametrize("src_b, b", [(1, 4), (2, 4), (2, 3)])
def test_upcycle_branches_starts_as_its_source_hydranet(tmp_path, src_b, b):
    from hydranets.upcycle import init_stem_from
    src, path = _hydranet_checkpoint(tmp_path, num_branches=src_b, topk=1, shared_path=True)
    hyd = build_hydranet("resnet_cifar", 6, num_branches=b, topk=1, depth=8, width=0.5, branch_width=1.0,
                         gate_width=1.0, shared_path=True)
    with pytest.raises(HydraError, match=r"is a HydraNet, which is copied whole, but hydra.upcycle=false"):
        init_stem_from(hyd, str(path), upcycle=False)
    assert init_stem_from(hyd, str(path), upcycle=None) == ["stem", "branches", "gate", "classifier"]
    hyd.eval()
    x = torch.randn(7, 3, 16, 16)
    with torch.no_grad():
        src_out = src(x, return_gate=True)
        out = hyd(x, return_gate=True)
        # the gate scores copy the source's, branch b's score being that of the source's branch b mod src_b
        torch.testing.assert_close(out.gate_logits, src_out.gate_logits[:, torch.arange(b) % src_b])
        torch.testing.assert_close(out.logits, src(x), rtol=1e-5, atol=1e-5)
        for i in range(b):  # every image sent to branch i computes what the source's branch i mod src_b gave
            route = torch.full((7, 1), i)
            torch.testing.assert_close(hyd(x, route=route), src(x, route=route % src_b), rtol=1e-5, atol=1e-5)
    ptrs = {p.data_ptr() for br in hyd.branches for p in br.parameters()}
    assert len(ptrs) == sum(1 for br in hyd.branches for _ in br.parameters())  # copies, not shared tensors


def test_upcycle_branches_checks_the_shape(tmp_path):
    from hydranets.upcycle import init_stem_from
    _, path = _hydranet_checkpoint(tmp_path, num_branches=2, topk=1, shared_path=True)
    fewer = build_hydranet("resnet_cifar", 6, num_branches=1, topk=1, depth=8, width=0.5, branch_width=1.0,
                           gate_width=1.0, shared_path=True)
    with pytest.raises(HydraError, match=r"with 2 branches cannot start one with fewer \(1\).*num_branches >= 2"):
        init_stem_from(fewer, str(path), upcycle=None)
    narrow = build_hydranet("resnet_cifar", 6, num_branches=4, topk=1, depth=8, width=0.5, branch_width=0.5,
                            gate_width=1.0, shared_path=True)
    with pytest.raises(HydraError, match=r"does not fit this one \(its tensor branches.0.0.0.body.0.0.weight "
                                         r"\(16, 16, 3, 3\) \(the source has \(32, 16, 3, 3\)\)\)"):
        init_stem_from(narrow, str(path), upcycle=True)
    no_shared = build_hydranet("resnet_cifar", 6, num_branches=4, topk=1, depth=8, width=0.5, branch_width=1.0,
                               gate_width=1.0)
    with pytest.raises(HydraError, match=r"the source's tensor shared.weight has no place in this one"):
        init_stem_from(no_shared, str(path), upcycle=None)


def test_shared_path_adds_the_gates_features_for_every_image():
    torch.manual_seed(0)
    kw = dict(num_classes=16, num_branches=4, topk=1, depth=8)
    plain = build_hydranet("resnet_cifar", **kw).eval()
    shared = build_hydranet("resnet_cifar", shared_path=True, **kw).eval()
    shared.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(shared(x), plain(x))  # the projection starts at zero: same function
        torch.nn.init.normal_(shared.shared.weight)
        out = shared(x, return_gate=True)
        feats = shared.stem(x)
        gate_feats = torch.nn.functional.adaptive_avg_pool2d(shared.gate[:-3](feats), 1).flatten(1)
        routed = torch.stack([torch.sigmoid(out.gate_logits[i, b]) * shared.branches[b](feats[i:i + 1])[0]
                              for i, b in enumerate(out.route[:, 0].tolist())])
        expected = shared.classifier(shared.norm(routed + shared.shared(gate_feats)))
    torch.testing.assert_close(out.logits, expected, rtol=1e-4, atol=1e-5)
    assert count_params(shared) - count_params(plain) == shared.gate[-1].in_features * 64 + 64
    macs = model_macs(shared, (3, 32, 32)) - model_macs(plain, (3, 32, 32))
    assert macs == shared.gate[-1].in_features * 64   # one small projection per image


def test_balance_loss_by_hand():
    from hydranets.routing import balance_loss
    even = balance_loss(torch.zeros(4, 2), torch.tensor([[0], [1], [0], [1]]))
    assert even.item() == pytest.approx(1.0)                      # uniform routing: 1
    logits = torch.tensor([[torch.tensor(3.0).log().item(), 0.0]] * 2, requires_grad=True)  # softmax p0 = 3/4
    loss = balance_loss(logits, torch.tensor([[0], [0]]))        # every image on branch 0: f = (1, 0)
    assert loss.item() == pytest.approx(2 * 0.75)
    loss.backward()
    assert (logits.grad[:, 0] > 0).all() and (logits.grad[:, 1] < 0).all()  # descent moves mass off branch 0
    top2 = balance_loss(torch.zeros(3, 4), torch.tensor([[0, 1], [0, 2], [0, 3]]))  # f = (1/2, 1/6, 1/6, 1/6)
    assert top2.item() == pytest.approx(4 * 0.25 * (0.5 + 3 / 6))


def test_balance_loss_of_an_empty_batch_is_zero_not_nan():
    from hydranets.routing import balance_loss
    logits = torch.zeros(0, 4, requires_grad=True)
    loss = balance_loss(logits, torch.zeros(0, 1, dtype=torch.long))
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad.shape == (0, 4)


def test_speed_is_timed_on_the_given_images():
    from hydranets.cost import compare_speed, first_images

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def forward(self, x):
            self.seen.append(x.clone())
            return x.mean()

    batches = [(torch.arange(i * 30, i * 30 + 3 * 4 * 4 * 3, dtype=torch.float).reshape(3, 3, 4, 4), None)
               for i in range(3)]
    images = first_images(batches, 5)
    assert torch.equal(images, torch.cat([batches[0][0], batches[1][0][:2]]))
    rec = Recorder()
    out = compare_speed({"r": (rec, {})}, (3, 4, 4), 4, repeats=1, warmup=0, min_time=0, images=images)
    assert out["r"]["batch_size"] == 4 and rec.seen and all(torch.equal(x, images[:4]) for x in rec.seen)
    rec.seen.clear()
    compare_speed({"r": (rec, {})}, (3, 4, 4), 7, repeats=1, warmup=0, min_time=0, images=images[:3])
    repeated = torch.cat([images[:3], images[:3], images[:1]])
    assert rec.seen and all(torch.equal(x, repeated) for x in rec.seen)
    with pytest.raises(HydraError, match=r"needs images of size \(3, 4, 4\), got a tensor of shape \(2, 3, 5, 5\)"):
        compare_speed({"r": (rec, {})}, (3, 4, 4), 2, images=torch.zeros(2, 3, 5, 5))


def test_upcycled_gate_with_shared_path_starts_as_the_baseline(tmp_path):
    from hydranets.upcycle import init_stem_from
    base, path = _baseline_checkpoint(tmp_path)
    hyd = build_hydranet("resnet_cifar", 6, num_branches=3, topk=1, branch_width=0.5, gate_width=1.0,
                         shared_path=True, depth=8, width=0.5)
    assert init_stem_from(hyd, str(path), upcycle=None) == ["gate"]
    hyd.eval()
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        expected = base.forward_features(x)
        torch.testing.assert_close(hyd.gate[:-1](hyd.stem(x)), expected, rtol=1e-5, atol=1e-5)
        for branch in hyd.branches:  # fresh branches, projected to zero: they add nothing yet
            assert branch[-1].weight.abs().sum() == 0
        eps = hyd.norm.eps  # a fresh BatchNorm1d in eval mode divides by sqrt(1 + eps)
        torch.testing.assert_close(hyd(x), base.fc(expected / (1 + eps) ** 0.5), rtol=1e-4, atol=1e-4)
    no_shared = build_hydranet("resnet_cifar", 6, num_branches=3, topk=1, branch_width=0.5, gate_width=1.0,
                               depth=8, width=0.5)
    fresh_fc = no_shared.classifier.weight.clone()
    assert init_stem_from(no_shared, str(path), upcycle=True) == ["gate"]  # the gate's trunk only
    torch.testing.assert_close(no_shared.gate[:-1].eval()(no_shared.stem.eval()(x)), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(no_shared.classifier.weight, fresh_fc)


def test_shared_branch_weights_train_on_every_branchs_images():
    torch.manual_seed(0)
    kw = dict(num_classes=6, num_branches=3, topk=1, depth=8, width=0.5, branch_width=1.0, gate_width=1.0)
    tied = build_hydranet("resnet_cifar", share_branch_weights=True, **kw)
    free = build_hydranet("resnet_cifar", **kw)
    free.load_state_dict(tied.state_dict())  # the same function, its branches' weights as separate copies
    first = tied.branches[0]
    for name, p in first.named_parameters():
        is_norm = isinstance(first.get_submodule(name.rsplit(".", 1)[0]), torch.nn.BatchNorm2d)
        assert all((p is br.get_parameter(name)) != is_norm for br in tied.branches[1:]), name
    assert count_params(free) - count_params(tied) == 2 * sum(
        p.numel() for m in tied.branches[0].modules() if not isinstance(m, torch.nn.BatchNorm2d)
        for p in m.parameters(recurse=False))
    assert active_params(tied, 1) == active_params(free, 1) and active_params(tied, 3) == count_params(tied)
    x, route = torch.randn(9, 3, 16, 16), torch.tensor([[0], [1], [2]] * 3)
    for model in (tied, free):
        model.train()
        model(x, route=route).square().sum().backward()
    conv = "0.0.body.0.0.weight"  # a branch's first convolution: its gradient, summed over the branches' images
    torch.testing.assert_close(first.get_parameter(conv).grad,
                               sum(br.get_parameter(conv).grad for br in free.branches), rtol=1e-4, atol=1e-6)
    norm = "0.0.body.0.1.weight"  # its normalisation stays each branch's own
    for a, b in zip(tied.branches, free.branches):
        torch.testing.assert_close(a.get_parameter(norm).grad, b.get_parameter(norm).grad, rtol=1e-4, atol=1e-6)


def test_shared_branch_norms_make_every_branch_one_network():
    torch.manual_seed(0)
    one = build_hydranet("resnet_cifar", 6, num_branches=3, topk=1, depth=8, width=0.5, branch_width=1.0,
                         share_branch_weights=True, share_branch_norms=True)
    first = one.branches[0]
    for br in one.branches[1:]:
        assert all(t is first.get_parameter(n) for n, t in br.named_parameters())
        assert all(t is first.get_buffer(n) for n, t in br.named_buffers())
    assert active_params(one, 1) == active_params(one, 3) == count_params(one)
    one.train()
    x = torch.randn(6, 3, 16, 16)
    one(x, route=torch.tensor([[2]] * 6))  # the statistics that branch 2's images leave are every branch's
    assert first.get_buffer("0.0.body.0.1.running_mean").abs().sum() > 0
    one.eval()
    with torch.no_grad():
        feats = one.stem(x)
        for br in one.branches[1:]:
            torch.testing.assert_close(br(feats), first(feats))


def test_tied_branches_stay_tied_after_a_move_to_another_dtype():
    """Module.to replaces buffers with converted copies; the branches must still share one set (as on CUDA)."""
    one = build_hydranet("resnet_cifar", 6, num_branches=3, topk=1, depth=8, width=0.5, branch_width=1.0,
                         share_branch_weights=True, share_branch_norms=True).to(torch.float64)
    first = one.branches[0]
    for br in one.branches[1:]:
        assert all(t is first.get_buffer(n) for n, t in br.named_buffers())
        assert all(t is first.get_parameter(n) for n, t in br.named_parameters())
    one.train()
    one(torch.randn(6, 3, 16, 16, dtype=torch.float64), route=torch.tensor([[2]] * 6))
    assert one.branches[1].get_buffer("0.0.body.0.1.running_mean").abs().sum() > 0


@pytest.mark.parametrize("route, match", [
    ([[0, 0], [1, 1]], "names a branch twice"),
    ([[0, 1]], r"shape \(N=2, k\)"),
    ([[0, 8], [1, 2]], "outside 0..7"),
    ([[0.0, 1.0], [1.0, 2.0]], "integer tensor"),
])
def test_a_callers_route_is_checked(hydra, route, match):
    with pytest.raises(HydraError, match=match):
        hydra(torch.randn(2, 3, 32, 32), route=torch.tensor(route))


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32, torch.uint8])
def test_a_callers_route_of_any_integer_dtype_runs_as_int64(hydra, dtype):
    x = torch.randn(3, 3, 32, 32)
    route = torch.tensor([[3, 1], [3, 0], [5, 2]])
    with torch.no_grad():
        assert torch.equal(hydra.eval()(x, route=route.to(dtype)), hydra(x, route=route))


def test_ghost_branch_norms_normalise_training_groups_on_their_own_and_keep_ties():
    torch.manual_seed(0)
    one = build_hydranet("resnet_cifar", 6, num_branches=3, topk=1, depth=8, width=0.5, branch_width=1.0,
                         share_branch_weights=True, share_branch_norms=True)
    x = torch.randn(8, 3, 16, 16)
    before = one.eval()(x)
    norms = sum(type(m) is torch.nn.BatchNorm2d for m in one.branches[0].modules())
    assert ghost_branch_norms(one.branches, 4) == 3 * norms
    assert not any(type(m) is torch.nn.BatchNorm2d for br in one.branches for m in br.modules())
    assert any(type(m) is torch.nn.BatchNorm2d for m in one.stem.modules())   # the stem keeps whole batches
    first = one.branches[0]
    for br in one.branches[1:]:
        assert all(t is first.get_parameter(n) for n, t in br.named_parameters())
        assert all(t is first.get_buffer(n) for n, t in br.named_buffers())
    torch.testing.assert_close(one(x), before)   # evaluation: plain batch norm with the same state

    bn = next(m for m in first.modules() if isinstance(m, GhostBatchNorm2d)).train()
    h = torch.randn(10, bn.num_features, 4, 4) * 3 + 1
    out = bn(h)
    for group in h.split(4):   # groups of 4, 4 and 2, each by its own mean and (biased) variance
        mean, var = group.mean((0, 2, 3), keepdim=True), group.var((0, 2, 3), unbiased=False, keepdim=True)
        expected = (group - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
        torch.testing.assert_close(out[:len(group)], expected, rtol=1e-4, atol=1e-5)
        out = out[len(group):]
    with pytest.raises(HydraError, match="integer >= 2"):
        ghost_branch_norms(one.branches, 1)


@pytest.mark.parametrize("kwargs,match", [
    ({"feature_dim": 0}, "feature_dim must be a positive integer"),   # was taken as 'the backbone's'
    ({"num_branches": True}, "num_branches must be a positive integer"),
    ({"topk": True}, "topk must be an integer"),
    ({"split": True}, "split must be a stage index"),
    ({"split": 1.5}, "split must be a stage index"),
    ({"branch_width": float("inf")}, "branch_width must be a positive number"),
    ({"gate_width": float("nan")}, "gate_width must be a positive number"),
])
def test_build_settings_of_the_wrong_kind_are_clear_errors(kwargs, match):
    with pytest.raises(HydraError, match=match):
        build_hydranet("resnet_cifar", **{"num_classes": 8, "num_branches": 4, "topk": 2, "depth": 8, "width": 0.25,
                                          **kwargs})


def test_backbone_settings_with_a_built_backbone_are_refused():
    """With a built backbone, width= etc. once did nothing, silently."""
    base = create_model("resnet_cifar", num_classes=8, depth=8, width=0.25)
    with pytest.raises(HydraError, match="width apply only to a backbone given by name"):
        build_hydranet(base, 8, num_branches=2, topk=1, width=0.5)
    assert build_hydranet(base, 8, num_branches=2, topk=1).branches[0][-1].in_features == 8  # 64 x 0.25 x 0.5


def test_force_of_another_shape_is_refused(hydra):
    """A force of shape (B,) once broadcast over every image."""
    x = torch.randn(3, 3, 32, 32)
    with pytest.raises(HydraError, match=r"force must be \(N, B\) = \(3, 8\)"):
        hydra(x, force=torch.eye(B)[5])
    force = torch.zeros(3, B, dtype=torch.bool)
    force[[0, 1, 2], [5, 1, 7]] = True
    with torch.no_grad():
        route = hydra(x, topk=2, force=force, return_gate=True).route
        scores = hydra.gate(hydra.stem(x))
    assert route[:, 0].tolist() == [5, 1, 7]
    for i, first in enumerate([5, 1, 7]):
        rest = scores[i].clone()
        rest[first] = -float("inf")
        assert route[i, 1] == rest.argmax()

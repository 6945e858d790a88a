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


def test_true_route_top1_routes_each_image_to_its_subtask():
    from hydranets import build_hydranet
    from hydranets.evaluate import evaluate
    torch.manual_seed(0)
    subsets = [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    model = build_hydranet("resnet_cifar", 10, num_branches=3, topk=1, depth=8, width=0.5, partition=subsets).eval()
    x, y = torch.randn(40, 3, 16, 16), torch.arange(40) % 10
    ev = evaluate(model, [(x[:24], y[:24]), (x[24:], y[24:])], true_route=True)
    with torch.no_grad():
        feats = model.stem(x)
        gate = model.gate(feats)
        subtask = torch.tensor([next(b for b, s in enumerate(subsets) if c in s) for c in y.tolist()])
        combined = torch.stack([torch.sigmoid(gate[i, b]) * model.branches[b](feats[i:i + 1])[0]
                                for i, b in enumerate(subtask.tolist())])
        expected = 100.0 * (model.classifier(model.norm(combined)).argmax(1) == y).float().mean().item()
        gate_top1 = 100.0 * (model(x).argmax(1) == y).float().mean().item()
    assert expected != gate_top1  # the check below can tell the two apart
    assert ev["true_route_top1"] == pytest.approx(expected)
    assert ev["top1"] == pytest.approx(gate_top1)
    assert "true_route_top1" not in evaluate(model, [(x, y)])


def test_shuffled_top1_runs_the_next_branch_with_the_gates_weight():
    from hydranets import build_hydranet
    from hydranets.evaluate import evaluate
    torch.manual_seed(0)
    model = build_hydranet("resnet_cifar", 10, num_branches=3, topk=1, depth=8, width=0.5, shared_path=True).eval()
    x, y = torch.randn(40, 3, 16, 16), torch.arange(40) % 10
    with torch.no_grad():
        before = model(x)
        feats = model.stem(x)
        gate_feats = model.gate[:-1](feats)
        gate = model.gate[-1](gate_feats)
        chosen = gate.argmax(1).tolist()
        combined = torch.stack([torch.sigmoid(gate[i, b]) * model.branches[(b + 1) % 3](feats[i:i + 1])[0]
                                for i, b in enumerate(chosen)]) + model.shared(gate_feats)
        expected = 100.0 * (model.classifier(model.norm(combined)).argmax(1) == y).float().mean().item()
        gate_top1 = 100.0 * (before.argmax(1) == y).float().mean().item()
    assert expected != gate_top1  # the check below can tell the two apart
    ev = evaluate(model, [(x[:24], y[:24]), (x[24:], y[24:])], shuffled_branches=True)
    assert ev["shuffled_top1"] == pytest.approx(expected)
    assert ev["top1"] == pytest.approx(gate_top1)
    with torch.no_grad():
        assert torch.equal(model(x), before)  # the branches are back in place
    assert "shuffled_top1" not in evaluate(model, [(x, y)])


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_auto_precision_is_resolved_for_the_device_not_run_in_fp32(monkeypatch, fast_bf16):
    """Whatever this machine's CPU: auto is bf16 where the CPU runs it fast (AVX512-BF16 or AMX), else fp32."""
    from hydranets import create_model
    from hydranets.evaluate import autocast_for, evaluate, resolve_precision
    torch.manual_seed(0)
    model = create_model("resnet_cifar", num_classes=10, depth=8, width=0.5)
    batches = [(torch.randn(16, 3, 16, 16), torch.arange(16) % 10)]
    cpu = torch.device("cpu")
    with torch.no_grad():
        x = batches[0][0]
        fp32 = model.eval()(x).float().softmax(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(x).float().softmax(1)
    assert not torch.equal(fp32, bf16)  # the check below can tell the two apart
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: fast_bf16)
    here = "bf16" if fast_bf16 else "fp32"
    assert resolve_precision("auto", cpu) == here
    auto = evaluate(model, batches, precision="auto", collect_probs=True)
    assert auto["precision"] == here and torch.equal(auto["probs"], bf16 if fast_bf16 else fp32)
    with pytest.raises(ValueError, match="resolve 'auto'"):
        autocast_for(cpu, "auto")
    with pytest.raises(ValueError, match="not one of"):
        autocast_for(cpu, "fp64")


def test_auto_precision_on_cuda_needs_native_bf16(monkeypatch):
    """A GPU before compute capability 8.0 (T4, V100) only emulates bf16, slowly: auto is fp32 there."""
    from hydranets.evaluate import resolve_precision
    asked = []

    def capability(device=None):
        asked.append(device)
        return caps

    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.version, "hip", None)
    for caps, expected in (((7, 5), "fp32"), ((7, 0), "fp32"), ((8, 0), "bf16"), ((9, 0), "bf16")):
        assert resolve_precision("auto", torch.device("cuda:1")) == expected, caps
    assert asked == [torch.device("cuda:1")] * 4
    assert resolve_precision("fp16", torch.device("cuda:1")) == "fp16"


def test_evaluate_that_fails_leaves_the_model_in_training_mode():
    from hydranets import build_hydranet
    from hydranets.errors import HydraError
    from hydranets.evaluate import evaluate
    torch.manual_seed(0)
    model = build_hydranet("resnet_cifar", 10, num_branches=3, topk=1, depth=8, width=0.25).train()
    with pytest.raises(HydraError, match="topk must be"):
        evaluate(model, [(torch.randn(4, 3, 8, 8), torch.arange(4))], topk=4)
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("flags", [{}, {"true_route": True, "shuffled_branches": True}, {"collect_probs": True}])
def test_evaluate_of_no_images_is_one_error(flags):
    from hydranets import build_hydranet, create_model
    from hydranets.errors import HydraError
    from hydranets.evaluate import evaluate
    from hydranets.partition import partition_random
    torch.manual_seed(0)
    hydra = build_hydranet("resnet_cifar", 10, num_branches=2, topk=1, depth=8, width=0.25,
                           partition=partition_random(10, 2))
    for model in (create_model("resnet_cifar", num_classes=10, depth=8, width=0.25), hydra):
        with pytest.raises(HydraError, match="nothing to evaluate"):
            evaluate(model, [], **flags)

"""Counted and timed cost: MACs and throughput of models in other dtypes, the models left as they were."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from hydranets import build_hydranet, create_model
from hydranets.cost import compare_speed, model_macs
from hydranets.errors import HydraError


def _by_hand(model: nn.Module, x: torch.Tensor) -> float:
    """Multiply-adds per image of every Conv2d and Linear call, from forward hooks."""
    total = []

    def conv(m, inputs, out):
        total.append(out.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1])

    hooks = [m.register_forward_hook(conv if isinstance(m, nn.Conv2d) else
                                     lambda m, inputs, out: total.append(out.numel() * m.in_features))
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return sum(total) / len(x)


def test_model_macs_of_a_bf16_or_fp16_model():
    torch.manual_seed(0)
    dense = create_model("resnet_cifar", num_classes=10, depth=8, width=0.25).eval()
    expected = _by_hand(dense, torch.randn(2, 3, 8, 8))
    hydra = build_hydranet("resnet_cifar", 10, num_branches=3, topk=2, depth=8, width=0.25).eval()
    expected_hydra = model_macs(hydra, (3, 8, 8), batch_size=2)
    for dtype in (torch.bfloat16, torch.float16):
        assert model_macs(dense.to(dtype), (3, 8, 8), batch_size=2) == expected
    assert model_macs(hydra.to(torch.bfloat16), (3, 8, 8), batch_size=2) == expected_hydra


def test_compare_speed_times_a_bf16_model():
    model = create_model("resnet_cifar", num_classes=10, depth=8, width=0.25).to(torch.bfloat16)
    seen = []
    model.register_forward_hook(lambda m, inputs, out: seen.append((inputs[0], out.dtype)))
    speed = compare_speed({"bf16": (model, {})}, (3, 8, 8), 2, repeats=3, warmup=0, min_time=0)["bf16"]
    assert len(seen) >= 3  # at least one call per repeat
    for x, out_dtype in seen:
        assert x.shape == (2, 3, 8, 8) and x.dtype == torch.bfloat16 and out_dtype == torch.bfloat16
        assert x.is_contiguous(memory_format=torch.channels_last) and torch.equal(x, seen[0][0])
    assert speed["batch_size"] == 2 and speed["median_s"] > 0
    assert speed["images_per_s"] == pytest.approx(2 / speed["median_s"])
    assert speed["latency_ms"] == pytest.approx(1000 * speed["median_s"])
    assert speed["spread"] >= 1


def test_compare_speed_reports_the_spread_of_its_repeats_and_a_busy_machine_is_noted(monkeypatch):
    """The slowest repeat over the fastest, so that timings on a busy machine are flagged, not passed off."""
    import hydranets.cost as cost_mod
    clock = iter([0.0, 1.0] * 3 + [0.0, 1.0, 0.0, 3.0, 0.0, 2.0])   # 2 warm-ups, the calibration, repeats of 1, 3, 2 s
    monkeypatch.setattr(cost_mod.time, "perf_counter", lambda: next(clock))
    model = create_model("resnet_cifar", num_classes=10, depth=8, width=0.25)
    speed = compare_speed({"m": (model, {})}, (3, 8, 8), 2, repeats=3, warmup=2, min_time=0)
    assert speed["m"]["median_s"] == 2.0 and speed["m"]["spread"] == 3.0
    note = cost_mod.unsteady_note(speed)
    assert note.startswith("note: the timings are unsteady (the repeats of m differ 3.0x")
    assert cost_mod.unsteady_note({"a": {"spread": 1.2}, "b": {"spread": 1.5}}) is None
    assert "repeats of b differ 1.6x" in cost_mod.unsteady_note({"a": {"spread": 1.2}, "b": {"spread": 1.6}})


def test_compare_speed_leaves_each_model_in_its_mode():
    torch.manual_seed(0)
    dense = create_model("resnet_cifar", num_classes=10, depth=8, width=0.25).eval()
    hydra = build_hydranet("resnet_cifar", 10, num_branches=3, topk=1, depth=8, width=0.25).train()
    speed = compare_speed({"dense": (dense, {}), "hydra": (hydra, {}), "hydra k=2": (hydra, {"topk": 2})},
                          (3, 8, 8), 2, repeats=1, warmup=0, min_time=0)
    assert all(s["images_per_s"] > 0 for s in speed.values())
    assert all(m.training for m in hydra.modules()) and not any(m.training for m in dense.modules())


def test_timing_waits_for_any_accelerator(monkeypatch):
    """compare_speed's clock waits for queued work on MPS/XPU too, not only on CUDA (launches are not work)."""
    from hydranets.cost import _sync
    calls = []
    monkeypatch.setattr(torch.mps, "synchronize", lambda: calls.append("mps"))
    _sync(torch.device("mps"))
    _sync(torch.device("cpu"))
    assert calls == ["mps"]
    with pytest.raises(HydraError, match="cannot time on device meta"):
        _sync(torch.device("meta"))

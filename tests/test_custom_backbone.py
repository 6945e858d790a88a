"""A researcher's own backbone: a StagePlan registered by name, checked as it builds, costed and split like ours."""
from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

import hydranets
from conftest import REPO
from hydranets import Backbone, HydraError, build_hydranet, create_model, register_model, registry
from hydranets.cost import model_macs


@pytest.fixture(autouse=True)
def own_registry(monkeypatch):
    """Each test registers into a copy of the registry, so its models do not outlive it."""
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))


@dataclass
class TinyPlan:
    """Three stages of one conv each (the last 1x1), and a final that may change channels (the mistake)."""

    widths: tuple[int, ...] = (4, 8, 16)
    final_out: int | None = None  # channels build_final outputs; None keeps them
    in_chans: int = 3
    num_stages: int = 3

    def build(self, index: int, in_channels: int, width: float) -> tuple[nn.Module, int]:
        cout = hydranets.scaled(self.widths[index], width)
        k, stride = (1, 1) if index == 2 else (3, 1 + (index == 1))
        return nn.Sequential(nn.Conv2d(in_channels, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout),
                             nn.ReLU()), cout

    def build_final(self, channels: int) -> nn.Module:
        if self.final_out is None or self.final_out == channels:
            return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU())
        return nn.Conv2d(channels, self.final_out, 1)


# ---------------------------------------------------------------- the example
def test_example_script_runs_and_prints_what_it_checks():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, str(REPO / "examples" / "custom_backbone.py")], capture_output=True, text=True,
                       env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == "vgg_tiny registered: ['vgg_tiny']"
    assert "soft (train) logits (16, 10)" in lines
    assert any(re.fullmatch(r"top-1 \(eval\) logits \(16, 10\), images per branch \[\d+, \d+, \d+, \d+\]", s)
               for s in lines)
    macs = dict(re.findall(r"MACs/image at k=(\d+): ([\d.]+)M", p.stdout))
    assert float(macs["1"]) < float(macs["4"])
    assert re.search(r"folded \d+ batch norms; logits match: True", p.stdout)
    assert p.stderr == ""


# ---------------------------------------------------------------- 1: build_final keeps channels
def test_a_final_that_changes_channels_is_refused_when_built_not_at_forward():
    with pytest.raises(HydraError, match=r"TinyPlan.build_final\(16\) gives 32 channels; build_final must keep the "
                                         r"channel count it is given \(put a layer .* end of the last stage"):
        Backbone(TinyPlan(final_out=32), 10)

    @register_model
    def tiny_widening(num_classes: int = 10, width: float = 1.0, in_chans: int = 3) -> Backbone:
        return Backbone(TinyPlan(final_out=32, in_chans=in_chans), num_classes, width)

    for build in (lambda: create_model("tiny_widening", 10), lambda: build_hydranet("tiny_widening", 10, 2, 1)):
        with pytest.raises(HydraError, match="build_final must keep the channel count"):
            build()


def test_a_final_of_a_fixed_width_is_refused_in_the_narrower_branches():
    """A final that always outputs 16 channels fits the backbone at width 1, not its half-width branches."""
    backbone = Backbone(TinyPlan(final_out=16), 10)
    assert backbone(torch.zeros(2, 3, 8, 8)).shape == (2, 10)
    with pytest.raises(HydraError, match=r"build_final\(8\) gives 16 channels; build_final must keep"):
        build_hydranet(backbone, 10, num_branches=2, topk=1, branch_width=0.5)


class LinearFinal(TinyPlan):
    def build_final(self, channels: int) -> nn.Module:
        return nn.Linear(channels, channels)


class FunctionFinal(TinyPlan):
    def build_final(self, channels: int):
        return torch.relu


@pytest.mark.parametrize("plan,match", [
    (LinearFinal(), r"LinearFinal.build_final\(16\) fails on a \(1, 16, 4, 4\) feature map \(.*\); it must take"),
    (FunctionFinal(), r"build_final\(16\) must return an nn.Module \(nn.Identity\(\) for none\), got builtin"),
])
def test_a_final_that_is_no_feature_map_module_is_one_clear_error(plan, match):
    with pytest.raises(HydraError, match=match) as e:
        Backbone(plan, 10)
    assert "\n" not in str(e.value)


def test_the_final_check_leaves_modes_and_random_state_alone():
    torch.manual_seed(3)
    a = Backbone(TinyPlan(), 10)
    torch.manual_seed(3)
    b = Backbone(TinyPlan(), 10)
    assert a.final.training and all(m.training for m in a.modules())
    assert torch.equal(a.stages[0][0].weight, b.stages[0][0].weight)
    assert torch.equal(a.final[0].running_var, torch.ones(16)) and a.final[0].num_batches_tracked == 0


# ---------------------------------------------------------------- 2: an incomplete plan
class NoFinal:
    num_stages, in_chans = 2, 3

    def build(self, index: int, in_channels: int, width: float) -> tuple[nn.Module, int]:
        return nn.Conv2d(in_channels, 4, 3), 4


class ModuleOnly(TinyPlan):
    def build(self, index: int, in_channels: int, width: float):
        return super().build(index, in_channels, width)[0]


@pytest.mark.parametrize("plan,match", [
    (NoFinal(), r"NoFinal has no build_final; a plan needs num_stages, in_chans, build\(index, in_channels, width\) "
                r"and build_final\(channels\) \(see hydranets.StagePlan\)"),
    (object(), "object has no num_stages, in_chans, build, build_final; a plan needs"),
    (TinyPlan(num_stages=0), r"TinyPlan.num_stages must be a positive integer, got 0 \(see hydranets.StagePlan\)"),
    (ModuleOnly(), r"ModuleOnly.build\(0, 3, 1.0\) must return \(module, output channels\), got Sequential"),
])
def test_an_incomplete_plan_names_what_is_missing(plan, match):
    with pytest.raises(HydraError, match=match):
        Backbone(plan, 10)


# ---------------------------------------------------------------- 3: registering again
MODULE = '''
import hydranets

@hydranets.register_model
def reloaded_net(num_classes=10, width=1.0, in_chans=3):
    return hydranets.create_model("resnet_cifar", num_classes=num_classes, depth=8, width={width}, in_chans=in_chans)
'''


def test_the_same_factory_defined_again_replaces_the_old_one(tmp_path, monkeypatch):
    """Re-running a notebook cell or reloading a module registers the same function again: it replaces the old."""
    (tmp_path / "mynets_reloaded.py").write_text(MODULE.format(width=0.25))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("mynets_reloaded")
    assert create_model("reloaded_net").num_features == 16
    (tmp_path / "mynets_reloaded.py").write_text(MODULE.format(width=0.5))
    importlib.reload(module)
    assert create_model("reloaded_net").num_features == 32
    cell, source = {"__name__": "__main__"}, MODULE.format(width=0.25).replace("reloaded_net", "cell_net")
    for _ in range(2):  # a notebook cell run twice
        exec(compile(source, "<cell>", "exec"), cell)  # noqa: S102
    assert hydranets.is_model("cell_net")
    del sys.modules["mynets_reloaded"]


def test_another_function_of_a_registered_name_is_refused():
    def resnet20(num_classes: int = 10) -> nn.Module:
        return nn.Linear(4, num_classes)

    with pytest.raises(HydraError, match=r"model 'resnet20' is already registered \(by hydranets.models.resnet."
                                         r"resnet20\); give your factory function another name"):
        register_model(resnet20)
    assert isinstance(create_model("resnet20", 10), Backbone)


# ---------------------------------------------------------------- 4: keywords a factory does not take
def test_pretrained_weights_are_refused_with_where_to_get_weights():
    for name in ("resnet20", "hydra_resnet20_b4k1"):
        with pytest.raises(HydraError, match=r"cannot be built with pretrained=True: hydranets publishes no pretrained "
                                             r"weights; train a run .* hydranets.load_model\(RUN\)"):
            create_model(name, 10, pretrained=True)
    assert isinstance(create_model("resnet20", 10, pretrained=False), Backbone)  # what it builds anyway

    @register_model
    def with_weights(num_classes: int = 10, pretrained: bool = False) -> nn.Module:
        return nn.Linear(4, num_classes).requires_grad_(not pretrained)

    assert not create_model("with_weights", 3, pretrained=True).weight.requires_grad  # its own keyword reaches it


def test_a_keyword_the_factory_does_not_take_is_one_line_naming_model_and_keyword():
    with pytest.raises(HydraError, match=r"^model 'resnet20' cannot be built with widht=0.5: its factory takes no "
                                         r"'widht' \(it takes num_classes, width, in_chans\)$") as e:
        create_model("resnet20", 10, widht=0.5)
    assert isinstance(e.value, TypeError)  # what Python raises for it, and what callers may already catch

    @register_model
    def no_in_chans(num_classes: int = 10) -> nn.Module:
        return nn.Linear(4, num_classes)

    with pytest.raises(HydraError, match="model 'no_in_chans' cannot be built with in_chans=3"):
        create_model("no_in_chans", 10, in_chans=3)


# ---------------------------------------------------------------- 5: the plan's own init
class ZeroLastNorm(TinyPlan):
    def init_weights(self, module: nn.Module) -> None:
        for m in module.modules():
            if isinstance(m, nn.Sequential) and isinstance(m[0], nn.Conv2d) and m[0].kernel_size == (1, 1):
                nn.init.zeros_(m[1].weight)


def test_a_plans_own_init_runs_after_the_default():
    plain, own = Backbone(TinyPlan(), 10), Backbone(ZeroLastNorm(), 10)
    assert torch.equal(plain.stages[2][1].weight, torch.ones(16))
    assert torch.equal(own.stages[2][1].weight, torch.zeros(16)) and torch.equal(own.stages[1][1].weight, torch.ones(8))
    hydra = build_hydranet(own, 10, num_branches=2, topk=1)
    assert all(torch.equal(b[0][1].weight, torch.zeros(8)) for b in hydra.branches)
    assert torch.equal(hydra.gate[0][1].weight, torch.zeros(4))


# ---------------------------------------------------------------- MACs by hand
def conv_macs(cin: int, cout: int, k: int, hw: int) -> int:
    return cin * cout * k * k * hw * hw


def test_macs_of_a_custom_plan_match_the_formula():
    """8x8 input: 3->4 (3x3, 8x8), 4->8 (3x3 stride 2, 4x4), 8->16 (1x1, 4x4); pools, norms and activations are free."""
    classes, branches = 10, 4
    backbone = Backbone(TinyPlan(), classes)
    stem = conv_macs(3, 4, 3, 8) + conv_macs(4, 8, 3, 4)
    assert model_macs(backbone, (3, 8, 8)) == stem + conv_macs(8, 16, 1, 4) + 16 * classes
    hydra = build_hydranet(backbone, classes, num_branches=branches, topk=1)  # branches at 0.5: 8 ch, gate at 0.25: 4
    branch = conv_macs(8, 8, 1, 4) + 8 * 16  # projected to the backbone's 16 features
    gate = conv_macs(8, 4, 1, 4) + 4 * branches
    assert model_macs(hydra, (3, 8, 8), topk=1) == stem + gate + branch + 16 * classes
    assert model_macs(hydra, (3, 8, 8), topk=branches) == stem + gate + branches * branch + 16 * classes


def test_a_factory_without_in_chans_trains_on_rgb_and_is_refused_otherwise():
    """Training passed in_chans to every factory, so one without it failed with a TypeError naming a keyword the
    user never gave."""
    from hydranets.train import build_model

    @hydranets.register_model
    def rgb_only(num_classes=10):
        return create_model("resnet_cifar", num_classes=num_classes, depth=8, width=0.25)

    info = {"name": "rgb_only", "kwargs": {}, "num_classes": 10, "in_chans": 3, "hydra": None}
    assert build_model(info)(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    with pytest.raises(HydraError, match=r"^model 'rgb_only' takes no in_chans, and these images have 1 channel\(s\); "
                                         r"give its factory an in_chans argument$"):
        build_model({**info, "in_chans": 1})


def test_what_the_fourth_audit_found_is_one_line():
    """A one-stage plan made a HydraNet (the error spoke of a split the user never set), a factory returning no
    module, an in_chans in model.kwargs that the data contradicts (silently replaced), a module given as a file."""
    from hydranets.train import build_model, import_modules
    with pytest.raises(HydraError, match=r"^a HydraNet needs a backbone of at least 2 stages .*TinyPlan has 1$"):
        build_hydranet(Backbone(TinyPlan(widths=(4,), num_stages=1), 10), 10, num_branches=2, topk=1)

    @register_model
    def returns_nothing(num_classes=10):
        return None

    with pytest.raises(HydraError, match="^model 'returns_nothing': its factory returns_nothing returned NoneType, "
                                         "not an nn.Module$"):
        create_model("returns_nothing")
    info = {"name": "resnet_cifar", "kwargs": {"in_chans": 1, "depth": 8}, "num_classes": 10, "in_chans": 3,
            "hydra": None}
    with pytest.raises(HydraError, match=r"^model.kwargs has in_chans=1, but these images have 3 channel\(s\); "):
        build_model(info)
    for given, words in (("mynets.py", "give mynets (run from its folder)"), ("./mynets.py", "give mynets"),
                         ("lib/mynets", "give its name")):
        with pytest.raises(HydraError, match=r"^model.modules takes module names, not files: " + re.escape(words)):
            import_modules([given])

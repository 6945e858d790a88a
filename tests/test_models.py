import pytest
import torch

import hydranets
from hydranets import HydraError, create_model, list_models
from hydranets.cost import count_params, model_macs


def input_size(name: str) -> tuple[int, int, int]:
    return (3, 64, 64) if "ressep" in name else (3, 32, 32)


@pytest.mark.parametrize("name,num_classes,expected", [
    ("resnet20", 100, 0.278e6),   # He et al. 2016: 0.27M on CIFAR-10, + 64 x 90 weights for 100 classes
    ("resnet110", 100, 1.73e6),   # 1.7M
    ("densenet_bc_100_k12", 100, 0.80e6),  # Huang et al. 2017: 0.8M
    ("resnet18", 100, 11.22e6),   # 11.2M for the CIFAR layout
])
def test_parameter_counts_match_published(name, num_classes, expected):
    n = count_params(create_model(name, num_classes=num_classes))
    assert abs(n - expected) / expected < 0.02, n


def test_resnet20_macs_match_published():
    macs = model_macs(create_model("resnet20", num_classes=100), (3, 32, 32), batch_size=2)
    assert abs(macs - 40.8e6) / 40.8e6 < 0.01  # about 41M multiply-adds (He et al.)


@pytest.mark.parametrize("name", list_models())
def test_forward_backward_every_model(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10)
    x = torch.randn(3, *input_size(name))
    out = model(x)
    assert out.shape == (3, 10)
    out.logsumexp(1).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        assert model(x[:1]).shape == (1, 10)


def test_same_seed_same_model_and_output():
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        m = create_model("hydra_resnet20_b8k2", num_classes=10).eval()
        outs.append(m(torch.ones(2, 3, 32, 32)))
    assert torch.equal(outs[0], outs[1])


def test_width_multiplier_scales_channels():
    assert create_model("resnet20", num_classes=10, width=2.0).stage_channels == [32, 32, 64, 128]
    assert create_model("ressep", num_classes=10, widths=(8, 16, 32, 64), depth=1).num_features == 64


def test_unknown_model_suggests_close_matches():
    with pytest.raises(HydraError, match="did you mean .*resnet20"):
        create_model("resnet21", num_classes=10)


@pytest.mark.parametrize("kwargs,match", [({"depth": 21}, "6n\\+2"), ({"depth": 8, "width": 1.0}, None)])
def test_cifar_resnet_depth_is_checked(kwargs, match):
    if match:
        with pytest.raises(HydraError, match=match):
            create_model("resnet_cifar", num_classes=10, **kwargs)
    else:
        assert create_model("resnet_cifar", num_classes=10, **kwargs)(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_wrong_input_shape_is_one_clear_error():
    with pytest.raises(HydraError, match=r"expected input of shape \(N, 3, H, W\), got \(2, 1, 32, 32\)"):
        create_model("resnet20", num_classes=10)(torch.zeros(2, 1, 32, 32))
    with pytest.raises(HydraError, match="expected input"):
        hydranets.build_hydranet("resnet20", 10, 4, 1)(torch.zeros(3, 32, 32))


@pytest.mark.parametrize("name,kwargs", [
    ("resnet_cifar", {"depth": 8, "width": 0}), ("resnet_cifar", {"depth": 8, "width": -1.0}),
    ("resnet_cifar", {"depth": 8, "width": float("nan")}), ("resnet20", {"width": float("inf")}),
    ("densenet_bc", {"depth": 10, "growth": 0}),
    ("ressep", {"widths": (8, 8, 8, 8), "depth": 0}), ("ressep", {"widths": (), "depth": 1}),
])
def test_settings_that_make_no_network_are_clear_errors(name, kwargs):
    """Width 0 or below once gave a network of 1-channel layers; ResSep depth 0 one that failed on its first batch."""
    with pytest.raises(HydraError, match="must be a positive|ResSep needs"):
        create_model(name, num_classes=4, **kwargs)


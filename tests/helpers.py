"""Assertions and runners shared by the CLI, training, pipeline and predict tests."""
import contextlib
import importlib.util
import io
import sys
from pathlib import Path
from types import ModuleType

import torch

from hydranets import Partition
from hydranets.cli import main
from hydranets.config import load_config
from hydranets.train import train


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """A script of ``benchmarks/`` as a module, able to import the scripts beside it as it does when run."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``hydranets ARGV`` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        main(list(argv))
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str, *words: str) -> str:
    """The error: one line, the last on stderr (after any progress lines), no traceback, holding ``words``."""
    lines = [l for l in err.splitlines() if l.strip()]
    errors = [l for l in lines if "error" in l.lower()]
    assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith("error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in errors[0], (w, errors[0])
    return errors[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes: to show that nothing was changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def train_pair(root: Path, overrides: list[str], subsets: list[list[int]], classes: list[str]) -> dict[str, Path]:
    """A baseline and a top-1 HydraNet with ``subsets`` as its (random) subtasks, trained quietly into ``root``."""
    part = root / "subtasks.json"
    Partition(subsets, len(classes), classes, "random").save(part)
    n = torch.get_num_threads()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            train(load_config(overrides=[*overrides, f"out={root / 'baseline'}"]))
            train(load_config(overrides=[*overrides, f"out={root / 'hydranet'}", "hydra.enabled=true",
                                         f"hydra.num_branches={len(subsets)}", "hydra.topk=1",
                                         f"hydra.partition={part}"]))
    finally:
        torch.set_num_threads(n)
    return {"baseline": root / "baseline", "hydranet": root / "hydranet"}


SUBSETS = [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]


def tiny_hydra_and_control():
    """An untrained B=3 HydraNet on SUBSETS, a dense control, two test batches of 60 random 16x16 images, x, y."""
    from hydranets import build_hydranet, create_model
    torch.manual_seed(0)
    hydra = build_hydranet("resnet_cifar", 10, num_branches=3, topk=1, depth=8, width=0.5, partition=SUBSETS).eval()
    control = create_model("resnet_cifar", num_classes=10, depth=8, width=0.5).eval()
    x, y = torch.randn(60, 3, 16, 16), torch.arange(60) % 10
    return hydra, control, [(x[:32], y[:32]), (x[32:], y[32:])], x, y


def trained_looking(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random batch-norm statistics and affines, as training leaves them (fresh ones are the identity); eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 2 + 0.1)
            if m.affine:
                m.weight.data.copy_(torch.randn(m.num_features, generator=g))
                m.bias.data.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()

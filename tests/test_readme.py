"""The README's Python API block, run as a newcomer would paste it (with a tiny trained run for its last lines)."""
from __future__ import annotations

import re
import shlex

import pytest
import torch
from PIL import Image

from conftest import REPO
from hydranets.cli import build_parser
from helpers import train_pair

TRAIN = ["data.name=synthetic", "model.name=resnet_cifar", "model.kwargs={depth: 8, width: 0.25}", "data.augment=none",
         "optim.warmup_epochs=0", "train.epochs=1", "train.batch_size=32", "train.precision=fp32",
         "train.channels_last=false", "train.progress=false", "train.device=cpu", "train.threads=1"]


def python_api_block() -> str:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the Python API section should hold one python block"
    return blocks[0]


@pytest.mark.usefixtures("one_thread")
def test_python_api_block_runs(tmp_path, monkeypatch):
    code = python_api_block()
    run_name = re.search(r'load_model\("([^"]+)"', code).group(1)
    run = train_pair(tmp_path, TRAIN, [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]], [f"class{i}" for i in range(10)])["hydranet"]
    monkeypatch.chdir(tmp_path)
    for name in re.search(r"read_images\(\[([^\]]+)\]", code).group(1).replace('"', "").split(", "):
        Image.new("RGB", (48, 40), (200, 80, 40)).save(tmp_path / name)
    ns: dict = {}
    exec(compile(code.replace(run_name, str(run)), "README.md", "exec"), ns)  # noqa: S102
    hydra, x = ns["hydra"], ns["x"]
    assert ns["logits"].shape == (64, 100) and [t.shape for t in ns["out"]] == [(64, 100), (64, 8), (64, 1)]
    with torch.no_grad():
        assert torch.allclose(ns["fast"](x), hydra.eval()(x), atol=1e-4)  # "the same logits as hydra.eval()(x)"
    assert "hydra_resnet20_b8k2" in ns["hydranets"].list_models("hydra_*")
    with torch.no_grad():   # "the same logits as hydra.eval()"
        assert torch.allclose(ns["mine"](x), hydra.eval()(x), atol=1e-5) and ns["mine"].topk == hydra.topk


def readme_commands() -> list[list[str]]:
    """Each ``hydranets`` command of the README's command-line block, as the words after ``hydranets``."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Command line\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    commands = []
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        if "hydranets" in words:
            commands.append(words[words.index("hydranets") + 1:])
    return commands


def test_command_line_block_parses_and_names_shipped_configs():
    commands = readme_commands()
    assert {c[0] for c in commands} >= {"train", "partition", "predict", "eval", "pipeline", "report", "bench", "models"}
    parser = build_parser()
    for words in commands:
        words = [w if w != "..." else "configs/x.yaml" for w in words]  # "--config ...": any config
        parser.parse_args(words)  # an option the README shows but the CLI lacks exits here
        for i, w in enumerate(words[:-1]):
            if w == "--config" and words[i + 1] != "configs/x.yaml":
                assert (REPO / words[i + 1]).is_file(), f"the README names {words[i + 1]}, which is not shipped"

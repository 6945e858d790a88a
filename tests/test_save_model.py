"""hydranets.save_model: a model built in Python and trained in a loop of one's own, saved so that load_model,
predict, export_model and `hydranets predict` / `export` use it as they use a run's model.safetensors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import hydranets
from hydranets import Backbone, HydraError, HydraNet
from hydranets.data.inputs import read_images
from helpers import one_error_line, run_cli, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 16
SUBSETS = [[0, 1], [2, 3, 4], [5]]


def dense():
    return hydranets.create_model("resnet_cifar", num_classes=6, depth=8, width=0.25)


def hydra():
    return hydranets.build_hydranet("resnet_cifar", 6, num_branches=3, topk=2, partition=SUBSETS, depth=8, width=0.25)


def preset():
    model = hydranets.create_model("hydra_resnet20_b4k1", num_classes=6)
    model.topk = 2  # k and subtasks set after it was built are what is saved
    model.set_partition([[0, 1], [2], [3, 4], [5]])
    return model


MAKERS = {"dense": dense, "hydra": hydra, "preset": preset}
NAMES = [f"class{i}" for i in range(6)]


def trained(make) -> torch.nn.Module:
    """A model as one's own loop leaves it: weights and batch-norm statistics no longer those it was built with."""
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for _ in range(2):
        x, y = torch.randn(8, 3, SIZE, SIZE), torch.arange(8) % 6
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def save(model, where, **kw):
    return hydranets.save_model(model, where, image_size=SIZE, class_names=NAMES, mean=[0.5, 0.4, 0.3],
                                std=0.25, **kw)


@pytest.mark.parametrize("kind", list(MAKERS))
def test_saved_model_loads_back_with_the_same_outputs(tmp_path, kind):
    model = trained(MAKERS[kind])
    path = save(model, tmp_path / "mine.safetensors")
    assert path == tmp_path / "mine.safetensors" and path.is_file()
    assert model.training  # saving leaves the model as it was
    torch.manual_seed(123)  # the loaded model starts from other random weights: equal outputs are the saved ones
    loaded = hydranets.load_model(path, "cpu")
    assert not loaded.training and type(loaded) is type(model)
    x = torch.randn(5, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    spec = loaded.input_spec
    assert (spec.classes, spec.mean, spec.std, spec.shape) == (NAMES, [0.5, 0.4, 0.3], [0.25] * 3, (SIZE, SIZE))
    if isinstance(model, HydraNet):
        assert loaded.topk == 2 and loaded.partition.subsets == model.partition.subsets
        assert torch.equal(loaded.membership, model.membership)
        with torch.no_grad():  # the same branches chosen
            assert torch.equal(loaded(x, return_gate=True).route, model(x, return_gate=True).route)
    folded = hydranets.load_model(path, "cpu", fold=True)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-4)


@pytest.mark.parametrize("kind", list(MAKERS))
def test_predict_and_export_use_the_saved_class_names_and_size(tmp_path, kind):
    model = trained(MAKERS[kind]).eval()
    loaded = hydranets.load_model(save(model, tmp_path / "run"), "cpu")  # a folder: model.safetensors inside
    images = torch.randint(0, 256, (4, 3, SIZE, SIZE), dtype=torch.uint8)
    rows = hydranets.predict(loaded, images, top=3)
    assert len(rows) == 4 and all(set(r["classes"]) <= set(NAMES) and len(r["classes"]) == 3 for r in rows)
    with torch.no_grad():  # normalised with the saved mean and std
        x = (images.float() / 255 - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / 0.25
        expected = model(x).softmax(1).topk(3, dim=1).indices
    assert [r["indices"] for r in rows] == expected.tolist()
    assert [r["classes"] for r in rows] == [[NAMES[i] for i in row] for row in expected.tolist()]
    assert ("branches" in rows[0]) == isinstance(model, HydraNet)
    out = hydranets.export_model(loaded, tmp_path / "model.pt2")  # its example input from the saved size
    program, meta = hydranets.load_exported(out)
    assert meta["inputs"]["classes"] == NAMES and meta["input_shape"] == [3, SIZE, SIZE]
    with torch.no_grad():
        assert torch.allclose(program(x), loaded(x), atol=1e-4)


def test_hydranets_predict_and_export_take_the_saved_file(tmp_path, capsys):
    model = trained(hydra)
    path = save(model, tmp_path / "mine.safetensors")
    pixels = np.random.RandomState(0).randint(0, 256, (20, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "image.png")
    code, out, err = run_cli(capsys, "predict", str(path), str(tmp_path / "image.png"), "--top", "2",
                             "--json", str(tmp_path / "p.json"))
    assert code == 0, err
    assert "image.png: class" in out and "[branch" in out
    row, = json.loads((tmp_path / "p.json").read_text())
    loaded = hydranets.load_model(path, "cpu")
    expected, = hydranets.predict(loaded, read_images([tmp_path / "image.png"], loaded.input_spec), top=2)
    assert row["classes"] == expected["classes"] and row["branches"] == expected["branches"]
    code, out, err = run_cli(capsys, "export", str(path), "--out", str(tmp_path / "m.pt2"))
    assert code == 0 and (tmp_path / "m.pt2").is_file(), err
    for command, needs in (("eval", "hydranets eval"), ("partition", "hydranets partition")):  # they need its data set
        code, _, err = run_cli(capsys, command, str(path), *(["-B", "2"] if command == "partition" else []))
        assert code == 2
        one_error_line(err, f"{path} holds a model saved with hydranets.save_model, without the data set", needs)


def test_defaults_name_classes_by_index_and_leave_pixels_in_0_to_1(tmp_path):
    model = dense()
    loaded = hydranets.load_model(hydranets.save_model(model, tmp_path / "m.safetensors", image_size=(12, SIZE)),
                                  "cpu")
    spec = loaded.input_spec
    assert spec.classes == [str(i) for i in range(6)] and spec.mean == [0.0] * 3 and spec.std == [1.0] * 3
    assert spec.shape == (12, SIZE)


def test_what_create_model_and_build_hydranet_record():
    assert dense().hydranets_info == {"name": "resnet_cifar", "kwargs": {"depth": 8, "width": 0.25},
                                      "num_classes": 6, "in_chans": 3, "hydra": None}
    info = hydra().hydranets_info  # as a run's model_info: train.build_model rebuilds it
    assert (info["name"], info["kwargs"], info["num_classes"], info["in_chans"]) == (
        "resnet_cifar", {"depth": 8, "width": 0.25}, 6, 3)
    assert info["hydra"]["num_branches"] == 3 and "shared_path" not in info["hydra"]
    assert preset().hydranets_info["name"] == "hydra_resnet20_b4k1"


def test_saving_leaves_the_random_state_alone(tmp_path):
    model = hydra()
    state = torch.get_rng_state()
    save(model, tmp_path / "m.safetensors")
    assert torch.equal(torch.get_rng_state(), state)


def refused(tmp_path, call, *words):
    before = snapshot(tmp_path)
    with pytest.raises(HydraError) as e:
        call()
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    assert snapshot(tmp_path) == before  # nothing written


def test_models_not_built_by_name_are_refused_naming_which_can_be_saved(tmp_path):
    plan = dense().plan
    where = tmp_path / "m.safetensors"
    refused(tmp_path, lambda: save(Backbone(plan, 6), where), "create_model", "build_hydranet", "Backbone")
    from_object = hydranets.build_hydranet(Backbone(plan, 6), 6, num_branches=3, topk=2)
    refused(tmp_path, lambda: save(from_object, where), "create_model", "build_hydranet", "HydraNet")
    refused(tmp_path, lambda: save(torch.nn.Sequential(dense()), where), "create_model")


def test_a_model_changed_after_it_was_built_is_refused(tmp_path):
    folded, _ = hydranets.fold_batchnorms(dense())
    refused(tmp_path, lambda: save(folded, tmp_path / "m.safetensors"), "no longer matches", "folded")
    model = dense()
    model.fc = torch.nn.Linear(model.fc.in_features, 3)
    refused(tmp_path, lambda: hydranets.save_model(model, tmp_path / "m.safetensors", image_size=SIZE),
            "fc.bias: (3,) here, (6,)")


def test_bad_input_is_one_line_before_anything_is_written(tmp_path):
    model = hydra()
    where = tmp_path / "m.safetensors"
    refused(tmp_path, lambda: hydranets.save_model(model, where, image_size=SIZE, class_names=NAMES[:5]),
            "class_names", "6 classes", "5 names")
    refused(tmp_path, lambda: hydranets.save_model(model, where, image_size=SIZE, mean=[0.5, 0.5]), "mean", "3")
    refused(tmp_path, lambda: hydranets.save_model(model, where, image_size=SIZE, std=0), "std", "above 0")
    refused(tmp_path, lambda: hydranets.save_model(model, where, image_size=0), "image_size")
    refused(tmp_path, lambda: hydranets.save_model(model, tmp_path / "m.pt", image_size=SIZE), ".safetensors")
    (tmp_path / "file").write_text("x")
    refused(tmp_path, lambda: save(model, tmp_path / "file" / "m.safetensors"), "cannot write", "is a file")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "last.pt").write_bytes(b"")
    refused(tmp_path, lambda: save(model, tmp_path / "run"), "run folder")


MINE = '''
import hydranets

@hydranets.register_model
def saved_mine(num_classes=10, in_chans=3, **kwargs):
    return hydranets.create_model("resnet_cifar", num_classes=num_classes, in_chans=in_chans, depth=8, width=0.25)
'''


def test_a_model_of_ones_own_module_loads_in_a_fresh_process(tmp_path, monkeypatch):
    """The file records the module that registers the model, so load_model imports it again; a factory defined in
    __main__ could never be imported again, so it is refused when saving, and a pipeline folder is not a place."""
    import subprocess
    import sys
    (tmp_path / "savedmine_mod.py").write_text(MINE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import savedmine_mod  # noqa: F401
    model = hydranets.create_model("saved_mine", num_classes=4)
    path = hydranets.save_model(model, tmp_path / "m.safetensors", image_size=SIZE)
    from hydranets.checkpoint import load_safetensors
    assert load_safetensors(path)["modules"] == ["savedmine_mod"]
    assert load_safetensors(hydranets.save_model(dense(), tmp_path / "d.safetensors", image_size=SIZE))["modules"] == []
    code = ("import torch, hydranets; m = hydranets.load_model('m.safetensors', 'cpu'); "
            "print(m(torch.zeros(1, 3, 16, 16)).shape)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0 and p.stdout.strip() == "torch.Size([1, 4])", p.stderr
    monkeypatch.setattr(hydranets.registry._MODELS["saved_mine"], "__module__", "__main__")
    with pytest.raises(HydraError, match="its factory is defined in __main__"):
        hydranets.save_model(model, tmp_path / "main.safetensors", image_size=SIZE)
    (tmp_path / "pipe" / "baseline").mkdir(parents=True)
    with pytest.raises(HydraError, match="is a pipeline folder"):
        hydranets.save_model(model, tmp_path / "pipe", image_size=SIZE)
    assert not (tmp_path / "main.safetensors").exists() and not (tmp_path / "pipe" / "model.safetensors").exists()


def test_a_run_of_a_model_no_longer_registered_is_one_line(tmp_path, capsys):
    path = hydranets.save_model(dense(), tmp_path / "m.safetensors", image_size=SIZE)
    from hydranets.checkpoint import load_safetensors, save_safetensors
    saved = load_safetensors(path)
    meta = {k: v for k, v in saved.items() if k != "model"}
    meta["model_info"] = {**meta["model_info"], "name": "renamed_since"}
    model = dense()
    model.load_state_dict(saved["model"])
    save_safetensors(model, path, meta)
    code, _, err = run_cli(capsys, "predict", str(path), "x.png")
    assert code == 2
    one_error_line(err, "unknown model 'renamed_since'", "model.modules")

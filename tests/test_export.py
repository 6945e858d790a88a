"""`hydranets export` and hydranets.export: a trained model as a torch.export program, conditional execution kept."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import hydranets
from hydranets.data.inputs import InputSpec
from hydranets.data.synthetic import synthetic_splits
from hydranets.errors import HydraError
from hydranets.export import METADATA_FILE, export_model, load_exported
from helpers import one_error_line, run_cli, train_pair

BASE = ["data.name=synthetic", "model.name=resnet_cifar", "model.kwargs={depth: 8, width: 0.25}",
        "data.augment=none", "optim.warmup_epochs=0", "train.epochs=1", "train.batch_size=32",
        "train.precision=fp32", "train.channels_last=false", "train.progress=false", "train.device=cpu",
        "train.threads=1"]
CLASSES = [f"class{c}" for c in range(10)]
B = 3
CHECKPOINT = "checkpoints/last.pt"  # where a run keeps its last checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def routed_hydranet(topk: int = 1, fold: bool = True, backbone: str = "resnet_cifar",
                    **kwargs) -> tuple[hydranets.HydraNet, torch.Tensor]:
    """A B=3 HydraNet (folded; with ``fold=False`` as built, its batch norms given statistics) whose gate spreads images over every branch (an untrained gate
    sends all to one: its last layer is set to random directions around the pooled features' mean), and 64 random
    16x16 images."""
    torch.manual_seed(0)
    kwargs = kwargs or {"depth": 8, "width": 0.5}
    model = hydranets.build_hydranet(backbone, 10, num_branches=B, topk=topk, **kwargs).eval()
    x = torch.randn(64, 3, 16, 16)
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) and not fold):  # not 0 and 1
            bn.running_mean.normal_(0, 0.1), bn.running_var.uniform_(0.5, 1.5)
            bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(0, 0.1)
        feats = model.gate[:-1](model.stem(x))
        head = model.gate[-1]
        head.weight.copy_(torch.randn_like(head.weight))
        head.bias.copy_(-(head.weight @ feats.mean(0)))
    if not fold:
        return model, x
    folded, pairs = hydranets.fold_batchnorms(model)
    assert pairs > 0
    return folded, x


def eager(model: torch.nn.Module, x: torch.Tensor, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(x, **kw)


def routes(model: hydranets.HydraNet, x: torch.Tensor, topk: int | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(x, topk=topk, return_gate=True).route


@pytest.fixture(scope="module")
def hydra(tmp_path_factory):
    """The routed HydraNet, its images, and its export at k=1 (traced on one image routed to branch 0)."""
    torch.manual_seed(0)
    model, x = routed_hydranet()
    first = x[routes(model, x)[:, 0] == 0][:1]
    path = export_model(model, tmp_path_factory.mktemp("export") / "hydra.pt2", first)
    program, meta = load_exported(path)
    return {"model": model, "x": x, "path": path, "program": program, "meta": meta}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A trained baseline and a HydraNet (3 branches, top-1), one epoch each."""
    return train_pair(tmp_path_factory.mktemp("export-runs"), BASE, [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]], CLASSES)


# ---------------------------------------------------------------- the exported program
@pytest.mark.parametrize("n", [1, 3, 17])
def test_exported_hydranet_gives_the_eager_logits_at_any_batch_size(hydra, n):
    x = hydra["x"][10:10 + n]
    if n > 1:  # the images go to more than one branch: the grouping is exercised
        assert len(set(routes(hydra["model"], x)[:, 0].tolist())) > 1
    assert same(eager(hydra["program"], x), eager(hydra["model"], x))


def test_routing_is_not_baked_in(hydra):
    """Traced with every image on branch 0, the program follows each batch's own routing: all on another branch,
    some branches empty, one image per branch, every branch at once."""
    model, program, x = hydra["model"], hydra["program"], hydra["x"]
    route = routes(model, x)[:, 0]
    on = {b: x[route == b] for b in range(B)}
    assert all(len(on[b]) >= 4 for b in range(B)), route.bincount()
    batches = [on[2][:5], on[1][:4], torch.cat([on[1][:3], on[2][:3]]), on[2][:1], on[1][:1], x]
    for batch in batches:
        assert same(eager(program, batch), eager(model, batch))
        # the test can fail: the trace's route (branch 0 for every image) gives other logits for these images
        if not (routes(model, batch) == 0).all():
            baked = eager(model, batch, route=torch.zeros(len(batch), 1, dtype=torch.long))
            assert not torch.allclose(baked, eager(model, batch), atol=1e-3)


def test_each_branch_runs_on_its_own_images_only(hydra):
    """In the graph, the stem and the gate see the whole batch; each branch's convolutions see a number of images
    known only at run time (the rows nonzero found for that branch), not the batch."""
    program = torch.export.load(hydra["path"])
    convs = [n for n in program.graph.nodes if n.op == "call_function" and "conv" in str(n.target)]
    batch = {str(n.meta["val"].shape[0]) for n in convs if "branches" not in n.args[1].name}
    assert len(batch) == 1 and batch.pop().startswith("s")  # the dynamic batch size
    per_branch = {}
    for n in convs:
        if "branches" in n.args[1].name:
            b = int(n.args[1].name.split("branches_")[1].split("_")[0])
            per_branch.setdefault(b, set()).add(str(n.meta["val"].shape[0]))
    assert sorted(per_branch) == list(range(B))
    sizes = [s.pop() for s in per_branch.values() if len(s) == 1]
    assert len(sizes) == B and len(set(sizes)) == B and all(s.startswith("u") for s in sizes)  # unbacked, one each
    assert sum("nonzero" in str(n.target) for n in program.graph.nodes) == B


def test_hydranet_exported_at_another_k(tmp_path):
    model, x = routed_hydranet(topk=1)
    model.train()  # exported as in evaluation (top-k), and left in the mode it was in
    path = export_model(model, tmp_path / "k2.pt2", x[:4], topk=2)
    assert model.training and model.topk == 1
    model.eval()
    program, meta = load_exported(path)
    assert meta["topk"] == 2 and meta["num_branches"] == B
    route = routes(model, x, topk=2)
    assert (route[:, 0] != route[:, 1]).all() and len(set(route.reshape(-1).tolist())) == B
    for n in (1, 5, 64):
        assert same(eager(program, x[:n]), eager(model, x[:n], topk=2))
    assert not torch.allclose(eager(program, x), eager(model, x, topk=1), atol=1e-3)


@pytest.mark.parametrize("backbone, kwargs", [("resnet_cifar", {"depth": 8, "width": 0.5}),
                                             ("densenet_bc", {"depth": 10, "growth": 4})])
def test_batch_norms_not_folded_export_too(tmp_path, backbone, kwargs):
    """Batch norms left in the branches (a model not folded, or DenseNet's, which no convolution precedes) export
    as a scale and shift; torch.export refuses batch_norm on a branch's data-dependent number of images."""
    model, x = routed_hydranet(fold=False, backbone=backbone, **kwargs)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.branches.modules())
    program, _ = load_exported(export_model(model, tmp_path / "m.pt2", x[:1]))
    assert len(set(routes(model, x)[:, 0].tolist())) == B
    for batch in (x, x[:1], x[routes(model, x)[:, 0] != 0]):  # every branch; one image; branch 0 with none
        assert same(eager(program, batch), eager(model, batch))
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.branches.modules())  # the model itself untouched


def test_dense_model(tmp_path):
    torch.manual_seed(0)
    model, _ = hydranets.fold_batchnorms(hydranets.create_model("resnet_cifar", num_classes=10, depth=8, width=0.5))
    x = torch.randn(17, 3, 16, 16)
    program, meta = load_exported(export_model(model, tmp_path / "dense.pt2", x[:1]))
    for n in (1, 3, 17):
        assert same(eager(program, x[:n]), eager(model, x[:n]))
    assert meta["kind"] == "dense" and meta["topk"] is None and meta["num_branches"] is None
    assert meta["num_classes"] == 10 and meta["input_shape"] == [3, 16, 16]


@pytest.mark.parametrize("height", [None, 12])
def test_metadata_round_trip(tmp_path, height):
    model, _ = routed_hydranet()
    spec = InputSpec(CLASSES, [0.4, 0.5, 0.6], [0.2, 0.25, 0.3], 18, 16, height)
    model.input_spec = spec  # as hydranets.load_model sets it: export then needs no example
    path = export_model(model, tmp_path / "m.pt2")
    _, meta = load_exported(path)
    assert InputSpec.from_dict(meta["inputs"]) == spec and meta["inputs"]["classes"] == CLASSES
    assert meta["input_shape"] == [3, *spec.shape] and meta["dtype"] == "float32"
    assert (meta["kind"], meta["topk"], meta["num_branches"], meta["num_classes"]) == ("hydranet", 1, B, 10)
    assert meta["torch"] == torch.__version__ and meta["format"] == 1
    extra = {METADATA_FILE: ""}  # the same JSON, read with torch alone
    program = torch.export.load(path, extra_files=extra).module()
    assert json.loads(extra[METADATA_FILE]) == meta
    x = torch.randn(2, 3, *spec.shape)
    assert same(eager(program, x), eager(model, x))


@pytest.mark.slow
def test_the_file_runs_with_torch_alone(hydra, tmp_path):
    x = hydra["x"][:9]
    torch.save({"x": x, "logits": eager(hydra["model"], x)}, tmp_path / "io.pt")
    code = (f"import sys, torch; p = torch.export.load({str(hydra['path'])!r}).module(); "
            f"d = torch.load({str(tmp_path / 'io.pt')!r}); y = p(d['x']); "
            "assert torch.allclose(y, d['logits'], rtol=1e-5, atol=1e-5), (y - d['logits']).abs().max(); "
            "assert not [m for m in sys.modules if m.startswith('hydranets')]; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_eager_dispatch_is_untouched_outside_export(hydra, monkeypatch):
    """The tensor-only path is taken while exporting only: eager forward passes keep the grouping dispatch."""
    from hydranets import routing
    calls = []
    monkeypatch.setattr(routing, "dispatch_traceable", lambda *a: calls.append(a) or pytest.fail("taken in eager"))
    eager(hydra["model"], hydra["x"][:5])
    eager(hydra["model"], hydra["x"][:1])
    assert not calls


def test_dispatch_traceable_equals_dispatch_in_eager():
    """The export path computes what dispatch does, weights and empty branches included, run here without export."""
    from hydranets.routing import dispatch, dispatch_traceable
    torch.manual_seed(0)
    branches = [torch.nn.Linear(4, 6) for _ in range(4)]
    x = torch.randn(7, 4)
    for route in (torch.tensor([[0, 2], [2, 0], [0, 1], [2, 1], [0, 2], [1, 0], [2, 0]]),  # branch 3: no images
                  torch.full((7, 1), 3), torch.tensor([[1]])):
        n, k = route.shape
        weight = torch.rand(n, k)
        with torch.no_grad():
            expected = dispatch(x[:n], branches, route, weight, 6)
            assert same(dispatch_traceable(x[:n], branches, route, weight, 6), expected)


# ---------------------------------------------------------------- errors of the Python API
def test_export_model_bad_input(tmp_path):
    model, x = routed_hydranet()
    dense = hydranets.create_model("resnet_cifar", num_classes=10, depth=8, width=0.5).eval()
    for kw, words in (({"topk": 0}, "topk must be an integer from 1"), ({"topk": B + 1}, "topk must be"),
                      ({"topk": True}, "topk must be")):
        with pytest.raises(HydraError, match=words):
            export_model(model, tmp_path / "a.pt2", x[:2], **kw)
    with pytest.raises(HydraError, match="topk is for HydraNets"):
        export_model(dense, tmp_path / "a.pt2", x[:2], topk=1)
    with pytest.raises(HydraError, match="needs an example input"):
        export_model(dense, tmp_path / "a.pt2")
    with pytest.raises(HydraError, match="is a folder"):
        export_model(dense, tmp_path, x[:2])
    for bad in (x[0], x[:2].long(), x[:0]):
        with pytest.raises(HydraError, match="example must be"):
            export_model(dense, tmp_path / "a.pt2", bad)
    assert not (tmp_path / "a.pt2").exists()


def test_load_exported_bad_input(tmp_path):
    with pytest.raises(HydraError, match="does not exist"):
        load_exported(tmp_path / "none.pt2")
    (tmp_path / "text.pt2").write_text("not a program")
    with pytest.raises(HydraError, match="not a readable torch.export program"):
        load_exported(tmp_path / "text.pt2")
    plain = torch.export.export(torch.nn.Linear(2, 2), (torch.randn(3, 2),))
    torch.export.save(plain, tmp_path / "plain.pt2")
    with pytest.raises(HydraError, match="without hydranets metadata"):
        load_exported(tmp_path / "plain.pt2")


# ---------------------------------------------------------------- the command line
def test_cli_export_of_a_trained_run(runs, capsys, tmp_path):
    run = runs["hydranet"]
    code, out, err = run_cli(capsys, "export", str(run))
    assert code == 0, err
    path = run / "model.pt2"
    assert path.is_file() and out.startswith(f"wrote {path} (") and f"{path.stat().st_size:,} bytes" in out
    assert "HydraNet, B=3, k=1" in out
    program, meta = load_exported(path)
    ckpt = torch.load(run / CHECKPOINT, weights_only=True)
    assert meta["inputs"] == ckpt["inputs"] and meta["topk"] == 1 and meta["num_branches"] == 3
    spec = InputSpec.from_dict(meta["inputs"])
    images = synthetic_splits(10)[1].images[:17]
    x = (images.float() / 255 - torch.tensor(spec.mean)[:, None, None]) / torch.tensor(spec.std)[:, None, None]
    model = hydranets.load_model(run, "cpu", fold=True)
    for n in (1, 17):
        assert same(eager(program, x[:n]), eager(model, x[:n]))
    unfolded = hydranets.load_model(run, "cpu")  # batch norms folded: the same function as the model as trained
    assert torch.allclose(eager(program, x), eager(unfolded, x), atol=1e-4)

    # from its checkpoint file, at another k, to a file of one's choosing
    code, out, err = run_cli(capsys, "export", str(run / CHECKPOINT), "--topk", "2", "--out", str(tmp_path / "k2.pt2"))
    assert code == 0 and "HydraNet, B=3, k=2" in out, err
    program, meta = load_exported(tmp_path / "k2.pt2")
    assert meta["topk"] == 2 and same(eager(program, x), eager(model, x, topk=2))


def test_cli_export_of_a_dense_run_from_its_safetensors(runs, capsys):
    run = runs["baseline"]
    code, out, err = run_cli(capsys, "export", str(run / "model.safetensors"))
    assert code == 0, err
    program, meta = load_exported(run / "model.pt2")  # beside the file named: in the run folder
    assert meta["kind"] == "dense" and "): dense, batch norms folded" in out
    x = torch.randn(5, 3, 16, 16)
    assert same(eager(program, x), eager(hydranets.load_model(run, "cpu", fold=True), x))


def test_cli_export_bad_input(runs, capsys, tmp_path):
    run = runs["hydranet"]
    out = tmp_path / "m.pt2"
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    for argv, words in ((["--out", str(out), "--topk", "0"], ["topk must be an integer from 1", "(3)"]),
                        (["--out", str(out), "--topk", "4"], ["topk must be"]),
                        (["--out", str(tmp_path)], ["is a folder", "model.pt2"]),
                        (["--out", str(out), "--device", "gpu0"], ["'gpu0' is not a device name"])) + (
                        () if torch.cuda.is_available() else
                        ((["--out", str(out), "--device", "cuda"], ["no CUDA device is available"]),)):
        code, stdout, err = run_cli(capsys, "export", str(run), *argv)
        assert code == 2 and stdout == ""
        one_error_line(err, *words)
    for target, words in ((tmp_path / "empty", ["does not exist"]), (tmp_path / "notes.txt", ["not a readable"]),
                          (runs["baseline"], ["dense model", "--topk is for HydraNets"])):
        (tmp_path / "empty").mkdir(exist_ok=True)
        code, stdout, err = run_cli(capsys, "export", str(target), "--out", str(out), "--topk", "1")
        assert code == 2 and stdout == ""
        one_error_line(err, *words)
    assert not out.exists() and not (tmp_path / "empty" / "model.pt2").exists()

    out.write_bytes(b"keep")  # an existing file is replaced only with --overwrite
    code, _, err = run_cli(capsys, "export", str(run), "--out", str(out))
    assert code == 2 and out.read_bytes() == b"keep"
    one_error_line(err, "exists", "--overwrite")
    code, _, err = run_cli(capsys, "export", str(run), "--out", str(out), "--overwrite")
    assert code == 0, err
    assert load_exported(out)[1]["topk"] == 1

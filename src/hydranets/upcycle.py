"""Sparse upcycling: a HydraNet started from a trained network, so it begins as that network and specialises.

A dense baseline gives the stem its stages and, where the widths match, every branch and the gate its later stages and
the classifier its own (``hydra.init_from`` with ``hydra.upcycle``); a HydraNet with fewer branches is copied whole,
each new branch a copy of one of its branches.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .checkpoint import load_checkpoint, resolve_checkpoint
from .errors import HydraError
from .hydranet import HydraNet


def init_stem_from(model: HydraNet, path: str, upcycle: bool | None = False) -> list[str]:
    """Copy a trained baseline's stages into the HydraNet's stem (same backbone and stem width).

    With ``upcycle`` the parts after the stem whose widths equal the baseline's also start from its
    later stages: every branch at ``branch_width`` 1.0 (its projection the identity), the gate's trunk
    at ``gate_width`` 1.0 (with ``shared_path``, its projection the identity and fresh branches'
    projections zero). The classifier becomes the baseline's, so the network starts as the trained one
    and specialises from there. ``None`` upcycles where the widths allow. Returns the parts upcycled.
    A HydraNet checkpoint (fewer branches, same shape) is copied whole (``upcycle`` True or None):
    see :func:`upcycle_branches`.
    """
    file = resolve_checkpoint(path)
    if not file.exists():
        raise HydraError(f"hydra.init_from={path}: {file} does not exist; train that run first or fix the path")
    ckpt = load_checkpoint(file)
    theirs = ckpt["model"]
    if any(k.startswith("branches.") for k in theirs):
        if upcycle is False:
            raise HydraError(f"hydra.init_from {path} is a HydraNet, which is copied whole, but hydra.upcycle=false "
                             "asks for its stem only; drop hydra.upcycle=false, or start from a baseline")
        return upcycle_branches(model, theirs, path)
    stages = {k[len("stages."):]: v for k, v in theirs.items() if k.startswith("stages.")}
    problem = _misfit(model.stem, stages)
    if problem:
        raise HydraError(f"hydra.init_from {path}: its stages do not fit the HydraNet's stem ({problem}); "
                         "use a baseline of the same backbone and hydra.stem_width=1.0")
    model.stem.load_state_dict({k: stages[k] for k in model.stem.state_dict()})
    if upcycle is False:
        return []
    split, tail = len(model.stem), len(model.branches[0]) - 4
    mapped = {}
    for key, value in theirs.items():
        head, _, rest = key.partition(".")
        if head == "stages" and int(rest.split(".")[0]) >= split:
            index, _, rest = rest.partition(".")
            mapped[f"{int(index) - split}.{rest}"] = value
        elif head == "final":
            mapped[f"{tail}.{rest}"] = value
    skip = f"{tail + 3}."
    same_classifier = tuple(theirs["fc.weight"].shape) == tuple(model.classifier.weight.shape)
    classifier_problem = None if same_classifier else (
        f"the baseline's classifier {tuple(theirs['fc.weight'].shape)} to fit this HydraNet's "
        f"{tuple(model.classifier.weight.shape)}")
    proj = model.branches[0][-1]
    branch_problem = _misfit(model.branches[0], mapped, skip)
    if branch_problem is None and proj.in_features != proj.out_features:
        branch_problem = f"hydra.feature_dim equal to the branch width ({proj.in_features}), got {proj.out_features}"
    branch_problem = branch_problem or classifier_problem
    shared = model.shared
    gate_problem = _misfit(model.gate, mapped, skip)
    if gate_problem is None and shared is not None and (shared.in_features != shared.out_features or not same_classifier):
        gate_problem = classifier_problem or f"hydra.feature_dim equal to the gate width ({shared.in_features})"
    if branch_problem is not None and gate_problem is not None:
        if upcycle is None:
            return []
        raise HydraError(f"hydra.upcycle from {path} needs {branch_problem}; use hydra.branch_width=1.0 (or "
                         "hydra.gate_width=1.0) with a baseline of the same backbone, or hydra.upcycle=false")
    parts, feeds_classifier = [], False
    with torch.no_grad():
        if branch_problem is None:
            for branch in model.branches:
                _load_tail(branch, mapped, skip)
                _set_linear(branch[-1], torch.eye(proj.in_features))
            parts, feeds_classifier = ["branches"], True
        if gate_problem is None:
            _load_tail(model.gate, mapped, skip)
            parts.append("gate")
            if shared is not None:
                _set_linear(shared, torch.eye(shared.in_features))
                feeds_classifier = True
                if branch_problem is not None:  # fresh branches add nothing yet: the network starts as its source
                    for branch in model.branches:
                        _set_linear(branch[-1], torch.zeros_like(branch[-1].weight))
        if feeds_classifier:
            model.classifier.load_state_dict({"weight": theirs["fc.weight"], "bias": theirs["fc.bias"]})
    return parts


def upcycle_branches(model: HydraNet, theirs: dict, path: str) -> list[str]:
    """Start a HydraNet as a trained one of the same shape with fewer branches (sparse upcycling).

    Branch ``b`` and the gate's score for it copy the source's branch ``b mod B_source``; every other
    part is copied as is. The new network computes what its source did (each image's chosen branch is
    a copy of the branch it ran there) and specialises its copies from that point on: e.g. a
    one-branch network trained half the schedule, then forked into B branches for the rest.
    """
    src_b = 1 + max(int(k.split(".")[1]) for k in theirs if k.startswith("branches."))
    if model.num_branches < src_b:
        raise HydraError(f"hydra.init_from {path}: a HydraNet with {src_b} branches cannot start one with fewer "
                         f"({model.num_branches}); use hydra.num_branches >= {src_b}")
    head = f"gate.{len(model.gate) - 1}."
    rows = torch.arange(model.num_branches) % src_b
    mapped = {}
    for key in model.state_dict():
        if key == "membership":
            continue
        if key.startswith("branches."):
            _, index, rest = key.split(".", 2)
            mapped[key] = theirs.get(f"branches.{int(index) % src_b}.{rest}")
        elif key.startswith(head) and key in theirs:
            mapped[key] = theirs[key][rows]
        else:
            mapped[key] = theirs.get(key)
    problem = _misfit(model, mapped, "membership", "the source")
    unused = [k for k in theirs if k != "membership" and k not in mapped and not k.startswith("branches.")]
    problem = problem or (f"the source's tensor {unused[0]} has no place in this one" if unused else None)
    if problem:
        raise HydraError(f"hydra.init_from {path}: that HydraNet does not fit this one ({problem}); "
                         "use one of the same backbone, widths and hydra.shared_path")
    model.load_state_dict(mapped, strict=False)
    return ["stem", "branches", "gate", "classifier"]


def _load_tail(module: nn.Module, mapped: dict, skip: str) -> None:
    """Load the baseline's later stages (``mapped``) into a branch or the gate, all but its head."""
    module.load_state_dict({k: mapped[k] for k in module.state_dict() if not k.startswith(skip)}, strict=False)


def _set_linear(layer: nn.Linear, weight: torch.Tensor) -> None:
    layer.weight.copy_(weight)
    layer.bias.zero_()


def _misfit(module: nn.Module, source: dict, skip: str | None = None, theirs: str = "the baseline") -> str | None:
    """The first of ``module``'s tensors that ``source`` lacks or has in another shape, described."""
    for k, v in module.state_dict().items():
        if (skip is None or not k.startswith(skip)) and (source.get(k) is None or source[k].shape != v.shape):
            return f"its tensor {k} {tuple(v.shape)} ({theirs} has " + \
                (f"{tuple(source[k].shape)})" if source.get(k) is not None else "none)")
    return None


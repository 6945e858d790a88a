"""The HydraNet template: stem -> gate picks top-k of B branches -> those branches -> combiner -> classifier.

The combiner is ``BatchNorm(sum over chosen b of s_b * proj_b(branch_b(stem(x))))`` with ``s`` the
sigmoid (or softmax) of the gate's scores; the normalisation keeps the classifier's input at one
scale whichever branches ran, which makes HydraNets train several times faster than without it.
With ``shared_path`` the gate's pooled features, projected, are added to that sum for every image (a
path all images share, like a shared expert), so an image sent to the wrong branch keeps general features.

One template for every backbone family: it splits any :class:`~hydranets.models.Backbone` at a stage
and rebuilds the stages after the split as B narrower branches and one narrow gate.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn as nn

from .errors import HydraError, is_positive_real, is_whole
from .models.backbone import Backbone, build_final, build_stages, check_input, init_weights
from .partition import Partition, as_partition
from .registry import create_model, register_model
from .routing import dispatch, run_all, topk_route

ROUTINGS = ("soft", "topk")


class HydraOutput(NamedTuple):
    logits: torch.Tensor
    gate_logits: torch.Tensor
    route: torch.Tensor | None


def _head(stages: list[nn.Module], final: nn.Module, channels: int, out: int) -> nn.Sequential:
    return nn.Sequential(*stages, final, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, out))


class HydraNet(nn.Module):
    """A wide network of B class-specialised branches of which only ``topk`` run per image.

    ``forward(x)`` returns class logits. Routing is ``"soft"`` (every branch, weighted by the gate;
    the default in ``train()``) or ``"topk"`` (only each image's top-k branches run; the default in
    ``eval()``). ``route`` (N, k) sets the branches per image; ``force`` (N, B) 0/1 puts the marked
    branches first in each image's top-k (e.g. the true subtask while training).
    """

    def __init__(self, stem: nn.Module, branches: Sequence[nn.Module], gate: nn.Module, classifier: nn.Linear,
                 topk: int, in_chans: int = 3, partition: Partition | None = None,
                 gate_weighting: str = "sigmoid", train_routing: str = "soft", shared_path: bool = False) -> None:
        super().__init__()
        self.stem = stem
        self.branches = nn.ModuleList(branches)
        self.gate = gate
        self.shared = nn.Linear(gate[-1].in_features, classifier.in_features) if shared_path else None
        self.norm = nn.BatchNorm1d(classifier.in_features)
        self.classifier = classifier
        self.in_chans = in_chans
        self.num_features = classifier.in_features
        self.tied_norms: bool | None = None  # set by tie_branches: branches share weights (and norms if True)
        self.num_classes = classifier.out_features
        if gate_weighting not in ("sigmoid", "softmax", "none"):
            raise HydraError(f"gate_weighting must be 'sigmoid', 'softmax' or 'none', got {gate_weighting!r}")
        self.gate_weighting = gate_weighting
        self.train_routing = _check_routing(train_routing)
        self.topk = topk
        self.partition = partition
        membership = partition.membership() if partition is not None else torch.zeros(0, len(branches))
        self.register_buffer("membership", membership)

    def tie_branches(self, norms: bool = False) -> None:
        """Make every branch use the first branch's weights (and normalisation layers with ``norms``)."""
        tie_branch_weights(self.branches, norms=norms)
        self.tied_norms = norms

    def _apply(self, fn, recurse: bool = True):
        # Module._apply replaces buffers (and, under some torch settings, parameters) with converted copies,
        # which would untie the branches on a move to another device or dtype.
        super()._apply(fn, recurse)
        if self.tied_norms is not None:
            tie_branch_weights(self.branches, norms=self.tied_norms)
        return self

    @property
    def num_branches(self) -> int:
        return len(self.branches)

    @property
    def topk(self) -> int:
        return self._topk

    @topk.setter
    def topk(self, k: int) -> None:
        self._topk = _check_topk(k, self.num_branches)

    def set_partition(self, partition: Partition | Sequence[Sequence[int]]) -> None:
        """Attach the subtasks (the gate's targets); B must equal the number of subsets."""
        p = as_partition(partition, self.num_classes)
        if p.num_subsets != self.num_branches:
            raise HydraError(f"partition has {p.num_subsets} subsets but the model has {self.num_branches} branches")
        self.partition = p
        self.membership = p.membership().to(self.membership.device)

    def gate_targets(self, labels: torch.Tensor) -> torch.Tensor:
        """(N, B) 0/1 subtask membership of each label: the gate's training target."""
        if self.membership.numel() == 0:
            raise HydraError("this HydraNet has no partition; build it with partition=... or call set_partition")
        return self.membership[labels]

    def _weights(self, gate_logits: torch.Tensor, route: torch.Tensor | None) -> torch.Tensor:
        scores = gate_logits if route is None else gate_logits.gather(1, route)
        if self.gate_weighting == "none":  # unscaled outputs: the gate learns from its own losses only
            return torch.ones_like(scores)
        return scores.sigmoid() if self.gate_weighting == "sigmoid" else scores.softmax(1)

    def forward(self, x: torch.Tensor, routing: str | None = None, topk: int | None = None,
                route: torch.Tensor | None = None, force: torch.Tensor | None = None,
                return_gate: bool = False) -> torch.Tensor | HydraOutput:
        check_input(x, self.in_chans)
        feats = self.stem(x)
        gate_feats = self.gate[:-1](feats)
        gate_logits = self.gate[-1](gate_feats)
        routing = _check_routing(routing or (self.train_routing if self.training else "topk"))
        if topk is not None:
            _check_topk(topk, self.num_branches)
            if route is not None or routing != "topk":
                why = "with a route given" if route is not None else "under soft routing (the default in training mode)"
                raise HydraError(f"topk={topk} has no effect {why}; leave it out, or pass routing='topk' (or call "
                                 ".eval()) to run top-k")
        if route is not None:
            route = _check_route(route, x.shape[0], self.num_branches).to(x.device, torch.long)
        if route is None and routing == "topk":
            k = self.topk if topk is None else topk
            scores = gate_logits.detach().float()
            if force is not None:
                if force.shape != gate_logits.shape:
                    raise HydraError(f"force must be (N, B) = {tuple(gate_logits.shape)} (1 for each branch to put "
                                     f"first), got {tuple(force.shape)}")
                scores = scores + 1e4 * force.to(scores.device, scores.dtype)
            route = topk_route(scores, k)
        if route is None:
            combined = run_all(feats, self.branches, self._weights(gate_logits, None))
        else:
            combined = dispatch(feats, self.branches, route, self._weights(gate_logits, route), self.num_features)
        if self.shared is not None:
            combined = combined + self.shared(gate_feats).to(combined.dtype)
        logits = self.classifier(self.norm(combined))
        return HydraOutput(logits, gate_logits, route) if return_gate else logits


def _check_route(route: torch.Tensor, n: int, num_branches: int) -> torch.Tensor:
    """A caller's route: (N, k) distinct branch indices per image, as top-k would give (any integer dtype)."""
    if route.dim() != 2 or route.shape[0] != n or not 1 <= route.shape[1] <= num_branches or route.is_floating_point():
        raise HydraError(f"route must be an integer tensor of shape (N={n}, k) with 1 <= k <= {num_branches}, "
                         f"got {tuple(route.shape)} {route.dtype}")
    if n and (route.min() < 0 or route.max() >= num_branches):
        raise HydraError(f"route holds branch indices outside 0..{num_branches - 1}")
    if route.shape[1] > 1 and (route.sort(1).values.diff(dim=1) == 0).any():
        raise HydraError("route names a branch twice for one image; each image's k branches must differ")
    return route


def _check_topk(k: int, num_branches: int) -> int:
    if not is_whole(k) or k > num_branches:
        raise HydraError(f"topk must be an integer from 1 to the number of branches ({num_branches}), got {k!r}")
    return k


def _check_routing(routing: str) -> str:
    if routing not in ROUTINGS:
        raise HydraError(f"routing must be one of {', '.join(ROUTINGS)}, got {routing!r}")
    return routing


def build_hydranet(backbone: str | Backbone, num_classes: int, num_branches: int = 8, topk: int = 2,
                   split: int | None = None, stem_width: float = 1.0, branch_width: float = 0.5,
                   gate_width: float = 0.25, feature_dim: int | None = None,
                   partition: Partition | Sequence[Sequence[int]] | None = None,
                   gate_weighting: str = "sigmoid", train_routing: str = "soft", shared_path: bool = False,
                   share_branch_weights: bool = False, share_branch_norms: bool = False,
                   **backbone_kwargs) -> HydraNet:
    """Turn a registered backbone into a HydraNet.

    The stem is the backbone's stages before ``split`` (default: before the last stage) at
    ``stem_width``; each of the ``num_branches`` branches is a copy of the stages from ``split`` on at
    ``branch_width``, pooled and projected to ``feature_dim`` (default: the backbone's feature width);
    the gate is a copy of those stages at ``gate_width`` with one score per branch. Widths are
    multipliers of the backbone's own (including its ``width`` setting). ``shared_path`` also feeds the
    gate's features to the combiner (its projection starts at zero, so a network with upcycled branches starts as
    its source; ``upcycle.init_stem_from`` makes it the identity when it upcycles the gate instead).
    ``share_branch_weights`` ties every branch's weights to the first branch's except its normalisation
    layers: each convolution then learns from every image, and a branch is specialised only by the
    statistics and affine of its own normalisation (the same MACs per image; about one branch's parameters).
    ``share_branch_norms`` ties those too, statistics included: every branch is then the same network, and
    what is left of routing is that each branch's images are normalised as a group in training and
    scaled by their gate scores (a control for what routing itself costs).
    Every Conv/BatchNorm/Linear is then initialised as in a Backbone, the plan's own ``init_weights(model)`` last
    where it defines one.
    """
    backbone_name = backbone if isinstance(backbone, str) else None
    if isinstance(backbone, str):
        backbone = create_model(backbone, num_classes=num_classes, **backbone_kwargs)
    elif backbone_kwargs:
        raise HydraError(f"the backbone settings {', '.join(sorted(backbone_kwargs))} apply only to a backbone "
                         "given by name; this one is already built")
    if not isinstance(backbone, Backbone):
        raise HydraError(f"build_hydranet needs a staged Backbone, got {type(backbone).__name__}")
    if not is_whole(num_branches):
        raise HydraError(f"num_branches must be a positive integer, got {num_branches!r}")
    if num_branches > num_classes:
        raise HydraError(f"num_branches ({num_branches}) exceeds the number of classes ({num_classes}); "
                         "each branch needs at least one class")
    _check_topk(topk, num_branches)
    if share_branch_norms and not share_branch_weights:
        raise HydraError("share_branch_norms ties the branches' normalisation layers on top of their weights; "
                         "set share_branch_weights too")
    plan, n = backbone.plan, backbone.plan.num_stages
    if n < 2:
        raise HydraError(f"a HydraNet needs a backbone of at least 2 stages (a stem and what its branches copy); "
                         f"{type(plan).__name__} has {n}")
    split = n - 1 if split is None else split
    if not is_whole(split) or split >= n:
        raise HydraError(f"split must be a stage index from 1 to {n - 1} for this backbone, got {split}")
    for name, w in (("stem_width", stem_width), ("branch_width", branch_width), ("gate_width", gate_width)):
        if not is_positive_real(w):
            raise HydraError(f"{name} must be a positive number, got {w!r}")
    feature_dim = backbone.num_features if feature_dim is None else feature_dim
    if not is_whole(feature_dim):
        raise HydraError(f"feature_dim must be a positive integer (or None for the backbone's), got {feature_dim!r}")
    p = as_partition(partition, num_classes) if partition is not None else None
    if p is not None and p.num_subsets != num_branches:
        raise HydraError(f"partition has {p.num_subsets} subsets but num_branches is {num_branches}")

    w = backbone.width
    stem_stages, stem_ch = build_stages(plan, 0, split, plan.in_chans, w * stem_width)
    branches = []
    for _ in range(num_branches):
        stages, ch = build_stages(plan, split, n, stem_ch, w * branch_width)
        branches.append(_head(stages, build_final(plan, ch), ch, feature_dim))
    gate_stages, gate_ch = build_stages(plan, split, n, stem_ch, w * gate_width)
    gate = _head(gate_stages, build_final(plan, gate_ch), gate_ch, num_branches)
    model = HydraNet(nn.Sequential(*stem_stages), branches, gate, nn.Linear(feature_dim, num_classes), topk,
                     plan.in_chans, p, gate_weighting, train_routing, shared_path)
    init_weights(model, plan)
    for head in [b[-1] for b in model.branches] + [model.gate[-1]]:  # default init: a small one stalls learning
        head.reset_parameters()
    if model.shared is not None:
        nn.init.zeros_(model.shared.weight)
        nn.init.zeros_(model.shared.bias)
    if share_branch_weights:
        model.tie_branches(norms=share_branch_norms)
    if backbone_name is not None:  # how it was made (as a run's model_info), so that hydranets.save_model can record it
        hydra = {"num_branches": num_branches, "split": split, "stem_width": stem_width, "branch_width": branch_width,
                 "gate_width": gate_width, "feature_dim": feature_dim, "gate_weighting": gate_weighting}
        for key, on in (("shared_path", shared_path), ("share_branch_weights", share_branch_weights),
                        ("share_branch_norms", share_branch_norms)):
            if on:
                hydra[key] = True
        model.hydranets_info = {"name": backbone_name, "kwargs": dict(backbone_kwargs), "num_classes": num_classes,
                                "in_chans": plan.in_chans, "hydra": hydra}
    return model


_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


class GhostBatchNorm2d(nn.BatchNorm2d):
    """Batch norm that in training normalises each run of ``group`` images by its own statistics (ghost
    batch normalisation), updating its running statistics once per group; in evaluation it is plain
    batch norm, with the same state."""

    def __init__(self, num_features: int, group: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.size(0) <= self.group:
            return super().forward(x)
        return torch.cat([super(GhostBatchNorm2d, self).forward(c) for c in x.split(self.group)])


def ghost_branch_norms(branches: Sequence[nn.Module], group: int) -> int:
    """Make the branches' 2-d batch norms normalise training images in groups of at most ``group``: a
    one-branch network then sees the small groups that top-1 of B branches hands each branch (about
    batch/B images). The new layers hold the old ones' tensors, so tied branches stay tied. Returns
    how many layers changed."""
    if not (isinstance(group, int) and not isinstance(group, bool) and group >= 2):
        raise HydraError(f"the normalisation group must be an integer >= 2 (images per group), got {group!r}")
    changed = 0
    for branch in branches:
        for parent in list(branch.modules()):
            for name, bn in list(parent.named_children()):
                if type(bn) is not nn.BatchNorm2d:
                    continue
                ghost = GhostBatchNorm2d(bn.num_features, group, eps=bn.eps, momentum=bn.momentum,
                                         affine=bn.affine, track_running_stats=bn.track_running_stats)
                for tname, _ in list(bn.named_parameters(recurse=False)) + list(bn.named_buffers(recurse=False)):
                    setattr(ghost, tname, getattr(bn, tname))
                ghost.train(bn.training)
                setattr(parent, name, ghost)
                changed += 1
    return changed


def tie_branch_weights(branches: Sequence[nn.Module], norms: bool = False) -> None:
    """Make every branch use the first branch's parameters, those of its normalisation layers (and their
    statistics) only with ``norms``."""
    first = dict(branches[0].named_modules())
    for branch in branches[1:]:
        for name, module in branch.named_modules():
            if isinstance(module, _NORMS) and not norms:
                continue
            tensors = [n for n, _ in module.named_parameters(recurse=False)]
            tensors += [n for n, _ in module.named_buffers(recurse=False)] if norms else []
            for tname in tensors:
                setattr(module, tname, getattr(first[name], tname))


def _preset(backbone: str, num_branches: int, topk: int, **defaults):
    def factory(num_classes: int = 100, **kwargs) -> HydraNet:
        return build_hydranet(backbone, num_classes, **{"num_branches": num_branches, "topk": topk,
                                                        **defaults, **kwargs})
    return factory


def _register_presets() -> None:
    presets = {
        "hydra_resnet20_b8k2": ("resnet20", 8, 2, {}),
        "hydra_resnet20_b4k1": ("resnet20", 4, 1, {}),
        "hydra_resnet56_b8k2": ("resnet56", 8, 2, {}),
        "hydra_resnet110_b8k2": ("resnet110", 8, 2, {}),
        "hydra_resnet18_b8k2": ("resnet18", 8, 2, {"branch_width": 0.25, "gate_width": 0.125}),
        "hydra_densenet_bc_100_k12_b8k2": ("densenet_bc_100_k12", 8, 2, {}),
        "hydra_ressep_b8k2": ("ressep", 8, 2, {"stem_width": 0.5, "branch_width": 0.125, "gate_width": 0.125}),
    }
    for name, (backbone, b, k, kw) in presets.items():
        fn = _preset(backbone, b, k, **kw)
        fn.__name__ = name
        fn.__doc__ = f"HydraNet on {backbone}: B={b} branches, top-{k} at inference."
        register_model(fn)


_register_presets()

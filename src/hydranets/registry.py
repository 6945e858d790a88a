"""Models by name, in the style of timm: ``@register_model`` factories and ``create_model``."""
from __future__ import annotations

import difflib
import fnmatch
from typing import Callable

import torch.nn as nn

from .errors import HydraError, is_whole

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a factory under its function name."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} is registered twice")
    _MODELS[fn.__name__] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern, sorted."""
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def is_model(name: str) -> bool:
    return name in _MODELS


def create_model(name: str, num_classes: int = 1000, **kwargs) -> nn.Module:
    """Build a registered model (backbone or HydraNet preset) by name."""
    if name not in _MODELS:
        close = difflib.get_close_matches(name, _MODELS, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see hydranets.list_models()"
        raise HydraError(f"unknown model {name!r}{hint}")
    if not is_whole(num_classes):
        raise HydraError(f"num_classes must be a positive integer, got {num_classes!r}")
    return _MODELS[name](num_classes=num_classes, **kwargs)

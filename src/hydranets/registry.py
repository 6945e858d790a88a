"""Models by name, in the style of timm: ``@register_model`` factories and ``create_model``."""
from __future__ import annotations

import difflib
import fnmatch
import inspect
from typing import Callable

import torch.nn as nn

from .errors import HydraError, is_whole

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def _origin(fn: Callable) -> tuple[str, str]:
    return getattr(fn, "__module__", None) or "?", getattr(fn, "__qualname__", None) or fn.__name__


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a factory under its function name.

    The same function defined again (same module and qualified name: a re-run notebook cell, a reloaded
    module) replaces the old one; another function of a registered name is refused.
    """
    old = _MODELS.get(fn.__name__)
    if old is not None and _origin(old) != _origin(fn):
        raise HydraError(f"model {fn.__name__!r} is already registered (by {'.'.join(_origin(old))}); "
                         "give your factory function another name")
    _MODELS[fn.__name__] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern, sorted."""
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def is_model(name: str) -> bool:
    return name in _MODELS


class KeywordError(HydraError, TypeError):
    """A keyword the model's factory does not take: bad input, and a TypeError as Python's own would be."""


def _check_keywords(name: str, fn: Callable, kwargs: dict) -> dict:
    """``kwargs`` less a false ``pretrained``; a keyword the factory does not take is refused in one line."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no signature to read (a builtin): the call itself decides
        return kwargs
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return kwargs
    named = [k for k, p in params.items() if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                        inspect.Parameter.KEYWORD_ONLY)]
    if "pretrained" in kwargs and "pretrained" not in named:
        if kwargs["pretrained"]:
            raise KeywordError(f"model {name!r} cannot be built with pretrained={kwargs['pretrained']!r}: hydranets "
                               "publishes no pretrained weights; train a run (hydranets train) and load it with "
                               "hydranets.load_model(RUN)")
        kwargs = {k: v for k, v in kwargs.items() if k != "pretrained"}
    for key, value in kwargs.items():
        if key not in named:
            shown = repr(value) if len(repr(value)) <= 40 and "\n" not in repr(value) else "..."
            raise KeywordError(f"model {name!r} cannot be built with {key}={shown}: its factory takes no {key!r} "
                               f"(it takes {', '.join(named) or 'no keywords'})")
    return kwargs


def model_module(name: str) -> str:
    """The module that registered model ``name`` (to import again where the model is loaded)."""
    return getattr(_MODELS[name], "__module__", None) or "?"


def takes_keyword(name: str, key: str) -> bool:
    """Whether the registered factory ``name`` accepts the keyword ``key`` (by name or through ``**kwargs``)."""
    try:
        params = inspect.signature(_MODELS[name]).parameters
    except (TypeError, ValueError):
        return True
    return key in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def create_model(name: str, num_classes: int = 1000, **kwargs) -> nn.Module:
    """Build a registered model (backbone or HydraNet preset) by name.

    A keyword the model does not take is a :class:`KeywordError`; hydranets has no pretrained weights, so
    ``pretrained=False`` is accepted and ``pretrained=True`` refused. The model records its name and keywords
    (``model.hydranets_info``, in the form of a checkpoint's ``model_info``) for :func:`hydranets.save_model`.
    """
    if name not in _MODELS:
        close = difflib.get_close_matches(name, _MODELS, n=3, cutoff=0.5)
        hint = (f"; did you mean {', '.join(close)}?" if close else "; see hydranets.list_models()") + (
            " (a model of your own: import the module that registers it, or name it in model.modules)")
        raise HydraError(f"unknown model {name!r}{hint}")
    if not is_whole(num_classes):
        raise HydraError(f"num_classes must be a positive integer, got {num_classes!r}")
    fn = _MODELS[name]
    checked = _check_keywords(name, fn, {"num_classes": num_classes, **kwargs})
    model = fn(**checked)
    if not isinstance(model, nn.Module):
        raise HydraError(f"model {name!r}: its factory {fn.__name__} returned {type(model).__name__}, not an nn.Module")
    kw = {k: v for k, v in checked.items() if k != "num_classes"}  # how it was made, for hydranets.save_model
    model.hydranets_info = {"name": name, "kwargs": kw, "num_classes": num_classes,
                            "in_chans": getattr(model, "in_chans", kw.get("in_chans", 3)), "hydra": None}
    return model

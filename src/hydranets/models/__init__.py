"""Backbone families, one file each; importing this registers them."""
from . import densenet, resnet, ressep  # noqa: F401
from .backbone import Backbone, StagePlan, build_stages

__all__ = ["Backbone", "StagePlan", "build_stages"]

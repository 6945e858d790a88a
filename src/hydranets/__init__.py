"""hydranets: HydraNets (Mullapudi et al., CVPR 2018) for PyTorch.

Wide networks of class-specialised branches, of which only the top-k chosen by a gate run per image.
"""
from . import models  # noqa: F401  (registers the backbone families)
from .errors import HydraError
from .export import export_model, load_exported
from .hydranet import HydraNet, HydraOutput, build_hydranet
from .inference import fold_batchnorms, load_model, predict, save_model
from .models import Backbone, StagePlan
from .models.backbone import scaled
from .partition import Partition
from .registry import create_model, is_model, list_models, register_model

__version__ = "0.1.0"
__all__ = ["Backbone", "HydraError", "HydraNet", "HydraOutput", "Partition", "StagePlan", "build_hydranet",
           "create_model", "export_model", "fold_batchnorms", "is_model", "list_models", "load_exported", "load_model",
           "predict", "register_model", "save_model", "scaled", "__version__"]

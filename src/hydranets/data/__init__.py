"""Data: in-memory image sets (CIFAR, Tiny-ImageNet, Fashion-MNIST), the batch loader, image folders, downloads."""
from .cache import default_cache_dir
from .datasets import DATASET_NAMES, load_dataset, load_splits
from .download import download_file, extract_archive
from .image_dataset import ImageDataset
from .imagefolder import ImageFolderDataset, make_imagefolder_loader
from .loader import BatchLoader

__all__ = [
    "DATASET_NAMES",
    "BatchLoader",
    "ImageDataset",
    "ImageFolderDataset",
    "default_cache_dir",
    "download_file",
    "extract_archive",
    "load_dataset",
    "load_splits",
    "make_imagefolder_loader",
]

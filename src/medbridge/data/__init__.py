"""Data: image reading, dataset loaders (one per official layout), splits, label alignment, focal views."""

from .datasets import DatasetSpec, detect_format, get_dataset, list_datasets, load_dataset, register_dataset
from .focal import FocalConfig, FocalViews, focal_views
from .images import ImageReadError, read_image
from .labels import Alignment, align_label_names, apply_uncertainty, prompt_name
from .loader import ViewDataset, collate_views
from .splits import Split, label_fraction, load_split, make_split, official_split, patient_split, save_split
from .table import DatasetError, ImageTable

__all__ = ["DatasetSpec", "detect_format", "get_dataset", "list_datasets", "load_dataset", "register_dataset",
           "FocalConfig", "FocalViews", "focal_views", "ImageReadError", "read_image", "Alignment",
           "align_label_names", "apply_uncertainty", "prompt_name", "ViewDataset", "collate_views", "Split",
           "label_fraction", "load_split", "make_split", "official_split", "patient_split", "save_split",
           "DatasetError", "ImageTable"]

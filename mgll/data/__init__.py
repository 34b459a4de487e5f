"""Dataset contract, PyTorch dataset and synthetic generators for multi-granular image-label data."""

from .image_dataset import RecordImageDataset, collate_records, to_tensor
from .records import (
    DatasetCard,
    Level,
    MultiGranularDataset,
    Record,
    RecordError,
    load_card,
    load_dataset,
    write_dataset,
)
from .synthetic import FUNDUS_DISEASES, make_synthetic

__all__ = [
    "FUNDUS_DISEASES",
    "DatasetCard",
    "Level",
    "MultiGranularDataset",
    "Record",
    "RecordError",
    "RecordImageDataset",
    "collate_records",
    "load_card",
    "load_dataset",
    "make_synthetic",
    "to_tensor",
    "write_dataset",
]

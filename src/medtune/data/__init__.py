"""Datasets: the dataset folder contract, validation, and importers (MedMNIST, synthetic demo data)."""

from medtune.data.contract import (
    DATALIST_JSON,
    DATASET_FORMAT,
    DATASET_JSON,
    add_case,
    create_dataset,
    load_datalist,
    new_case_id,
    read_datalist,
    read_dataset_json,
    staged_folder,
    validate_dataset,
    write_datalist,
)
from medtune.data.medmnist_import import import_medmnist
from medtune.data.synthetic import make_synthetic_classification

__all__ = [
    "DATALIST_JSON",
    "DATASET_FORMAT",
    "DATASET_JSON",
    "add_case",
    "create_dataset",
    "import_medmnist",
    "load_datalist",
    "make_synthetic_classification",
    "new_case_id",
    "read_datalist",
    "read_dataset_json",
    "staged_folder",
    "validate_dataset",
    "write_datalist",
]

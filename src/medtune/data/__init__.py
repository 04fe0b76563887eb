"""Datasets: the dataset folder contract, validation (incl. 3D geometry checks), and importers (MedMNIST, MSD,
synthetic demo data)."""

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
from medtune.data.geometry import check_image, check_label, check_pair, read_header
from medtune.data.medmnist_import import import_medmnist
from medtune.data.msd_import import import_msd
from medtune.data.synthetic import make_synthetic_classification

__all__ = [
    "DATALIST_JSON",
    "DATASET_FORMAT",
    "DATASET_JSON",
    "add_case",
    "check_image",
    "check_label",
    "check_pair",
    "create_dataset",
    "import_medmnist",
    "import_msd",
    "load_datalist",
    "make_synthetic_classification",
    "new_case_id",
    "read_datalist",
    "read_dataset_json",
    "read_header",
    "staged_folder",
    "validate_dataset",
    "write_datalist",
]

"""The datasets: offline TFDS builders, TFDS catalog datasets, image folders; a loader into
numpy arrays."""
from tlresearch.data.load import (
    DATASETS,
    Dataset,
    check_name,
    default_data_dir,
    load,
    load_for,
    mocked,
    report,
)

__all__ = ["DATASETS", "Dataset", "check_name", "default_data_dir", "load", "load_for", "mocked",
           "report"]

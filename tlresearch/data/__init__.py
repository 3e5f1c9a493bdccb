"""The datasets: offline TFDS builders, TFDS catalog datasets, image folders; a loader into
numpy arrays."""
from tlresearch.data.load import (Dataset, DATASETS, check_name, default_data_dir, load,
                                  load_for, report)

__all__ = ["Dataset", "DATASETS", "check_name", "default_data_dir", "load", "load_for", "report"]

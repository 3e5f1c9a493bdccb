"""The benchmark datasets: offline TFDS builders and a loader into numpy arrays."""
from tlresearch.data.load import Dataset, DATASETS, load, default_data_dir

__all__ = ["Dataset", "DATASETS", "load", "default_data_dir"]

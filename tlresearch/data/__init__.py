"""The datasets: offline TFDS builders, TFDS catalog datasets, image folders; a loader into
numpy arrays.

The loader's names are resolved on first use, so that `tlresearch.data.folder` or
`tlresearch.data.images` (all that predicting needs) load without TensorFlow Datasets and
the glyph builder's matplotlib.
"""
import importlib

__all__ = ["DATASETS", "Dataset", "check_name", "default_data_dir", "load", "load_for", "mocked",
           "report"]


def __getattr__(name: str):
  if name in __all__:
    return getattr(importlib.import_module("tlresearch.data.loader"), name)
  raise AttributeError(f"module 'tlresearch.data' has no attribute '{name}'")

"""A learnable random task for checks and tests: a mean image per class plus noise."""
from __future__ import annotations

import numpy as np

from tlresearch.data.loader import Dataset


def class_means(n_train: int = 48, n_val: int = 16, n_test: int = 16, classes: int = 4,
                seed: int = 0, size: int = 16, name: str = "fake") -> Dataset:
  """Three splits of uint8 [n, size, size, 3] images: class c is its own random mean image
  plus Gaussian noise (std 40), labels cycling through the classes."""
  rng = np.random.default_rng(seed)
  protos = rng.integers(0, 256, (classes, size, size, 3))

  def split(n):
    y = np.arange(n) % classes
    x = np.clip(protos[y] + rng.normal(0, 40, (n, size, size, 3)), 0, 255).astype(np.uint8)
    return x, y.astype(np.int32)

  (a, b), (c, d), (e, f) = split(n_train), split(n_val), split(n_test)
  return Dataset(name, a, b, c, d, e, f, classes, tuple(str(i) for i in range(classes)))

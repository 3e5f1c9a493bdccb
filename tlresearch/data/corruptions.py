"""Image corruptions at high severity (the glyph benchmark's input-level shift, and the
corrupted test copy of the `ood` probe), and the separable linear operators they use.

numpy only: a probe can corrupt images without the dataset builders (TFDS, matplotlib).
"""
from __future__ import annotations

import numpy as np

CORRUPTIONS = ("gaussian_noise", "gaussian_blur", "low_contrast", "pixelate",
               "salt_and_pepper")


def blur_matrix(n: int, sigma) -> np.ndarray:
  """[..., n, n] Gaussian smoothing operators, one per sigma, rows renormalised so that
  borders keep their level."""
  d = np.arange(n)[:, None] - np.arange(n)[None, :]
  k = np.exp(-0.5 * (d / np.asarray(sigma)[..., None, None]) ** 2)
  return (k / k.sum(-1, keepdims=True)).astype(np.float32)


def separable(x: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
  """rows @ x @ cols.T for every image and channel; x [B, H, W, C], operators [H', H] and
  [W', W], or one per image [B, H', H] and [B, W', W]."""
  x = np.moveaxis(x, -1, 1)
  rows = rows[:, None] if rows.ndim == 3 else rows
  cols = cols[:, None] if cols.ndim == 3 else cols
  return np.moveaxis(rows @ x @ np.swapaxes(cols, -1, -2), 1, -1)


def corrupt_images(images: np.ndarray, rng) -> np.ndarray:
  """One of CORRUPTIONS per image, at high severity (images [B, S, S, 3] in [0, 1])."""
  b, s = images.shape[0], images.shape[1]
  kind = rng.integers(0, len(CORRUPTIONS), b)
  out = images.copy()
  for k, name in enumerate(CORRUPTIONS):
    idx = np.flatnonzero(kind == k)
    if idx.size == 0:
      continue
    x = images[idx]
    n = idx.size
    if name == "gaussian_noise":
      sigma = rng.uniform(0.22, 0.3, (n, 1, 1, 1))
      x = x + sigma.astype(np.float32) * rng.standard_normal(x.shape, np.float32)
    elif name == "gaussian_blur":
      kernel = blur_matrix(s, rng.uniform(1.2, 1.6, n))
      x = separable(x, kernel, kernel)
    elif name == "low_contrast":
      factor = rng.uniform(0.12, 0.2, (n, 1, 1, 1)).astype(np.float32)
      mean = x.mean(axis=(1, 2, 3), keepdims=True)
      x = mean + factor * (x - mean)
    elif name == "pixelate":
      # Average 3x3 blocks (~11x11 effective resolution); the last row/column of blocks is
      # 2 px wide.
      block = np.minimum(np.arange(s) // 3, (s - 1) // 3)
      m = np.zeros((block.max() + 1, s), np.float32)
      m[block, np.arange(s)] = 1
      m /= m.sum(1, keepdims=True)
      x = separable(x, m[block], m[block])
    elif name == "salt_and_pepper":
      amount = rng.uniform(0.15, 0.22, (n, 1, 1))
      u = rng.random((n, s, s), np.float32)
      x = np.where((u < amount / 2)[..., None], 0.0, x)
      x = np.where((u > 1 - amount / 2)[..., None], 1.0, x)
    out[idx] = x
  return out

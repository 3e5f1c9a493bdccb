"""Digits: scikit-learn's 1,797 handwritten 8x8 digits as a small real-data target task.

The images ship inside scikit-learn (`sklearn.datasets.load_digits`), so nothing is
downloaded. Grey levels 0..16 (ink is high) are scaled to 0..255 and upsampled 4x to 32x32
with bilinear interpolation, then replicated to 3 channels, to match the glyph tasks'
input shape. Bilinear rather than nearest because the glyph images a model is pretrained on
have smooth anti-aliased strokes; nearest would add hard 4x4 blocks, an artefact of the
upsampling rather than of the task.

The split is fixed, seeded and stratified: in each class, 60% train, 15% validation and the
rest test (`split_indices`), giving 1,078 / 269 / 450 examples.
"""
from __future__ import annotations

import functools

import numpy as np
import tensorflow_datasets as tfds

from tlresearch.core.errors import choices, UserError
from tlresearch.data.builders import FORMAT_VERSION, RELEASE_NOTES

IMAGE_SIZE = 32
SPLITS = ("train", "validation", "test")
FRACTIONS = {"train": 0.60, "validation": 0.15}  # test takes the rest
_SEED = 8_817


def _upsample_matrix(n_out: int, n_in: int) -> np.ndarray:
  """[n_out, n_in] bilinear interpolation operator (pixel centres aligned, edges clamped)."""
  pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
  lo = np.floor(pos).astype(int)
  hi = np.minimum(lo + 1, n_in - 1)
  w = np.zeros((n_out, n_in))
  w[np.arange(n_out), lo] += 1 - (pos - lo)
  w[np.arange(n_out), hi] += pos - lo
  return w


@functools.lru_cache(maxsize=1)
def images_and_labels() -> tuple[np.ndarray, np.ndarray]:
  """All 1,797 digits: images uint8 [N, 32, 32, 3], labels int64 [N], in scikit-learn order."""
  from sklearn.datasets import load_digits  # imported here: only builds need scikit-learn
  digits = load_digits()
  up = _upsample_matrix(IMAGE_SIZE, digits.images.shape[1])
  grey = up @ (digits.images * (255.0 / 16.0)) @ up.T
  images = np.repeat(np.round(grey).clip(0, 255).astype(np.uint8)[..., None], 3, axis=-1)
  return images, digits.target.astype(np.int64)


def split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
  """Stratified split: each class's examples are shuffled with a fixed seed and cut at the
  FRACTIONS; each split is then shuffled so classes are interleaved."""
  rng = np.random.default_rng(_SEED)
  parts = {split: [] for split in SPLITS}
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    n_train = round(FRACTIONS["train"] * idx.size)
    n_val = round(FRACTIONS["validation"] * idx.size)
    parts["train"].append(idx[:n_train])
    parts["validation"].append(idx[n_train:n_train + n_val])
    parts["test"].append(idx[n_train + n_val:])
  return {split: rng.permutation(np.concatenate(p)) for split, p in parts.items()}


def generate(split: str) -> tuple[np.ndarray, np.ndarray]:
  """One split: images uint8 [N, 32, 32, 3], labels int64 [N]."""
  if split not in SPLITS:
    raise UserError(f"unknown split {split!r}; valid: {choices(SPLITS)}")
  images, labels = images_and_labels()
  idx = split_indices(labels)[split]
  return images[idx], labels[idx]


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn digits at 32x32x3 with a fixed stratified train/validation/test split."""

  name = "tlr_digits"
  VERSION = tfds.core.Version(FORMAT_VERSION)
  RELEASE_NOTES = RELEASE_NOTES

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.split("\n")[0],
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=[str(d) for d in range(10)]),
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # the data ships with scikit-learn
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split):
    images, labels = generate(split)
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {"image": image, "label": int(label)}

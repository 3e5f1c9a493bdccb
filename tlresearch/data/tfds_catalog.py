"""Any TFDS image-classification dataset: `tfds:NAME` (NAME may carry a config and version,
e.g. `tfds:cifar10`, `tfds:oxford_flowers102`, `tfds:imagenet_resized/32x32`).

Offline first: the dataset must be prepared in the data dir (`tfds build NAME
--data_dir=DIR`, once, with a network); otherwise loading fails at once, saying so, instead
of entering TFDS's download retry loop. `data.download=True` lets a run download and
prepare it. Images are resized (bilinear, antialiased) to the model's input size in tf.data,
grey images become RGB, and all splits are read into memory as uint8.

Under `tfds.testing.mock_data` nothing needs to be prepared; the mocked dataset has
whatever splits are asked for, so it is read as train + test.
"""
from __future__ import annotations

import difflib

import numpy as np
import tensorflow_datasets as tfds

from tlresearch.data.splits import DataOptions, assemble
from tlresearch.errors import UserError


def _builder(name: str, data_dir: str):
  try:
    return tfds.builder(name, data_dir=data_dir, try_gcs=False)
  except tfds.core.registered.DatasetNotFoundError:
    close = difflib.get_close_matches(name.split("/")[0], tfds.list_builders(), n=3)
    hint = f"; did you mean {', '.join('tfds:' + c for c in close)}?" if close else \
        "; see https://www.tensorflow.org/datasets/catalog"
    raise UserError(f"unknown TFDS dataset 'tfds:{name}'{hint}") from None


def _keys(builder, name: str) -> tuple[str, str]:
  features = builder.info.features
  keys = builder.info.supervised_keys
  image, label = keys if isinstance(keys, tuple) and len(keys) == 2 and \
      all(isinstance(k, str) for k in keys) else ("image", "label")
  if not (image in features and isinstance(features[image], tfds.features.Image)
          and label in features and isinstance(features[label], tfds.features.ClassLabel)):
    raise UserError(f"tfds:{name} is not an image-classification dataset (needs an image "
                    f"feature and a class label; has {', '.join(features.keys())})")
  return image, label


def _read(builder, split: str, image_key: str, label_key: str, size: int | None, name: str):
  import tensorflow as tf  # tensorflow_datasets already imported it to read the split

  def example(ex):
    image = ex[image_key]
    if image.shape[-1] == 1:
      image = tf.image.grayscale_to_rgb(image)
    image = image[..., :3]  # drop an alpha channel
    if size is not None:
      image = tf.image.resize(image, (size, size), antialias=True)
      image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    return image, tf.cast(ex[label_key], tf.int32)

  read_config = tfds.ReadConfig(try_autocache=False)
  ds = builder.as_dataset(split=split, shuffle_files=False, read_config=read_config)
  shape = builder.info.features[image_key].shape
  if size is None and None in shape[:2]:
    raise UserError(f"tfds:{name} has images of different sizes: set model.input_size")
  batches = list(tfds.as_numpy(ds.map(example, num_parallel_calls=tf.data.AUTOTUNE).batch(1024)))
  images = np.concatenate([b[0] for b in batches]).astype(np.uint8, copy=False)
  return images, np.concatenate([b[1] for b in batches]).astype(np.int32)


def load(name: str, data_dir: str, opts: DataOptions, size: int | None, mocked: bool = False):
  """(splits dict from `splits.assemble`, notes, class names) for tfds:NAME; `mocked`: under
  tfds.testing.mock_data (nothing is prepared then)."""
  builder = _builder(name, data_dir)
  if not mocked and not (builder.data_path / "dataset_info.json").exists():
    if not opts.download:
      raise UserError(
          f"TFDS dataset '{name}' is not prepared in {data_dir}; prepare it once with "
          f"`tfds build {name} --data_dir={data_dir}` (needs a network, or the manual files "
          f"TFDS names), or set --config.data.download=True to let this run download it")
    builder.download_and_prepare()
  image_key, label_key = _keys(builder, name)
  available = set(builder.info.splits.keys()) or {"train", "test"}
  if "train" not in available:
    raise UserError(f"tfds:{name} has no train split (has {', '.join(sorted(available))})")
  arrays = {s: _read(builder, s, image_key, label_key, size, name)
            for s in ("train", "validation", "test") if s in available}
  splits, notes = assemble(arrays, opts, f"tfds:{name}")
  label = builder.info.features[label_key]
  return splits, notes, tuple(label.names)

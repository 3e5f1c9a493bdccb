"""Any TFDS image-classification dataset: `tfds:NAME` (NAME may carry a config and version,
e.g. `tfds:cifar10`, `tfds:oxford_flowers102`, `tfds:imagenet_resized/32x32`).

Offline first: the dataset must be prepared in the data dir (`tfds build NAME
--data_dir=DIR`, once, with a network); otherwise loading fails at once, saying so, instead
of entering TFDS's download retry loop. `data.download=True` lets a run download and
prepare it. Grey images become RGB, images are resized (`tlresearch.data.images`) to the
model's input size, and all splits are read into memory as uint8.

A dataset prepared as ArrayRecord (`tfds build NAME --file_format=array_record`) is read with
numpy and Pillow alone; one in TFDS's default TFRecord form needs TensorFlow (the `[tf]`
extra), and without it loading fails at once saying so.

Under `tfds.testing.mock_data` nothing needs to be prepared; the mocked dataset has
whatever splits are asked for, so it is read as train + test.
"""
from __future__ import annotations

import difflib

import numpy as np
import tensorflow_datasets as tfds

from tlresearch.core.errors import UserError
from tlresearch.data import images
from tlresearch.data.splits import assemble, DataOptions


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


def _tensorflow(name: str, data_dir: str, why: str):
  try:
    import tensorflow as tf
  except ImportError:
    raise UserError(
        f"tfds:{name} {why}, which needs TensorFlow: pip install -e \".[tf]\"; or prepare an "
        f"ArrayRecord copy once where TensorFlow is installed (`tfds build {name} "
        f"--data_dir={data_dir} --file_format=array_record`), which reads without it") from None
  return tf


def _array_record(builder) -> bool:
  """Whether the prepared dataset is stored as ArrayRecord (read with numpy and Pillow)."""
  return builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD


def _collect(pairs, size, name):
  """(uint8 [N, H, W, 3], int32 [N]) from (image, label) pairs, each image made RGB and
  resized as it arrives (a split of large images is never held at full size)."""
  x, y = [], []
  for image, label in pairs:
    image = np.asarray(image)
    if image.dtype != np.uint8:
      raise UserError(f"tfds:{name} has {image.dtype} images; only 8-bit images are supported")
    image = images.rgb(image)
    x.append(image if size is None else images.resize([image], size)[0])
    y.append(label)
  x = np.stack(x) if x else np.zeros((0, size or 0, size or 0, 3), np.uint8)
  return x, np.asarray(y, np.int32)


def _read_array_record(builder, split, image_key, label_key, size, name):
  source = builder.as_data_source(split=split)
  # One index at a time (see load._read_split).
  pairs = ((e[image_key], e[label_key]) for e in map(source.__getitem__, range(len(source))))
  return _collect(pairs, size, name)


def _read_tfrecord(builder, split, image_key, label_key, size, name, tf):
  read_config = tfds.ReadConfig(try_autocache=False)
  ds = builder.as_dataset(split=split, shuffle_files=False, read_config=read_config)
  ds = ds.map(lambda ex: (ex[image_key], ex[label_key]), num_parallel_calls=tf.data.AUTOTUNE)
  return _collect(tfds.as_numpy(ds), size, name)


def _read(builder, split: str, image_key: str, label_key: str, size: int | None, name: str,
          data_dir: str):
  if size is None and None in builder.info.features[image_key].shape[:2]:
    raise UserError(f"tfds:{name} has images of different sizes: set model.input_size")
  if _array_record(builder):
    return _read_array_record(builder, split, image_key, label_key, size, name)
  tf = _tensorflow(name, data_dir, "is stored as TFRecord")
  return _read_tfrecord(builder, split, image_key, label_key, size, name, tf)


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
    _tensorflow(name, data_dir, "is prepared by TFDS's TensorFlow pipeline")
    builder.download_and_prepare()
  image_key, label_key = _keys(builder, name)
  available = set(builder.info.splits.keys()) or {"train", "test"}
  if "train" not in available:
    raise UserError(f"tfds:{name} has no train split (has {', '.join(sorted(available))})")
  try:
    arrays = {s: _read(builder, s, image_key, label_key, size, name, data_dir)
              for s in ("train", "validation", "test") if s in available}
  except UserError:
    raise
  except Exception as e:  # noqa: BLE001 - damaged shards raise DataLossError, riegeli errors...
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    raise UserError(f"tfds:{name} in {builder.data_path} cannot be read ({type(e).__name__}: "
                    f"{first}); prepare it again (delete that folder, then `tfds build "
                    f"{name} --data_dir={data_dir}`)") from None
  splits, notes = assemble(arrays, opts, f"tfds:{name}")
  label = builder.info.features[label_key]
  return splits, notes, tuple(label.names)

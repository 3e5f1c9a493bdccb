"""Named datasets as in-memory numpy arrays.

A dataset name is one of DATASETS (the project's offline benchmark), `tfds:NAME` (any TFDS
image-classification dataset, `tlresearch.data.tfds_catalog`) or `folder:PATH` (an image
folder, `tlresearch.data.folder`). `image_size` resizes every split to the model's input
size; `options` (the config's `data` block, `splits.DataOptions`) says how missing
validation / test splits are carved and whether TFDS may download.

For DATASETS, `load(name)` builds the TFDS dataset into the data dir the first time (locally, from the
generators in `tlresearch.data.builders`; nothing is downloaded), then reads all three
splits fully into memory. Decoded arrays are cached per (name, data dir) for the life of
the process, so a sweep decodes each dataset once; they are read-only, so a caller cannot
change what the next caller gets.

Tests that need data without building it can mock TFDS; the data dir is then ignored and
each split holds `num_examples` random examples of the right shape, dtype and label range:

    with tfds.testing.mock_data(num_examples=20):
      data = load("digits", data_dir=tmp_path)

The default policy (AUTO) falls back to the builder code because the mocked data dir has no
metadata for these datasets, so no files are needed. Mocked loads bypass the cache in both
directions. Random labels may leave a class empty: use `k_shot` only with enough examples.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import sys
import threading
from typing import NamedTuple

import numpy as np
import tensorflow_datasets as tfds

# Importing the builder modules registers them with TFDS.
from tlresearch.core.errors import choices, UserError
from tlresearch.data import images
from tlresearch.data.builders import digits, FILE_FORMAT, glyphs
from tlresearch.data.splits import DataOptions

log = logging.getLogger(__name__)


class DatasetSpec(NamedTuple):
  tfds_name: str     # "builder" or "builder/config"
  description: str   # one line, for listings


DATASETS: dict[str, DatasetSpec] = {
    **{f"glyphs_{config}": DatasetSpec(f"tlr_glyphs/{config}", cfg.description)
       for config, cfg in glyphs.CONFIGS.items()},
    "digits": DatasetSpec(
        "tlr_digits", "scikit-learn's handwritten 8x8 digits, upsampled to 32x32 (real data)."),
}

_BUILDERS = {"tlr_glyphs": glyphs.Glyphs, "tlr_digits": digits.Digits}
_SPLITS = ("train", "validation", "test")
# Builds never need the network; also never look for a prepared copy on GCS.
_DOWNLOAD_CONFIG = tfds.download.DownloadConfig(try_download_gcs=False)


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """Three splits of one classification task; images uint8 [N, H, W, 3], labels int32 [N].

  Arrays are read-only (copy before changing them in place). `skipped`: files of a folder
  dataset that were not readable images; `notes`: how splits were made (e.g. carved)."""
  name: str
  train_x: np.ndarray
  train_y: np.ndarray
  val_x: np.ndarray
  val_y: np.ndarray
  test_x: np.ndarray
  test_y: np.ndarray
  num_classes: int
  class_names: tuple[str, ...]
  skipped: tuple[str, ...] = ()
  notes: tuple[str, ...] = ()
  # The file each example came from, per split (train, val, test), where there are files
  # (folder datasets): messages and the data card name images by them.
  sources: tuple[tuple[str, ...], ...] = ()

  def __repr__(self) -> str:
    return (f"Dataset({self.name!r}, train={len(self.train_y)}, val={len(self.val_y)}, "
            f"test={len(self.test_y)}, num_classes={self.num_classes})")


def default_data_dir() -> str:
  """$TLRESEARCH_DATA_DIR if set, else ~/.cache/tlresearch/tensorflow_datasets."""
  from tlresearch.core import io
  return io.env_folder("TLRESEARCH_DATA_DIR", ".cache", "tlresearch", "tensorflow_datasets")


def _builder(spec: DatasetSpec, data_dir: str) -> tfds.core.DatasetBuilder:
  # The classes are used directly rather than tfds.builder(name): no registry or community
  # lookups, and the import above is what defines them.
  name, _, config = spec.tfds_name.partition("/")
  return _BUILDERS[name](data_dir=data_dir, config=config or None, file_format=FILE_FORMAT)


def _read_only(a: np.ndarray) -> np.ndarray:
  a.flags.writeable = False
  return a


def _prepared(builder: tfds.core.DatasetBuilder) -> bool:
  # TFDS writes into a temporary folder and renames it when done, so the metadata file is
  # there only for a complete build. (builder.is_prepared() logs a warning when it isn't.)
  return (builder.data_path / "dataset_info.json").exists()


def _older_builds(builder: tfds.core.DatasetBuilder) -> list[str]:
  """Complete builds of other versions beside this one (e.g. the 1.0.0 TFRecord layout)."""
  parent = builder.data_path.parent
  return sorted(str(d) for d in parent.iterdir() if d.name != builder.data_path.name
                and (d / "dataset_info.json").exists()) if parent.exists() else []


def _read_split(builder: tfds.core.DatasetBuilder, split: str):
  # An ArrayRecord data source decodes with numpy alone (no TensorFlow). Read one index at
  # a time: tfds.testing.mock_data's batched __getitems__ is broken in TFDS 4.9.10.
  source = builder.as_data_source(split=split)
  examples = [source[i] for i in range(len(source))]
  if not examples:
    return _read_only(np.zeros((0, 0, 0, 3), np.uint8)), _read_only(np.zeros((0,), np.int32))
  x = np.stack([np.asarray(e["image"], np.uint8) for e in examples])
  y = np.asarray([e["label"] for e in examples], np.int32)
  return _read_only(x), _read_only(y)


_cache: dict[tuple[str, str], Dataset] = {}
_lock = threading.Lock()


def _load_full(name: str, data_dir: str) -> Dataset:
  spec = DATASETS[name]
  builder = _builder(spec, data_dir)
  # tfds.testing.mock_data redirects every builder to its own data dir; the data is then
  # random, so it must neither be built nor cached.
  mocked = os.path.abspath(os.fspath(builder.data_dir_root)) != data_dir
  key = (name, data_dir)
  with _lock:
    if not mocked and key in _cache:
      return _cache[key]
    if not mocked and not _prepared(builder):
      old = _older_builds(builder)
      print(f"building dataset {name} into {data_dir} (one-time"
            + (f"; the older format in {', '.join(old)} is no longer read and may be deleted"
               if old else "") + ")", file=sys.stderr, flush=True)
      tfds.disable_progress_bar()  # one line above says what happens; no per-split bars
      try:
        builder.download_and_prepare(download_config=_DOWNLOAD_CONFIG)
      except Exception:
        # Another process may have finished the same build first; its result is identical.
        builder = _builder(spec, data_dir)
        if not _prepared(builder):
          raise
    try:
      arrays = {split: _read_split(builder, split) for split in _SPLITS}
    except Exception as e:  # noqa: BLE001 - ArrayRecord/riegeli raise many types for bad bytes
      if mocked:
        raise
      # The project's own datasets are generated here: a damaged copy is rebuilt, as the
      # pretrained cache is (riegeli's chunk hashes catch damaged bytes as read errors).
      first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
      log.warning("dataset %s in %s cannot be read (%s): rebuilding it", name,
                  builder.data_path, first)
      shutil.rmtree(builder.data_path, ignore_errors=True)
      builder = _builder(spec, data_dir)
      builder.download_and_prepare(download_config=_DOWNLOAD_CONFIG)
      arrays = {split: _read_split(builder, split) for split in _SPLITS}
    label = builder.info.features["label"]
    data = Dataset(name, *arrays["train"], *arrays["validation"], *arrays["test"],
                   num_classes=label.num_classes, class_names=tuple(label.names))
    if not mocked:
      _cache[key] = data
    return data


def _k_shot(data: Dataset, k: int, seed: int) -> Dataset:
  """Exactly k training examples per class. Each class's examples are shuffled by
  default_rng(seed) and the first k kept, so with one seed a smaller k is a subset of a
  larger one; the kept examples stay in split order."""
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
    raise UserError(f"k_shot must be an integer number of examples per class, got {k!r}")
  if k <= 0:
    raise UserError(f"k_shot must be a positive number of examples per class, got {k}")
  counts = np.bincount(data.train_y, minlength=data.num_classes)
  smallest = int(np.argmin(counts))
  if k > counts[smallest]:
    raise UserError(
        f"k_shot={k} is more than the {counts[smallest]} training examples of class "
        f"{data.class_names[smallest]!r} (label {smallest}) in {data.name}; "
        f"use k_shot <= {counts[smallest]}")
  rng = np.random.default_rng(seed)
  keep = np.sort(np.concatenate([
      rng.permutation(np.flatnonzero(data.train_y == c))[:k] for c in range(data.num_classes)]))
  sources = ((tuple(data.sources[0][i] for i in keep),) + data.sources[1:]
             if data.sources else ())
  return dataclasses.replace(data, train_x=_read_only(data.train_x[keep]),
                             train_y=_read_only(data.train_y[keep]), sources=sources)


CLASS_SUBSETS = ("", "A", "B")
_CLASS_SPLIT_SEED = 2014  # one fixed random split of the classes into halves A and B


def class_half(num_classes: int, half: str) -> np.ndarray:
  """Sorted class indices of half `half` ("A" or "B") of a fixed random split of the
  classes (Yosinski et al. 2014 split ImageNet's classes the same way); A gets the smaller
  half when the count is odd."""
  perm = np.random.default_rng(_CLASS_SPLIT_SEED).permutation(num_classes)
  return np.sort(perm[:num_classes // 2] if half == "A" else perm[num_classes // 2:])


def _subset(data: Dataset, half: str) -> Dataset:
  """Only the classes of `half`, in every split, relabelled 0..m-1 in class order."""
  keep = class_half(data.num_classes, half)
  relabel = np.full(data.num_classes, -1, np.int32)
  relabel[keep] = np.arange(keep.size)

  kept = [np.flatnonzero(relabel[y] >= 0) for y in (data.train_y, data.val_y, data.test_y)]
  arrays = [a for x, y, idx in zip((data.train_x, data.val_x, data.test_x),
                                   (data.train_y, data.val_y, data.test_y), kept)
            for a in (_read_only(x[idx]), _read_only(relabel[y[idx]]))]
  sources = (tuple(tuple(files[i] for i in idx) for files, idx in zip(data.sources, kept))
             if data.sources else ())
  return Dataset(f"{data.name}[{half}]", *arrays, num_classes=int(keep.size),
                 class_names=tuple(data.class_names[i] for i in keep), sources=sources)


PREFIXES = ("tfds:", "folder:")


def check_name(name: str) -> None:
  """UserError unless `name` is one of DATASETS, `tfds:NAME` or `folder:PATH`."""
  if name in DATASETS or any(str(name).startswith(p) and len(name) > len(p) for p in PREFIXES):
    return
  raise UserError(f"unknown dataset {name!r}; valid: {choices(DATASETS)}, tfds:NAME, folder:PATH")


def _load_resized(name: str, data_dir: str, size: int | None, opts: DataOptions) -> Dataset:
  key = (name, data_dir, size, opts)
  if name.startswith("folder:"):
    from tlresearch.data import folder
    key += folder.fingerprint(name[len("folder:"):])
  mocked = _mocked(data_dir)
  with _lock:
    if not mocked and key in _cache:
      return _cache[key]
  if name in DATASETS:
    data = _load_full(name, data_dir)
    if size is not None and data.train_x.shape[1:3] != (size, size):
      data = dataclasses.replace(data, **{k: _read_only(images.resize(getattr(data, k), size))
                                          for k in ("train_x", "val_x", "test_x")})
  else:
    if name.startswith("tfds:"):
      from tlresearch.data import tfds_catalog
      splits, notes, class_names = tfds_catalog.load(name[len("tfds:"):], data_dir, opts, size,
                                                     mocked)
      skipped = ()
    else:
      from tlresearch.data import folder
      splits, notes, class_names, skipped = folder.load(name[len("folder:"):], opts, size)
    arrays = [_read_only(np.ascontiguousarray(a)) for s in _SPLITS for a in splits[s][:2]]
    sources = tuple(tuple(splits[s][2]) for s in _SPLITS) if len(splits["train"]) > 2 else ()
    data = Dataset(name, *arrays, num_classes=len(class_names), class_names=class_names,
                   skipped=tuple(skipped), notes=tuple(notes), sources=sources)
  if opts.drop_duplicates:
    from tlresearch.data import checks
    data = checks.drop_duplicates(data)
  if not mocked:
    with _lock:
      _cache[key] = data
  return data


def _mocked(data_dir: str) -> bool:
  """Whether tfds.testing.mock_data is active: it redirects every builder's data dir (then
  data is random and must neither be built nor cached)."""
  probe = digits.Digits(data_dir=data_dir)
  return os.path.abspath(os.fspath(probe.data_dir_root)) != data_dir


def mocked() -> bool:
  """Whether `tfds.testing.mock_data` is active in this process: its data exists only
  here, so no other process may train on it."""
  return _mocked(os.path.abspath(default_data_dir()))


def load(name: str, *, data_dir: str | None = None, k_shot: int | None = None,
         seed: int = 0, image_size: int | None = None, options=None,
         class_subset: str = "") -> Dataset:
  """The dataset `name` (one of DATASETS, `tfds:NAME` or `folder:PATH`).

  The built-in datasets are built into `data_dir` if needed; `tfds:` datasets are read from
  it. image_size: resize every split to image_size x image_size (None: keep the dataset's
  size). options: the config's `data` block (see `splits.DataOptions`).
  k_shot: keep exactly k training examples per class, chosen by `seed` (same seed, same
  subset); validation and test are unchanged.
  class_subset: "" for every class, "A" or "B" for one half of a fixed random class split.
  """
  check_name(name)
  if class_subset not in CLASS_SUBSETS:
    raise UserError(f"unknown class_subset {class_subset!r}; valid: '' (all classes), A, B")
  opts = DataOptions.from_config(options)
  data_dir = os.path.abspath(os.path.expanduser(os.fspath(data_dir or default_data_dir())))
  data = _load_resized(name, data_dir, int(image_size) if image_size else None, opts)
  if class_subset:
    data = _subset(data, class_subset)
  return data if k_shot is None else _k_shot(data, k_shot, seed)


def load_for(cfg) -> Dataset:
  """The dataset of one grid cell's config: target, data dir, k-shot subset of its seed,
  resized to its model's input size, read with its `data` options (if any)."""
  size = cfg.model.input_size
  return load(cfg.target, data_dir=cfg.data_dir or None, k_shot=cfg.k_shot or None,
              seed=cfg.seed, image_size=int(size) if size else None, options=cfg.data,
              class_subset=cfg.class_subset)


SKIPPED_SHOWN = 5  # how many skipped paths a log line and final.json name


def report(data: Dataset) -> dict:
  """Logs how the splits were made and which files were skipped; returns the same as
  final.json fields (`skipped_files`: count and the first few paths; `data_notes`)."""
  for note in data.notes:
    log.info("%s", note)
  first = list(data.skipped[:SKIPPED_SHOWN])
  if data.skipped:
    n = len(data.skipped)
    what = "file that is not a readable image" if n == 1 else "files that are not readable images"
    log.info(f"{data.name}: skipped {n} {what}: " + ", ".join(first)
             + (", ..." if n > len(first) else ""))
  return {"skipped_files": {"count": len(data.skipped), "first": first},
          "data_notes": list(data.notes)}

"""Image folders: `folder:PATH` with `PATH/train/<class>/<images>` (the Keras
`image_dataset_from_directory` layout), plus optional `PATH/validation/` (or `val/`) and
`PATH/test/` with the same class folders. A missing validation or test split is carved from
train (per class, seeded; see `splits.assemble`).

Any format Pillow reads (JPEG, PNG, GIF, BMP, TIFF, WebP, ...) is decoded to RGB and resized
(bilinear, antialiased) to the model's input size; files in subfolders of a class folder
belong to that class. Files that are not readable images are skipped and reported; hidden
files (names starting with '.') are ignored. A class folder without any readable image is an
error, not an empty class.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from tlresearch.data.images import resize_pil
from tlresearch.data.splits import DataOptions, assemble
from tlresearch.errors import UserError

SPLIT_DIRS = {"train": ("train",), "validation": ("validation", "val"), "test": ("test",)}
LAYOUT = "PATH/train/<class>/<images> (+ optional PATH/validation/, PATH/test/)"


def _files(class_dir: str) -> list[str]:
  out = []
  for root, dirs, files in os.walk(class_dir, followlinks=True):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    out += [os.path.join(root, f) for f in sorted(files) if not f.startswith(".")]
  return out


def _decode(path: str, size: int | None):
  """uint8 [H, W, 3] or None when the file is not a readable image."""
  from PIL import Image
  try:
    with Image.open(path) as img:
      if size is not None:
        img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale when that suffices
      img = img.convert("RGB")
      if size is not None:
        img = resize_pil(img, size)
      return np.asarray(img, np.uint8)
  except Exception:  # noqa: BLE001 - anything Pillow cannot read is "not an image" here
    return None


def _read_split(split_dir: str, classes: list[str], size: int | None, name: str, pool):
  present = sorted(d for d in os.listdir(split_dir)
                   if os.path.isdir(os.path.join(split_dir, d)) and not d.startswith("."))
  unknown = sorted(set(present) - set(classes))
  if unknown:
    raise UserError(f"{name}: class folder '{unknown[0]}' in {split_dir} is not in train; "
                    f"valid: {', '.join(classes)}")
  paths, labels = [], []
  for label, c in enumerate(classes):
    if c not in present:
      continue
    files = _files(os.path.join(split_dir, c))
    if not files:
      raise UserError(f"{name}: class folder {os.path.join(split_dir, c)} is empty")
    paths += files
    labels += [label] * len(files)
  images = list(pool.map(lambda p: _decode(p, size), paths))
  skipped = [p for p, im in zip(paths, images) if im is None]
  ok = [i for i, im in enumerate(images) if im is not None]
  read = np.bincount(np.asarray(labels, np.int64)[ok], minlength=len(classes))
  for label, c in enumerate(classes):
    if c in present and read[label] == 0:
      raise UserError(f"{name}: class folder {os.path.join(split_dir, c)} has no readable "
                      "images")
  shapes = {images[i].shape for i in ok}
  if len(shapes) > 1:
    raise UserError(f"{name}: images in {split_dir} have different sizes "
                    f"({', '.join(map(str, sorted(shapes)[:3]))}, ...): set model.input_size")
  x = np.stack([images[i] for i in ok]) if ok else np.zeros((0, size or 1, size or 1, 3),
                                                               np.uint8)
  return (x, np.asarray(labels, np.int32)[ok]), skipped


def load(path: str, opts: DataOptions, size: int | None):
  """(splits dict from `splits.assemble`, notes, class names, skipped paths) of folder:PATH."""
  name = f"folder:{path}"
  root = os.path.abspath(os.path.expanduser(path))
  dirs = {}
  for split, candidates in SPLIT_DIRS.items():
    found = [os.path.join(root, d) for d in candidates if os.path.isdir(os.path.join(root, d))]
    if found:
      dirs[split] = found[0]
  if "train" not in dirs:
    raise UserError(f"{name}: no train folder {os.path.join(root, 'train')}; expected {LAYOUT}")
  classes = sorted(d for d in os.listdir(dirs["train"])
                   if os.path.isdir(os.path.join(dirs["train"], d)) and not d.startswith("."))
  if not classes:
    raise UserError(f"{name}: no class folders in {dirs['train']}; expected {LAYOUT}")
  arrays, skipped = {}, []
  with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
    for split, d in dirs.items():
      arrays[split], bad = _read_split(d, classes, size, name, pool)
      skipped += bad
  for split, (x, _) in arrays.items():
    if split != "train" and len(x) and x.shape[1:] != arrays["train"][0].shape[1:]:
      raise UserError(f"{name}: {split} images are {x.shape[1:3]}, train images "
                      f"{arrays['train'][0].shape[1:3]}: set model.input_size")
  splits, notes = assemble({s: a for s, a in arrays.items() if len(a[0])}, opts, name)
  return splits, notes, tuple(classes), skipped


def fingerprint(path: str) -> tuple:
  """Modification times of the folder, its split folders and their class folders: adding or
  removing a file or class changes it, so a process never reuses a stale decoded copy."""
  root = os.path.abspath(os.path.expanduser(path))
  out = []
  for d in [root] + [os.path.join(root, s) for names in SPLIT_DIRS.values() for s in names]:
    if os.path.isdir(d):
      out.append((d, os.stat(d).st_mtime_ns))
      if d != root:
        out += [(e.path, e.stat().st_mtime_ns) for e in os.scandir(d) if e.is_dir()]
  return tuple(sorted(out))

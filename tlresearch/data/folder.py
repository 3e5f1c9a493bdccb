"""Image folders: `folder:PATH` with `PATH/train/<class>/<images>` (the Keras
`image_dataset_from_directory` layout), plus optional `PATH/validation/` (or `val/`) and
`PATH/test/` with the same class folders. A missing validation or test split is carved from
train (per class, seeded; see `splits.assemble`).

Any format Pillow reads (JPEG, PNG, GIF, BMP, TIFF, WebP, ...) is decoded to RGB and resized
(bilinear, antialiased) to the model's input size; files in subfolders of a class folder
belong to that class; each file is read once, however many links reach it (`Walk`), and
deeper bit depths are scaled to 8 bits (`to_rgb`). Files that are not readable images are
skipped and reported; hidden files (names starting with '.') are ignored. A class folder without any readable image is an
error, not an empty class.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from tlresearch.core import io
from tlresearch.core.errors import UserError, shown
from tlresearch.data.images import resize_pil
from tlresearch.data.splits import assemble, DataOptions

SPLIT_DIRS = {"train": ("train",), "validation": ("validation", "val"), "test": ("test",)}
LAYOUT = "PATH/train/<class>/<images> (+ optional PATH/validation/, PATH/test/)"
# Pillow modes of more than 8 bits per channel, and the largest value of each: scaled to 8 bits.
DEEP_MODES = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535, "I": 65535}


class Walk:
  """Reads the files of one dataset folder exactly once.

  A file is counted once however many links (symbolic or hard) reach it, and belongs to the
  class folder it is found in. A symbolic link to a file or folder inside the dataset is not
  followed (the target is read where it really is: a link `train/a/loop -> ..` cannot bring
  other classes' images into class `a`, nor a test image into train); a link leaving the
  dataset is followed only with `data.follow_external_links`, and never into a folder the
  walk has already entered. Whatever is not followed is reported (`links`)."""

  def __init__(self, root: str, follow_external: bool):
    self.root, self.follow_external = os.path.realpath(root), follow_external
    self.inodes: set = set()
    self.dirs: set = set()
    self.links: list[str] = []     # what was not followed, and why

  def _inside(self, real: str) -> bool:
    return real == self.root or real.startswith(self.root + os.sep)

  def files(self, folder: str) -> list[str]:
    """Image candidates under `folder`, in sorted order, hidden names ignored."""
    out = []
    real = os.path.realpath(folder)
    if real in self.dirs:
      self.links.append(f"{folder} (a folder already read)")
      return out
    self.dirs.add(real)
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
      if entry.name.startswith("."):
        continue
      if entry.is_symlink():
        target = os.path.realpath(entry.path)
        if self._inside(target):
          self.links.append(f"{entry.path} -> {target} (inside the dataset: read there)")
          continue
        if not self.follow_external:
          self.links.append(f"{entry.path} -> {target} (outside the dataset; "
                            "data.follow_external_links=True follows it)")
          continue
        if not os.path.exists(target):
          self.links.append(f"{entry.path} (a broken link)")
          continue
      if entry.is_dir():
        out += self.files(entry.path)
      elif entry.is_file():
        st = entry.stat()
        if (st.st_dev, st.st_ino) in self.inodes:
          self.links.append(f"{entry.path} (the same file as one already read)")
          continue
        self.inodes.add((st.st_dev, st.st_ino))
        out.append(entry.path)
    return out


def to_rgb(img):
  """A PIL image as 8-bit RGB. Deeper greyscale (16-bit `I;16*`, `I` as from 16-bit PNGs) is
  scaled from its full range, `F` from [0, 1] (or [0, 255] when it exceeds 1), never
  clipped; L, LA, P, RGBA (alpha dropped, as Keras's loader does), CMYK, 1 and the others
  convert as Pillow converts them."""
  from PIL import Image
  if img.mode in DEEP_MODES or img.mode == "F":
    a = np.asarray(img, np.float64)
    top = DEEP_MODES.get(img.mode) or (1.0 if a.size and a.max() <= 1.0 else 255.0)
    a = np.clip(a, 0, top) * (255.0 / top)
    img = Image.fromarray(np.round(a).astype(np.uint8), "L")
  return img if img.mode == "RGB" else img.convert("RGB")


def _decode(path: str, size: int | None):
  """uint8 [H, W, 3] or None when the file is not a readable image."""
  from PIL import Image
  try:
    with Image.open(path) as img:
      if size is not None:
        img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale when that suffices
      img = to_rgb(img)
      if size is not None:
        img = resize_pil(img, size)
      return np.asarray(img, np.uint8)
  except Exception:  # noqa: BLE001 - anything Pillow cannot read is "not an image" here
    return None


def _read_split(split_dir: str, classes: list[str], size: int | None, name: str, pool,
                walk: Walk):
  present = sorted(d for d in os.listdir(split_dir)
                   if os.path.isdir(os.path.join(split_dir, d)) and not d.startswith("."))
  for c in present:  # class names go into tables, reports and the kept model's card
    io.check_name_text(c, f"{name}: class folder {os.path.basename(split_dir)}/")
  unknown = sorted(set(present) - set(classes))
  if unknown:
    raise UserError(f"{name}: class folder '{unknown[0]}' in {split_dir} is not in train; "
                    f"valid: {', '.join(classes)}")
  paths, labels = [], []
  for label, c in enumerate(classes):
    if c not in present:
      continue
    files = walk.files(os.path.join(split_dir, c))
    if not files:
      raise UserError(f"{name}: class folder {os.path.join(split_dir, c)} is empty"
                      + (" (links not followed: see data.follow_external_links)"
                         if walk.links else ""))
    paths += files
    labels += [label] * len(files)
  images = list(pool.map(lambda p: _decode(p, size), paths))
  # File names are read as the OS gives them and recorded as shown text (\xNN for a byte
  # that is not UTF-8): the records only name files, they never open them.
  skipped = [shown(p) for p, im in zip(paths, images) if im is None]
  ok = [i for i, im in enumerate(images) if im is not None]
  read = np.bincount(np.asarray(labels, np.int64)[ok], minlength=len(classes))
  for label, c in enumerate(classes):
    if c in present and read[label] == 0:
      raise UserError(f"{name}: class folder {os.path.join(split_dir, c)} has no readable "
                      "images")
  first = {}
  for i in ok:
    first.setdefault(images[i].shape[:2], paths[i])
  if len(first) > 1:
    (a, pa), (b, pb) = list(first.items())[:2]
    raise UserError(f"{name}: images differ in size ({pa} is {a[0]}x{a[1]}, {pb} is "
                    f"{b[0]}x{b[1]}): set model.input_size to resize them all, e.g. "
                    "--config.model.input_size=32")
  x = np.stack([images[i] for i in ok]) if ok else np.zeros((0, size or 1, size or 1, 3),
                                                               np.uint8)
  files = np.asarray([shown(paths[i]) for i in ok], dtype=object)
  return (x, np.asarray(labels, np.int32)[ok], files), skipped


def load(path: str, opts: DataOptions, size: int | None):
  """(splits dict from `splits.assemble`: split -> (images, labels, files), notes, class
  names, skipped paths) of folder:PATH."""
  name = f"folder:{path}"
  io.check_name_text(path, "dataset folder")
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
  walk = Walk(root, opts.follow_external_links)
  with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
    for split, d in dirs.items():
      arrays[split], bad = _read_split(d, classes, size, name, pool, walk)
      skipped += bad
  for split, (x, *_) in arrays.items():
    if split != "train" and len(x) and x.shape[1:] != arrays["train"][0].shape[1:]:
      raise UserError(f"{name}: {split} images are {x.shape[1:3]}, train images "
                      f"{arrays['train'][0].shape[1:3]}: set model.input_size to resize them "
                      "all, e.g. --config.model.input_size=32")
  splits, notes = assemble({s: a for s, a in arrays.items() if len(a[0])}, opts, name)
  if walk.links:
    links = "; ".join(shown(s) for s in walk.links[:3])
    notes = [f"{name}: {len(walk.links)} links not followed or files counted once: {links}"
             + ("; ..." if len(walk.links) > 3 else "")] + list(notes)
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


def content_digest(path: str, follow_external: bool = False) -> str:
  """A digest of what `folder:PATH` holds: its real location, and every file the reader
  would read (path, size, modification time). A cell trained on a folder is reused only
  while this is unchanged (tlresearch.experiment.cell)."""
  import hashlib
  root = os.path.abspath(os.path.expanduser(path))
  key = (os.path.realpath(root), follow_external, fingerprint(path))
  if key not in _DIGESTS:
    h = hashlib.sha256(key[0].encode("utf-8", "surrogateescape"))
    walk = Walk(root, follow_external)
    for names in SPLIT_DIRS.values():
      for split in names:
        d = os.path.join(root, split)
        if not os.path.isdir(d):
          continue
        for c in sorted(e.name for e in os.scandir(d) if e.is_dir() and not e.name.startswith(".")):
          for f in walk.files(os.path.join(d, c)):
            st = os.stat(f)
            h.update(f"{os.path.relpath(f, root)}|{st.st_size}|{st.st_mtime_ns}\n".encode(
                "utf-8", "surrogateescape"))
    _DIGESTS[key] = h.hexdigest()
  return _DIGESTS[key]


_DIGESTS: dict = {}

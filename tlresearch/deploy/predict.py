"""Labels for new images from a kept model or its `jax` export.

    python -m tlresearch.deploy.predict --model=DIR [--top_k=3] [--out=FILE.csv] [--batch_size=64]
                                 PATH...

`--model` is a kept model (`model_card.json` + `variables/`, tlresearch.deploy.recognizer; a cell
folder holding one works too) or a `jax` export (`model.jax` + `export.json`,
tlresearch.deploy.export; run with `jax.export.deserialize`, no tlresearch model code). Each PATH is
an image file or a folder, walked recursively in sorted order (hidden files and folders
ignored). Images are read as training read them (the card's `input.decode`): any format
Pillow reads, JPEGs decoded at a reduced scale when that suffices (`draft`, as a `folder:`
dataset) or whole (`full`, as the other datasets), converted to RGB, resized to the model's
input size with Pillow's bilinear filter (antialiased, `reducing_gap=None`).

Output: one line per image on stdout, `path<TAB>label1 0.973<TAB>label2 0.020 ...` (top_k
labels, most probable first); `--out` also writes a CSV (path, rank1_label, rank1_prob, ...,
rankK_prob). A file that is not a readable image is reported on stderr (`skipped: PATH (not a
readable image)`) and the rest go on. The last line, on stderr, counts the images and
skipped files and gives images/s (reading, resizing and the model; compilation excluded).

Exit status: 0 when at least one image was labelled, 1 when none could be read, 2 after one
`error:` line for a bad flag, model or path (nothing read).
"""
from __future__ import annotations

import csv
import io as _stdio
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from tlresearch.core import io
from tlresearch.core.errors import choices, shown, UserError
from tlresearch.data import folder
from tlresearch.data.images import resize_pil

USAGE = ("usage: python -m tlresearch.deploy.predict --model=DIR [--top_k=3] [--out=FILE.csv] "
         "[--batch_size=64] PATH...")
FLAGS = {"model", "top_k", "out", "batch_size", "help"}
_READ_THREADS = 8


class Model:
  """What predict needs of a model: class names, input size (H, W) and a batched
  uint8 [N, H, W, 3] -> probabilities [N, classes] function."""

  def __init__(self, path: str, kind: str, class_names, image_size, fn, decode: str = "draft"):
    self.path, self.kind, self.class_names = path, kind, list(class_names)
    self.decode = decode  # recognizer.DECODES: how training decoded its images
    self.image_size = (int(image_size[0]), int(image_size[1]))
    self._fn = fn

  def probabilities(self, images) -> np.ndarray:
    return np.asarray(self._fn(np.asarray(images, np.uint8)), np.float32)


def load(path: str) -> Model:
  """The kept model or `jax` export in folder `path`; UserError when it is neither."""
  from tlresearch.deploy import export, recognizer
  if not os.path.isdir(path):
    raise UserError(f"--model {path} is not a folder")
  jax_file = os.path.join(path, export.JAX_FILE)
  if os.path.isfile(os.path.join(path, export.EXPORT_CARD)):
    if not os.path.isfile(jax_file):
      raise UserError(f"{path} is an export without {export.JAX_FILE}: predict reads a kept "
                      "model or a jax export (tlresearch.deploy.export --format=jax)")
    return _load_jax_export(path)
  rec = recognizer.load(export.model_path(path))
  return Model(path, "kept model", rec.class_names, rec.image_size, rec.probabilities,
               rec.card["input"].get("decode", "full"))


def _load_jax_export(path: str) -> Model:
  import jax
  from tlresearch.deploy import export
  try:
    card = io.read_json(os.path.join(path, export.EXPORT_CARD))
    size = (card["input"]["height"], card["input"]["width"])
    decode = card["input"].get("decode", "full")
    names = card["class_names"]
    with open(os.path.join(path, export.JAX_FILE), "rb") as f:
      exported = jax.export.deserialize(bytearray(f.read()))
  except Exception as e:  # noqa: BLE001 - any unreadable part means "not a usable export"
    raise UserError(f"{path} is not a readable jax export ({type(e).__name__}: {e})") from None
  shape = tuple(exported.in_avals[0].shape[1:])
  if shape != (*size, 3):
    raise UserError(f"{path}: {export.JAX_FILE} takes images of shape {shape}, "
                    f"{export.EXPORT_CARD} says {(*size, 3)}")
  return Model(path, "jax export", names, size, jax.jit(exported.call), decode)


def image_files(paths, notes: list | None = None) -> list[str]:
  """The files `paths` name: files as given, folders walked as training walks a dataset
  folder (`folder.Walk`: sorted, hidden names ignored, each file once however many links
  reach it, a link back into the folder read where it points, links out of it followed).
  What the walk did not read is appended to `notes`. UserError for a path that does not
  exist."""
  out = []
  for p in paths:
    if os.path.isfile(p):
      out.append(p)
    elif os.path.isdir(p):
      walk = folder.Walk(p, follow_external=True)
      out += walk.files(p)
      if notes is not None:
        notes += walk.links
    else:
      raise UserError(f"no such file or folder: {p}")
  return out


def read_image(path: str, size: tuple[int, int], decode: str = "draft"):
  """uint8 [H, W, 3] of the image file at `path` resized to `size` (H, W) as training did
  (`decode`: "draft" as a `folder:` dataset, tlresearch.data.folder; "full" as the other
  datasets, decoded whole first), or None when it is not a readable image."""
  from PIL import Image
  h, w = size
  try:
    with Image.open(path) as img:
      if decode == "draft":
        img.draft("RGB", (w, h))  # JPEG: decode at a reduced scale when that suffices
      img = folder.to_rgb(img)
      img = resize_pil(img, h) if h == w else img.resize((w, h), Image.BILINEAR,
                                                         reducing_gap=None)
      return np.asarray(img, np.uint8)
  except Exception:  # noqa: BLE001 - anything Pillow cannot read is "not an image" here
    return None


def top(probs: np.ndarray, class_names, k: int) -> list[tuple[str, float]]:
  """The `k` most probable (label, probability), highest first (ties: class order)."""
  order = np.argsort(-probs, kind="stable")[:k]
  return [(class_names[i], float(probs[i])) for i in order]


def batches(model: Model, files, top_k: int, batch_size: int):
  """Yields (results, skipped) per batch of `files`: results [(path, top(...))], skipped
  [path]. Every call of the model has the same batch size (the last batch is padded), so
  it compiles once."""
  size = min(batch_size, max(len(files), 1))
  shape = (size, *model.image_size, 3)
  with ThreadPoolExecutor(min(_READ_THREADS, os.cpu_count() or 1)) as pool:
    for start in range(0, len(files), size):
      chunk = files[start:start + size]
      images = list(pool.map(lambda p: read_image(p, model.image_size, model.decode), chunk))
      ok = [(p, im) for p, im in zip(chunk, images) if im is not None]
      skipped = [p for p, im in zip(chunk, images) if im is None]
      results = []
      if ok:
        x = np.zeros(shape, np.uint8)
        x[:len(ok)] = np.stack([im for _, im in ok])
        probs = model.probabilities(x)
        results = [(p, top(probs[i], model.class_names, top_k)) for i, (p, _) in enumerate(ok)]
      yield results, skipped


def warm_up(model: Model, n_files: int, batch_size: int) -> float:
  """Compiles the model for the batch shape `batches` uses; its seconds. UserError when
  the model cannot run here (e.g. an export lowered for another platform)."""
  t0 = time.perf_counter()
  size = min(batch_size, max(n_files, 1))
  try:
    model.probabilities(np.zeros((size, *model.image_size, 3), np.uint8))
  except ValueError as e:
    raise UserError(f"{model.path}: cannot run here: {str(e).splitlines()[0]}") from None
  return time.perf_counter() - t0


def check(top_k: int, batch_size: int) -> None:
  if top_k < 1:
    raise UserError(f"--top_k must be >= 1, got {top_k}")
  if batch_size < 1:
    raise UserError(f"--batch_size must be >= 1, got {batch_size}")


def predict(model_dir: str, paths, top_k: int = 3, batch_size: int = 64):
  """Labels for the images in `paths` (files or folders).

  Args:
    model_dir: a kept model or a `jax` export folder.
    paths: image files and folders (walked recursively, sorted, hidden files ignored).
    top_k: labels per image, most probable first.
    batch_size: images per call of the model.
  Returns:
    (results, skipped): results [(path, [(label, probability), ...])] in file order,
    skipped [path] of the files that are not readable images.
  """
  check(top_k, batch_size)
  model = load(model_dir)
  files = image_files(paths)
  results, skipped = [], []
  for r, s in batches(model, files, top_k, batch_size):
    results += r
    skipped += s
  return results, skipped


def csv_text(results, k: int) -> str:
  """The CSV of `results`: path, rank1_label, rank1_prob, ..., rank{k}_prob."""
  buf = _stdio.StringIO()
  writer = csv.writer(buf, lineterminator="\n")
  writer.writerow(["path"] + [f"rank{i}_{c}" for i in range(1, k + 1) for c in ("label", "prob")])
  for path, labels in results:
    writer.writerow([shown(path)] + [x for label, p in labels for x in (label, f"{p:.6f}")])
  return buf.getvalue()


def _integer(flags: dict, key: str, default: int) -> int:
  try:
    return int(flags.get(key, default))
  except ValueError:
    raise UserError(f"--{key} must be an integer, got '{flags[key]}'") from None


def _parse(argv: list[str]) -> tuple[dict, list[str]]:
  flags, paths = {}, []
  for arg in argv:
    if not arg.startswith("--"):
      paths.append(arg)
      continue
    key, eq, value = arg[2:].partition("=")
    if key not in FLAGS:
      raise UserError(f"unknown flag '--{key}'; valid: {choices('--' + f for f in FLAGS)}")
    if key != "help" and (not eq or not value):
      raise UserError(f"'{arg}' needs a value: --{key}=VALUE")
    flags[key] = value
  return flags, paths


def main(argv: list[str]) -> int:
  flags, paths = _parse(argv)
  if "help" in flags:
    print(__doc__)
    return 0
  if "model" not in flags:
    raise UserError(f"--model=DIR is required; {USAGE}")
  if not paths:
    raise UserError(f"no image file or folder given; {USAGE}")
  top_k, batch_size = _integer(flags, "top_k", 3), _integer(flags, "batch_size", 64)
  check(top_k, batch_size)
  if "out" in flags and os.path.isdir(flags["out"]):
    raise UserError(f"--out {flags['out']} is a folder; give a file name (e.g. predictions.csv)")
  model = load(flags["model"])
  notes = []
  files = image_files(paths, notes)
  for note in notes:
    print(f"not read: {note}", file=sys.stderr)
  compile_s = warm_up(model, len(files), batch_size)
  results, skipped = [], []
  t0 = time.perf_counter()
  for res, skip in batches(model, files, top_k, batch_size):
    for path in skip:
      print(f"skipped: {shown(path)} (not a readable image)", file=sys.stderr)
    for path, labels in res:
      print(shown(path) + "".join(f"\t{label} {p:.3f}" for label, p in labels))
    results += res
    skipped += skip
  seconds = time.perf_counter() - t0
  if "out" in flags and results:
    io.write_text(flags["out"], csv_text(results, min(top_k, len(model.class_names))))
  rate = len(results) / seconds if seconds > 0 else 0.0
  print(f"{len(results)} images, {len(skipped)} skipped, {rate:.1f} images/s "
        f"(compile {compile_s:.1f} s excluded)"
        + (f"; wrote {flags['out']}" if "out" in flags and results else ""), file=sys.stderr)
  return 0 if results else 1


if __name__ == "__main__":
  from tlresearch.core.errors import exit_with
  sys.stdout.reconfigure(line_buffering=True)  # lines appear as batches finish
  exit_with(main)

"""The data card of a results folder: what a reader of a table should know about its data.

`data.md` has, for every dataset a grid trained on, where it came from, the image size, the
examples per class and split, how the splits were made, what the checks found (duplicates
within and across splits with the first files, images under two labels, classes a split
lacks) and what was skipped. `data_<dataset>.png` is its contact sheet: the first few
images of each class in each split, as a researcher would look at a new dataset first.
"""
from __future__ import annotations

import os
import re

import numpy as np

from tlresearch.core import io
from tlresearch.data import checks as checks_lib

PER_SPLIT = 3      # images per class and split on the contact sheet
MAX_CLASSES = 20   # classes on a contact sheet (the rest are named below it)


def origin(name: str, data_dir: str) -> str:
  """Where a dataset's images come from, in one line."""
  from tlresearch.data import loader
  if name in loader.DATASETS:
    spec = loader.DATASETS[name]
    return (f"the project's offline TFDS builder `{spec.tfds_name}`, generated locally into "
            f"{data_dir}: {spec.description}")
  if name.startswith("tfds:"):
    return f"TFDS dataset `{name[5:]}`, read from {data_dir}"
  return f"image folder {name[len('folder:'):]}"


def slug(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9.]+", "-", name).strip("-")


def _counts_table(check: checks_lib.DataCheck) -> list[str]:
  rows = ["| class | train | validation | test |", "|---|---|---|---|"]
  for c, name in enumerate(check.class_names):
    rows.append(f"| {name} | " + " | ".join(str(check.counts[s][c]) for s in checks_lib.SPLITS)
                + " |")
  rows.append("| **all** | " + " | ".join(f"**{sum(check.counts[s])}**"
                                            for s in checks_lib.SPLITS) + " |")
  return rows


def _found(check: checks_lib.DataCheck, data) -> list[str]:
  out = []
  for key, d in check.duplicates.items():
    later, _, earlier = key.partition("~")
    one = d["count"] == 1
    what = ((f"{later} image that is also a {earlier} image" if one else
             f"{later} images that are also {earlier} images") if earlier else
            f"{later} image{'' if one else 's'} that {'is a copy' if one else 'are copies'} of "
            f"another {later} image")
    out.append(f"- {d['count']} {what}; first: " + "; ".join(f"`{x}`" for x in d["first"]))
  if check.conflicts["count"]:
    n = check.conflicts["count"]
    out.append(f"- {n} image{'' if n == 1 else 's'} under more than one label; first: "
               + "; ".join(f"`{x}`" for x in check.conflicts["first"]))
  out += [f"- {w}" for w in check.gaps]
  if not out:
    out.append("- no duplicate images within or across splits, no image under two labels, "
               "every class in every split")
  if data.skipped:
    n = len(data.skipped)
    out.append(f"- {n} file{'' if n == 1 else 's'} skipped (not readable images); first: "
               + ", ".join(f"`{p}`" for p in data.skipped[:checks_lib.SHOWN]))
  return out


def section(data, check: checks_lib.DataCheck, data_dir: str, sheet: str) -> list[str]:
  h, w, ch = check.image_shape
  base = data.name.split("[")[0]
  lines = [f"## {data.name}", "",
           f"- source: {origin(base, data_dir)}",
           f"- {len(check.class_names)} classes, images {h}x{w}x{ch} uint8 as the model sees them"
           " (after resizing to the model's input size)",
           f"- contact sheet: [{sheet}]({sheet})"]
  lines += [f"- {n}" for n in data.notes]
  lines += ["", "Examples per class and split:", "", *_counts_table(check), "",
            "What the checks found (`tlresearch/data/checks.py`):", "", *_found(check, data), ""]
  return lines


def contact_sheet(data, path: str) -> None:
  """The first PER_SPLIT images of each class (at most MAX_CLASSES) in each split."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  splits = {"train": (data.train_x, data.train_y), "validation": (data.val_x, data.val_y),
            "test": (data.test_x, data.test_y)}
  h, w = data.train_x.shape[1:3]
  classes = list(range(min(data.num_classes, MAX_CLASSES)))
  pad = 2
  sheet = np.full((len(classes) * (h + pad), 3 * PER_SPLIT * (w + pad) + 2 * pad * 3, 3), 255,
                  np.uint8)
  for r, c in enumerate(classes):
    for s, (x, y) in enumerate(splits.values()):
      for k, i in enumerate(np.flatnonzero(y == c)[:PER_SPLIT]):
        top = r * (h + pad)
        left = s * (PER_SPLIT * (w + pad) + 2 * pad) + k * (w + pad)
        sheet[top:top + h, left:left + w] = x[i]
  fig, ax = plt.subplots(figsize=(3 + 0.5 * 3 * PER_SPLIT, 0.6 + 0.5 * len(classes)))
  ax.imshow(sheet, interpolation="nearest")
  ax.set_yticks([r * (h + pad) + h / 2 for r in range(len(classes))])
  ax.set_yticklabels([data.class_names[c] for c in classes], fontsize=7)
  ax.set_xticks([s * (PER_SPLIT * (w + pad) + 2 * pad) + PER_SPLIT * (w + pad) / 2
                 for s in range(3)])
  ax.set_xticklabels(list(splits), fontsize=8)
  ax.tick_params(length=0)
  for spine in ax.spines.values():
    spine.set_visible(False)
  more = data.num_classes - len(classes)
  ax.set_title(f"{data.name}: first {PER_SPLIT} images per class and split"
               + (f" ({more} more classes not shown)" if more > 0 else ""), fontsize=8)
  fig.tight_layout()
  io.save_figure(fig, path)


def write(folder: str, checked: list, data_dir: str) -> list[str]:
  """data.md and one contact sheet per dataset into `folder`; `checked`: (dataset, its
  DataCheck) pairs. Returns the file names written."""
  lines = ["# Data", "",
           "The datasets this grid trained and tested on, as loaded (before a cell's k-shot "
           "subset of train, which its seed draws).", ""]
  names = ["data.md"]
  for data, check in checked:
    sheet = f"data_{slug(data.name)}_{check.image_shape[0]}px.png"
    contact_sheet(data, os.path.join(folder, sheet))
    names.append(sheet)
    lines += section(data, check, data_dir, sheet)
  io.write_text(os.path.join(folder, "data.md"), "\n".join(lines).rstrip() + "\n")
  return names

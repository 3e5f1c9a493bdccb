"""Write a dataset out as an image folder (`OUT/{train,validation,test}/<class>/<n>.png`,
the layout `folder:` datasets read), e.g. to try a folder recipe offline:

  python -m tlresearch.tools.to_folder --dataset=digits --out=/tmp/digits_folder --per_class=20

`--per_class=N` keeps N training images per class (seeded, as `k_shot`); validation and test
are written whole. The images are the dataset's own pixels (PNG, lossless).
"""
from __future__ import annotations

import os

from tlresearch.core import io
from tlresearch.core.errors import exit_with, UserError

USAGE = ("usage: python -m tlresearch.tools.to_folder --dataset=NAME --out=DIR [--per_class=N] "
         "[--seed=S] [--data_dir=DIR]")


def write(name: str, out: str, per_class: int = 0, seed: int = 0, data_dir: str | None = None):
  """Writes dataset `name` to the new folder `out` (atomically); returns image counts."""
  from PIL import Image
  from tlresearch import data as data_lib
  if os.path.exists(out) and os.listdir(out):
    raise UserError(f"--out {out} exists and is not empty; choose a new folder")
  ds = data_lib.load(name, data_dir=data_dir, k_shot=per_class or None, seed=seed)
  counts = {}
  with io.atomic_dir(out) as tmp:
    for split, x, y in (("train", ds.train_x, ds.train_y), ("validation", ds.val_x, ds.val_y),
                        ("test", ds.test_x, ds.test_y)):
      for c in ds.class_names:
        os.makedirs(os.path.join(tmp, split, str(c)), exist_ok=True)
      for i, (image, label) in enumerate(zip(x, y)):
        Image.fromarray(image).save(
            os.path.join(tmp, split, str(ds.class_names[int(label)]), f"{i:05d}.png"))
      counts[split] = len(x)
  return counts


def main(argv: list[str]) -> int:
  args = {}
  for a in argv:
    key, eq, value = a.lstrip("-").partition("=")
    if not a.startswith("--") or not eq or key not in ("dataset", "out", "per_class", "seed",
                                                        "data_dir"):
      raise UserError(f"unexpected argument '{a}'; {USAGE}")
    args[key] = value
  if "dataset" not in args or not args.get("out"):
    raise UserError(f"--dataset and --out are required; {USAGE}")
  try:
    per_class, seed = int(args.get("per_class", 0)), int(args.get("seed", 0))
  except ValueError:
    raise UserError(f"--per_class and --seed must be integers; {USAGE}") from None
  counts = write(args["dataset"], args["out"], per_class, seed, args.get("data_dir") or None)
  print(f"wrote {args['out']}: " + ", ".join(f"{k} {v} images" for k, v in counts.items()))
  return 0


if __name__ == "__main__":
  exit_with(main)

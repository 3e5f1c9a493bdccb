"""A dataset looked at as a whole, before anything trains on it.

What a per-file reader cannot see, and what ruins a comparison silently: images of the test
split that are byte-for-byte training images (leakage), the same image under two labels,
class names that are one class to a person (`Cat`, `cat`), a task of one class, classes a
split has no example of. `inspect` finds them in the arrays the model sees (after
resizing, so a copy saved at another size is caught too); what cannot give a meaningful
result raises a one-line UserError, the rest become warnings that the sweep logs and the
data card (`card.py`) records. `drop_duplicates` removes, on request
(`data.drop_duplicates`), the validation and test images that are also in an earlier split.

Checks are cached per loaded dataset object (the loader caches those by name, options and,
for a folder, its fingerprint), so a grid of many cells checks each dataset once.
"""
from __future__ import annotations

import dataclasses
import hashlib
import unicodedata
import weakref

import numpy as np

from tlresearch.core.errors import UserError

SPLITS = ("train", "validation", "test")
SHOWN = 3  # how many examples a warning names


@dataclasses.dataclass(frozen=True)
class DataCheck:
  """What `inspect` found. counts: split -> examples per class; duplicates: within a split
  ("train") or across ("test~train": test images that are also training images) -> number of
  such images and the first few; conflicts: images that occur under more than one label;
  gaps: the warnings about classes a split lacks; warnings: every warning line."""
  name: str
  class_names: tuple[str, ...]
  image_shape: tuple[int, ...]
  counts: dict
  duplicates: dict
  conflicts: dict
  gaps: tuple[str, ...]
  warnings: tuple[str, ...]


def _arrays(data):
  return {"train": (data.train_x, data.train_y), "validation": (data.val_x, data.val_y),
          "test": (data.test_x, data.test_y)}


def _digests(x: np.ndarray) -> list[bytes]:
  return [hashlib.blake2b(np.ascontiguousarray(im).tobytes(), digest_size=16).digest()
          for im in x]


def _where(data, split: str, i: int) -> str:
  """An example named by its file where it has one, else by split and index."""
  if data.sources:
    return data.sources[SPLITS.index(split)][i]
  return f"{split}[{i}]"


def _shown(names: list[str], total: int | None = None) -> str:
  total = len(names) if total is None else total
  return ", ".join(names[:SHOWN]) + (", ..." if total > SHOWN else "")


def _folded(name: str) -> str:
  return unicodedata.normalize("NFKC", name).casefold()


def _check_classes(data) -> None:
  names = list(data.class_names)
  if data.num_classes < 2:
    raise UserError(f"{data.name} has {data.num_classes} class"
                    f"{'' if data.num_classes == 1 else 'es'} ({', '.join(names) or 'none'}): "
                    "a classifier needs at least 2 (add a class, or a class folder)")
  seen: dict[str, str] = {}
  for n in names:
    other = seen.setdefault(_folded(n), n)
    if other != n:
      raise UserError(f"{data.name}: classes {other!r} and {n!r} differ only in case or Unicode "
                      "form and would train as two classes: merge them or rename one")
  counts = np.bincount(data.train_y, minlength=data.num_classes)
  empty = [names[c] for c in np.flatnonzero(counts == 0)]
  if empty:
    raise UserError(f"{data.name}: class {empty[0]!r} has no training example"
                    + (f" (nor {len(empty) - 1} more)" if len(empty) > 1 else "")
                    + ": remove it, or add training images")


def _split_warnings(data, counts: dict) -> list[str]:
  out = []
  for split, why in (("validation", "selection and early stopping never see it"),
                     ("test", "its recall is not measured, and macro-F1 is the mean over the "
                              "classes the test split has")):
    missing = [data.class_names[c] for c, n in enumerate(counts[split]) if n == 0]
    if missing:
      out.append(f"{data.name}: {len(missing)} class{'es have' if len(missing) > 1 else ' has'} "
                 f"no {split} image ({_shown([repr(m) for m in missing])}): {why}"
                 + ("; a class needs 2 training images for one to be carved"
                    if any(n < 2 for n in counts["train"]) else ""))
  return out


# (later split, earlier split): a later image that is also an earlier one is a duplicate.
CROSS = (("validation", "train"), ("test", "train"), ("test", "validation"))


def _cross_split(digests: dict, later: str, earlier: str) -> list[tuple[int, int]]:
  """(index in `later`, index of its first copy in `earlier`) for every image of `later`
  that is also in `earlier`."""
  index = {d: i for i, d in reversed(list(enumerate(digests[earlier])))}
  return [(i, index[d]) for i, d in enumerate(digests[later]) if d in index]


def _duplicates(data, digests: dict) -> tuple[dict, dict, list[str]]:
  dups, out = {}, []
  for split in SPLITS:
    first: dict[bytes, int] = {}
    again = [i for i, d in enumerate(digests[split]) if first.setdefault(d, i) != i]
    if again:
      dups[split] = {"count": len(again),
                     "first": [f"{_where(data, split, i)} = "
                               f"{_where(data, split, first[digests[split][i]])}"
                               for i in again[:SHOWN]]}
      out.append(f"{data.name}: {len(again)} {split} image{'s are copies' if len(again) > 1 else ' is a copy'} "
                 f"of another {split} image: {_shown(dups[split]['first'], len(again))}")
  for later, earlier in CROSS:
    hits = _cross_split(digests, later, earlier)
    if hits:
      key = f"{later}~{earlier}"
      dups[key] = {"count": len(hits), "first": [f"{_where(data, later, i)} = "
                                                 f"{_where(data, earlier, j)}"
                                                 for i, j in hits[:SHOWN]]}
      out.append(f"{data.name}: {len(hits)} {later} image{'s duplicate' if len(hits) > 1 else ' duplicates'} "
                 f"{earlier} images: {_shown(dups[key]['first'], len(hits))} "
                 "(data.drop_duplicates=True drops them)")
  labels: dict[bytes, set] = {}
  where: dict[bytes, str] = {}
  for split, (_, y) in _arrays(data).items():
    for i, (d, label) in enumerate(zip(digests[split], y)):
      labels.setdefault(d, set()).add(int(label))
      where.setdefault(d, _where(data, split, i))
  mixed = [d for d, ls in labels.items() if len(ls) > 1]
  conflicts = {"count": len(mixed),
               "first": [f"{where[d]} ({', '.join(repr(data.class_names[c]) for c in sorted(labels[d]))})"
                         for d in mixed[:SHOWN]]}
  if mixed:
    out.append(f"{data.name}: {len(mixed)} image{'s occur' if len(mixed) > 1 else ' occurs'} "
               f"under more than one label: {_shown(conflicts['first'], len(mixed))}")
  return dups, conflicts, out


_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def inspect(data) -> DataCheck:
  """The checks of one loaded dataset (tlresearch.data.loader.Dataset). Raises UserError for
  fewer than 2 classes, class names equal under case folding or NFKC, a class with no
  training example; warns of a class missing from validation or test, duplicate images
  within and across splits, and images under two labels."""
  if data in _CACHE:
    return _CACHE[data]
  _check_classes(data)
  arrays = _arrays(data)
  counts = {s: np.bincount(y, minlength=data.num_classes).tolist() for s, (_, y) in arrays.items()}
  digests = {s: _digests(x) for s, (x, _) in arrays.items()}
  dups, conflicts, dup_warnings = _duplicates(data, digests)
  gaps = tuple(_split_warnings(data, counts))
  result = DataCheck(data.name, tuple(data.class_names), tuple(int(n) for n in data.train_x.shape[1:]),
                     counts, dups, conflicts, gaps, gaps + tuple(dup_warnings))
  _CACHE[data] = result
  return result


def drop_duplicates(data):
  """`data` without the validation images that are also training images and the test images
  that are also training or validation images (a note says how many went)."""
  digests = {s: _digests(x) for s, (x, _) in _arrays(data).items()}
  drop = {"validation": set(), "test": set()}
  for later, earlier in CROSS:
    drop[later].update(i for i, _ in _cross_split(digests, later, earlier))
  drop = {s: sorted(d) for s, d in drop.items()}
  if not drop["validation"] and not drop["test"]:
    return data
  fields = {}
  for split, (xk, yk) in (("validation", ("val_x", "val_y")), ("test", ("test_x", "test_y"))):
    keep = np.setdiff1d(np.arange(len(digests[split])), drop[split])
    if keep.size == 0:
      raise UserError(f"{data.name}: every {split} image is also in an earlier split; "
                      "data.drop_duplicates would leave it empty")
    for k in (xk, yk):
      a = getattr(data, k)[keep]
      a.flags.writeable = False
      fields[k] = a
  sources = data.sources
  if sources:
    sources = (sources[0],) + tuple(
        tuple(sources[SPLITS.index(s)][i] for i in np.setdiff1d(np.arange(len(digests[s])),
                                                                  drop[s]))
        for s in ("validation", "test"))
  note = (f"{data.name}: dropped {len(drop['validation'])} validation and {len(drop['test'])} "
          "test images that are also in an earlier split (data.drop_duplicates)")
  return dataclasses.replace(data, **fields, sources=sources, notes=tuple(data.notes) + (note,))

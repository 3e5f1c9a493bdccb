"""Data options shared by the catalog and folder loaders, and seeded split carving."""
from __future__ import annotations

import dataclasses

import numpy as np

from tlresearch.core.errors import UserError

VTAB1K_TRAIN, VTAB1K_VAL = 800, 200


@dataclasses.dataclass(frozen=True)
class DataOptions:
  """How a `tfds:` or `folder:` dataset is read (config block `data`; every key optional)."""
  download: bool = False      # tfds: may download and prepare a dataset that is not prepared
  val_fraction: float = 0.1   # carved from train (per class, seeded) when there is no validation
  test_fraction: float = 0.2  # carved from train the same way when there is no test split
  split_seed: int = 0         # one fixed carve for every seed: all cells share val and test
  vtab1k: bool = False        # VTAB-1k: 800 train + 200 validation drawn from train (seeded)
  val_examples: int = 0       # >0: evaluate on this many validation examples (seeded subset)
  test_examples: int = 0      # >0: the same for test (CPU smoke runs; 0 = the whole split)
  follow_external_links: bool = False  # folder: follow links to files and folders outside it
  drop_duplicates: bool = False  # any dataset: drop val / test images also in an earlier split

  @classmethod
  def from_config(cls, cfg) -> DataOptions:
    if not cfg:
      return cls()
    given = dict(cfg.items() if hasattr(cfg, "items") else cfg)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(given) - set(names))
    if unknown:
      raise UserError(f"unknown data option '{unknown[0]}'; valid: {', '.join(names)}")
    opts = cls(**given)
    for key in ("val_fraction", "test_fraction"):
      if not 0 < getattr(opts, key) < 1:
        raise UserError(f"data.{key} must be in (0, 1), got {getattr(opts, key)}")
    if not 0 <= opts.split_seed <= 2**31 - 1:
      raise UserError(f"data.split_seed must be an integer in [0, 2147483647], got "
                      f"{opts.split_seed}")
    for key in ("val_examples", "test_examples"):
      if getattr(opts, key) < 0:
        raise UserError(f"data.{key} must be >= 0 (0: the whole split), got {getattr(opts, key)}")
    return opts


def carve(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(kept, carved) indices: round(fraction * n_c) examples of each class c (at least one
  where the class has two or more) go to the carved split, chosen by default_rng(seed)."""
  rng = np.random.default_rng(seed)
  carved = []
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    n = round(fraction * len(idx))
    if len(idx) >= 2:
      n = min(max(n, 1), len(idx) - 1)
    carved.append(idx[:n])
  carved = np.sort(np.concatenate(carved)) if carved else np.zeros(0, np.int64)
  kept = np.setdiff1d(np.arange(len(labels)), carved)
  return kept, carved


def vtab1k(labels: np.ndarray, seed: int, name: str) -> tuple[np.ndarray, np.ndarray]:
  """(train, validation) indices of VTAB-1k: 800 and 200 examples drawn from train."""
  need = VTAB1K_TRAIN + VTAB1K_VAL
  if len(labels) < need:
    raise UserError(f"data.vtab1k needs {need} training examples, {name} has {len(labels)}")
  perm = np.random.default_rng(seed).permutation(len(labels))
  return np.sort(perm[:VTAB1K_TRAIN]), np.sort(perm[VTAB1K_TRAIN:need])


def _take(split: tuple, idx: np.ndarray) -> tuple:
  return tuple(a[idx] for a in split)


def assemble(arrays: dict, opts: DataOptions, name: str) -> tuple[dict, list[str]]:
  """train / validation / test tuples (x, y, and any further per-example arrays, e.g. the
  files a folder's images came from) from the splits a dataset has, and notes saying what
  was carved. No test split: the dataset's validation split becomes the test split if there
  is one, else test is carved from train. No validation split (or VTAB-1k): carved from
  train, after the test split."""
  train = arrays["train"]
  val, test = arrays.get("validation"), arrays.get("test")
  notes = []
  if test is None and val is not None:
    test, val = val, None
    notes.append(f"{name}: no test split; its validation split is the test split")
  elif test is None:
    keep, cut = carve(train[1], opts.test_fraction, opts.split_seed)
    test, train = _take(train, cut), _take(train, keep)
    notes.append(f"{name}: no test split; carved {len(cut)} examples ({opts.test_fraction:g} "
                 f"per class, split_seed {opts.split_seed}) from train")
  if opts.vtab1k:
    tr, va = vtab1k(train[1], opts.split_seed, name)
    val, train = _take(train, va), _take(train, tr)
    notes.append(f"{name}: VTAB-1k, {len(tr)} train + {len(va)} validation drawn from train "
                 f"(split_seed {opts.split_seed})")
  elif val is None:
    keep, cut = carve(train[1], opts.val_fraction, opts.split_seed)
    val, train = _take(train, cut), _take(train, keep)
    notes.append(f"{name}: no validation split; carved {len(cut)} examples "
                 f"({opts.val_fraction:g} per class, split_seed {opts.split_seed}) from train")
  out = {"train": train, "validation": val, "test": test}
  for split, cap in (("validation", opts.val_examples), ("test", opts.test_examples)):
    if 0 < cap < len(out[split][1]):
      keep = np.sort(np.random.default_rng(opts.split_seed).permutation(len(out[split][1]))[:cap])
      notes.append(f"{name}: {split} limited to {cap} of {len(out[split][1])} examples "
                   f"(data.{'val' if split == 'validation' else 'test'}_examples)")
      out[split] = _take(out[split], keep)
  for split, arrays_ in out.items():
    if len(arrays_[0]) == 0:
      raise UserError(f"{name}: the {split} split is empty (too few examples to carve one; "
                      "add examples or a folder for it)")
  return out, notes

"""Merge pretrained variables into freshly initialised ones, strictly."""
from __future__ import annotations

from flax import traverse_util
import jax.numpy as jnp
import numpy as np


def merge_pretrained(fresh: dict, pretrained: dict, dont_load: tuple[str, ...] = ("head",)) -> dict:
  """`fresh` with every leaf replaced by the pretrained one, except groups in `dont_load`.

  Works on whole variable trees ({'params': ..., 'batch_stats': ...}). The group of a leaf is
  the first path component below the collection name. Raises ValueError naming every
  missing, unexpected or mis-shaped leaf, so a wrong depth or width never loads silently.
  """
  flat_fresh = traverse_util.flatten_dict(fresh, sep="/")
  flat_pre = traverse_util.flatten_dict(pretrained, sep="/")
  skip = lambda path: path.split("/")[1] in dont_load
  missing = sorted(p for p in flat_fresh if not skip(p) and p not in flat_pre)
  unexpected = sorted(p for p in flat_pre if not skip(p) and p not in flat_fresh)
  shape = sorted(f"{p}: pretrained {np.shape(flat_pre[p])} vs model {np.shape(v)}"
                 for p, v in flat_fresh.items()
                 if not skip(p) and p in flat_pre and np.shape(flat_pre[p]) != np.shape(v))
  problems = []
  if missing:
    problems.append(f"missing in checkpoint: {', '.join(missing)}")
  if unexpected:
    problems.append(f"unexpected in checkpoint: {', '.join(unexpected)}")
  if shape:
    problems.append(f"shape mismatch: {'; '.join(shape)}")
  if problems:
    raise ValueError("pretrained variables do not match the model: " + " | ".join(problems))
  merged = {p: (v if skip(p) else jnp.asarray(flat_pre[p], dtype=v.dtype))
            for p, v in flat_fresh.items()}
  return traverse_util.unflatten_dict(merged, sep="/")

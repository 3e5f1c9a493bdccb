"""Orbax checkpoints that are atomic, bounded in number and verified on restore.

Orbax restores damaged bytes without complaint (4 KiB zeroed inside an array file came back
as silent garbage), so every save records a SHA-256 of the arrays it wrote and every
restore recomputes it. A mismatch, a missing file or anything Orbax cannot read raises
`CheckpointError` naming the folder; callers decide what to do (the pretrained cache
rebuilds, a cell restarts from scratch).

Layout of one checkpoint folder:
  arrays/      the Orbax StandardCheckpointer output
  meta.json    {"checksum": ..., plus whatever the caller stores (JSON)}
A save is written to a hidden temporary folder and renamed into place, so a kill during a
save leaves either the previous checkpoint or the new one, never half of one.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import time

import jax
import numpy as np

from tlresearch.core import io

log = logging.getLogger(__name__)


class CheckpointError(Exception):
  """A checkpoint that is missing, truncated, unreadable or fails its checksum."""


def checksum(tree) -> str:
  """SHA-256 over every leaf's path, dtype, shape and bytes (host copies)."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    a = np.ascontiguousarray(jax.device_get(leaf))
    h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}|".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def save(path: str, tree, meta: dict | None = None) -> None:
  """Writes `tree` (arrays) and `meta` (JSON) to folder `path`, atomically."""
  import orbax.checkpoint as ocp
  with io.signals_deferred(), io.atomic_dir(path) as tmp:
    tree = jax.device_get(tree)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.join(tmp, "arrays"), tree)
    ckpt.wait_until_finished()
    io.write_json(os.path.join(tmp, "meta.json"), {**(meta or {}), "checksum": checksum(tree)})


def _first_line(e: Exception) -> str:
  """An exception's first line (Orbax and TensorStore raise long multi-line messages)."""
  return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def read_meta(path: str) -> dict:
  try:
    return io.read_json(os.path.join(path, "meta.json"))
  except (OSError, ValueError) as e:
    raise CheckpointError(f"checkpoint {path} has no readable meta.json ({e})") from None


def restore(path: str, target=None) -> tuple[object, dict]:
  """(tree, meta) from folder `path`; `target` (a pytree of arrays) gives the structure.

  Raises CheckpointError when the folder is incomplete, unreadable or its arrays do not
  match the checksum recorded at save time.
  """
  import orbax.checkpoint as ocp
  meta = read_meta(path)
  try:
    tree = ocp.StandardCheckpointer().restore(os.path.join(path, "arrays"), target)
  except Exception as e:  # Orbax/TensorStore raise many types for damaged files
    first = _first_line(e)
    raise CheckpointError(f"checkpoint {path} cannot be read ({first[:200]})") from None
  if checksum(tree) != meta.get("checksum"):
    raise CheckpointError(f"checkpoint {path} is corrupted: its arrays do not match the "
                          "checksum recorded when it was saved")
  return tree, meta


class Rolling:
  """Numbered checkpoints `step-000012` under one folder, keeping the newest `keep`."""

  PATTERN = re.compile(r"^step-(\d+)$")

  def __init__(self, directory: str, keep: int = 2):
    self.directory, self.keep = directory, max(1, int(keep))

  def steps(self) -> list[int]:
    if not os.path.isdir(self.directory):
      return []
    found = (self.PATTERN.match(n) for n in os.listdir(self.directory))
    return sorted(int(m.group(1)) for m in found if m)

  def path(self, step: int) -> str:
    return os.path.join(self.directory, f"step-{step:06d}")

  def save(self, step: int, tree, meta: dict) -> None:
    save(self.path(step), tree, {**meta, "step": step})
    for old in self.steps()[:-self.keep]:
      shutil.rmtree(self.path(old), ignore_errors=True)

  def clear(self) -> None:
    shutil.rmtree(self.directory, ignore_errors=True)


class FitCheckpointer:
  """What `train.fit` needs to survive a kill: save progress every few epochs, resume it.

  `fingerprint` identifies the run (a hash of the cell's config); a checkpoint saved under
  another fingerprint is ignored, so changing a config value never resumes stale weights.
  Saving costs ~0.1 s (Orbax), more than a whole epoch of the default CPU benchmark, hence
  `min_seconds`: a save happens only when `every_epochs` epochs and `min_seconds` seconds
  have passed since the last one. Resuming is exact either way (all randomness is keyed by
  seed, epoch and step), so the policy only decides how much work a kill can cost.
  """

  def __init__(self, directory: str, fingerprint: str, every_epochs: int = 1,
               min_seconds: float = 0.0, keep: int = 2, _failed: list | None = None):
    self.rolling = Rolling(directory, keep)
    self.fingerprint = fingerprint
    self.every_epochs, self.min_seconds = max(1, int(every_epochs)), float(min_seconds)
    self._last_epoch, self._last_time = 0, time.monotonic()
    # Whether a save failed, shared with this run's parts: the failure is said once per run.
    self._failed = [False] if _failed is None else _failed

  def part(self, i: int) -> "FitCheckpointer":
    """The checkpointer of part i of one run (a soup's i-th ingredient): its own folder
    below this one's, under the same policy."""
    return FitCheckpointer(os.path.join(self.rolling.directory, f"part{i}"),
                           f"{self.fingerprint}-part{i}", self.every_epochs, self.min_seconds,
                           self.rolling.keep, self._failed)

  def peek(self) -> dict | None:
    """Meta of the newest checkpoint saved under this fingerprint (arrays not yet read)."""
    for step in reversed(self.rolling.steps()):
      path = self.rolling.path(step)
      try:
        meta = read_meta(path)
      except CheckpointError as e:
        log.warning("%s; ignoring it", e)
        continue
      if meta.get("fingerprint") != self.fingerprint:
        # The cell's config changed since: its checkpoints can never be resumed.
        log.info("checkpoint %s was saved under a different config; discarding it", path)
        self.clear()
        return None
      meta["path"] = path
      self._last_epoch = meta["epochs_done"]
      return meta
    return None

  def restore(self, meta: dict, target):
    tree, _ = restore(meta["path"], target)
    return tree

  def maybe_save(self, epochs_done: int, tree_fn, meta: dict) -> bool:
    """Saves when the policy says so; False when it did not save. A save that fails (a full
    disk, a folder made read-only) is said once, in one line, and no later save is tried:
    the run goes on and finishes; a kill then resumes from the last checkpoint saved."""
    if (self._failed[0] or epochs_done - self._last_epoch < self.every_epochs
        or time.monotonic() - self._last_time < self.min_seconds):
      return False
    tree = tree_fn()
    try:
      self.rolling.save(epochs_done, tree, {**meta, "fingerprint": self.fingerprint,
                                            "epochs_done": epochs_done})
    except Exception as e:  # noqa: BLE001 - OSError, or whatever Orbax/TensorStore raise
      self._failed[0] = True
      why = io.os_error_line(e) if isinstance(e, OSError) else _first_line(e)[:200]
      log.warning("%s: a checkpoint could not be written (%s): the cell goes on and saves "
                  "no more, so a kill now loses the epochs since the last one saved (if any)",
                  self.rolling.directory, why)
      return False
    self._last_epoch, self._last_time = epochs_done, time.monotonic()
    return True

  def clear(self) -> None:
    self.rolling.clear()
    self._last_epoch = 0

"""Pretraining on the source task, cached by the config that made it.

The checkpoint lives in `<cache_dir>/pretrained/<source>-<hash>/` where the hash covers the
whole pretraining config (data, architecture, optimisation, seed), so any change that would
give different weights gives a different folder, and a second sweep reuses the first one's.
"""
from __future__ import annotations

import hashlib
import json
import os
import time

import jax
import ml_collections
from sklearn import metrics as skm

from tlresearch import data as data_lib
from tlresearch import checkpoint, grid, io, models, strategies, train

# Bump when a code change alters what a given pretraining config produces.
FORMAT_VERSION = 1
# Architecture fields the fine-tuned model must share with its pretrained backbone.
ARCH_FIELDS = ("family", "width", "blocks_per_stage", "num_stages", "stem_strides")


# Config options added after the first checkpoints were made, with their defaults.
LATER_OPTIONS = {"class_subset": "", "train.min_steps": 0, "train.bn_stats": "update"}


def default_cache_dir() -> str:
  return os.environ.get("TLRESEARCH_CACHE_DIR",
                        os.path.join(os.path.expanduser("~"), ".cache", "tlresearch"))


def for_model(pretrain_cfg, model_cfg) -> ml_collections.ConfigDict:
  """The pretraining config whose backbone has `model_cfg`'s architecture."""
  p = ml_collections.ConfigDict(pretrain_cfg.to_dict())
  for f in ARCH_FIELDS:
    p.model[f] = model_cfg[f]
  return p


def cache_key(pcfg) -> str:
  # Operational keys (e.g. train.data_parallel) never change which weights a config makes.
  config = grid.identity(pcfg.to_dict())
  # Options at their default are left out, so checkpoints made before an option existed
  # keep their key; any other value (e.g. a class subset) is part of it.
  for dotted, default in LATER_OPTIONS.items():
    *parents, leaf = dotted.split(".")
    node = config
    for p in parents:
      node = node.get(p, {})
    if leaf in node and node[leaf] == default:
      del node[leaf]
  blob = json.dumps({"format": FORMAT_VERSION, "config": config}, sort_keys=True)
  return f"{pcfg.dataset}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def checkpoint_dir(pcfg, cache_dir: str | None = None) -> str:
  return os.path.join(cache_dir or default_cache_dir(), "pretrained", cache_key(pcfg))


def train_source(pcfg, log=print, checkpointer=None) -> tuple[dict, dict]:
  """Trains the backbone on the source task from scratch; returns (variables, summary)."""
  t0 = time.perf_counter()
  ds = data_lib.load(pcfg.dataset, data_dir=pcfg.data_dir or None, seed=pcfg.seed,
                     class_subset=pcfg.get("class_subset", ""))
  model = models.build(pcfg.model, ds.num_classes)
  keys = train.CellKeys.from_seed(pcfg.seed)
  variables = train.init_variables(model, keys.init, ds.train_x.shape[1:])
  log(f"pretraining {pcfg.model.family} on {pcfg.dataset} ({len(ds.train_x)} images, "
      f"{pcfg.train.epochs} epochs)")
  epoch_line = lambda r, _: log(
      f"  epoch {r['epoch']}: train loss {r['train_loss']:.3f} acc {100 * r['train_accuracy']:.1f}%"
      f", val acc {100 * r['val_accuracy']:.1f}% ({r['seconds']:.1f}s)")
  result = train.fit(model, variables, strategies.full(model.groups), ds, pcfg.train, keys, log,
                     on_epoch=epoch_line, checkpointer=checkpointer)
  summary = {"dataset": pcfg.dataset, "class_subset": pcfg.get("class_subset", ""),
             "test_accuracy": result["test"]["accuracy"],
             "test_macro_f1": float(skm.f1_score(ds.test_y, result["test_predictions"],
                                                 average="macro")),
             "epochs_run": result["epochs_run"], "best_epoch": result["best_epoch"],
             "seconds": time.perf_counter() - t0, "history": result["history"]}
  return jax.device_get(result["variables"]), summary


def save(path: str, variables: dict, pcfg, summary: dict) -> None:
  """Writes the checkpoint beside the config that made it, atomically (tmp folder, rename).

  The arrays go through `checkpoint.save`, which records their checksum for `restore`.
  """
  with io.atomic_dir(path) as tmp:
    checkpoint.save(os.path.join(tmp, "variables"), variables)
    io.write_json(os.path.join(tmp, "config.json"), pcfg.to_dict())
    io.write_json(os.path.join(tmp, "summary.json"), summary)


def restore(path: str) -> dict:
  """The cached variables; CheckpointError if they are missing, unreadable or corrupted."""
  return checkpoint.restore(os.path.join(path, "variables"))[0]


def get_or_build(pcfg, cache_dir: str | None = None, log=print) -> tuple[dict, str]:
  """Pretrained variables for `pcfg`: from the cache, or trained and cached now.

  A cached checkpoint that fails its checksum (or cannot be read) is rebuilt, with a
  warning. Two processes wanting the same missing checkpoint build it once: the second
  waits on a lock file beside it and then reads what the first wrote.
  """
  path = checkpoint_dir(pcfg, cache_dir)
  lock = io.FileLock(path + ".lock")
  lock.acquire(blocking=True)
  try:
    if os.path.exists(os.path.join(path, "summary.json")):
      try:
        variables = restore(path)
        log(f"using cached pretrained backbone {path}")
        return variables, path
      except checkpoint.CheckpointError as e:
        log(f"warning: {e}; rebuilding the pretrained backbone")
    else:
      log(f"no cached pretrained backbone for this config; building {path}")
    # Pretraining is the longest single run of a sweep: its progress is checkpointed too.
    partial = checkpoint.FitCheckpointer(path + ".partial", cache_key(pcfg), min_seconds=30.0,
                                         log=log)
    variables, summary = train_source(pcfg, log, partial)
    save(path, variables, pcfg, summary)
    partial.clear()
    log(f"pretrained: source test accuracy {100 * summary['test_accuracy']:.1f}% "
        f"in {summary['seconds']:.0f}s")
    return variables, path
  finally:
    lock.release()

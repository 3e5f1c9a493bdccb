"""Pretraining on the source task, cached by the config that made it.

The checkpoint lives in `<cache_dir>/pretrained/<source>-<hash>/` where the hash covers the
whole pretraining config (data, architecture, optimisation, seed), so any change that would
give different weights gives a different folder, and a second sweep reuses the first one's.
"""
from __future__ import annotations

import logging
import os
import time

import jax
import ml_collections
from sklearn import metrics as skm

from tlresearch import data as data_lib, models
from tlresearch.core import configs, io, layout
from tlresearch.methods import strategies
from tlresearch.training import checkpoint, programs, train

log = logging.getLogger(__name__)

# Architecture fields the fine-tuned model must share with its pretrained backbone.
ARCH_FIELDS = ("family", "width", "blocks_per_stage", "num_stages", "stem_strides")
# The fields that decide which weights a pretraining config makes; bump the version when a
# code change alters what they produce.
IDENTITY_VERSION = 2
IDENTITY_FIELDS = ("dataset", "class_subset", "data_dir", "seed", "model") + tuple(
    f"train.{k}" for k in train.IDENTITY_FIELDS)


def default_cache_dir() -> str:
  """$TLRESEARCH_CACHE_DIR if set, else ~/.cache/tlresearch."""
  return io.env_folder("TLRESEARCH_CACHE_DIR", ".cache", "tlresearch")


def for_model(pretrain_cfg, model_cfg) -> ml_collections.ConfigDict:
  """The pretraining config whose backbone has `model_cfg`'s architecture."""
  p = ml_collections.ConfigDict(pretrain_cfg.to_dict() if hasattr(pretrain_cfg, "to_dict")
                                else pretrain_cfg)
  for f in ARCH_FIELDS:
    if f in model_cfg:  # a Keras family's weights do not come from source pretraining
      p.model[f] = model_cfg[f]
  return p


def identity(pretrain_cfg, model_cfg=None) -> dict:
  """What decides the pretrained weights: the pretraining fields (with `model_cfg`'s
  architecture, when given)."""
  pcfg = pretrain_cfg if model_cfg is None else for_model(pretrain_cfg, model_cfg)
  return configs.pick(pcfg, IDENTITY_FIELDS, IDENTITY_VERSION,
                      {f"train.{k}": v for k, v in train.IDENTITY_DEFAULTS.items()}
                      | {f"model.{k}": v for k, v in models.IDENTITY_DEFAULTS.items()})


def cache_key(pcfg) -> str:
  return f"{pcfg.dataset}-{configs.digest(identity(pcfg))[:12]}"


def checkpoint_dir(pcfg, cache_dir: str | None = None) -> str:
  return os.path.join(cache_dir or default_cache_dir(), "pretrained", cache_key(pcfg))


def train_source(pcfg, checkpointer=None) -> tuple[dict, dict]:
  """Trains the backbone on the source task from scratch; returns (variables, summary)."""
  t0 = time.perf_counter()
  ds = data_lib.load(pcfg.dataset, data_dir=pcfg.data_dir or None, seed=pcfg.seed,
                     class_subset=pcfg.class_subset)
  model = models.build(pcfg.model, ds.num_classes)
  keys = train.CellKeys.from_seed(pcfg.seed)
  variables = programs.init_variables(model, keys.init, ds.train_x.shape[1:])
  log.info("pretraining %s on %s (%d images, %d epochs)", pcfg.model.family, pcfg.dataset,
           len(ds.train_x), pcfg.train.epochs)

  def epoch_line(_, r, __):
    log.info("  epoch %d: train loss %.3f acc %.1f%%, val acc %.1f%% (%.1fs)", r["epoch"],
             r["train_loss"], 100 * r["train_accuracy"], 100 * r["val_accuracy"], r["seconds"])

  (result,) = train.fit(model, [variables], strategies.full(model.groups), [ds], pcfg.train,
                        [keys], checkpointer=lambda _: checkpointer, on_epoch=epoch_line)
  summary = {"dataset": pcfg.dataset, "class_subset": pcfg.class_subset,
             "test_accuracy": result.test["accuracy"],
             "test_macro_f1": float(skm.f1_score(ds.test_y, result.test_predictions,
                                                 average="macro")),
             "epochs_run": result.epochs_run, "best_epoch": result.best_epoch,
             "seconds": time.perf_counter() - t0, "layout": layout.current(),
             "history": result.history}
  return jax.device_get(result.variables), summary


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


def get_or_build(pcfg, cache_dir: str | None = None) -> tuple[dict, str]:
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
        log.info("using cached pretrained backbone %s", path)
        return variables, path
      except checkpoint.CheckpointError as e:
        log.warning("%s; rebuilding the pretrained backbone", e)
    else:
      log.info("no cached pretrained backbone for this config; building %s", path)
    # Pretraining is the longest single run of a sweep: its progress is checkpointed too.
    partial = checkpoint.FitCheckpointer(path + ".partial", cache_key(pcfg), min_seconds=30.0)
    variables, summary = train_source(pcfg, partial)
    save(path, variables, pcfg, summary)
    partial.clear()
    log.info("pretrained: source test accuracy %.1f%% in %.0fs",
             100 * summary["test_accuracy"], summary["seconds"])
    return variables, path
  finally:
    lock.release()

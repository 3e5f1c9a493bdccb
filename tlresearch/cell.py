"""One grid cell: data, model, strategy, fit, metrics -> files in the cell's folder."""
from __future__ import annotations

import os
import time

import jax.numpy as jnp
from sklearn import metrics as skm

from tlresearch import data as data_lib
from tlresearch import checkpoint, grid, io, models, optim, probes, strategies, train
from tlresearch.strategies import resolve
from flax import traverse_util


def trainable_params(variables, strategy) -> int:
  """Largest number of trainable parameters over the strategy's stages."""
  paths = traverse_util.flatten_dict(variables["params"], sep="/").keys()
  return max(optim.count(variables["params"], resolve(s.rules, paths)) for s in strategy.stages)


def not_loaded(cfg, strategy, groups) -> tuple[str, ...]:
  """Groups that keep their fresh init: the head (a new task's head is new, unless the cell
  asks for the source head), and the groups above a strategy's `transfer_groups`."""
  head = () if cfg.get("pretrained_head", False) else (groups[-1],)
  above = () if strategy.transfer_groups is None else tuple(groups[strategy.transfer_groups:-1])
  return above + head


def run(cfg, cell_id: str, axes: dict, cell_dir: str, pretrained: dict | None, log=print) -> dict:
  """Trains one cell and writes config.json, metrics.jsonl and final.json to `cell_dir`."""
  t0 = time.perf_counter()
  if not train.compile_reuse():
    train.clear_compile_cache()
  compile0 = train.COMPILE_SECONDS[0]
  io.write_json(os.path.join(cell_dir, "config.json"), {"cell_id": cell_id, "axes": axes,
                                                        "config": cfg.to_dict()})
  ds = data_lib.load_for(cfg)
  data_report = data_lib.report(ds, log)  # skipped files, carved splits
  model = models.build(cfg.model, ds.num_classes)
  strategy = strategies.get(cfg.strategy, model.groups)
  keys = train.CellKeys.from_seed(cfg.seed)
  # The same init key for every strategy: the head starts identical across a comparison.
  fresh = model.init(keys.init, jnp.zeros((1,) + ds.train_x.shape[1:], jnp.float32))
  variables = (models.merge_pretrained(fresh, pretrained, not_loaded(cfg, strategy, model.groups))
               if strategy.pretrained else fresh)
  policy = cfg.get("checkpoint") or checkpoint.defaults()
  ckpt = checkpoint.FitCheckpointer(
      os.path.join(cell_dir, "checkpoints"), grid.fingerprint(cfg),
      every_epochs=policy.every_epochs, min_seconds=policy.min_seconds, keep=policy.keep,
      log=log) if policy.enabled else None
  result = train.fit(model, variables, strategy, ds, cfg.train, keys, log, checkpointer=ckpt)
  # The selection protocol (tlresearch.selection) reads only this validation score.
  val = result["val"]
  pred = result["test_predictions"]
  labels = list(range(ds.num_classes))
  final = {
      "cell_id": cell_id, "axes": axes, "status": "diverged" if result["diverged"] else "ok",
      "diverged_at": result["diverged"],
      "strategy": strategy.spec, "target": cfg.target, "seed": cfg.seed,
      "test_accuracy": result["test"]["accuracy"], "test_loss": result["test"]["loss"],
      "test_macro_f1": float(skm.f1_score(ds.test_y, pred, labels=labels, average="macro",
                                          zero_division=0)),
      "classification_report": skm.classification_report(
          ds.test_y, pred, labels=labels, target_names=list(ds.class_names), output_dict=True,
          zero_division=0),
      "best_epoch": result["best_epoch"], "epochs_run": result["epochs_run"],
      "trainable_params": trainable_params(variables, strategy),
      "total_params": optim.count(variables["params"]),
      "train_examples": int(len(ds.train_x)), "cached_prefix": result["cached_prefix"],
      "notes": result["notes"], **data_report, "val_accuracy": val["accuracy"],
      "hparams": {"train.lr": cfg.train.lr, "train.weight_decay": cfg.train.weight_decay},
      **probes.measure(tuple(cfg.get("probes", ())), model, variables, result["variables"], ds),
      "compile_seconds": train.COMPILE_SECONDS[0] - compile0,
      "wall_seconds": time.perf_counter() - t0,
  }
  io.write_jsonl(os.path.join(cell_dir, "metrics.jsonl"), result["history"])
  io.write_json(os.path.join(cell_dir, "final.json"), final)
  if ckpt is not None:
    ckpt.clear()  # final.json is the cell's record from now on
  return final

"""One grid cell: data, model, strategy, fit, metrics -> files in the cell's folder."""
from __future__ import annotations

import os
import time

from sklearn import metrics as skm

from tlresearch import data as data_lib
from tlresearch import checkpoint, grid, io, models, optim, probes, seeds, strategies, train
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
  _fresh_programs_for_baseline()
  compile0 = train.COMPILE_SECONDS[0]
  _write_config(cfg, cell_id, axes, cell_dir)
  ds, data_report = _load(cfg, log)
  model = models.build(cfg.model, ds.num_classes)
  strategy = strategies.get(cfg.strategy, model.groups)
  keys = train.CellKeys.from_seed(cfg.seed)
  variables = _start_variables(cfg, model, strategy, keys, ds, pretrained)
  ckpt = _checkpointer(cfg, cell_dir, log)
  result = train.fit(model, variables, strategy, ds, cfg.train, keys, log, checkpointer=ckpt)
  final = final_record(cfg, cell_id, axes, ds, data_report, model, strategy, variables, result)
  final["compile_seconds"] = train.COMPILE_SECONDS[0] - compile0
  final["wall_seconds"] = time.perf_counter() - t0
  _write_results(cell_dir, result, final, ckpt)
  return final


def run_seeds(cfgs, cell_ids, axes_list, cell_dirs, pretrained: dict | None,
              log=print) -> list[dict]:
  """`run` for cells that differ only in seed, trained together (tlresearch.seeds.fit_seeds);
  writes the same files with the same fields. compile_seconds and wall_seconds are each
  cell's equal share of the group's."""
  t0 = time.perf_counter()
  _fresh_programs_for_baseline()
  compile0 = train.COMPILE_SECONDS[0]
  for cfg, cell_id, axes, cell_dir in zip(cfgs, cell_ids, axes_list, cell_dirs):
    _write_config(cfg, cell_id, axes, cell_dir)
  loaded = [_load(cfg, log) for cfg in cfgs]
  datas = [ds for ds, _ in loaded]
  model = models.build(cfgs[0].model, datas[0].num_classes)  # one module for every seed
  strategy = strategies.get(cfgs[0].strategy, model.groups)
  keys = [train.CellKeys.from_seed(cfg.seed) for cfg in cfgs]
  starts = [_start_variables(cfg, model, strategy, k, ds, pretrained)
            for cfg, k, ds in zip(cfgs, keys, datas)]
  ckpts = [_checkpointer(cfg, d, log) for cfg, d in zip(cfgs, cell_dirs)]
  results = seeds.fit_seeds(model, starts, strategy, datas, cfgs[0].train, keys, log,
                            checkpointers=ckpts)
  finals = [final_record(cfg, cell_id, axes, ds, data_report, model, strategy, v, result)
            for cfg, cell_id, axes, (ds, data_report), v, result
            in zip(cfgs, cell_ids, axes_list, loaded, starts, results)]
  share = {"compile_seconds": (train.COMPILE_SECONDS[0] - compile0) / len(cfgs),
           "wall_seconds": (time.perf_counter() - t0) / len(cfgs)}
  for cell_dir, result, final, ckpt in zip(cell_dirs, results, finals, ckpts):
    final.update(share)
    _write_results(cell_dir, result, final, ckpt)
  return finals


def _fresh_programs_for_baseline():
  """Under `TLRESEARCH_COMPILE_CACHE=off` (the benchmark's baseline) a cell, or a group of
  seeds trained together, compiles its own programs: nothing reused from earlier cells."""
  if not train.compile_reuse():
    train.clear_compile_cache()


def _write_config(cfg, cell_id, axes, cell_dir):
  io.write_json(os.path.join(cell_dir, "config.json"), {"cell_id": cell_id, "axes": axes,
                                                        "config": cfg.to_dict()})


def _load(cfg, log):
  ds = data_lib.load_for(cfg)
  return ds, data_lib.report(ds, log)  # skipped files, carved splits


def _start_variables(cfg, model, strategy, keys, ds, pretrained):
  # The same init key for every strategy: the head starts identical across a comparison.
  fresh = train.init_variables(model, keys.init, ds.train_x.shape[1:])
  return (models.merge_pretrained(fresh, pretrained, not_loaded(cfg, strategy, model.groups))
          if strategy.pretrained else fresh)


def _checkpointer(cfg, cell_dir, log):
  policy = cfg.get("checkpoint") or checkpoint.defaults()
  return checkpoint.FitCheckpointer(
      os.path.join(cell_dir, "checkpoints"), grid.fingerprint(cfg),
      every_epochs=policy.every_epochs, min_seconds=policy.min_seconds, keep=policy.keep,
      log=log) if policy.enabled else None


def final_record(cfg, cell_id, axes, ds, data_report, model, strategy, variables,
                 result) -> dict:
  """final.json's fields, except the timings (compile_seconds, wall_seconds) the caller
  adds. `variables` are the cell's starting ones, `result` what `train.fit` returned."""
  # The selection protocol (tlresearch.selection) reads only this validation score.
  val = result["val"]
  pred = result["test_predictions"]
  labels = list(range(ds.num_classes))
  return {
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
  }


def _write_results(cell_dir, result, final, ckpt):
  io.write_jsonl(os.path.join(cell_dir, "metrics.jsonl"), result["history"])
  io.write_json(os.path.join(cell_dir, "final.json"), final)
  if ckpt is not None:
    ckpt.clear()  # final.json is the cell's record from now on

"""Run an experiment: the grid of cells, then the tables, or the source pretraining alone."""
from __future__ import annotations

import os
import shutil
import time

from tqdm import tqdm

from tlresearch import cell as cell_lib
from tlresearch import findings as findings_lib
from tlresearch import grid, io, models, pretrain, report, selection, strategies, train
from tlresearch import seeds as seeds_lib
from tlresearch.errors import UserError


def enable_compile_cache(cache_dir: str | None) -> str:
  """JAX's persistent compilation cache in the project cache: a rerun compiles ~nothing."""
  import jax
  path = os.path.join(cache_dir or pretrain.default_cache_dir(), "jax_compilation_cache")
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
  return path


def run_grid(config, name: str, workdir: str, results_dir: str, overwrite: bool = False,
             progress: bool = True, findings: findings_lib.Findings | None = None,
             command: str = "") -> dict:
  """Runs every unfinished cell of `config`'s grid and writes `results_dir/name/`.

  With `config.selection.enabled`, the selection cells run first and each configuration's
  final cells use its selected values (tlresearch.selection). `findings`: the experiment's
  claims and plots, written to findings.md; `command`: the command line that made them.
  """
  t0 = time.perf_counter()
  cells = grid.expand(config)
  sel_cells = selection.expand(config, cells)
  # every bad value and every bad dataset fails here, before training
  grid.check_all(cells + sel_cells)
  lock = io.directory_lock(workdir)
  if not lock.acquire():
    raise UserError(f"workdir {workdir} is in use by another sweep (pid {lock.holder()}); "
                    "wait for it to finish or pass a different --workdir")
  try:
    return _run_grid(config, cells, sel_cells, name, workdir, results_dir, overwrite, progress,
                     findings, command, t0)
  finally:
    lock.release()


def _clear_workdir(workdir: str) -> None:
  """--overwrite: every cell folder goes, the lock file (held by us) stays."""
  for entry in os.listdir(workdir):
    if entry != ".lock":
      path = os.path.join(workdir, entry)
      shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)


def _run_grid(config, cells, sel_cells, name, workdir, results_dir, overwrite, progress,
              findings, command, t0) -> dict:
  enable_compile_cache(config.cache_dir or None)
  if overwrite:
    _clear_workdir(workdir)
  pretrained = {}

  def backbone(cfg):
    external = models.pretrained_key(cfg.model)  # e.g. keras:imagenet weights, or None
    if external is not None:
      if external not in pretrained:
        pretrained[external] = models.load_pretrained(cfg.model, log=tqdm.write)
      return pretrained[external]
    pcfg = pretrain.for_model(cfg.pretrain, cfg.model)
    key = pretrain.cache_key(pcfg)
    if key not in pretrained:
      pretrained[key] = pretrain.get_or_build(pcfg, cfg.cache_dir or None, log=tqdm.write)[0]
    return pretrained[key]

  labels = dict(config.report.axis_labels)

  def run_cells(cells, root, desc):
    """final.json of every cell, training only the unfinished ones; (finals, reused)."""
    done = {c.id: grid.finished(os.path.join(root, c.id), c) for c in cells}
    todo = [c for c in cells if done[c.id] is None]
    needs = {c.id: strategies.get(c.config.strategy,
                                  models.groups_of(c.config.model)).pretrained for c in todo}
    for c in todo:  # before the progress bar, so its ETA measures cells only
      if needs[c.id]:
        backbone(c.config)
    finals = []
    groups = seeds_lib.groups(todo)  # vmap mode: the seeds of one configuration train together
    bar = tqdm(cells, desc=desc, unit="cell", disable=not progress, dynamic_ncols=True)
    for c in bar:
      final = done[c.id]
      if final is None and c.id in groups:  # its group trains now, the whole group's cells
        done.update(_run_seed_group(groups[c.id], root,
                                    backbone(c.config) if needs[c.id] else None, labels))
        final = done[c.id]
      if final is None:
        final = cell_lib.run(c.config, c.id, c.axes, os.path.join(root, c.id),
                             backbone(c.config) if needs[c.id] else None, log=tqdm.write)
        tqdm.write(_summary_line(final, labels))
      finals.append(final)
    return finals, len(cells) - len(todo)

  out_dir = os.path.join(results_dir, name)
  sel_table = None
  if sel_cells:
    sel_finals, _ = run_cells(sel_cells, os.path.join(workdir, "selection"), f"{name} selection")
    chosen = selection.choose(config, sel_cells, sel_finals)
    cells = selection.apply(cells, chosen)
    sel_table = selection.table_csv(sel_cells, sel_finals, chosen)
  finals, reused = run_cells(cells, workdir, name)
  axes = grid.axes_of(config)
  # The reference row of the paired-difference table: the base config with that strategy.
  reference = tuple({**grid.base_axes(config), "strategy": config.report.reference}.values())

  def extra(folder):
    """selection.csv, findings.md and the findings' plots, into the results folder."""
    names = []
    if sel_table is not None:
      io.write_text(os.path.join(folder, "selection.csv"), sel_table)
      names.append("selection.csv")
    if findings is not None:
      names += [os.path.basename(p)
                for p in findings_lib.write(folder, name, findings, finals, command)]
    return names

  paths = report.write(finals, axes, out_dir, name, labels, reference,
                       metrics=config.report.get("metrics", None),
                       show_hparams=selection.enabled(config), extra=extra)
  seconds = time.perf_counter() - t0
  summary = {"cells": len(cells), "reused": reused, "seconds": seconds,
             "compile_seconds": train.COMPILE_SECONDS[0], "outputs": paths}
  print(f"{name}: {len(cells)} cells ({reused} reused) in {seconds:.0f}s; wrote "
        + ", ".join(paths))
  return summary


def _run_seed_group(group, root: str, pretrained, labels: dict) -> dict:
  """{cell id: final.json} of cells that differ only in seed, trained together."""
  finals = cell_lib.run_seeds([c.config for c in group], [c.id for c in group],
                              [c.axes for c in group], [os.path.join(root, c.id) for c in group],
                              pretrained, log=tqdm.write)
  for f in finals:
    tqdm.write(_summary_line(f, labels))
  return {c.id: f for c, f in zip(group, finals)}


def _summary_line(f: dict, labels: dict) -> str:
  axes = " ".join(f"{labels.get(k, k).replace(' ', '_')}={v}" for k, v in f["axes"].items())
  return (f"[{f['status']}] {axes}: test acc {100 * f['test_accuracy']:.1f}% "
          f"F1 {100 * f['test_macro_f1']:.1f}% best epoch {f['best_epoch']}/{f['epochs_run']} "
          f"{f['trainable_params']:,} trainable, {f['wall_seconds']:.1f}s "
          f"(compile {f['compile_seconds']:.1f}s)")


def run_pretrain(config, name: str, results_dir: str, overwrite: bool = False) -> dict:
  """Builds (or reuses) the cached source checkpoint and writes its summary to results."""
  pcfg = pretrain.for_model(config.pretrain, config.pretrain.model)
  enable_compile_cache(config.cache_dir or None)
  path = pretrain.checkpoint_dir(pcfg, config.cache_dir or None)
  if overwrite and os.path.exists(path):
    shutil.rmtree(path)
  _, path = pretrain.get_or_build(pcfg, config.cache_dir or None)
  summary = io.read_json(os.path.join(path, "summary.json"))
  out = os.path.join(results_dir, name, "summary.json")
  io.write_json(out, {**{k: v for k, v in summary.items() if k != "history"},
                      "cache_key": os.path.basename(path), "config": pcfg.to_dict()})
  print(f"{name}: source test accuracy {100 * summary['test_accuracy']:.1f}%, checkpoint "
        f"{path}; wrote {out}")
  return summary

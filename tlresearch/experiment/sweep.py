"""Run an experiment: the grid of cells, then the tables, or the source pretraining alone.

A grid runs whole in one process (`run_grid`), or split across the tasks of an array job
(`run_grid` with `task_index` / `num_tasks` in each task, then `merge_grid` once): both
build the results folder with `write_results` from the cells' final.json records.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from tlresearch import data as data_lib, models
from tlresearch.analysis import findings as findings_lib, report
from tlresearch.core import configs, io, layout, timing
from tlresearch.core.errors import UserError
from tlresearch.data import card as data_card
from tlresearch.deploy import recognizer
from tlresearch.experiment import cell as cell_lib, grid, selection, workers
from tlresearch.methods import strategies
from tlresearch.training import pretrain, programs, train

log = logging.getLogger(__name__)


def enable_compile_cache(cache_dir: str | None) -> str:
  """JAX's persistent compilation cache in the project cache: a rerun compiles ~nothing."""
  path = os.path.join(cache_dir or pretrain.default_cache_dir(), "jax_compilation_cache")
  programs.use_compile_cache(path)
  return path


def run_grid(config, name: str, workdir: str, results_dir: str, overwrite: bool = False,
             progress: bool = True, findings: findings_lib.Findings | None = None,
             command: str = "", task_index: int = 0, num_tasks: int = 1,
             retrained: set | None = None, pool: workers.Pool | None = None) -> dict:
  """Runs every unfinished cell of `config`'s grid and writes `results_dir/name/`.

  Cells live in the cell store `<workdir>/cells/` (`cell_dir`), shared by every experiment
  run with the same workdir: a cell another grid trained is reused. `overwrite` retrains
  this grid's cells except those in `retrained` (folders this command has retrained
  already, e.g. for an earlier experiment of `--experiment=all`), and adds them to it.
  `pool`: worker processes started for several grids (used, not closed), instead of this
  grid's own.

  With `config.selection.enabled`, the selection cells run first and each configuration's
  final cells use its selected values (tlresearch.experiment.selection). `findings`: the
  experiment's claims and plots, written to findings.md; `command`: the command line that made them.
  With `num_tasks` > 1, runs only the configurations of task `task_index` (grid.shard) and
  writes no tables: `merge_grid` builds them once every task has finished.
  """
  t0 = time.perf_counter()
  timing.reset()
  grid.check_task(task_index, num_tasks)
  check_folders(config, name, workdir, results_dir)
  if overwrite and num_tasks > 1:
    raise UserError("--overwrite cannot be used with --num_tasks > 1: it would delete the other "
                    "tasks' cells; clear the workdir once before launching the tasks instead")
  cells = grid.expand(config)
  sel_cells = selection.first_round(config, cells)
  mine, sel_mine = cells, sel_cells
  if num_tasks > 1:
    mine = grid.shard(cells, task_index, num_tasks)
    sel_mine = selection.first_round(config, mine)
  workers.check(config.workers)
  layout.check(config.threads)
  enable_compile_cache(config.cache_dir or None)
  retrained = set() if retrained is None else retrained
  with CellRunner(config, progress, retrained if overwrite else None, pool) as runner:
    # Worker processes start while this one checks: their imports overlap the checks.
    runner.start_workers(_unfinished(mine, sel_mine, workdir, overwrite))
    # every bad value and every bad dataset fails here, before training (in every task alike)
    with timing.phase("check"):
      checked = cell_lib.check_all(cells + sel_cells)
      report.check(config)
    with _workdir_lock(workdir, name, task_index, num_tasks):
      if num_tasks > 1:
        return _run_task(config, cells, mine, name, workdir, runner, task_index, num_tasks, t0)
      finals, outcome, reused = train_cells(config, cells, name, workdir, runner)
      runner.close()
      with timing.phase("report"):
        paths = write_results(config, name, results_dir, finals, outcome, findings, command,
                              checked)
  seconds = time.perf_counter() - t0
  print(f"{name}: {len(cells)} cells ({reused} reused) in {seconds:.0f}s; wrote "
        + ", ".join(paths))
  return {"cells": len(cells), "reused": reused, "seconds": seconds, "outputs": paths,
          "workers": runner.workers, "phases": timing.snapshot(),
          "folders": runner.folders, "trained": runner.trained}


def check_folders(config, name: str, workdir: str, results_dir: str) -> None:
  """UserError now, before anything trains, for a results folder, workdir or cache that
  cannot be written (a file in the way, a read-only or full disk), and for a results
  folder `results_dir/name` whose replacement would delete what is not this project's."""
  out = os.path.join(results_dir, name)
  real_out, real_work = os.path.realpath(out), os.path.realpath(workdir)
  if real_work == real_out or real_work.startswith(real_out + os.sep):
    raise UserError(f"the workdir {workdir} is inside {out}, which is replaced whole when the "
                    "tables are written: choose another --workdir or --results_dir")
  report.check_replaceable(out)
  io.check_writable(results_dir, "the results folder (--results_dir)")
  io.check_writable(workdir, "the workdir (--workdir)")
  io.check_writable(config.cache_dir or pretrain.default_cache_dir(),
                    "the cache folder (cache_dir / $TLRESEARCH_CACHE_DIR)")


def _unfinished(cells, sel_cells, workdir: str, overwrite: bool) -> int:
  """How many of these final and first-round selection cells have no final.json yet."""
  if overwrite:
    return len(cells) + len(sel_cells)
  return sum(f is None for f in _read_finals(cells + sel_cells, workdir))


def _run_task(config, cells, mine, name, workdir, runner, task_index, num_tasks, t0) -> dict:
  """One task of a sharded grid: its configurations' cells, no tables."""
  # Selection runs for this task's configurations only: exactly the cells they need.
  # save_model: the best of the grid is known once every task has finished (merge_grid).
  _, outcome, reused = train_cells(config, mine, name, workdir, runner, keep=False)
  n_sel = outcome.cells if outcome is not None else 0
  seconds = time.perf_counter() - t0
  count = lambda cs: len({configs.configuration(c.axes) for c in cs})
  print(f"{name}: --task_index={task_index} of --num_tasks={num_tasks} ran its {count(mine)} "
        f"of {count(cells)} configurations, {len(mine)} cells"
        + (f" and {n_sel} selection cells" if n_sel else "")
        + f" ({reused} reused) in {seconds:.0f}s, no tables; once every task has finished, "
        "the same command with --merge in place of --task_index/--num_tasks builds them")
  return {"cells": len(mine), "selection_cells": n_sel, "reused": reused,
          "seconds": seconds, "outputs": [], "workers": runner.workers,
          "phases": timing.snapshot(), "folders": runner.folders, "trained": runner.trained}


def merge_grid(config, name: str, workdir: str, results_dir: str,
               findings: findings_lib.Findings | None = None, command: str = "") -> dict:
  """Builds `results_dir/name/` from the cells the tasks of a sharded grid left in `workdir`,
  exactly as `run_grid` in one process would, except the data card (data.md): it trains
  nothing, so it reads no data (a merge may run where the data is not) and loads no
  backbone; while any cell is unfinished, raises UserError and writes nothing."""
  t0 = time.perf_counter()
  cells = grid.expand(config)
  report.check(config)
  check_folders(config, name, workdir, results_dir)

  def read_selection(sel_cells, round_index):
    finals = _read_finals(sel_cells, workdir)
    _check_all_finished(workdir, sel_cells, finals)
    return finals

  # The same rounds as the run, each read from disk: a widened candidate is found exactly
  # when the run that made it chose to widen.
  cells, outcome = selection.run(config, cells, read_selection)
  finals = _read_finals(cells, workdir)
  _check_all_finished(workdir, cells, finals)
  recognizer.keep(config, cells, finals, cell_dirs(cells, workdir), kept_record(workdir, name))
  paths = write_results(config, name, results_dir, finals, outcome, findings, command)
  seconds = time.perf_counter() - t0
  print(f"{name}: merged {len(cells)} cells"
        + (f" and {outcome.cells} selection cells" if outcome is not None else "")
        + f" from {workdir} in {seconds:.0f}s; wrote " + ", ".join(paths))
  return {"cells": len(cells), "reused": len(cells), "seconds": seconds, "outputs": paths}


def _check_all_finished(workdir: str, cells, finals: list) -> None:
  ids = [os.path.relpath(cell_dir(workdir, c), workdir) for c in cells]
  missing = [i for i, f in zip(ids, finals) if f is None]
  if missing:
    first = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
    raise UserError(f"cannot merge: {len(missing)} of {len(ids)} cells are not finished in "
                    f"{workdir} ({first}); the tasks that run them must finish first (rerun a "
                    "failed task with its same flags), and --merge needs the tasks' --config "
                    "overrides")


@contextlib.contextmanager
def _workdir_lock(workdir: str, name: str, task_index: int, num_tasks: int):
  """A whole-grid sweep holds `<workdir>/.lock` alone. The tasks of a sharded grid hold it
  shared (they run side by side; a whole-grid sweep, which may clear the workdir, runs with
  none of them) and each its own task lock (a task started twice would train its cells twice
  at once)."""
  with contextlib.ExitStack() as stack:
    _hold(stack, io.directory_lock(workdir), num_tasks > 1,
          f"workdir {workdir} is in use by another sweep", " or pass a different --workdir")
    if num_tasks > 1:
      _hold(stack, io.task_lock(workdir, name, task_index, num_tasks), False,
            f"--task_index={task_index} of --num_tasks={num_tasks} is already running on "
            f"workdir {workdir}", "")
    yield


def _hold(stack: contextlib.ExitStack, lock: io.FileLock, shared: bool, busy: str,
          advice: str) -> None:
  if not lock.acquire(shared=shared):
    raise UserError(f"{busy} (pid {lock.holder()}); wait for it to finish{advice}")
  stack.callback(lock.release)


def cell_dir(workdir: str, cell) -> str:
  """A cell's folder in the store: `<workdir>/cells/<identity>` (cell.folder)."""
  return os.path.join(workdir, "cells", cell_lib.folder(cell.config))


def cell_dirs(cells, workdir: str) -> dict[str, str]:
  return {c.id: cell_dir(workdir, c) for c in cells}


def kept_record(workdir: str, name: str) -> str:
  """Where experiment `name` records its kept models (tlresearch.deploy.recognizer)."""
  return os.path.join(workdir, "kept", f"{name}.json")


def _read_finals(cells, workdir: str) -> list[dict | None]:
  """Each cell's final.json when it finished under exactly its config, else None."""
  return [cell_lib.finished(cell_dir(workdir, c), c) for c in cells]


def train_cells(config, cells, name: str, workdir: str, run_cells: CellRunner,
                keep: bool = True) -> tuple[list[dict], selection.Outcome | None, int]:
  """Runs the unfinished selection cells (round by round), then the unfinished final cells
  under their configuration's selected values, then (with `keep`: the whole grid) applies
  `save_model`; (finals, selection outcome or None, final cells reused)."""

  def run_selection(sel_cells, round_index):
    desc = f"{name} selection" + (f" (widened, round {round_index + 1})" if round_index else "")
    return run_cells(sel_cells, workdir, desc, final=False)[0]

  cells, outcome = selection.run(config, cells, run_selection)
  finals, reused = run_cells(cells, workdir, name)
  if keep:
    recognizer.keep(config, cells, finals, cell_dirs(cells, workdir), kept_record(workdir, name),
                    run_cells.retrain)
  return finals, outcome, reused


def seed_groups(cells) -> list[list]:
  """The cells in training order, as groups that train in one `cell.run`: the seeds of a
  configuration together where they train vmapped (`train.seeds_mode`), else one each."""
  together, out = {}, []
  for c in cells:
    if train.seeds_mode(c.config.train) == "vmap":
      key = cell_lib.configuration_key(c.config)
      if key not in together:
        together[key] = []
        out.append(together[key])
      together[key].append(c)
    else:
      out.append([c])
  return out


class CellRunner:
  """Trains cells and reports each as it finishes: in this process, or on a pool of worker
  processes (`config.workers`, tlresearch.experiment.workers) started once for the whole sweep.

  `runner(cells, workdir, desc, final)` -> (final.json of every cell, how many were reused);
  `final` is False for selection cells. With `retrained` (a set, --overwrite), a finished
  cell trains again unless its folder is in it, and then joins it.
  `folders` lists the store folders asked for (with repeats), `trained` how many trained."""

  def __init__(self, config, progress: bool, retrained: set | None = None,
               pool: workers.Pool | None = None):
    self.labels = dict(config.report.axis_labels)
    self.print_reports = bool(config.report.classification_reports)
    self.progress = progress
    self.setting = config.workers
    self.threads = config.threads
    self.backbones = cell_lib.Backbones()
    self.pool, self.shared_pool = None, pool
    self.workers = 1  # the most processes that trained at once
    self.retrained = retrained
    self.folders, self.trained = [], 0

  def start_workers(self, pending_cells: int) -> None:
    """Starts the worker pool if `config.workers` asks for one for this much work (their
    start-up then overlaps whatever this process does next)."""
    if self.pool is None and pending_cells and self.shared_pool is not None:
      self.pool, self.workers = self.shared_pool, self.shared_pool.size
    if self.pool is None and pending_cells:
      import jax
      n = workers.count(self.setting, pending_cells, jax.default_backend(), data_lib.mocked())
      if n > 1:
        log.info("training on %d worker processes", n)
        self.pool = workers.Pool(n, self.threads)
        self.workers = n

  def retrain(self, cell, cell_dir: str) -> dict:
    """Trains one cell again in this process (bitwise the same result); its final record."""
    pretrained = strategies.get(cell.config.strategy,
                                models.groups_of(cell.config.model)).pretrained
    return cell_lib.run([cell], [cell_dir],
                        self.backbones(cell.config) if pretrained else None)[0]

  def close(self, kill: bool = False) -> None:
    if self.pool is not None and self.pool is not self.shared_pool:
      self.pool.close(kill)
    self.pool = None

  def __enter__(self):
    return self

  def __exit__(self, exc_type, *_):
    self.close(kill=exc_type is not None)

  def __call__(self, cells, workdir, desc, final: bool = True):
    dirs = cell_dirs(cells, workdir)
    self.folders += list(dirs.values())
    done = dict(zip((c.id for c in cells), _read_finals(cells, workdir)))
    for c in cells:  # save_model=all: a cell finished without its model trains again
      if (done[c.id] is not None and c.config.save_model == "all"
          and not recognizer.has_model(dirs[c.id])):
        done[c.id] = None
      if self.retrained is not None and dirs[c.id] not in self.retrained:
        done[c.id] = None
    # One training per store folder: cells of this grid that are the same cell under two
    # names (an operational axis) share it.
    todo = list({dirs[c.id]: c for c in reversed(cells) if done[c.id] is None}.values())[::-1]
    for c in todo:
      if self.retrained is not None:
        shutil.rmtree(dirs[c.id], ignore_errors=True)
        self.retrained.add(dirs[c.id])
      else:
        cell_lib.set_aside(dirs[c.id], c)
    self.trained += len(todo)
    needs = {c.id: strategies.get(c.config.strategy,
                                  models.groups_of(c.config.model)).pretrained for c in todo}
    groups = seed_groups(todo)
    self.start_workers(len(groups))
    if self.pool is None:
      with timing.phase("backbone"):
        for c in todo:  # before the progress bar, so its ETA measures cells only
          if needs[c.id]:
            self.backbones(c.config)
    tasks = [(g, [dirs[c.id] for c in g], needs[g[0].id]) for g in groups]
    # Log lines go through tqdm while the bar is up, so the bar stays one line below them.
    with logging_redirect_tqdm(loggers=[logging.getLogger("tlresearch")]), \
        tqdm(total=len(cells), desc=desc, unit="cell", disable=not self.progress,
             dynamic_ncols=True) as bar:
      bar.update(len(cells) - len(todo))

      def finished(index, finals):
        for c, f in zip(groups[index], finals):
          done[c.id] = f
          log.info("%s", _summary_line(f, self.labels))
          if self.print_reports and final:
            log.info("%s", report.classification_report_text(f["classification_report"]))
        bar.update(len(finals))

      if self.pool is None:
        for i, (group, group_dirs, pretrained) in enumerate(tasks):
          finished(i, cell_lib.run(group, group_dirs,
                                   self.backbones(group[0].config) if pretrained else None))
      else:
        with timing.phase("wait"):
          self.pool.run(tasks, [_cost(g) for g in groups], [_programs_key(g) for g in groups],
                        finished)
    by_folder = {dirs[c.id]: done[c.id] for c in todo}
    for c in cells:  # a twin of a trained cell: its record, under this cell's name
      if done[c.id] is None:
        done[c.id] = {**by_folder[dirs[c.id]], "cell_id": c.id, "axes": c.axes}
    return [done[c.id] for c in cells], len(cells) - len(todo)


def _cost(group) -> float:
  """A seed group's expected training time, for ordering (the longest first): examples x
  epochs x seeds (the datasets are in memory from the checks)."""
  cfg = group[0].config
  return len(data_lib.load_for(cfg).train_x) * int(cfg.train.epochs) * len(group)


def _programs_key(group) -> str:
  """Groups with equal keys run the same compiled programs (they differ in seed, learning
  rate or weight decay only)."""
  ident = cell_lib.identity(group[0].config)
  for k in ("seed", "train.lr", "train.weight_decay"):
    ident.pop(k, None)
  return json.dumps(ident, sort_keys=True)


def write_results(config, name: str, results_dir: str, finals: list[dict],
                  outcome: selection.Outcome | None = None,
                  findings: findings_lib.Findings | None = None, command: str = "",
                  checked=()) -> list[str]:
  """The results folder `results_dir/name/` (tables, plots, runs.csv, selection.csv,
  findings, and the data card of `checked`'s (dataset, DataCheck) pairs), replaced whole;
  the tables are built from the cells' final.json records only."""
  axes = grid.axes_of(config)
  # The reference row of the paired-difference table: the base config with that strategy.
  reference = tuple({**grid.base_axes(config), "strategy": config.report.reference}.values())

  def extra(folder):
    """selection.csv, findings.md and the findings' plots, into the results folder."""
    names = []
    if outcome is not None:
      io.write_text(os.path.join(folder, "selection.csv"), outcome.table)
      names.append("selection.csv")
    if findings is not None:
      names += [os.path.basename(p)
                for p in findings_lib.write(folder, name, findings, finals, command)]
    if checked:
      names += data_card.write(folder, checked, config.data_dir or data_lib.default_data_dir())
    if config.report.classification_reports:
      io.write_text(os.path.join(folder, "classification_reports.md"),
                    _classification_reports(name, finals, dict(config.report.axis_labels)))
      names.append("classification_reports.md")
    return names

  return report.write(finals, axes, os.path.join(results_dir, name), name,
                      dict(config.report.axis_labels), reference,
                      metrics=config.report.metrics,
                      show_hparams=selection.enabled(config),
                      at_edge=outcome.at_edge if outcome is not None else set(), extra=extra)


def _classification_reports(name: str, finals: list[dict], labels: dict) -> str:
  """Every final cell's per-class test report (scikit-learn's layout), in grid order."""
  out = [f"# {name}: per-class test reports", ""]
  for f in finals:
    axes = ", ".join(f"{labels.get(k, k)}={v}" for k, v in f["axes"].items())
    out += [f"## {axes}", "", f"test accuracy {100 * f['test_accuracy']:.1f}%, macro F1 "
            f"{100 * f['test_macro_f1']:.1f}%", "", "```",
            report.classification_report_text(f["classification_report"]).rstrip(), "```", ""]
  return "\n".join(out)


def _summary_line(f: dict, labels: dict) -> str:
  axes = " ".join(f"{labels.get(k, k).replace(' ', '_')}={v}" for k, v in f["axes"].items())
  return (f"[{f['status']}] {axes}: test acc {100 * f['test_accuracy']:.1f}% "
          f"F1 {100 * f['test_macro_f1']:.1f}% best epoch {f['best_epoch']}/{f['epochs_run']} "
          f"{f['trainable_params']:,} trainable, {f['wall_seconds']:.1f}s "
          f"(compile {f['compile_seconds']:.1f}s)")


def run_pretrain(config, name: str, results_dir: str, overwrite: bool = False) -> dict:
  """Builds (or reuses) the cached source checkpoint and writes its summary to results."""
  pcfg = pretrain.for_model(config.pretrain, config.pretrain.model)
  io.check_writable(results_dir, "the results folder (--results_dir)")
  io.check_writable(config.cache_dir or pretrain.default_cache_dir(),
                    "the cache folder (cache_dir / $TLRESEARCH_CACHE_DIR)")
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

"""Per-configuration hyperparameter selection on the validation split: the fair protocol.

Strategies prefer different learning rates (a probe on frozen features takes a larger one
than full fine-tuning), so comparing them at one shared value measures the value as much as
the strategy. With `config.selection.enabled`, every configuration (a grid row on one target)
first runs each (lr, weight decay) of a small grid under the selection seeds; the pair with
the best mean validation accuracy wins (ties: the first in grid order), and the final seeds
run with it and report on test. The test split is never read for the choice.

A winner at the edge of the lr grid says the optimum may lie beyond it: the grid of that
configuration is widened by one more value past that edge (the edge's own ratio, e.g. 0.1 ->
0.333 after 0.03, 0.1) and the choice is made again, up to `selection.widen` times. A winner
still at an edge after that is flagged in the table.

A configuration whose every stage is the converged probe (tlresearch.methods.probe: its L2
strength is chosen on validation by the solver itself, and it has no learning rate) runs no
selection.

Selection cells live in the cell store beside the final ones (`<workdir>/cells/`, named by
identity, so an experiment that shares a selection cell with another reuses it), are skipped
when finished, and are not part of the final tables; `selection.csv` beside the tables lists every candidate's score.
"""
from __future__ import annotations

import csv
import dataclasses
import io as _io
import itertools

import ml_collections

from tlresearch import models
from tlresearch.core import configs
from tlresearch.core.errors import UserError
from tlresearch.experiment import grid
from tlresearch.methods import strategies
from tlresearch.training import train

LR, WD = "train.lr", "train.weight_decay"


def enabled(config) -> bool:
  return "selection" in config and bool(config.selection.enabled)


def check(config) -> None:
  if not enabled(config):
    return
  clash = [d for d in (LR, WD) if d in grid.axes_of(config)]
  if clash:
    raise UserError(f"selection.enabled chooses {', '.join(clash)} per configuration; remove "
                    "them from config.grid or set selection.enabled=False")
  s = config.selection
  if not len(s.lr) or not len(s.weight_decay) or not s.seeds:
    raise UserError("selection needs at least one value in selection.lr, "
                    "selection.weight_decay and selection.seeds")
  if any(not lr > 0 for lr in s.lr):
    raise UserError(f"selection.lr values must be > 0, got {list(s.lr)}")
  if s.widen < 0:
    raise UserError(f"selection.widen must be >= 0, got {s.widen}")
  grid.check_seeds(s.seeds, "selection.seeds")


def probe_only(cfg) -> bool:
  """Whether every stage of the cell's strategy is solved by the converged probe."""
  model = models.build(cfg.model, 2)
  paths = models.param_paths(cfg.model)
  strategy = strategies.get(cfg.strategy, model.groups)
  return all(train.solves_probe(model, stage, paths, cfg.train) for stage in strategy.stages)


@dataclasses.dataclass
class Outcome:
  """What selection decided: each configuration's values, every candidate's score (CSV), and
  the configurations whose chosen lr is still at an edge of its widened grid."""
  chosen: dict            # configuration key -> {dotted key: value} ({} for probe-only ones)
  table: str
  at_edge: set
  cells: int              # selection cells run, over every round


def _candidate_cells(cell, lrs, wds, seeds) -> list:
  out = []
  for lr, wd in itertools.product(lrs, wds):
    for seed in seeds:
      combo = {LR: lr, WD: wd}
      axes = {**{k: v for k, v in cell.axes.items() if k != "seed"}, **combo, "seed": seed}
      cfg = ml_collections.ConfigDict(cell.config.to_dict())
      cfg.seed = seed
      if "save_model" in cfg:
        cfg.save_model = "none"  # a selection cell's model is never kept
      for dotted, v in combo.items():
        configs.set_path(cfg, dotted, v)
      cfg.lock()
      out.append(grid.Cell(grid.cell_id(axes), axes, cfg))
  return out


def _next_lr(lrs: list, upward: bool) -> float:
  """One more lr past the edge, at the ratio of the edge's two outermost values (x3 when
  the grid has one value)."""
  s = sorted(lrs)
  if upward:
    v = s[-1] * (s[-1] / s[-2] if len(s) > 1 else 3.0)
  else:
    v = s[0] / (s[1] / s[0] if len(s) > 1 else 3.0)
  return float(f"{v:.3g}")


def _tuned(cells) -> tuple[dict, dict]:
  """({configuration: its first cell}, the same for the configurations selection tunes)."""
  reps = {}
  for cell in cells:
    reps.setdefault(configs.configuration(cell.axes), cell)
  return reps, {k: c for k, c in reps.items() if not probe_only(c.config)}


def first_round(config, cells: list) -> list:
  """The selection cells of the first round (the config's grid, before any widening), so
  that their values and data can be checked before anything trains."""
  if not enabled(config):
    return []
  check(config)
  s = config.selection
  return [c for rep in _tuned(cells)[1].values()
          for c in _candidate_cells(rep, [float(v) for v in s.lr],
                                    [float(v) for v in s.weight_decay], list(s.seeds))]


def run(config, cells: list, run_cells) -> tuple[list, Outcome | None]:
  """The final `cells` with their configuration's selected values, and the Outcome (None
  when selection is off). `run_cells(sel_cells, round_index)` returns their final.json
  records (training the unfinished ones, or reading them); it is called once per round."""
  if not enabled(config):
    return cells, None
  check(config)
  s = config.selection
  reps, tuned = _tuned(cells)
  lrs = {k: [float(v) for v in s.lr] for k in tuned}
  wds = [float(v) for v in s.weight_decay]
  sel_cells, finals, pending = [], [], {k: list(v) for k, v in lrs.items()}
  chosen = {}
  for round_index in range(int(s.widen) + 1):
    new = [c for k, c in tuned.items() for c in _candidate_cells(c, pending.get(k, []), wds,
                                                                  list(s.seeds))]
    if new:
      finals += list(run_cells(new, round_index))
      sel_cells += new
    chosen = _choose(sel_cells, finals, lrs, wds)
    pending = {}
    if round_index == int(s.widen):
      break
    for k, values in lrs.items():
      edge = _edge(chosen[k][LR], values)
      if edge is not None:
        pending[k] = [_next_lr(values, upward=edge == "high")]
        values += pending[k]
    if not pending:
      break
  at_edge = {k for k, values in lrs.items() if _edge(chosen[k][LR], values) is not None}
  chosen.update({k: {} for k in reps if k not in tuned})
  return _apply(cells, chosen), Outcome(chosen, _table_csv(sel_cells, finals, chosen), at_edge,
                                        len(sel_cells))


def _edge(lr: float, values: list) -> str | None:
  if len(values) < 2:
    return None
  return "high" if lr == max(values) else "low" if lr == min(values) else None


def _choose(sel_cells: list, finals: list, lrs: dict, wds: list) -> dict:
  """{configuration key: {dotted key: value}} by mean validation accuracy (a failed run
  scores -inf; ties: the first candidate in grid order, widened values last)."""
  scores = {}
  for cell, final in zip(sel_cells, finals):
    base = {k: v for k, v in cell.axes.items() if k not in (LR, WD)}
    ok = final.get("status") == "ok"
    scores.setdefault(configs.configuration(base), {}).setdefault(
        (cell.axes[LR], cell.axes[WD]), []).append(final["val_accuracy"] if ok else float("-inf"))
  out = {}
  for key, by in scores.items():
    order = [c for c in itertools.product(lrs[key], wds) if c in by]
    lr, wd = max(order, key=lambda c: sum(by[c]) / len(by[c]))
    out[key] = {LR: lr, WD: wd}
  return out


def _apply(cells: list, chosen: dict) -> list:
  """The final cells with their configuration's selected values (ids and axes unchanged)."""
  out = []
  for cell in cells:
    values = chosen[configs.configuration(cell.axes)]
    if not values:
      out.append(cell)
      continue
    cfg = ml_collections.ConfigDict(cell.config.to_dict())
    for dotted, v in values.items():
      configs.set_path(cfg, dotted, v)
    cfg.lock()
    out.append(grid.Cell(cell.id, cell.axes, cfg))
  return out


def _table_csv(sel_cells: list, finals: list[dict], chosen: dict) -> str:
  """One row per selection cell: its axes, validation accuracy, and whether it won."""
  keys = list(sel_cells[0].axes) if sel_cells else []
  buf = _io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(keys + ["val_accuracy", "selected"])
  for cell, final in zip(sel_cells, finals):
    base = {k: v for k, v in cell.axes.items() if k not in (LR, WD)}
    won = all(cell.axes[d] == v for d, v in chosen[configs.configuration(base)].items())
    w.writerow([cell.axes[k] for k in keys] + [f"{final.get('val_accuracy', float('nan')):.6g}",
                                                int(won)])
  return buf.getvalue()

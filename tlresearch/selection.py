"""Per-configuration hyperparameter selection on the validation split: the fair protocol.

Strategies prefer different learning rates (a probe on frozen features takes a larger one
than full fine-tuning), so comparing them at one shared value measures the value as much as
the strategy. With `config.selection.enabled`, every configuration (a grid row on one target)
first runs each (lr, weight decay) of a small grid under the selection seeds; the pair with
the best mean validation accuracy wins (ties: the first in grid order), and the final seeds
run with it and report on test. The test split is never read for the choice. The selected
values are in each final cell's config and `final.json` (`hparams`), and in the tables.

Selection cells live in `<workdir>/selection/`, are skipped when finished, and are not part
of the final tables; `selection.csv` beside the tables lists every candidate's score.
"""
from __future__ import annotations

import csv
import io as _io
import itertools

import ml_collections

from tlresearch import configs, grid
from tlresearch.errors import UserError

KEYS = (("lr", "train.lr"), ("weight_decay", "train.weight_decay"))


def enabled(config) -> bool:
  return "selection" in config and bool(config.selection.enabled)


def _candidates(config) -> list[dict]:
  values = [[(dotted, v) for v in config.selection[name]] for name, dotted in KEYS]
  return [dict(c) for c in itertools.product(*values)]


def expand(config, cells: list) -> list:
  """The selection cells for the final `cells` ([] when selection is off)."""
  if not enabled(config):
    return []
  clash = [d for _, d in KEYS if d in grid.axes_of(config)]
  if clash:
    raise UserError(f"selection.enabled chooses {', '.join(clash)} per configuration; remove "
                    "them from config.grid or set selection.enabled=False")
  if not all(len(config.selection[name]) for name, _ in KEYS) or not config.selection.seeds:
    raise UserError("selection needs at least one value in selection.lr, "
                    "selection.weight_decay and selection.seeds")
  out, seen = [], set()
  for cell in cells:
    key = grid.configuration(cell.axes)
    if key in seen:
      continue
    seen.add(key)
    for combo in _candidates(config):
      for seed in config.selection.seeds:
        axes = {**{k: v for k, v in cell.axes.items() if k != "seed"}, **combo, "seed": seed}
        cfg = ml_collections.ConfigDict(cell.config.to_dict())
        cfg.seed = seed
        for dotted, v in combo.items():
          configs.set_path(cfg, dotted, v)
        cfg.lock()
        out.append(grid.Cell(grid.cell_id(axes), axes, cfg))
  return out


def choose(config, sel_cells: list, finals: list[dict]) -> dict:
  """{configuration key: {dotted key: selected value}} by mean validation accuracy."""
  scores = {}
  for cell, final in zip(sel_cells, finals):
    combo = tuple((d, cell.axes[d]) for _, d in KEYS)
    base = {k: v for k, v in cell.axes.items() if k not in dict(KEYS).values()}
    ok = final.get("status") == "ok"
    scores.setdefault(grid.configuration(base), {}).setdefault(combo, []).append(
        final["val_accuracy"] if ok else float("-inf"))
  order = [tuple(c.items()) for c in _candidates(config)]
  return {g: dict(max(order, key=lambda c: sum(by[c]) / len(by[c])))
          for g, by in scores.items()}


def apply(cells: list, chosen: dict) -> list:
  """The final cells with their configuration's selected values (ids and axes unchanged)."""
  out = []
  for cell in cells:
    cfg = ml_collections.ConfigDict(cell.config.to_dict())
    for dotted, v in chosen[grid.configuration(cell.axes)].items():
      configs.set_path(cfg, dotted, v)
    cfg.lock()
    out.append(grid.Cell(cell.id, cell.axes, cfg))
  return out


def table_csv(sel_cells: list, finals: list[dict], chosen: dict) -> str:
  """One row per selection cell: its axes, validation accuracy, and whether it won."""
  keys = list(sel_cells[0].axes) if sel_cells else []
  buf = _io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(keys + ["val_accuracy", "selected"])
  for cell, final in zip(sel_cells, finals):
    base = {k: v for k, v in cell.axes.items() if k not in dict(KEYS).values()}
    won = all(cell.axes[d] == v for d, v in chosen[grid.configuration(base)].items())
    w.writerow([cell.axes[k] for k in keys] + [f"{final.get('val_accuracy', float('nan')):.6g}",
                                                int(won)])
  return buf.getvalue()

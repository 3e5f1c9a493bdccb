"""Expand a config's grid into cells, check them all before training, run the unfinished ones.

`config.grid` is a list of blocks; each block maps config keys (dotted paths) to the values
to cross. Every block is crossed with `config.targets` and `config.seeds`. A design that is
not a full cross product (e.g. regularisers only for linear_probe and full) is several
blocks. A cell's axes are the union of all blocks' keys, with the base value wherever its
block does not set one, so every row of `runs.csv` names its complete configuration.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re

import ml_collections

from tlresearch.core import configs
from tlresearch.core.errors import UserError


@dataclasses.dataclass(frozen=True)
class Cell:
  id: str
  axes: dict
  config: ml_collections.ConfigDict


def _get(cfg, dotted: str):
  try:
    return configs.get_path(cfg, dotted)
  except UserError:
    raise UserError(f"grid axis '{dotted}' is not a config key") from None


def axes_of(config) -> list[str]:
  keys = []
  for block in config.grid:
    keys += [k for k in block if k not in keys]
  return keys + ["target", "seed"]


def base_axes(config) -> dict:
  """The base config's value of every axis except target and seed (the reference row)."""
  return {k: _get(config, k) for k in axes_of(config) if k not in ("target", "seed")}


def _slug(v) -> str:
  return re.sub(r"[^A-Za-z0-9.]+", "-", str(v)).strip("-")


SEED_RANGE = (0, 2**31 - 1)  # seeds key JAX's and numpy's generators


def check(config) -> None:
  """UserError for a grid that would be empty or whose seeds are not usable: every block
  and value list non-empty, targets non-empty, seeds distinct integers in SEED_RANGE."""
  if not config.grid:
    raise UserError("config.grid is empty: nothing to run")
  for name in ("targets", "seeds"):
    if isinstance(config[name], (str, bytes)) or not len(config[name]):
      raise UserError(f"config.{name} must be a non-empty list, got {config[name]!r}")
  check_seeds(config.seeds, "config.seeds")
  if len(set(config.seeds)) != len(config.seeds):
    raise UserError(f"config.seeds has a repeated seed: {list(config.seeds)}")
  if len(set(config.targets)) != len(config.targets):
    raise UserError(f"config.targets has a repeated target: {list(config.targets)}")
  for i, block in enumerate(config.grid):
    if not block:
      raise UserError(f"config.grid block {i} is empty: give it at least one axis")
    for key, values in block.items():
      if key in ("target", "seed"):
        raise UserError(f"grid axis '{key}' is set by config.{key}s, which every block is "
                        f"crossed with: use --config.{key}s=[...] instead")
      if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise UserError(f"grid values for '{key}' must be a list, got {values!r}")
      if not len(values):
        raise UserError(f"grid values for '{key}' (block {i}) are empty: give at least one")


def check_seeds(seeds, name: str) -> None:
  """UserError unless every seed is an integer in SEED_RANGE."""
  lo, hi = SEED_RANGE
  for s in seeds:
    if isinstance(s, bool) or not isinstance(s, int) or not lo <= s <= hi:
      raise UserError(f"{name} must be integers in [{lo}, {hi}], got {s!r}")


def set_per_cell(config) -> set[str]:
  """Keys whose config value no cell ever uses: target and seed, and the axes every block
  sets. Overriding one on the command line would be silently ignored."""
  blocks = [set(b) for b in config.grid]
  every = set.intersection(*blocks) if blocks else set()
  return {"target", "seed"} | every


def cell_id(axes: dict) -> str:
  digest = hashlib.sha1(json.dumps(axes, sort_keys=True).encode()).hexdigest()[:8]
  return "_".join(_slug(v) for v in axes.values()) + "-" + digest


def expand(config) -> list[Cell]:
  """All cells of the grid, in a stable order, duplicates removed."""
  check(config)
  keys = axes_of(config)
  base = base_axes(config)
  cells, seen = [], set()
  for block in config.grid:
    combos = [{}]
    for key, values in block.items():
      _get(config, key)
      combos = [{**c, key: v} for c in combos for v in values]
    for target in config.targets:
      for combo in combos:
        for seed in config.seeds:
          axes = {**base, **combo, "target": target, "seed": seed}
          axes = {k: axes[k] for k in keys}
          frozen = json.dumps(axes, sort_keys=True)
          if frozen in seen:
            continue
          seen.add(frozen)
          cfg = ml_collections.ConfigDict(config.to_dict())
          del cfg["grid"]  # a cell is one point of it
          for k, v in axes.items():
            configs.set_path(cfg, k, v)
          cfg.lock()
          cells.append(Cell(cell_id(axes), axes, cfg))
  return cells




def check_task(task_index: int, num_tasks: int) -> None:
  if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
    raise UserError(f"--num_tasks must be an integer >= 1, got {num_tasks!r}")
  if (isinstance(task_index, bool) or not isinstance(task_index, int)
      or not 0 <= task_index < num_tasks):
    raise UserError(f"--task_index must be an integer in [0, {num_tasks - 1}] for "
                    f"--num_tasks={num_tasks}, got {task_index!r}")


def shard(cells: list[Cell], task_index: int, num_tasks: int) -> list[Cell]:
  """Task `task_index` of `num_tasks`: whole configurations, dealt round robin in grid order.

  Whole configurations, because a configuration's final cells need all of its selection
  cells (selection.choose): no task then waits on another. Grid order and round robin make
  the split depend only on the config (never on hashing or the process), and deal the
  strategies of a block across the tasks.
  """
  check_task(task_index, num_tasks)
  order = list(dict.fromkeys(configs.configuration(c.axes) for c in cells))
  mine = set(order[task_index::num_tasks])
  return [c for c in cells if configs.configuration(c.axes) in mine]

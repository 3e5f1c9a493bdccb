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
import os
import re

import ml_collections

from tlresearch import data as data_lib
from tlresearch import models, optim, probes, strategies
from tlresearch.errors import UserError, choices


@dataclasses.dataclass(frozen=True)
class Cell:
  id: str
  axes: dict
  config: ml_collections.ConfigDict


def _get(cfg, dotted: str):
  node = cfg
  for part in dotted.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise UserError(f"grid axis '{dotted}' is not a config key")
    node = node[part]
  return node


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


def cell_id(axes: dict) -> str:
  digest = hashlib.sha1(json.dumps(axes, sort_keys=True).encode()).hexdigest()[:8]
  return "_".join(_slug(v) for v in axes.values()) + "-" + digest


def expand(config) -> list[Cell]:
  """All cells of the grid, in a stable order, duplicates removed."""
  if not config.grid:
    raise UserError("config.grid is empty: nothing to run")
  keys = axes_of(config)
  base = base_axes(config)
  cells, seen = [], set()
  for block in config.grid:
    combos = [{}]
    for key, values in block.items():
      _get(config, key)
      if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise UserError(f"grid values for '{key}' must be a list, got {values!r}")
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
          del cfg["grid"]
          for k, v in axes.items():
            _set(cfg, k, v)
          cells.append(Cell(cell_id(axes), axes, cfg))
  return cells


def configuration(axes: dict) -> str:
  """The configuration a cell belongs to: every axis but the seed (a table row on one
  target). Its seeds are paired, and selection chooses one lr / weight decay for all of
  them, so a configuration is the unit that selection and sharding keep together."""
  return json.dumps({k: v for k, v in axes.items() if k != "seed"}, sort_keys=True, default=str)


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
  order = list(dict.fromkeys(configuration(c.axes) for c in cells))
  mine = set(order[task_index::num_tasks])
  return [c for c in cells if configuration(c.axes) in mine]


def _set(cfg, dotted: str, value):
  *parents, leaf = dotted.split(".")
  node = cfg
  for p in parents:
    node = node[p]
  try:
    node[leaf] = value
  except TypeError as e:
    raise UserError(f"grid value {value!r} for '{dotted}' has the wrong type ({e})") from None


def check(cfg) -> None:
  """Raises UserError for any invalid value in a cell's config, before anything trains."""
  t = cfg.train
  data_lib.check_name(cfg.target)
  models.build(cfg.model, 2)  # family and architecture fields
  groups = models.groups_of(cfg.model)
  strategy = strategies.get(cfg.strategy, groups)
  paths = models.param_paths(cfg.model)
  for stage in strategy.stages:
    try:
      strategies.resolve(stage.rules, paths)
    except ValueError as e:
      raise UserError(f"strategy '{cfg.strategy}': {e}") from None
  pretrained_head = bool(cfg.get("pretrained_head", False))
  if not strategies.trains(strategy, paths, groups[-1]) and not (pretrained_head
                                                                 and strategy.pretrained):
    raise UserError(f"strategy '{cfg.strategy}' never trains the head, so the head must come "
                    "from pretraining: set pretrained_head=True (the target must have the "
                    "source task's classes)")
  probes.check(tuple(cfg.get("probes", ())))
  if strategy.pretrained:
    models.check_pretrained(cfg.model)  # e.g. missing ImageNet weights: fail now, not later
  rules = [
      (t.epochs >= 1, f"train.epochs must be >= 1, got {t.epochs}"),
      (t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}"),
      (t.lr > 0, f"train.lr must be > 0, got {t.lr}"),
      (t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}"),
      (t.warmup_epochs >= 0, f"train.warmup_epochs must be >= 0, got {t.warmup_epochs}"),
      (0 <= cfg.model.dropout_rate < 1,
       f"model.dropout_rate must be in [0, 1), got {cfg.model.dropout_rate}"),
      (t.early_stopping.patience >= 1,
       f"train.early_stopping.patience must be >= 1, got {t.early_stopping.patience}"),
      (t.early_stopping.monitor in ("val_accuracy", "val_loss"),
       f"train.early_stopping.monitor must be one of val_accuracy, val_loss, "
       f"got '{t.early_stopping.monitor}'"),
      (t.get("bn_stats", "update") in ("update", "frozen"),
       f"train.bn_stats must be one of frozen, update, got '{t.get('bn_stats')}'"),
      (t.get("min_steps", 0) >= 0, f"train.min_steps must be >= 0, got {t.get('min_steps')}"),
      (t.optimizer in optim.OPTIMIZERS,
       f"unknown train.optimizer '{t.optimizer}'; valid: {choices(optim.OPTIMIZERS)}"),
      (cfg.k_shot is None or cfg.k_shot >= 0,
       f"k_shot must be >= 1 (or 0 / None for all examples), got {cfg.k_shot}"),
  ]
  for ok, message in rules:
    if not ok:
      raise UserError(message)
  from tlresearch import seeds  # imported here: seeds imports grid
  seeds.resolve_mode(t)  # train.seeds_mode


def check_all(cells) -> None:
  """Every cell's values, every (target, classes, k_shot, seed, size) subset actually
  loadable, and a pretrained head only where the target has the source task's classes."""
  for cell in cells:
    check(cell.config)
  loaded = set()
  for c in cells:
    cfg = c.config
    key = json.dumps([cfg.target, cfg.data_dir, cfg.get("class_subset", ""), cfg.k_shot or 0,
                      cfg.seed,
                      cfg.model.get("input_size"), (cfg.get("data") or {})], sort_keys=True,
                     default=lambda d: d.to_dict())
    if key not in loaded:
      loaded.add(key)
      data_lib.load_for(cfg)
  for c in cells:
    if c.config.get("pretrained_head", False):
      p = c.config.pretrain
      source = data_lib.load(p.dataset, data_dir=p.data_dir or None,
                             class_subset=p.get("class_subset", ""))
      target = data_lib.load(c.config.target, data_dir=c.config.data_dir or None,
                             class_subset=c.config.get("class_subset", ""))
      if source.num_classes != target.num_classes:
        raise UserError(f"pretrained_head=True needs the source's {source.num_classes} classes, "
                        f"but {c.config.target} has {target.num_classes}")


# Config keys (dotted paths) that change how a cell runs, never what it computes: a cell
# finished or checkpointed under other values of these, or before they existed, is still the
# same cell. Data parallelism changes only the float reduction order of a few sums.
OPERATIONAL_KEYS = ("checkpoint", "train.seeds_mode", "train.data_parallel",
                    "pretrain.train.data_parallel")


def identity(config_dict: dict) -> dict:
  """The part of a config that determines its results (JSON-normalised)."""
  out = json.loads(json.dumps(config_dict))
  for dotted in OPERATIONAL_KEYS:
    *parents, leaf = dotted.split(".")
    node = out
    for p in parents:
      node = node.get(p) if isinstance(node, dict) else None
    if isinstance(node, dict):  # configs saved before a key existed simply lack it
      node.pop(leaf, None)
  return out


def fingerprint(cfg) -> str:
  return hashlib.sha256(json.dumps(identity(cfg.to_dict()), sort_keys=True).encode()).hexdigest()


def finished(cell_dir: str, cell: Cell) -> dict | None:
  """The cell's final.json when it finished under exactly this config, else None."""
  try:
    with open(os.path.join(cell_dir, "config.json")) as f:
      saved = json.load(f)
    with open(os.path.join(cell_dir, "final.json")) as f:
      final = json.load(f)
  except (OSError, ValueError):
    return None
  same = identity(saved.get("config", {})) == identity(cell.config.to_dict())
  return final if same and final.get("status") in ("ok", "diverged") else None

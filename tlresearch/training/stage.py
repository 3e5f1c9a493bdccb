"""Planning a stage: where its training starts (above a cached frozen prefix, or at the
stem) and the compiled step it trains with (`programs.StepSpec`) and that step's inputs."""
from __future__ import annotations

from flax import traverse_util

from tlresearch.data.augment import AugmentSpec
from tlresearch.methods import penalty
from tlresearch.methods.strategies import FROZEN, frozen_groups, resolve
from tlresearch.training import parallel, programs


def _first_trainable_group(rule_by_path, groups) -> int:
  return min(groups.index(p.split("/")[0]) for p, r in rule_by_path.items() if r != FROZEN)


def stage_start(groups, stage, param_paths, cfg, cache: bool | None = None) -> str:
  """The group a stage's training starts at: above its frozen prefix when that prefix's
  output is cached (`cache`, default `cfg.cache_frozen_prefix`; never with augmentation, which
  changes the prefix's input every step), else the first group."""
  first = _first_trainable_group(resolve(stage.rules, param_paths), groups)
  cache = bool(cfg.cache_frozen_prefix) if cache is None else cache
  aug = AugmentSpec.from_config(cfg.augment)
  return groups[first] if first > 0 and aug is None and cache else groups[0]


def stage_spec(model, stage, variables, cfg, n_train: int, n_epochs: int,
               cache: bool | None = None, mesh=None) -> tuple[programs.StepSpec, dict]:
  """The compiled-step description and step inputs of one strategy stage.

  `cfg` is the cell's `train` config; `cache` (default `cfg.cache_frozen_prefix`) starts
  training above the frozen prefix, whose output is then computed once per split; never
  with augmentation on, which changes the prefix's input every step. With a data-parallel
  `mesh` (`variables` replicated over it) the step splits each batch over its devices and
  the inputs are replicated. `variables` may be stacked over seeds (their penalty anchors
  then are too).
  """
  groups = model.groups
  aug = AugmentSpec.from_config(cfg.augment)
  batch_size = min(int(cfg.batch_size), n_train)
  steps = -(-n_train // batch_size)
  flat_params = traverse_util.flatten_dict(variables["params"], sep="/")
  rule_by_path = resolve(stage.rules, flat_params)
  first = _first_trainable_group(rule_by_path, groups)
  start = stage_start(groups, stage, flat_params, cfg, cache)
  # "frozen": every BatchNorm in inference mode with its statistics kept, trainable or not.
  frozen_bn = tuple(groups) if cfg.bn_stats == "frozen" else frozen_groups(rule_by_path, groups)
  spec = programs.StepSpec(
      model=model, rules=tuple(stage.rules), optimizer=cfg.optimizer,
      total_steps=n_epochs * steps, warmup_steps=round(cfg.warmup_epochs * steps),
      momentum=float(cfg.momentum), start=start, frozen_bn=frozen_bn,
      augment=aug if start == groups[0] else None, batch_size=batch_size,
      steps_per_epoch=steps, penalty=tuple(stage.penalty), frozen_prefix=tuple(groups[:first]),
      mesh=mesh, compute_dtype=cfg.compute_dtype, schedule=cfg.schedule)
  inputs = programs.step_inputs(float(cfg.lr),
                                float(cfg.weight_decay) if stage.weight_decay else 0.0,
                                penalty.anchor(stage, variables, rule_by_path))
  return spec, parallel.replicate(inputs, mesh)

"""What the benchmark and the floor both measure: the default cell's model and data, and a
compiled train step's images/s."""
from __future__ import annotations

import time


def default_cell(strategy: str = "linear_probe"):
  """The finetune_sweep cell of `strategy` in the base configuration, digits, seed 0."""
  from tlresearch.experiment import cli
  from tlresearch.experiment import grid
  config, _ = cli.load_config("finetune_sweep", [])
  for c in grid.expand(config):
    if (c.axes["strategy"] == strategy and c.config.target == "digits" and c.config.seed == 0
        and c.axes == {**c.axes, **grid.base_axes(config), "strategy": strategy}):
      return c
  raise LookupError(strategy)


def pretrained_model(cfg):
  """(dataset, model, pretrained variables, model variables) of a cell config: its target's
  data, the model with the source backbone merged in and a fresh head (key 0)."""
  import jax
  from tlresearch import data as data_lib
  from tlresearch import models
  from tlresearch.training import pretrain, programs
  ds = data_lib.load_for(cfg)
  model = models.build(cfg.model, ds.num_classes)
  pretrained = pretrain.get_or_build(pretrain.for_model(cfg.pretrain, cfg.model),
                                     cfg.cache_dir or None)[0]
  variables = models.merge_pretrained(
      programs.init_variables(model, jax.random.key(0), ds.train_x.shape[1:]),
      pretrained, (model.groups[-1],))
  return ds, model, pretrained, variables


def block(tree):
  import jax
  return jax.block_until_ready(tree)


def images_per_s(model, variables, strategy_name, data, cfg, cached: bool,
                  epochs: int = 3) -> float:
  """Train-step throughput of one strategy's first stage (compile and one warm-up epoch
  excluded)."""
  import jax
  import jax.numpy as jnp
  from tlresearch.training import programs, train
  from tlresearch.methods import strategies
  stage = strategies.get(strategy_name, model.groups).stages[0]
  spec, inputs = train.stage_spec(model, stage, variables, cfg, len(data.train_x),
                                  n_epochs=epochs + 1, cache=cached)
  start = spec.start
  state = programs.init_state(spec, variables, inputs)
  x = jnp.asarray(data.train_x)
  if start != model.groups[0]:
    x = programs.prefix_outputs(model, variables, x, model.groups[model.groups.index(start) - 1])
  y = jnp.asarray(data.train_y)
  keys = train.CellKeys.from_seed(0)
  state, _ = block(programs.train_epoch(spec, state, x, y, keys.order, keys.dropout,
                                         keys.augment, inputs))
  t0 = time.perf_counter()
  for e in range(epochs):
    state, m = programs.train_epoch(spec, state, x, y, jax.random.fold_in(keys.order, e),
                                    keys.dropout, keys.augment, inputs)
  block(m)
  return epochs * spec.steps_per_epoch * spec.batch_size / (time.perf_counter() - t0)

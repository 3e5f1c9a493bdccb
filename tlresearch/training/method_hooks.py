"""The methods that plug into the training loop through `hooks.Hook`, and which of them a
strategy needs (`hooks_for`).

- `ConvergedProbe`: a stage that trains a linear head alone on cached features is solved to
  convergence (L-BFGS, L2 chosen on validation: tlresearch.methods.probe), one record;
- `DeltaAttention`: DELTA's channel attention, from the converged probe of the stage's start;
- `WiseFT`: WiSE-FT's interpolation between the last stage's start and its end;
- `Soup`: a model soup, one fit per ingredient, then averaged.
"""
from __future__ import annotations

import time

from flax import traverse_util

from tlresearch.core import timing
from tlresearch.methods import penalty, probe
from tlresearch.training import attention, weight_space
from tlresearch.training.hooks import Hook
from tlresearch.training.stage import stage_start


def solves_probe(model, stage, param_paths, cfg) -> bool:
  """Whether `fit` solves this stage with the converged probe (tlresearch.methods.probe)
  rather than training it with the optimizer."""
  groups = model.groups
  # An MLP head on cached features is not a convex problem: it trains like any stage.
  linear = getattr(model, "head_spec", None) is None or model.head_spec.linear
  return stage.solve and linear and probe.applies(
      cfg, getattr(model, "dropout_rate", 0.0), stage_start(groups, stage, param_paths, cfg),
      groups[-1])


class ConvergedProbe(Hook):
  """A head-only stage on cached features, solved per live seed on its own split."""

  def solve(self, run, stage, spec, variables, live):
    paths = traverse_util.flatten_dict(variables["params"], sep="/")
    if not solves_probe(run.model, stage, paths, run.cfg):
      return None
    lanes = run.lanes
    splits = run.stage_splits(spec, variables, live)
    per_seed = lanes.unstack(variables)
    x = {k: lanes.unstack(splits[k]) for k in ("train", "val")}
    y = {k: lanes.unstack(run.data[f"{k}_y"]) for k in ("train", "val")}
    records = {}
    for s in live:
      t0 = time.perf_counter()
      with timing.phase("probe"):
        per_seed[s], sol = probe.solve(run.model, per_seed[s], x["train"][s], y["train"][s],
                                       x["val"][s], y["val"][s])
      r = run.seeds[s]
      r.probe = sol.record()
      records[s] = {"epoch": len(r.history) + 1, "stage": stage.name, "solver": "lbfgs",
                    "train_loss": sol.train_loss, "train_accuracy": sol.train_accuracy,
                    "val_loss": sol.val_loss, "val_accuracy": sol.val_accuracy,
                    "lr": None, "l2": sol.l2, "iterations": sol.iterations,
                    "seconds": time.perf_counter() - t0}
      if probe.note(sol):
        r.note(probe.note(sol))
    variables = lanes.stack(per_seed)
    run.record_solve(records, variables)
    return variables


class DeltaAttention(Hook):
  """DELTA's per-channel attention weights (tlresearch.training.attention), an input of the
  stage's penalty."""

  def stage_inputs(self, run, stage, spec, variables, inputs):
    if not penalty.needs_attention(stage.penalty):
      return inputs
    lanes = run.lanes
    with timing.phase("probe"):
      groups = penalty.captured_groups(stage.penalty, run.model.groups, spec.start)
      weights = lanes.stack([attention.delta_attention(run.model, v, groups, d)
                             for v, d in zip(lanes.unstack(variables), run.datas)])
    return {**inputs, "anchor": {**inputs["anchor"], "attention": weights}}


class WiseFT(Hook):
  """WiSE-FT: each live seed ends at its validation-chosen point between the last trained
  stage's start and end (tlresearch.training.weight_space.wise_ft)."""
  keeps_stage_start = True

  def __init__(self, bn: str):
    self.bn = bn

  def after_stages(self, run, stage_start, variables, splits, start, live):
    if stage_start is None:
      return variables
    with timing.phase("eval"):
      variables, records = weight_space.wise_ft(run.lanes, run.model, stage_start, variables,
                                                splits, run.data, start, live, self.bn)
    for s, record in records.items():
      run.seeds[s].weight_space = record
      run.seeds[s].test = None  # tested again, at the chosen point
    return variables


class Soup(Hook):
  """A model soup (tlresearch.training.weight_space.soup)."""

  def wrap(self, fit_once, model, starts, strategy, datas, cfg, keys, checkpointer,
           on_epoch):
    return weight_space.soup(model, starts, strategy, datas, cfg, keys, checkpointer,
                             on_epoch, fit_once)


def hooks_for(strategy) -> list[Hook]:
  """The hooks `strategy`'s stages and weight-space method declare, in the loop's order."""
  hooks = []
  if any(stage.solve for stage in strategy.stages):
    hooks.append(ConvergedProbe())
  if any(penalty.needs_attention(stage.penalty) for stage in strategy.stages):
    hooks.append(DeltaAttention())
  method = strategy.weight_space[:1]
  if method == ("wise_ft",):
    hooks.append(WiseFT(strategy.weight_space[1]))
  elif method == ("soup",):
    hooks.append(Soup())
  return hooks

"""A method plugs into `fit` through hooks, without a change to the loop's file."""
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from tlresearch import models
from tlresearch.methods import strategies
from tlresearch.training import hooks, programs, train
from tests.conftest import tiny_model_cfg, tiny_train_cfg

LOOP = pathlib.Path(__file__).resolve().parents[2] / "tlresearch" / "training" / "loop.py"


def _setup(spec="full"):
  model = models.build(tiny_model_cfg(), 4)
  variables = model.init(jax.random.key(1), jnp.zeros((1, 16, 16, 3)))
  return model, variables, strategies.get(spec, model.groups)


def _flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


class HalfwayBack(hooks.Hook):
  """Toy method: end halfway between the last stage's start and its trained weights."""
  keeps_stage_start = True

  def after_stages(self, run, stage_start, variables, splits, start, live):
    for s in live:
      run.seeds[s].test = None
    return jax.tree.map(lambda a, b: 0.5 * (a + b), stage_start, variables)


class KeepTheStart(hooks.Hook):
  """Toy method: every stage is 'solved' by keeping its starting weights (one record)."""

  def solve(self, run, stage, spec, variables, live):
    run.stage_splits(spec, variables, live)
    run.record_solve({s: {"epoch": len(run.seeds[s].history) + 1, "stage": stage.name,
                          "solver": "keep"} for s in live}, variables)
    return variables


def test_a_toy_method_combines_weights_after_the_stages(dataset):
  model, variables, strategy = _setup()
  cfg = tiny_train_cfg()
  keys = [train.CellKeys.from_seed(0)]
  plain = train.fit(model, [variables], strategy, [dataset], cfg, keys)[0]
  toy = train.fit(model, [variables], strategy, [dataset], cfg, keys, hooks=[HalfwayBack()])[0]
  # The same training, then the hook's combination.
  drop = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]
  assert drop(toy.history) == drop(plain.history)
  start, end, got = _flat(variables), _flat(plain.variables), _flat(toy.variables)
  assert any(not np.array_equal(start[p], end[p]) for p in start), "nothing trained"
  for path in start:
    np.testing.assert_allclose(got[path], 0.5 * (start[path] + end[path]), rtol=1e-6, atol=1e-7)
  # The fit is evaluated again at the combined weights.
  test, _ = programs.evaluate(model, toy.variables, jnp.asarray(dataset.test_x),
                              jnp.asarray(dataset.test_y))
  np.testing.assert_allclose(toy.test["accuracy"], float(test["accuracy"]))


def test_a_toy_method_solves_a_stage_without_the_optimizer(dataset):
  model, variables, strategy = _setup()
  records = []
  out = train.fit(model, [variables], strategy, [dataset], tiny_train_cfg(),
                  [train.CellKeys.from_seed(0)], on_epoch=lambda s, r, st: records.append(r),
                  hooks=[KeepTheStart()])[0]
  assert [r["solver"] for r in out.history] == ["keep"] and records == out.history
  start, got = _flat(variables), _flat(out.variables)
  assert all(np.array_equal(start[p], got[p]) for p in start)
  assert out.best_epoch == 1 and out.test is not None


def test_the_loop_names_no_method():
  text = LOOP.read_text().lower()
  named = [m for m in ("probe", "lbfgs", "delta", "attention", "wise", "soup", "l2_sp", "lwf",
                       "bss") if re.search(rf"\b{m}", text)]
  assert not named, f"training/loop.py names methods: {named}"


def test_strategies_declare_their_hooks():
  groups = ("stem", "stage1", "stage2", "stage3", "head")
  kinds = {spec: [type(h).__name__ for h in
                  train.method_hooks.hooks_for(strategies.get(spec, groups))]
           for spec in ("full", "linear_probe", "wise_ft:probe=0.5", "soup:n=3,spread=2",
                        "delta:alpha=0.01,beta=0.01,attention=1")}
  assert not {"WiseFT", "Soup", "DeltaAttention"} & set(kinds["full"])
  assert "ConvergedProbe" in kinds["linear_probe"]
  assert "WiseFT" in kinds["wise_ft:probe=0.5"]
  assert kinds["soup:n=3,spread=2"][-1:] == ["Soup"]
  assert "DeltaAttention" in kinds["delta:alpha=0.01,beta=0.01,attention=1"]

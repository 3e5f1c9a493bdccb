import numpy as np
import pytest
from flax import traverse_util

from tlresearch import models, optim, strategies
from tlresearch.errors import UserError
from tlresearch.strategies import FROZEN
from tests.conftest import tiny_model_cfg

import jax
import jax.numpy as jnp


def _params():
  model = models.build(tiny_model_cfg(), 5)
  v = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  return model, v["params"]


def _rules(spec, model, params):
  s = strategies.get(spec, model.groups)
  return strategies.resolve(s.stages[0].rules,
                            traverse_util.flatten_dict(params, sep="/").keys())


def test_groups_are_top_level_keys():
  model, params = _params()
  assert tuple(params) == model.groups == ("stem", "stage1", "stage2", "stage3", "head")


def test_trainable_parameter_counts_per_strategy():
  model, params = _params()
  size = lambda g: sum(np.size(v) for v in jax.tree.leaves(params[g]))
  total = sum(size(g) for g in model.groups)
  head = size("head")
  assert head == 16 * 5 + 5  # width 4 -> 16 channels in stage3, 5 classes
  expected = {
      "linear_probe": head,
      "partial:k=1": head + size("stage3"),
      "partial:k=2": head + size("stage3") + size("stage2"),
      "full": total,
      "scratch": total,
      "discriminative:decay=0.5": total,
  }
  for spec, n in expected.items():
    assert optim.count(params, _rules(spec, model, params)) == n, spec


def test_discriminative_multipliers_decay_downwards():
  model, params = _params()
  rules = _rules("discriminative:decay=0.5", model, params)
  assert rules["head/dense/kernel"] == 1.0
  assert rules["stage3/block1/conv1/kernel"] == 0.5
  assert rules["stem/conv/kernel"] == 0.5 ** 4


def test_first_match_wins_and_unmatched_raises():
  rules = (("head/.*", 1.0), (".*/bias", FROZEN), (".*", 2.0))
  out = strategies.resolve(rules, ["head/dense/bias", "stem/conv/bias", "stem/conv/kernel"])
  assert out == {"head/dense/bias": 1.0, "stem/conv/bias": FROZEN, "stem/conv/kernel": 2.0}
  with pytest.raises(ValueError, match="stem/conv/kernel"):
    strategies.resolve((("head/.*", 1.0),), ["head/dense/bias", "stem/conv/kernel"])


@pytest.mark.parametrize("spec, message", [
    ("nope", "unknown strategy 'nope'; valid: discriminative, full, linear_probe, partial"),
    ("partial:k=9", "k must be in 0..4"),
    ("partial:q=1", "bad options"),
])
def test_bad_strategy_specs(spec, message):
  with pytest.raises(UserError, match=message):
    strategies.get(spec, ("stem", "stage1", "stage2", "stage3", "head"))


def test_label_tree_matches_params_structure():
  model, params = _params()
  labels = optim.labels(_rules("partial:k=1", model, params), params)
  assert jax.tree.structure(labels) == jax.tree.structure(params)
  assert type(labels) is dict and type(params) is dict

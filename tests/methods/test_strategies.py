import numpy as np
import pytest
from flax import traverse_util

from tlresearch import models
from tlresearch.core.errors import UserError
from tlresearch.methods import optim, strategies
from tlresearch.methods.strategies import FROZEN
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
    ("nope", "unknown strategy 'nope'; valid: bitfit, bss, delta, discriminative, full, "
             "gradual_unfreeze, head_then_top, l2_sp, layer_decay, layer_transfer, "
             "linear_probe, lp_ft, lwf, norm_only, partial"),
    ("partial:k=9", "k must be in 0..4"),
    ("partial:q=1", "bad options"),
    ("surgical:group=stage9", "unknown group 'stage9'; valid: stem, stage1, stage2, stage3, head"),
    ("surgical", "unknown group ''"),
    ("layer_decay:decay=1.5", "decay must be in"),
    ("l2_sp:alpha=-1", "alpha must be a number >= 0"),
    ("lp_ft:probe=0", "probe must be a fraction"),
    ("gradual_unfreeze:epochs_per_stage=0", "epochs_per_stage must be an integer >= 1"),
    ("layer_transfer:n=5", "n must be in 1..4"),
    ("layer_transfer:n=2,fine_tune=2", "fine_tune must be 0 or 1"),
    ("random_features:n=0", "n must be in 1..4"),
])
def test_bad_strategy_specs(spec, message):
  with pytest.raises(UserError, match=message):
    strategies.get(spec, ("stem", "stage1", "stage2", "stage3", "head"))


def test_label_tree_matches_params_structure():
  model, params = _params()
  labels = optim.labels(_rules("partial:k=1", model, params), params)
  assert jax.tree.structure(labels) == jax.tree.structure(params)
  assert type(labels) is dict and type(params) is dict


def _trainable(spec, model, params, stage=0):
  s = strategies.get(spec, model.groups)
  rules = strategies.resolve(s.stages[stage].rules,
                             traverse_util.flatten_dict(params, sep="/").keys())
  return {p for p, r in rules.items() if r != FROZEN}


def test_bitfit_and_norm_only_train_biases_or_norms_plus_head():
  model, params = _params()
  bitfit, norm = _trainable("bitfit", model, params), _trainable("norm_only", model, params)
  backbone = lambda ps: {p for p in ps if not p.startswith("head/")}
  assert {p for p in bitfit if p.startswith("head/")} == {"head/dense/kernel", "head/dense/bias"}
  assert backbone(bitfit) and all(p.endswith("/bias") for p in backbone(bitfit))
  assert all(p.split("/")[-2].endswith(("bn", "bn1", "bn2")) for p in backbone(norm))
  assert backbone(bitfit) < backbone(norm)  # norm_only adds the BatchNorm scales
  assert any(p.endswith("/scale") for p in norm)
  # Every group has trainable leaves, so no group's BatchNorm is frozen and no prefix can be
  # cached: the strategy costs a full backward pass.
  rules = _rules("bitfit", model, params)
  assert strategies.frozen_groups(rules, model.groups) == ()
  assert not any(p.endswith("kernel") and not p.startswith("head/") for p in bitfit)


def test_surgical_trains_exactly_one_group():
  model, params = _params()
  for g in model.groups:
    trained = _trainable(f"surgical:group={g}", model, params)
    assert trained and {p.split("/")[0] for p in trained} == {g}


def test_layer_decay_multipliers():
  model, params = _params()
  rules = _rules("layer_decay:decay=0.7", model, params)
  for i, g in enumerate(reversed(model.groups)):
    mults = {r for p, r in rules.items() if p.startswith(g + "/")}
    assert len(mults) == 1 and mults.pop() == pytest.approx(0.7 ** i), g
  assert strategies.get("layer_decay", model.groups).spec == "layer_decay:decay=0.75"


def test_gradual_unfreeze_stage_rules_and_epochs():
  model, params = _params()
  s = strategies.get("gradual_unfreeze", model.groups)
  assert len(s.stages) == len(model.groups)
  for k, _ in enumerate(s.stages):
    groups = {p.split("/")[0] for p in _trainable("gradual_unfreeze", model, params, k)}
    assert groups == set(model.groups[len(model.groups) - 1 - k:]), k
  assert strategies.stage_epochs(s.stages, 12) == [1, 1, 1, 1, 8]
  s2 = strategies.get("gradual_unfreeze:epochs_per_stage=2", model.groups)
  assert strategies.stage_epochs(s2.stages, 12) == [2, 2, 2, 2, 4]


def test_lp_ft_is_a_probe_then_full_fine_tuning_with_the_whole_budget():
  model, params = _params()
  s = strategies.get("lp_ft", model.groups)
  assert [st.name for st in s.stages] == ["probe", "fine_tune"]
  assert _trainable("lp_ft", model, params, 0) == _trainable("linear_probe", model, params)
  assert _trainable("lp_ft", model, params, 1) == _trainable("full", model, params)
  assert strategies.stage_epochs(s.stages, 12) == [6, 12]
  assert strategies.stage_epochs(strategies.get("lp_ft:probe=0.25", model.groups).stages,
                                 12) == [3, 12]


def test_l2_sp_replaces_weight_decay_by_its_penalty():
  model, _ = _params()
  (stage,) = strategies.get("l2_sp:alpha=0.1,beta=0.02", model.groups).stages
  assert stage.penalty == ("l2_sp", 0.1, 0.02) and stage.weight_decay is False
  assert strategies.get("full", model.groups).stages[0].penalty == ()


def test_layer_transfer_and_random_features():
  from tlresearch.experiment import cell
  import ml_collections
  model, params = _params()
  frozen_t = strategies.get("layer_transfer:n=2", model.groups)
  tuned_t = strategies.get("layer_transfer:n=2,fine_tune=1", model.groups)
  rand = strategies.get("random_features:n=3", model.groups)
  assert frozen_t.transfer_groups == tuned_t.transfer_groups == 2
  assert {p.split("/")[0] for p in _trainable("layer_transfer:n=2", model, params)} == {
      "stage2", "stage3", "head"}
  assert len(_trainable("layer_transfer:n=2,fine_tune=1", model, params)) == len(
      _trainable("full", model, params))
  assert {p.split("/")[0] for p in _trainable("random_features:n=3", model, params)} == {
      "stage3", "head"}
  assert rand.pretrained is False
  cfg = ml_collections.ConfigDict({"pretrained_head": False})
  assert cell.not_loaded(cfg, frozen_t, model.groups) == ("stage2", "stage3", "head")
  assert cell.not_loaded(cfg, strategies.get("full", model.groups), model.groups) == ("head",)
  cfg.pretrained_head = True
  assert cell.not_loaded(cfg, strategies.get("full", model.groups), model.groups) == ()


def test_epoch_budget_reaches_min_steps():
  assert optim.epoch_budget(12, 1, 0) == 12
  assert optim.epoch_budget(12, 1, 100) == 100
  assert optim.epoch_budget(12, 3, 100) == 34
  assert optim.epoch_budget(12, 20, 100) == 12

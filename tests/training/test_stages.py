"""Training-level invariants of the multi-stage and penalised strategies."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from tlresearch import models
from tlresearch.methods import optim, penalty, strategies
from tlresearch.methods.strategies import Strategy
from tlresearch.training import train
from tests.conftest import fit_one, tiny_model_cfg, tiny_train_cfg


def _setup(classes=4):
  model = models.build(tiny_model_cfg(), classes)
  variables = model.init(jax.random.key(1), jnp.zeros((1, 16, 16, 3)))
  variables["batch_stats"] = jax.tree.map(lambda a: a + 0.3, variables["batch_stats"])
  return model, variables


def _flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def _fit(model, variables, strategy, dataset, cfg, **kw):
  return fit_one(model, variables, strategy, dataset, cfg, train.CellKeys.from_seed(0), **kw)


def _no_es(**kw):
  cfg = tiny_train_cfg(**kw)
  cfg.early_stopping.enabled = False
  return cfg


def test_l2_sp_penalty_value_and_gradient_point_to_the_anchor():
  w0 = {"stage1/conv/kernel": jnp.ones((3,)), "head/dense/kernel": jnp.ones((2,))}
  w = {"stage1/conv/kernel": jnp.array([2.0, 1.0, 0.0]), "head/dense/kernel": jnp.array([3.0, 0.0])}
  pen = ("l2_sp", 0.5, 0.1)
  # At the anchor only the head's beta term is left.
  assert float(penalty.value(pen, w0, w0, "head")) == pytest.approx(0.5 * 0.1 * 2)
  g = jax.grad(lambda t: penalty.value(pen, t, w0, "head"))(w)
  # Backbone: alpha (w - w0), toward the pretrained weights; head: beta w, toward zero.
  np.testing.assert_allclose(g["stage1/conv/kernel"], 0.5 * np.array([1.0, 0.0, -1.0]))
  np.testing.assert_allclose(g["head/dense/kernel"], 0.1 * np.array([3.0, 0.0]))


def test_l2_sp_keeps_the_backbone_near_pretrained_weights(dataset):
  model, variables = _setup()
  cfg = _no_es(epochs=3, lr=0.2, weight_decay=0.0)
  dist = {}
  for spec in ("full", "l2_sp:alpha=5.0,beta=0.0"):
    out = _fit(model, variables, strategies.get(spec, model.groups), dataset, cfg)
    before, after = _flat(variables["params"]), _flat(out.variables["params"])
    dist[spec] = sum(float(np.sum((after[p] - v) ** 2)) for p, v in before.items()
                     if p.endswith("kernel") and not p.startswith("head/"))
  assert 0 < dist["l2_sp:alpha=5.0,beta=0.0"] < 0.5 * dist["full"], dist


def test_l2_sp_pulls_toward_pretrained_not_toward_zero(dataset):
  # A backbone displaced from its anchor (the stage's starting, i.e. pretrained, weights):
  # the penalty's descent direction points back to the anchor, not toward zero.
  model, variables = _setup()
  stage = strategies.get("l2_sp:alpha=1.0,beta=0.0", model.groups).stages[0]
  flat = _flat(variables["params"])
  rules = strategies.resolve(stage.rules, flat)
  anchor = penalty.anchor(stage, variables, rules)
  moved = {p: (v + 1.0 if p in anchor else v) for p, v in flat.items()}
  g = jax.grad(lambda t: penalty.value(stage.penalty, t, anchor, "head"))(
      {p: moved[p] for p in anchor})
  for p in anchor:
    if not p.startswith("head/"):
      step = -g[p]  # gradient descent direction
      np.testing.assert_allclose(step, -(moved[p] - anchor[p]), rtol=1e-6)  # back to w0


def test_lp_ft_second_stage_starts_from_the_probe_head(dataset):
  model, variables = _setup()
  lp_ft = strategies.get("lp_ft:probe=0.5", model.groups)
  # The real first stage, then a fine-tuning stage so slow that its end is its start.
  still = dataclasses.replace(lp_ft.stages[1], rules=((".*", 1e-9),))
  strategy = Strategy("t", (lp_ft.stages[0], still))
  cfg = _no_es(epochs=4)
  snaps = {}
  out = _fit(model, variables, strategy, dataset, cfg,
             on_epoch=lambda r, s: snaps.__setitem__((r["stage"], r["epoch"]),
                                                     jax.device_get(s.params)))
  # The probe stage is one converged solve (tlresearch.methods.probe), then 4 fine-tuning epochs.
  probe_end = snaps[("probe", 1)]
  assert [k[0] for k in sorted(snaps, key=lambda k: k[1])] == ["probe"] + ["fine_tune"] * 4
  assert out.probe is not None and out.history[0]["solver"] == "lbfgs"
  start, probe_head, final = (_flat(variables["params"]), _flat(probe_end),
                              _flat(out.variables["params"]))
  assert not np.allclose(start["head/dense/kernel"], probe_head["head/dense/kernel"])
  for p, v in probe_head.items():
    np.testing.assert_allclose(final[p], v, atol=1e-5, err_msg=p)
    if not p.startswith("head/"):
      assert np.array_equal(v, start[p]), f"{p} moved during the probe"


@pytest.mark.slow
def test_gradual_unfreeze_freezes_below_each_stage(dataset):
  model, variables = _setup()
  strategy = strategies.get("gradual_unfreeze", model.groups)
  snaps = {0: _flat(variables["params"])}
  _fit(model, variables, strategy, dataset, _no_es(epochs=5),
       on_epoch=lambda r, s: snaps.__setitem__(r["epoch"], _flat(s.params)))
  groups = model.groups
  for epoch in range(1, 6):
    changed = {p.split("/")[0] for p, v in snaps[epoch].items()
               if not np.array_equal(v, snaps[epoch - 1][p])}
    assert changed == set(groups[len(groups) - epoch:]), (epoch, changed)


def test_bn_stats_frozen_keeps_statistics_while_weights_learn(dataset):
  model, variables = _setup()
  cfg = _no_es(bn_stats="frozen")
  out = _fit(model, variables, strategies.get("full", model.groups), dataset, cfg)
  for p, v in _flat(variables["batch_stats"]).items():
    assert np.array_equal(v, _flat(out.variables["batch_stats"])[p]), p
  assert not np.array_equal(_flat(variables["params"])["stem/conv/kernel"],
                            _flat(out.variables["params"])["stem/conv/kernel"])
  out = _fit(model, variables, strategies.get("full", model.groups), dataset, _no_es())
  assert not np.array_equal(_flat(variables["batch_stats"])["stem/bn/mean"],
                            _flat(out.variables["batch_stats"])["stem/bn/mean"])


def test_bitfit_moves_only_biases_and_head_and_has_no_state_elsewhere(dataset):
  model, variables = _setup()
  strategy = strategies.get("bitfit", model.groups)
  out = _fit(model, variables, strategy, dataset, _no_es(weight_decay=0.1))
  before, after = _flat(variables["params"]), _flat(out.variables["params"])
  moved = {p for p in before if not np.array_equal(before[p], after[p])}
  assert moved and all(p.startswith("head/") or p.endswith("/bias") for p in moved)
  assert any(not p.startswith("head/") for p in moved)
  rules = strategies.resolve(strategy.stages[0].rules, before)
  tx, _ = optim.make(rules, variables["params"], optimizer="sgd",
                     lr=optim.schedule(0.1, 10, 0), weight_decay=1e-4)
  state = tx.init(variables["params"])
  assert sum(np.size(x) for x in jax.tree.leaves(state) if np.ndim(x) > 0) == optim.count(
      variables["params"], rules)


def test_surgical_middle_group_caches_its_frozen_prefix(dataset):
  model, variables = _setup()
  out = _fit(model, variables, strategies.get("surgical:group=stage2", model.groups), dataset,
             _no_es(epochs=1))
  assert out.cached_prefix
  before, after = _flat(variables["params"]), _flat(out.variables["params"])
  assert {p.split("/")[0] for p in before if not np.array_equal(before[p], after[p])} == {"stage2"}

"""The converged probe: the optimum of its objective (checked against scikit-learn), its L2
chosen on validation, and where `fit` uses it."""
import flax.linen as nn
import jax
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from tests.conftest import fit_one, make_dataset, tiny_model_cfg, tiny_train_cfg
from tlresearch import models
from tlresearch.methods import probe, strategies
from tlresearch.models.heads import Head
from tlresearch.training import programs, train


class _HeadOnly(nn.Module):
  """A model whose only group is the head: its input is the pooled-feature map."""
  groups = ("head",)

  @nn.compact
  def __call__(self, x, train=False, start=None):
    return Head(5, name="head")(x)


def _features(n, seed, d=16, k=5, noise=2.0):
  rng = np.random.default_rng(seed)
  mu = np.random.default_rng(99).normal(size=(k, d))
  y = np.arange(n) % k
  x = (mu[y] + noise * rng.normal(size=(n, d))).astype(np.float32)
  return x[:, None, None, :], y.astype(np.int32)  # [n, 1, 1, d]: pooling is the identity


def test_the_solve_is_scikit_learns_optimum_and_its_l2_is_the_best_on_validation():
  (x, y), (vx, vy) = _features(60, 0), _features(40, 1)
  model = _HeadOnly()
  variables = model.init(jax.random.key(0), x)
  new, sol = probe.solve(model, variables, x, y, vx, vy)
  # Strongest first, the solves above the nearly separable end converged, and the chosen one
  # has the best validation accuracy of the path (ties: lower validation loss).
  assert [p["l2"] for p in sol.path] == list(probe.L2_GRID)
  assert all(p["grad_norm"] < probe.GTOL for p in sol.path if p["l2"] >= 1e-4) and sol.converged
  assert max(p["iterations"] for p in sol.path) < probe.MAX_ITER  # stalls stop early
  best = max(sol.path, key=lambda p: (p["val_accuracy"], -p["val_loss"]))
  assert (sol.l2, sol.val_accuracy) == (best["l2"], best["val_accuracy"])
  # scikit-learn's objective is C * sum(CE) + ||W||^2 / 2, i.e. ours with l2 = 1 / (C n).
  clf = LogisticRegression(C=1 / (sol.l2 * len(y)), tol=1e-10, max_iter=10_000).fit(x[:, 0, 0], y)
  kernel = np.asarray(new["params"]["head"]["dense"]["kernel"])
  bias = np.asarray(new["params"]["head"]["dense"]["bias"])
  scale = np.abs(clf.coef_).max()
  np.testing.assert_allclose(kernel, clf.coef_.T, atol=5e-3 * scale)
  # Softmax is shift invariant: compare the biases up to their mean.
  np.testing.assert_allclose(bias - bias.mean(), clf.intercept_ - clf.intercept_.mean(),
                             atol=5e-3 * max(1.0, np.abs(clf.intercept_).max()))
  assert clf.score(vx[:, 0, 0], vy) == pytest.approx(sol.val_accuracy)


def test_a_solve_stopped_early_is_reported():
  (x, y), (vx, vy) = _features(60, 0), _features(40, 1)
  model = _HeadOnly()
  _, sol = probe.solve(model, model.init(jax.random.key(0), x), x, y, vx, vy, max_iter=1)
  assert not sol.converged and "not converged" in probe.note(sol)


def _setup(strategy="linear_probe", **model_kw):
  model = models.build(tiny_model_cfg(**model_kw), 4)
  ds = make_dataset()
  variables = programs.init_variables(model, jax.random.key(1), ds.train_x.shape[1:])
  return model, variables, strategies.get(strategy, model.groups), ds


def _flat(tree):
  from flax import traverse_util
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def test_fit_solves_the_probe_and_leaves_the_backbone_alone():
  model, variables, strategy, ds = _setup()
  out = fit_one(model, variables, strategy, ds, tiny_train_cfg(epochs=3),
                train.CellKeys.from_seed(0))
  assert len(out.history) == 1 and out.history[0]["solver"] == "lbfgs"
  assert out.probe["l2"] in probe.L2_GRID and out.probe["solver"] == "lbfgs"
  assert out.cached_prefix and out.best_epoch == 1
  before, after = _flat(variables["params"]), _flat(out.variables["params"])
  for p, v in before.items():
    assert np.array_equal(v, after[p]) != p.startswith("head/"), p
  # The reported validation accuracy is the chosen solve's, measured again by `evaluate`.
  assert out.val["accuracy"] == pytest.approx(out.probe["val_accuracy"])


def test_sgd_probe_when_asked_or_when_the_objective_is_stochastic():
  for solver, dropout, augment in [("sgd", 0.0, False), ("lbfgs", 0.5, False),
                                   ("lbfgs", 0.0, True)]:
    model_cfg = tiny_model_cfg(dropout_rate=dropout)
    model = models.build(model_cfg, 4)
    cfg = tiny_train_cfg(epochs=3, probe_solver=solver)
    cfg.augment.enabled = augment
    stage = strategies.get("linear_probe", model.groups).stages[0]
    assert not train.solves_probe(model, stage, models.param_paths(model_cfg), cfg), (solver,
                                                                                       dropout)
  model, variables, strategy, ds = _setup()
  out = fit_one(model, variables, strategy, ds, tiny_train_cfg(epochs=3, probe_solver="sgd"),
                train.CellKeys.from_seed(0))
  assert out.probe is None and len(out.history) == 3 and out.history[0]["lr"] > 0


def test_gradual_unfreezing_keeps_its_head_epochs():
  model, variables, strategy, ds = _setup("gradual_unfreeze")
  paths = tuple(_flat(variables["params"]))
  assert not any(train.solves_probe(model, s, paths, tiny_train_cfg()) for s in strategy.stages)
  lp_ft = strategies.get("lp_ft", model.groups)
  assert [train.solves_probe(model, s, paths, tiny_train_cfg()) for s in lp_ft.stages] == [
      True, False]

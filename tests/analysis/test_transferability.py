"""Transferability estimators on constructed inputs whose answer is known, against direct
computations (scipy's Gaussian density, sklearn's mutual information, the covariance formula),
plus the invariances each estimator should have."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize
from scipy import stats as st

from tlresearch.analysis import transferability as tr
from tlresearch.core.errors import UserError


def _onehot(z, k):
  return np.eye(k)[np.asarray(z)]


def _informative(n=60, d=6, k=3, seed=0):
  """Features whose first k dims carry the class (one-hot * 2 plus noise), the rest noise."""
  rng = np.random.default_rng(seed)
  y = np.arange(n) % k
  f = rng.normal(size=(n, d))
  f[:, :k] += 2 * _onehot(y, k)
  return f, y


# ---------------------------------------------------------------------------------------------
# LEEP and NCE


def test_leep_and_nce_are_zero_when_the_source_label_determines_the_target_label():
  z = np.arange(30) % 5
  y = np.array([0, 1, 2, 0, 1])[z]  # a relabelling: 5 source classes onto 3 target classes
  assert tr.leep(_onehot(z, 5), y) == pytest.approx(0.0, abs=1e-12)
  assert tr.nce(z, y) == pytest.approx(0.0, abs=1e-12)


def test_leep_and_nce_are_minus_log_k_when_source_and_target_labels_are_independent():
  # Every (z, y) pair exactly twice: P(y|z) = 1/4 for every z.
  z, y = np.meshgrid(np.arange(3), np.arange(4), indexing="ij")
  z, y = np.tile(z.ravel(), 2), np.tile(y.ravel(), 2)
  assert tr.leep(_onehot(z, 3), y) == pytest.approx(-math.log(4), abs=1e-12)
  assert tr.nce(z, y) == pytest.approx(-math.log(4), abs=1e-12)


def test_leep_equals_nce_for_one_hot_source_probabilities():
  rng = np.random.default_rng(1)
  z = rng.integers(0, 6, 200)
  y = (z + rng.integers(0, 3, 200)) % 4  # related, not determined
  assert tr.leep(_onehot(z, 6), y) == pytest.approx(tr.nce(z, y), abs=1e-12)
  assert -math.log(4) < tr.nce(z, y) < 0


def test_leep_by_hand_on_four_examples():
  theta = np.array([[0.7, 0.3], [0.2, 0.8], [0.6, 0.4], [0.9, 0.1]])
  y = np.array([0, 1, 1, 0])
  # P(y, z) = (1/4) sum_{i: y_i = y} theta_iz: y=0 -> (0.4, 0.1), y=1 -> (0.2, 0.3);
  # P(z) = (0.6, 0.4); P(y=0|z) = (2/3, 1/4), P(y=1|z) = (1/3, 3/4).
  eep = [0.7 * 2 / 3 + 0.3 / 4, 0.2 / 3 + 0.8 * 3 / 4, 0.6 / 3 + 0.4 * 3 / 4, 0.9 * 2 / 3 + 0.1 / 4]
  assert eep == pytest.approx([13 / 24, 2 / 3, 1 / 2, 5 / 8])
  assert tr.leep(theta, y) == pytest.approx(np.mean(np.log(eep)), abs=1e-14)


def test_leep_ignores_a_source_class_no_example_predicts():
  theta = np.array([[0.7, 0.3, 0.0], [0.2, 0.8, 0.0], [0.6, 0.4, 0.0], [0.9, 0.1, 0.0]])
  assert tr.leep(theta, [0, 1, 1, 0]) == pytest.approx(tr.leep(theta[:, :2], [0, 1, 1, 0]))


def test_nce_against_the_conditional_entropy_of_a_small_table():
  # z = 0: y counts (2, 1, 1); z = 1: y counts (0, 3, 1); 8 examples.
  z = np.array([0, 0, 0, 0, 1, 1, 1, 1])
  y = np.array([0, 0, 1, 2, 1, 1, 1, 2])
  h = 0.5 * 1.5 * math.log(2) + 0.5 * -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
  assert tr.nce(z, y) == pytest.approx(-h, abs=1e-14)
  # H(Y|Z) = H(Y) - I(Y; Z), in nats.
  from sklearn.metrics import mutual_info_score
  hy = st.entropy(np.bincount(y))
  assert tr.nce(z, y) == pytest.approx(-(hy - mutual_info_score(y, z)), abs=1e-12)


def test_source_labels_need_not_be_contiguous():
  z = np.array([0, 0, 0, 0, 1, 1, 1, 1])
  y = np.array([0, 0, 1, 2, 1, 1, 1, 2])
  assert tr.nce(z * 7 + 3, y + 10) == pytest.approx(tr.nce(z, y))


# ---------------------------------------------------------------------------------------------
# H-score


@pytest.mark.parametrize("counts", [(5, 5, 5, 5), (2, 7, 3, 4)])
def test_h_score_of_one_hot_label_features_is_classes_minus_one(counts):
  y = np.repeat(np.arange(4), counts)
  f = np.concatenate([_onehot(y, 4), np.zeros((y.size, 3))], axis=1)
  assert tr.h_score(f, y) == pytest.approx(3.0, abs=1e-10)


def test_h_score_matches_the_covariance_formula_and_is_invariant_to_linear_maps():
  f, y = _informative(n=80, d=5, k=3, seed=2)
  cov_f = np.cov(f, rowvar=False)
  means = np.stack([f[y == c].mean(axis=0) for c in range(3)])
  cov_g = np.cov(means[y], rowvar=False)
  direct = np.trace(np.linalg.pinv(cov_f) @ cov_g)
  assert tr.h_score(f, y) == pytest.approx(direct, rel=1e-10)
  a = np.random.default_rng(3).normal(size=(5, 5)) + 3 * np.eye(5)
  assert tr.h_score(f @ a + 7.0, y) == pytest.approx(direct, rel=1e-9)
  assert 0 < direct < 2


def test_h_score_is_zero_when_the_class_means_are_equal():
  rng = np.random.default_rng(4)
  y = np.repeat(np.arange(3), 10)
  f = rng.normal(size=(30, 4))
  for c in range(3):  # every class's mean moved exactly onto (1, 2, 3, 4)
    f[y == c] += np.arange(1.0, 5.0) - f[y == c].mean(axis=0)
  assert tr.h_score(f, y) == pytest.approx(0.0, abs=1e-12)


def test_h_score_stays_finite_and_saturates_when_dims_exceed_examples():
  # d >= n - 1: the centred features span every direction of the examples, so the
  # pseudo-inverse score is K - 1 whatever the features (documented as uninformative).
  rng = np.random.default_rng(5)
  y = np.arange(12) % 3
  assert tr.h_score(rng.normal(size=(12, 40)), y) == pytest.approx(2.0, abs=1e-9)
  assert tr.h_score(rng.normal(size=(12, 40)).astype(np.float32), y) == pytest.approx(2.0, abs=1e-6)


def test_h_score_of_constant_features_is_zero():
  assert tr.h_score(np.ones((6, 3)), [0, 1, 2, 0, 1, 2]) == 0.0


# ---------------------------------------------------------------------------------------------
# LogME


@pytest.mark.parametrize("n, d", [(30, 4), (8, 20)])
def test_log_evidence_is_the_gaussian_marginal_likelihood(n, d):
  rng = np.random.default_rng(6)
  f = rng.normal(size=(n, d))
  y = (rng.random(n) < 0.4).astype(float)
  for alpha, beta in [(0.5, 2.0), (3.0, 0.7), (40.0, 9.0)]:
    cov = np.eye(n) / beta + f @ f.T / alpha
    direct = st.multivariate_normal(np.zeros(n), cov).logpdf(y) / n
    assert tr.log_evidence(f, y, alpha, beta) == pytest.approx(direct, abs=1e-12)


def test_logme_fixed_point_is_a_maximum_of_the_evidence():
  f, y = _informative()
  per_class = []
  for c in range(3):
    yc = (y == c).astype(float)
    alpha, beta, ev = tr.maximize_evidence(f, yc)
    per_class.append(ev)
    assert tr.log_evidence(f, yc, alpha, beta) == pytest.approx(ev, abs=1e-14)
    for da in (0.95, 1.0, 1.05):
      for db in (0.95, 1.0, 1.05):
        assert tr.log_evidence(f, yc, alpha * da, beta * db) <= ev + 1e-12, (c, da, db)
    # No general-purpose optimiser on the direct Gaussian likelihood does better.
    nll = lambda p: -st.multivariate_normal(  # noqa: E731
        np.zeros(len(yc)), np.eye(len(yc)) / math.exp(p[1]) + f @ f.T / math.exp(p[0])).logpdf(yc)
    best = optimize.minimize(nll, [0.0, 0.0], method="Nelder-Mead",
                             options={"xatol": 1e-8, "fatol": 1e-12, "maxiter": 2000})
    assert ev == pytest.approx(-best.fun / len(yc), abs=1e-9)
    assert ev >= -best.fun / len(yc) - 1e-12
  assert tr.logme(f, y) == pytest.approx(np.mean(per_class), abs=1e-14)


def _paper_fixed_point(f, y, steps=300):
  """LogME's Algorithm 1 written directly (m from a linear solve, no SVD), from alpha = beta = 1;
  None where it leaves (1e-8, 1e8) instead of converging."""
  n, d = f.shape
  eig = np.linalg.eigvalsh(f.T @ f)
  alpha = beta = 1.0
  for _ in range(steps):
    m = beta * np.linalg.solve(alpha * np.eye(d) + beta * f.T @ f, f.T @ y)
    gamma = np.sum(beta * eig / (alpha + beta * eig))
    new = gamma / (m @ m), (n - gamma) / np.sum((f @ m - y) ** 2)
    if not all(1e-8 < v < 1e8 for v in new):
      return None
    if abs(new[0] - alpha) < 1e-10 * alpha and abs(new[1] - beta) < 1e-10 * beta:
      return new
    alpha, beta = new
  return None


def test_logme_agrees_with_the_papers_iteration_where_the_evidence_has_one_maximum():
  f, y = _informative(n=50, d=5, k=2, seed=16)
  yc = (y == 1).astype(float)
  alpha, beta = _paper_fixed_point(f, yc)
  got = tr.maximize_evidence(f, yc)
  assert got[0] == pytest.approx(alpha, rel=1e-4) and got[1] == pytest.approx(beta, rel=1e-4)
  assert got[2] == pytest.approx(tr.log_evidence(f, yc, alpha, beta), abs=1e-12)


def test_logme_takes_the_higher_of_two_local_maxima():
  # Random features (the seed found by a search) whose evidence has two maxima in alpha/beta;
  # the paper's iteration from alpha = beta = 1 converges to the lower one.
  rng = np.random.default_rng(355)
  n, d = int(rng.integers(15, 40)), int(rng.integers(5, 30))
  y = (np.arange(n) % 3 == 0).astype(float)
  f = (rng.normal(size=(n, d)) * rng.uniform(0.1, 3, size=d)
       + rng.uniform(0, 2) * y[:, None] * rng.normal(size=d))
  assert (n, d) == (27, 10)
  local = tr.log_evidence(f, y, *_paper_fixed_point(f, y))
  alpha, beta, ev = tr.maximize_evidence(f, y)
  assert ev > local + 0.01
  grid = [tr.log_evidence(f, y, a, b)
          for a in np.logspace(-4, 6, 41) for b in np.logspace(-3, 3, 25)]
  assert ev >= max(grid) - 1e-12
  for da, db in ((0.95, 1), (1.05, 1), (1, 0.95), (1, 1.05)):
    assert tr.log_evidence(f, y, alpha * da, beta * db) <= ev + 1e-12


def test_logme_where_the_features_explain_nothing_is_the_noise_only_evidence():
  # Every feature has mean 0 within every class, so F^T y_c = 0 for each one-hot target: the
  # evidence is maximal as alpha -> infinity (w = 0), where it is log N(y; 0, |y|^2/n I) / n.
  rng = np.random.default_rng(7)
  y = np.repeat(np.arange(3), [10, 15, 25])
  f = rng.normal(size=(50, 6))
  for c in range(3):
    f[y == c] -= f[y == c].mean(axis=0)
  n = 50
  expected = np.mean([0.5 * (math.log(n / nc) - math.log(2 * math.pi) - 1) for nc in (10, 15, 25)])
  assert tr.logme(f, y) == pytest.approx(expected, abs=1e-10)


def test_logme_ranks_separating_features_above_random_ones():
  f, y = _informative(n=90, d=8, k=3, seed=8)
  noise = np.random.default_rng(9).normal(size=f.shape)
  assert tr.logme(f, y) > tr.logme(noise, y) + 0.05


@pytest.mark.parametrize("n, d", [(20, 100), (100, 10), (12, 12)])
def test_logme_is_finite_for_fewer_and_more_examples_than_dims(n, d):
  rng = np.random.default_rng(10)
  y = np.arange(n) % 4
  f = rng.normal(size=(n, d)) + _onehot(y, 4) @ rng.normal(size=(4, d))
  score = tr.logme(f, y)
  assert math.isfinite(score)
  # Not below what any single (alpha, beta) reaches.
  yc = (y == 0).astype(float)
  ev = tr.maximize_evidence(f, yc)[2]
  for alpha in (1e-3, 1.0, 1e3):
    for beta in (1e-1, 1.0, 10.0, 1e3):
      assert tr.log_evidence(f, yc, alpha, beta) <= ev + 1e-12


def test_scores_do_not_depend_on_the_order_of_the_examples():
  f, y = _informative(n=45, d=7, k=3, seed=11)
  rng = np.random.default_rng(12)
  probs = rng.dirichlet(np.ones(5), size=45)
  p = rng.permutation(45)
  a, b = tr.score_all(f, y, probs), tr.score_all(f[p], y[p], probs[p])
  assert a.keys() == b.keys()
  for name in a:
    assert b[name] == pytest.approx(a[name], abs=1e-10), name


# ---------------------------------------------------------------------------------------------
# score_all


def test_score_all_computes_what_its_inputs_allow():
  f, y = _informative(n=30, d=5, k=3, seed=13)
  probs = np.random.default_rng(14).dirichlet(np.ones(4), size=30)
  assert set(tr.ESTIMATORS) == {"logme", "h_score", "leep", "nce"}
  only_f = tr.score_all(f, y)
  assert set(only_f) == {k for k, v in tr.ESTIMATORS.items() if v == "features"}
  both = tr.score_all(f, y, source_probs=probs)
  assert set(both) == set(tr.ESTIMATORS)
  assert both["logme"] == tr.logme(f, y) and both["h_score"] == tr.h_score(f, y)
  assert both["leep"] == tr.leep(probs, y)
  assert both["nce"] == tr.nce(probs.argmax(axis=1), y)


# ---------------------------------------------------------------------------------------------
# Rank agreement


def test_tau_is_one_for_the_same_order_and_minus_one_for_the_reverse():
  scores, acc = [0.1, 0.5, 0.3, 0.9, 0.7], [60.0, 70.0, 65.0, 90.0, 80.0]
  assert tr.kendall_tau(scores, acc) == pytest.approx(1.0)
  assert tr.weighted_tau(scores, acc) == pytest.approx(1.0)
  assert tr.kendall_tau(scores, [-a for a in acc]) == pytest.approx(-1.0)
  assert tr.weighted_tau(scores, [-a for a in acc]) == pytest.approx(-1.0)
  # One discordant pair of six: (5 - 1) / 6.
  assert tr.kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(2 / 3)


def test_bootstrap_interval_holds_the_estimate_and_is_deterministic():
  rng = np.random.default_rng(15)
  acc = np.linspace(0.6, 0.9, 12) + rng.normal(0, 0.02, 12)
  scores = acc + rng.normal(0, 0.04, 12)  # a noisy but monotone relation
  for stat, point in (("kendall", tr.kendall_tau(scores, acc)),
                      ("weighted", tr.weighted_tau(scores, acc))):
    lo, hi = tr.bootstrap_tau(scores, acc, stat=stat, n_boot=500, seed=3)
    assert -1 <= lo <= point <= hi <= 1, (stat, lo, point, hi)
    assert hi - lo > 0.05
    assert tr.bootstrap_tau(scores, acc, stat=stat, n_boot=500, seed=3) == (lo, hi)
  assert tr.bootstrap_tau(scores, acc, n_boot=500, seed=4) != tr.bootstrap_tau(
      scores, acc, n_boot=500, seed=3)


def test_bootstrap_skips_resamples_that_are_all_ties():
  # With two models a resample either repeats one model (no tau) or holds both (tau = 1).
  assert tr.bootstrap_tau([0.1, 0.2], [50.0, 60.0], n_boot=200) == (1.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("call, match", [
    (lambda: tr.logme(np.ones((5, 3)), [0, 1, 0, 1]), "4 entries"),
    (lambda: tr.h_score(np.ones((5, 3)), [0, 1, 0, 1, 1, 0]), "6 entries"),
    (lambda: tr.leep(np.full((5, 2), 0.5), [0, 1, 0, 1]), "4 entries"),
    (lambda: tr.nce([0, 1, 0], [0, 1, 0, 1]), "4 entries"),
    (lambda: tr.kendall_tau([1, 2, 3], [1, 2]), "3 models"),
    (lambda: tr.score_all(np.ones((5, 3)), [0, 1, 0, 1, 0], np.full((4, 2), 0.5)), "4 examples"),
    (lambda: tr.logme(np.ones((5, 3)), [2, 2, 2, 2, 2]), "at least 2 classes"),
    (lambda: tr.h_score(np.ones((5, 3)), [0, 0, 0, 0, 0]), "at least 2 classes"),
    (lambda: tr.leep(np.full((4, 2), 0.5), [1, 1, 1, 1]), "at least 2 classes"),
    (lambda: tr.nce([0, 1, 0, 1], [3, 3, 3, 3]), "at least 2 classes"),
    (lambda: tr.logme(np.array([[0.0, 1.0], [np.nan, 1.0], [1.0, 2.0]]), [0, 1, 0]), "non-finite"),
    (lambda: tr.leep(np.array([[2.0, -1.0], [0.5, 0.5]]), [0, 1]), "logits"),
    (lambda: tr.leep(np.array([[0.9, 0.9], [0.5, 0.5]]), [0, 1]), "sum to 1"),
    (lambda: tr.logme(np.ones((4, 2)), [0, 1, 0.5, 1]), "integers"),
    (lambda: tr.logme(np.ones((4, 2)), [0, 1, -1, 1]), ">= 0"),
    (lambda: tr.bootstrap_tau([1, 2, 3], [1, 2, 3], stat="spearman"), "kendall, weighted"),
    (lambda: tr.maximize_evidence(np.ones((4, 2)), np.zeros(4)), "all zeros"),
])
def test_bad_input_is_a_one_line_user_error(call, match):
  with pytest.raises(UserError, match=match) as e:
    call()
  assert "\n" not in str(e.value)


# ---------------------------------------------------------------- the `transferability` probe

def test_transferability_probe_scores_the_starting_backbone_on_the_training_split():
  import jax
  import jax.numpy as jnp

  from tlresearch import models
  from tlresearch.analysis import probes
  from tlresearch.training import programs
  from tests.conftest import make_dataset, tiny_model_cfg

  ds = make_dataset()
  model = models.build(tiny_model_cfg(), ds.num_classes)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  width = variables["params"]["head"]["dense"]["kernel"].shape[0]
  head = {"kernel": jax.random.normal(jax.random.key(1), (width, 5)), "bias": jnp.zeros(5)}
  # Independently: the backbone's pooled output in inference mode, the head's softmax.
  fmap = model.apply(variables, programs.preprocess(jnp.asarray(ds.train_x), model),
                     stop=model.groups[-2])
  f = np.asarray(jnp.mean(fmap, axis=(1, 2)), np.float64)
  z = f @ np.asarray(head["kernel"], np.float64)
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  got = probes.measure(("transferability",), model, variables, variables, ds, head)
  assert set(got) == {f"transferability_{k}" for k in tr.ESTIMATORS}
  assert got["transferability_logme"] == pytest.approx(tr.logme(f, ds.train_y), abs=1e-5)
  assert got["transferability_leep"] == pytest.approx(tr.leep(p, ds.train_y), abs=1e-5)
  # Without a source head (random init, Keras weights) only the feature-based scores.
  assert set(probes.measure(("transferability",), model, variables, variables, ds)) == {
      "transferability_logme", "transferability_h_score"}

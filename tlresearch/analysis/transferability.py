"""Transferability estimators: scores computed from a pretrained model's outputs on the target
training set, without fine-tuning, that should rank models by the accuracy transfer reaches.

Four estimators, from two kinds of input:

- from the backbone's features [n, d]:
  - LogME (You et al. 2021, ICML, "LogME: Practical Assessment of Pre-trained Models for
    Transfer Learning"): the log marginal likelihood ("evidence") of a Bayesian linear
    regression from the features to each class's one-hot target, maximised over the prior
    precision alpha and the noise precision beta, per example and averaged over classes.
    The paper's fixed-point iteration does the maximising, checked against a grid over
    alpha / beta: on some features it stops at the lower of two maxima, or creeps for
    hundreds of steps towards a maximum at a limit (`_maximize`).
  - H-score (Bao et al. 2019, ICIP, "An Information-Theoretic Approach to Transferability in
    Task Transfer Learning"): tr(cov(f)^+ cov(E[f|y])), how much of the features' variance lies
    between the class means. The pseudo-inverse keeps it finite when d > n, but it then
    reaches its ceiling K - 1 for any features (`h_score`).
- from the source head's softmax probabilities theta(x) [n, C_s] on the target examples:
  - LEEP (Nguyen et al. 2020, ICML, "LEEP: A New Measure to Evaluate Transferability of
    Learned Representations"): the mean log-likelihood of the target labels under the
    "empirical predictor" sum_z P(y|z) theta(x)_z, with P(y|z) from the empirical joint of
    target label y and source label z.
  - NCE (Tran et al. 2019, ICCV, "Transferability and Hardness of Supervised Classification
    Tasks"): -H(Y|Z), with Z the source head's hard label (argmax), from the empirical joint.
    For one-hot theta, LEEP equals NCE.

All four are "higher is better". Whether an estimator is any use is a question of rank
agreement over several models: `kendall_tau` (tau-b), `weighted_tau` (the weighted tau the LogME
paper reports, which counts disagreements among the best models most) and `bootstrap_tau`, a
percentile interval for either over the models.

Everything is computed in float64 numpy/scipy: features usually arrive as float32, whose
~1e-7 precision the SVDs and log-determinants here would amplify. Bad input (mismatched
lengths, fewer than two classes present, non-finite values) raises UserError with a one-line
message.
"""
from __future__ import annotations

import logging
import math

import numpy as np
from scipy import optimize
from scipy import stats as _st

from tlresearch.core.errors import UserError

log = logging.getLogger(__name__)

# Which input each estimator reads; `score_all` computes the "source_probs" ones only when it
# is given (a backbone pretrained without a classification head has no source_probs).
ESTIMATORS = {
    "logme": "features",
    "h_score": "features",
    "leep": "source_probs",
    "nce": "source_probs",
}

# The LogME fixed point stops when both alpha and beta change by less than this, relatively.
# The evidence is flat near its maximum, so the score is settled long before the parameters.
LOGME_TOL = 1e-5
LOGME_MAX_ITER = 100
# The grid over alpha / beta that catches what the fixed point misses (`_maximize`), and how
# far above the fixed point's evidence a grid point must be to count as better (rounding).
_GRID_POINTS = 401
_GRID_MARGIN = 1e-12
# Source-head rows must sum to 1 within this (float32 softmax over ~1000 classes sums to 1
# within ~1e-4); further off, they are most likely logits, not probabilities.
_PROBS_ATOL = 1e-3

# ---------------------------------------------------------------------------------------------
# Input checks


def _features(features, name: str = "features") -> np.ndarray:
  f = np.asarray(features)
  if f.ndim != 2:
    raise UserError(f"{name} must be 2-D [examples, dims], got shape {f.shape}")
  if not np.issubdtype(f.dtype, np.number) or np.iscomplexobj(f):
    raise UserError(f"{name} must be real numbers, got dtype {f.dtype}")
  if f.shape[0] < 2 or f.shape[1] < 1:
    raise UserError(f"{name} needs at least 2 examples and 1 dim, got shape {f.shape}")
  f64 = f.astype(np.float64)
  if not np.all(np.isfinite(f64)):
    raise UserError(f"{name} has non-finite values (nan or inf)")
  return f64


def _int_labels(labels, n: int | None, name: str) -> np.ndarray:
  y = np.asarray(labels)
  if y.ndim != 1:
    raise UserError(f"{name} must be 1-D, got shape {y.shape}")
  if n is not None and y.shape[0] != n:
    raise UserError(f"{name} has {y.shape[0]} entries but the inputs have {n} examples")
  if np.issubdtype(y.dtype, np.floating):
    # Labels that went through a float array are accepted when they are whole numbers.
    if not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
      raise UserError(f"{name} must be integers, got non-integer values")
  elif not (np.issubdtype(y.dtype, np.integer) or y.dtype == bool):
    raise UserError(f"{name} must be integers, got dtype {y.dtype}")
  y = y.astype(np.int64)
  if y.size and y.min() < 0:
    raise UserError(f"{name} must be >= 0, got {int(y.min())}")
  return y


def _target(labels, n: int | None) -> tuple[np.ndarray, int]:
  """Target labels as 0..K-1 over the K classes present (a class with no example carries no
  information and would only add a degenerate all-zero target), and K >= 2."""
  y = _int_labels(labels, n, "labels")
  classes, codes = np.unique(y, return_inverse=True)
  if classes.size < 2:
    raise UserError(f"labels need at least 2 classes present, got {classes.size}")
  return codes.reshape(-1), int(classes.size)


def _probs(source_probs) -> np.ndarray:
  p = _features(source_probs, "source_probs")
  if np.any(p < 0):
    raise UserError("source_probs has negative values; pass softmax probabilities, not logits")
  sums = p.sum(axis=1)
  if np.any(np.abs(sums - 1) > _PROBS_ATOL):
    worst = float(sums[np.argmax(np.abs(sums - 1))])
    raise UserError(f"source_probs rows must sum to 1 (softmax probabilities), "
                    f"one sums to {worst:.6g}")
  # Renormalise the rounding so that the empirical joint sums to exactly 1.
  return p / sums[:, None]


# ---------------------------------------------------------------------------------------------
# LogME


def _evidence(n: int, d: int, sigma, x, r_perp2, alpha, beta):
  """Log evidence / n for targets y with x = U^T y (U: left singular vectors, sigma: squared
  singular values, k = min(n, d) of them) and r_perp2 = |y - U x|^2; vectorised over the
  columns of x. Also returns gamma, |m|^2 and the residual |F m - y|^2 for the fixed point."""
  denom = alpha + beta * sigma[:, None]
  gamma = np.sum(beta * sigma[:, None] / denom, axis=0)
  # Squared after the division: alpha can grow past 1e160 when a target is (nearly)
  # orthogonal to the features, and denom ** 2 would overflow.
  m2 = np.sum((beta * np.sqrt(sigma)[:, None] * x / denom) ** 2, axis=0)
  res2 = np.sum((alpha * x / denom) ** 2, axis=0) + r_perp2
  k = sigma.shape[0]
  # log|alpha I + beta F^T F|: the k singular directions, plus d - k where F^T F is 0.
  logdet = np.sum(np.log(denom), axis=0) + (d - k) * np.log(alpha)
  ev = (0.5 * n * np.log(beta) + 0.5 * d * np.log(alpha) - 0.5 * n * math.log(2 * math.pi)
        - 0.5 * beta * res2 - 0.5 * alpha * m2 - 0.5 * logdet)
  return ev / n, gamma, m2, res2


def _svd_parts(f: np.ndarray, targets: np.ndarray):
  """The SVD quantities the evidence needs: sigma [k], x = U^T Y [k, c], |Y - U x|^2 [c].
  The thin SVD covers n < d and n >= d alike (k = min(n, d))."""
  u, s, _ = np.linalg.svd(f, full_matrices=False)
  x = u.T @ targets
  # The part of y outside the features' column space, computed directly rather than as
  # |y|^2 - |x|^2, which cancels catastrophically when y is nearly in that space.
  r_perp2 = np.sum((targets - u @ x) ** 2, axis=0)
  return s ** 2, x, r_perp2


def _profile(n: int, sigma, x, r_perp2, log_t):
  """Log evidence / n at the best beta for each t = alpha / beta in exp(log_t) [g] and each
  target column of x [k, c], and that beta, both [g, c]. With S = I + F F^T / t the evidence
  is log N(y; 0, S / beta), whose maximum over beta is at beta = n / (y^T S^-1 y)."""
  t = np.exp(np.asarray(log_t, dtype=np.float64))[:, None]
  q = (t / (t + sigma)) @ x ** 2 + r_perp2
  beta = n / q
  logdet = np.sum(np.log1p(sigma / t), axis=1)  # log|S|, the same for every column
  ev = 0.5 * (np.log(beta) - math.log(2 * math.pi) - 1) - 0.5 * logdet[:, None] / n
  return ev, beta


def _grid(sigma) -> np.ndarray:
  """log t from the smallest squared singular value / e^30 to the largest * e^30: past either
  end the evidence is within ~1e-13 of its limit (t -> 0: the features interpolate y; t ->
  infinity: they explain none of it)."""
  pos = sigma[sigma > 0]
  if pos.size == 0:
    return np.linspace(-1.0, 1.0, 3)  # all-zero features: the evidence does not depend on t
  return np.linspace(math.log(pos.min()) - 30, math.log(pos.max()) + 30, _GRID_POINTS)


def _refine(n: int, sigma, x, r_perp2, grid, i: int) -> float:
  """log t maximising one column's profile evidence within a grid step of grid[i], the best
  grid point (bounded Brent)."""
  lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]
  f = lambda u: -_profile(n, sigma, x[:, None], r_perp2, [u])[0][0, 0]  # noqa: E731
  res = optimize.minimize_scalar(f, bounds=(lo, hi), method="bounded", options={"xatol": 1e-10})
  return float(res.x) if res.fun <= f(grid[i]) else float(grid[i])


def _maximize(n: int, d: int, sigma, x, r_perp2):
  """(alpha, beta, log evidence / n) maximising the evidence, per target column of x.

  First MacKay's fixed point (LogME's Algorithm 1), for all columns at once from
  alpha = beta = 1: gamma = sum beta sigma / (alpha + beta sigma), alpha <- gamma / |m|^2,
  beta <- (n - gamma) / |F m - y|^2, until both change by less than LOGME_TOL relatively.
  Where the evidence has one interior maximum it converges there in a few steps, and that is
  the answer. Two cases it misses, found on random features (~3 columns in 1000):
  - the supremum is a limit, alpha / beta -> 0 or infinity (a class the features do not
    explain at all; n < d with the target interpolated): the iteration creeps a few percent
    per step and after LOGME_MAX_ITER steps can be 0.01 short, as large as gaps between models;
  - the evidence has two local maxima in alpha / beta and the iteration finds the lower.
  So the evidence, maximised over beta in closed form, is also evaluated on a grid of
  alpha / beta (`_grid`, ~0.25 apart in log); where the fixed point did not converge, or the
  grid beats it, the best grid point is refined by a 1-D search and replaces it.
  """
  c = x.shape[1]
  alpha, beta = np.ones(c), np.ones(c)
  active = np.ones(c, dtype=bool)
  converged = np.zeros(c, dtype=bool)
  for _ in range(LOGME_MAX_ITER):
    _, gamma, m2, res2 = _evidence(n, d, sigma, x, r_perp2, alpha, beta)
    # |m|^2 = 0 (a target orthogonal to every feature) or a zero residual puts the optimum at
    # alpha or beta = infinity: the update would divide by zero, so the 1-D search takes over.
    active &= (m2 > 0) & (res2 > 0)
    with np.errstate(over="ignore"):
      new_alpha = np.where(active, gamma / np.where(active, m2, 1.0), alpha)
      new_beta = np.where(active, (n - gamma) / np.where(active, res2, 1.0), beta)
    # A step that overflows is heading for that infinite optimum too.
    ok = np.isfinite(new_alpha) & np.isfinite(new_beta)
    active &= ok
    new_alpha, new_beta = np.where(ok, new_alpha, alpha), np.where(ok, new_beta, beta)
    done = active & ((np.abs(new_alpha - alpha) <= LOGME_TOL * alpha)
                     & (np.abs(new_beta - beta) <= LOGME_TOL * beta))
    alpha, beta = new_alpha, new_beta
    converged |= done
    active &= ~done
    if not active.any():
      break
  ev = _evidence(n, d, sigma, x, r_perp2, alpha, beta)[0]
  grid = _grid(sigma)
  grid_ev = _profile(n, sigma, x, r_perp2, grid)[0]
  best = np.argmax(grid_ev, axis=0)
  redo = ~converged | (grid_ev[best, np.arange(c)] > ev + _GRID_MARGIN)
  for j in np.flatnonzero(redo):
    log_t = _refine(n, sigma, x[:, j], r_perp2[j], grid, int(best[j]))
    b = _profile(n, sigma, x[:, j:j + 1], r_perp2[j], [log_t])[1][0, 0]
    a = math.exp(log_t) * b
    cand = _evidence(n, d, sigma, x[:, j:j + 1], r_perp2[j], np.array([a]), np.array([b]))[0][0]
    if not converged[j] or cand > ev[j]:
      alpha[j], beta[j], ev[j] = a, b, cand
  if redo.any():
    log.debug("LogME: %d of %d targets maximised by the 1-D search", int(redo.sum()), c)
  return alpha, beta, ev


def log_evidence(features, y, alpha: float, beta: float) -> float:
  """LogME's log evidence / n of target y [n] given features [n, d] at fixed prior precision
  alpha and noise precision beta: log N(y; 0, I / beta + F F^T / alpha) / n, the model
  y = F w + noise with w ~ N(0, I / alpha), noise ~ N(0, I / beta)."""
  f = _features(features)
  t = np.asarray(y, dtype=np.float64)
  if t.shape != (f.shape[0],):
    raise UserError(f"y must have shape ({f.shape[0]},), got {t.shape}")
  if not (alpha > 0 and beta > 0 and math.isfinite(alpha) and math.isfinite(beta)):
    raise UserError(f"alpha and beta must be positive and finite, got {alpha}, {beta}")
  sigma, x, r_perp2 = _svd_parts(f, t[:, None])
  return float(_evidence(f.shape[0], f.shape[1], sigma, x, r_perp2,
                         np.array([float(alpha)]), np.array([float(beta)]))[0][0])


def maximize_evidence(features, y) -> tuple[float, float, float]:
  """(alpha, beta, log evidence / n) where the evidence of target y [n] is largest: LogME's
  fixed point, checked against a grid over alpha / beta (`_maximize`)."""
  f = _features(features)
  t = np.asarray(y, dtype=np.float64)
  if t.shape != (f.shape[0],):
    raise UserError(f"y must have shape ({f.shape[0]},), got {t.shape}")
  if not np.all(np.isfinite(t)):
    raise UserError("y has non-finite values (nan or inf)")
  if not np.any(t):
    raise UserError("y is all zeros: its evidence grows without bound as beta -> infinity")
  alpha, beta, ev = _maximize(*f.shape, *_svd_parts(f, t[:, None]))
  return float(alpha[0]), float(beta[0]), float(ev[0])


def logme(features, labels) -> float:
  """LogME: the mean over the classes present of the maximum log evidence / n of a Bayesian
  linear regression from features [n, d] (no intercept, no normalisation, as in the paper) to
  the class's one-hot target. Higher is better; it is comparable between models on the same
  target data (it is a per-example log-likelihood, so its scale depends on n only weakly)."""
  f = _features(features)
  y, k = _target(labels, f.shape[0])
  onehot = np.eye(k)[y]
  return float(np.mean(_maximize(*f.shape, *_svd_parts(f, onehot))[2]))


# ---------------------------------------------------------------------------------------------
# H-score


def h_score(features, labels) -> float:
  """H-score, tr(cov(f)^+ cov(E[f|y])), with the Moore-Penrose pseudo-inverse.

  Computed as |P_y U_r|_F^2, with U_r the left singular vectors of the centred features that
  have non-zero singular values and P_y the projection that replaces each entry by its class
  mean: the same number (cov(f) = X^T X / n and cov(E[f|y]) = X^T P_y X / n for centred X),
  but from an SVD of X rather than an inverse of X^T X, which squares X's condition number.
  Singular values at or below max(s) * max(n, d) * eps are zero (numpy's matrix_rank rule,
  with the eps of the input's float type: float32 features carry only float32 precision).

  It lies in [0, K - 1] (K classes present) and is invariant to invertible linear maps of the
  features. With d >= n - 1 features in general position the centred features span every
  direction of the n examples and the score is exactly K - 1 whatever the features are:
  there the pseudo-inverse keeps it finite but not informative (a shrunk covariance, as in
  Ibrahim et al. 2022, "Newer is not always better: rethinking transferability metrics",
  would trade the invariance for a usable score).
  """
  raw = np.asarray(features)
  f = _features(features)
  y, k = _target(labels, f.shape[0])
  n, d = f.shape
  x = f - f.mean(axis=0)
  u, s, _ = np.linalg.svd(x, full_matrices=False)
  eps = np.finfo(raw.dtype).eps if np.issubdtype(raw.dtype, np.floating) else np.finfo(float).eps
  if s.size == 0 or s[0] == 0:
    return 0.0  # constant features: no variance, none of it between classes
  u = u[:, s > s[0] * max(n, d) * eps]
  counts = np.bincount(y, minlength=k).astype(np.float64)
  # |P_y u|^2 for a unit column u = sum over classes of n_c * mean_c(u)^2.
  sums = np.zeros((k, u.shape[1]))
  np.add.at(sums, y, u)
  return float(np.sum(sums ** 2 / counts[:, None]))


# ---------------------------------------------------------------------------------------------
# LEEP and NCE


def leep(source_probs, labels) -> float:
  """LEEP: (1/n) sum_i log sum_z P(y_i|z) theta(x_i)_z, with the empirical joint
  P(y, z) = (1/n) sum_{i: y_i = y} theta(x_i)_z and P(y|z) = P(y, z) / P(z). At most 0 (the
  value when the source label determines the target label); -log K when P(y|z) = 1/K."""
  p = _probs(source_probs)
  y, k = _target(labels, p.shape[0])
  n = p.shape[0]
  joint = np.zeros((k, p.shape[1]))
  np.add.at(joint, y, p)
  joint /= n
  pz = joint.sum(axis=0)
  # A source class no example puts any mass on has no P(y|z); every theta_z is 0 there, so
  # any value leaves the score alone.
  cond = np.divide(joint, pz, out=np.zeros_like(joint), where=pz > 0)
  eep = np.sum(cond[y] * p, axis=1)
  return float(np.mean(np.log(eep)))


def nce(source_labels, labels) -> float:
  """NCE: -H(Y|Z) = sum_{y,z} P(y, z) log P(y|z), from the empirical joint of the target label
  y and the source head's hard label z (its argmax) over the n examples. In [-log K, 0]."""
  z = _int_labels(source_labels, None, "source_labels")
  y, k = _target(labels, z.shape[0])
  _, z = np.unique(z, return_inverse=True)
  z = z.reshape(-1)
  joint = np.zeros((k, int(z.max()) + 1))
  np.add.at(joint, (y, z), 1.0)
  joint /= y.shape[0]
  pz = joint.sum(axis=0)
  nz = joint > 0
  return float(np.sum(joint[nz] * np.log((joint / pz)[nz])))


def _nce_from_probs(source_probs, labels) -> float:
  return nce(np.argmax(_probs(source_probs), axis=1), labels)


_SCORERS = {"logme": logme, "h_score": h_score, "leep": leep, "nce": _nce_from_probs}


def score_all(features, labels, source_probs=None) -> dict[str, float]:
  """Every estimator in ESTIMATORS that the inputs allow: logme and h_score from features,
  leep and nce (on the argmax of source_probs) from source_probs when it is given; those are
  absent from the result when it is None."""
  n = _features(features).shape[0]
  if source_probs is not None and _probs(source_probs).shape[0] != n:
    raise UserError(f"source_probs has {np.shape(source_probs)[0]} examples but features has {n}")
  inputs = {"features": features, "source_probs": source_probs}
  return {name: _SCORERS[name](inputs[uses], labels)
          for name, uses in ESTIMATORS.items() if inputs[uses] is not None}


# ---------------------------------------------------------------------------------------------
# Rank agreement between an estimator's scores and the accuracies the models reach


def _pair(scores, accuracies) -> tuple[np.ndarray, np.ndarray]:
  s = np.asarray(scores, dtype=np.float64)
  a = np.asarray(accuracies, dtype=np.float64)
  if s.ndim != 1 or a.ndim != 1:
    raise UserError(f"scores and accuracies must be 1-D, got shapes {s.shape} and {a.shape}")
  if s.shape != a.shape:
    raise UserError(f"scores has {s.size} models but accuracies has {a.size}")
  if s.size < 2:
    raise UserError(f"rank agreement needs at least 2 models, got {s.size}")
  if not (np.all(np.isfinite(s)) and np.all(np.isfinite(a))):
    raise UserError("scores and accuracies must be finite (nan or inf found)")
  return s, a


def kendall_tau(scores, accuracies) -> float:
  """Kendall's tau-b between the estimator's scores and the models' accuracies (ties count in
  the denominator as tau-b prescribes). nan when all scores or all accuracies are tied."""
  s, a = _pair(scores, accuracies)
  return float(_st.kendalltau(s, a).statistic)


def weighted_tau(scores, accuracies) -> float:
  """scipy's weighted Kendall tau (hyperbolic weights 1/(r+1) on the rank r, averaged over
  ranking by scores and by accuracies), as LogME reports: swapping the two best models costs
  more than swapping the two worst. nan when all scores or all accuracies are tied."""
  s, a = _pair(scores, accuracies)
  return float(_st.weightedtau(s, a).statistic)


def bootstrap_tau(scores, accuracies, stat: str = "kendall", n_boot: int = 2000, seed: int = 0,
                  level: float = 0.95) -> tuple[float, float]:
  """Percentile bootstrap interval (low, high) for kendall_tau or weighted_tau over the models:
  each resample draws len(scores) model indices with replacement. A resample whose scores or
  accuracies are all tied has no tau and is skipped ((nan, nan) if every one is).

  The models are the sample here, and there are usually few of them: with 5-10 models the
  interval is wide (a resample holds only ~63% of the models, some of them repeated), so read
  it as how much tau depends on which models were compared, not as a precise interval.
  Deterministic for a given seed.
  """
  s, a = _pair(scores, accuracies)
  fns = {"kendall": _st.kendalltau, "weighted": _st.weightedtau}
  if stat not in fns:
    raise UserError(f"unknown stat {stat!r}; choose from: kendall, weighted")
  if not (isinstance(n_boot, (int, np.integer)) and n_boot >= 1):
    raise UserError(f"n_boot must be a positive integer, got {n_boot!r}")
  if not 0 < level < 1:
    raise UserError(f"level must be in (0, 1), got {level}")
  fn = fns[stat]
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, s.size, size=(int(n_boot), s.size))
  taus = []
  for i in idx:
    bs, ba = s[i], a[i]
    if np.ptp(bs) == 0 or np.ptp(ba) == 0:
      continue
    taus.append(fn(bs, ba).statistic)
  taus = np.asarray(taus, dtype=np.float64)
  taus = taus[np.isfinite(taus)]
  if taus.size == 0:
    return float("nan"), float("nan")
  lo, hi = np.quantile(taus, [(1 - level) / 2, (1 + level) / 2])
  return float(lo), float(hi)

"""Summaries over seeds: mean with a 95% confidence interval, paired differences."""
from __future__ import annotations

import math

import numpy as np
from scipy import stats as _st


def mean_ci(values, confidence: float = 0.95) -> tuple[float, float]:
  """(mean, half-width) of a Student-t confidence interval over independent seeds.

  With few seeds (3-10) the t interval is the honest choice: a bootstrap over 3 values
  cannot produce a wider interval than the data's range and badly under-covers. One value
  gives a half-width of nan (no interval can be claimed).
  """
  x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
  if x.size == 0:
    return float("nan"), float("nan")
  if x.size == 1:
    return float(x[0]), float("nan")
  half = _st.t.ppf(0.5 + confidence / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
  return float(x.mean()), float(half)


def paired_difference(a, b, confidence: float = 0.95) -> tuple[float, float]:
  """(mean, half-width) of a - b over paired seeds (a[i] and b[i] share seed i)."""
  a, b = np.asarray(a, float), np.asarray(b, float)
  if a.shape != b.shape:
    raise ValueError(f"paired samples need equal length, got {a.shape} and {b.shape}")
  return mean_ci(a - b, confidence)

"""Weight-space methods applied after training: WiSE-FT (Wortsman et al. 2022).

WiSE-FT interpolates, per seed, between the fine-tuning's starting weights theta_0 (for
`wise_ft`, LP-FT's probe: the pretrained backbone with the converged probe's head) and the
fine-tuned weights theta_1: theta(a) = (1 - a) theta_0 + a theta_1 for a in ALPHAS. Each
seed's a is chosen on its validation split (highest accuracy, ties to the lower validation
loss, then to the larger a); the whole curve, validation and test, is recorded, so a table
can show where on it the chosen point lies.

BatchNorm running statistics are interpolated like the weights. They are exact at a = 0
and a = 1; in between they are the interpolation of the two networks' statistics, not the
statistics of the interpolated network (which would need a pass over the training data).
Frozen parameters are equal at both ends, so a cached frozen prefix stays valid along the
whole curve.
"""
from __future__ import annotations

import jax
import numpy as np

ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))


def interpolate(start, end, alpha: float):
  return jax.tree.map(lambda a, b: (1.0 - alpha) * a + alpha * b, start, end)


def choose(val_accuracy, val_loss) -> int:
  """Index into ALPHAS of the best validation point (accuracy, then loss, then larger a)."""
  keys = [(float(acc), -float(loss), a) for acc, loss, a in zip(val_accuracy, val_loss, ALPHAS)]
  return max(range(len(keys)), key=keys.__getitem__)


def wise_ft(lanes, model, start, end, splits, data, group_start, seeds):
  """The interpolated weights each seed chooses, and per seed the curve record.

  `start`, `end`: stacked variables (lanes' layout); `splits`: the model inputs of val and
  test (images, or a cached prefix's outputs starting at `group_start`); `seeds`: the seed
  indices to record (the others keep `end`)."""
  curves = []
  for alpha in ALPHAS:
    v = interpolate(start, end, alpha)
    val, _ = lanes.evaluate(model, v, splits["val"], data["val_y"], group_start)
    test, _ = lanes.evaluate(model, v, splits["test"], data["test_y"], group_start)
    curves.append((val, test))
  records, chosen = {}, np.full(lanes.size, len(ALPHAS) - 1)
  for s in seeds:
    val_acc = [float(c[0]["accuracy"][s]) for c in curves]
    val_loss = [float(c[0]["loss"][s]) for c in curves]
    i = choose(val_acc, val_loss)
    chosen[s] = i
    records[s] = {"method": "wise_ft", "alphas": list(ALPHAS), "alpha": ALPHAS[i],
                  "val_accuracy": val_acc, "val_loss": val_loss,
                  "test_accuracy": [float(c[1]["accuracy"][s]) for c in curves]}
  # Each seed's chosen point, assembled one alpha at a time (lanes.select works per seed).
  out = end
  for i, alpha in enumerate(ALPHAS):
    flags = chosen == i
    if flags.any() and i != len(ALPHAS) - 1:
      out = lanes.select(flags, interpolate(start, end, alpha), out)
  return out, records

"""Loss penalties a strategy can put in place of weight decay.

L2-SP (Li et al. 2018) regularises toward the starting point: alpha/2 ||w - w0||^2 over the
transferred backbone's kernels, where w0 are the pretrained weights, plus beta/2 ||w||^2 over
the new head's kernels (there is no pretrained value to pull toward). Plain weight decay would
instead pull the backbone toward zero, away from what pretraining learned. Biases and
BatchNorm scales and shifts are left out, as they are from weight decay (`optim.decay_mask`).

The anchor w0 is a non-trainable input of the train step (not a constant baked into the
compiled program), so one compiled step serves every seed.
"""
from __future__ import annotations

import jax.numpy as jnp

from tlresearch.strategies import FROZEN


def anchor(stage, flat_params: dict, rule_by_path: dict) -> dict:
  """The stage's reference weights (its starting point) for the trainable kernels it
  penalises; {} when the stage has no penalty, so nothing extra enters the step."""
  if not stage.penalty:
    return {}
  return {p: v for p, v in flat_params.items() if rule_by_path[p] != FROZEN and p.endswith("kernel")}


def value(penalty: tuple, trainable: dict, anchor_params: dict, head: str):
  """The penalty of `trainable` (flat path -> array) given the stage's anchor."""
  if not penalty:
    return 0.0
  name, alpha, beta = penalty
  if name != "l2_sp":
    raise ValueError(f"unknown penalty {name!r}")
  total = 0.0
  for p, w0 in anchor_params.items():
    w = trainable[p]
    if p.split("/")[0] == head:
      total += 0.5 * beta * jnp.sum(jnp.square(w))
    else:
      total += 0.5 * alpha * jnp.sum(jnp.square(w - w0))
  return total

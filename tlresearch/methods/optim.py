"""Rules -> an `optax.partition` optimizer and its label tree.

Frozen parameters get `optax.set_to_zero()`: no optimizer state, no update, no weight decay
(decay lives inside each trainable partition's chain, so it cannot reach a frozen weight, the
trap `optax.masked` sets by passing unmasked updates through). Each distinct learning-rate
multiplier is one partition with its own scaled schedule.
"""
from __future__ import annotations

from flax import traverse_util
import jax.numpy as jnp
import optax

from tlresearch.core.errors import choices, UserError
from tlresearch.methods.strategies import FROZEN

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("warmup_cosine", "constant")


def schedule(peak_lr: float, total_steps: int, warmup_steps: int,
             kind: str = "warmup_cosine") -> optax.Schedule:
  """"warmup_cosine": linear warmup from 0 to `peak_lr`, then cosine decay to 0 at
  `total_steps`; "constant": `peak_lr` throughout (Keras's default, no warmup)."""
  if kind == "constant":
    return optax.constant_schedule(peak_lr)
  total_steps = max(int(total_steps), 1)
  warmup_steps = min(max(int(warmup_steps), 0), total_steps - 1)
  return optax.warmup_cosine_decay_schedule(0.0, peak_lr, warmup_steps, total_steps, 0.0)


def epoch_budget(epochs: int, steps_per_epoch: int, min_steps: int = 0) -> int:
  """`epochs`, raised so that training takes at least `min_steps` optimizer steps: a tiny
  k-shot training set (k=1: one batch per epoch) otherwise gets too few updates to fit even
  a head (BiT's hyper-rule also sizes the schedule in steps, Kolesnikov et al. 2020)."""
  return max(int(epochs), -(-int(min_steps) // max(int(steps_per_epoch), 1)))


def label_of(rule) -> str:
  return FROZEN if rule == FROZEN else f"lr_x{float(rule):g}"


def labels(rule_by_path: dict, params: dict) -> dict:
  """Label tree with exactly the structure of `params` (plain nested dicts)."""
  flat = traverse_util.flatten_dict(params, sep="/")
  return traverse_util.unflatten_dict({p: label_of(rule_by_path[p]) for p in flat}, sep="/")


def decay_mask(params: dict) -> dict:
  """Weight decay on conv/dense kernels only, not on biases or BatchNorm scales and shifts."""
  flat = traverse_util.flatten_dict(params, sep="/")
  return traverse_util.unflatten_dict({p: p.endswith("kernel") for p in flat}, sep="/")


def make(rule_by_path: dict, params: dict, *, optimizer: str, lr: optax.Schedule,
         weight_decay: float, momentum: float = 0.9) -> tuple[optax.GradientTransformation, dict]:
  """The partitioned optimizer for `params` under `rule_by_path`, and its label tree."""
  if optimizer not in OPTIMIZERS:
    raise UserError(f"unknown optim.optimizer '{optimizer}'; valid: {choices(OPTIMIZERS)}")
  mask = decay_mask(params)

  def one(mult: float) -> optax.GradientTransformation:
    scaled = lambda step: lr(step) * mult
    if optimizer == "sgd":
      return optax.chain(optax.add_decayed_weights(weight_decay, mask),
                         optax.sgd(scaled, momentum=momentum, nesterov=True))
    if optimizer == "adam":
      return optax.chain(optax.add_decayed_weights(weight_decay, mask), optax.adam(scaled))
    return optax.adamw(scaled, weight_decay=weight_decay, mask=mask)

  label_tree = labels(rule_by_path, params)
  transforms = {FROZEN: optax.set_to_zero()}
  for rule in set(rule_by_path.values()):
    if rule != FROZEN:
      transforms[label_of(rule)] = one(float(rule))
  return optax.partition(transforms, label_tree), label_tree


def count(params: dict, rule_by_path: dict | None = None) -> int:
  """Number of parameters (only the trainable ones when `rule_by_path` is given)."""
  flat = traverse_util.flatten_dict(params, sep="/")
  return int(sum(jnp.size(v) for p, v in flat.items()
                 if rule_by_path is None or rule_by_path[p] != FROZEN))

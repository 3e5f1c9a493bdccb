"""Backbone families. Every model exposes `.groups`: its ordered top-level group names."""
from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
from flax import traverse_util

from tlresearch.errors import UserError, choices
from tlresearch.models.merge import merge_pretrained
from tlresearch.models.resnet import ResNet, group_names

FAMILIES = {"resnet": ResNet}


def build(model_cfg, num_classes: int):
  """Module for `model_cfg` (a ConfigDict with `family` and the family's fields)."""
  family = model_cfg.family
  if family not in FAMILIES:
    raise UserError(f"unknown model.family '{family}'; valid: {choices(FAMILIES)}")
  kwargs = {k: v for k, v in model_cfg.items() if k != "family"}
  if family == "resnet":
    for key in ("width", "blocks_per_stage", "num_stages", "stem_strides"):
      if int(kwargs[key]) < 1:
        raise UserError(f"model.{key} must be >= 1, got {kwargs[key]}")
  return FAMILIES[family](num_classes=num_classes, **kwargs)


def groups_of(model_cfg) -> tuple[str, ...]:
  """Ordered group names of the model `model_cfg` describes, without building it."""
  if model_cfg.family == "resnet":
    return group_names(model_cfg.num_stages)
  raise UserError(f"unknown model.family '{model_cfg.family}'; valid: {choices(FAMILIES)}")


def param_paths(model_cfg) -> tuple[str, ...]:
  """Every `/`-joined parameter path of the model (shapes only, nothing is computed), so
  strategies can be checked against the real parameter names before any training."""
  return _param_paths(json.dumps(model_cfg.to_dict(), sort_keys=True))


@functools.lru_cache(maxsize=None)
def _param_paths(model_json: str) -> tuple[str, ...]:
  import ml_collections
  model = build(ml_collections.ConfigDict(json.loads(model_json)), 2)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  return tuple(traverse_util.flatten_dict(shapes["params"], sep="/"))


__all__ = ["FAMILIES", "ResNet", "build", "groups_of", "merge_pretrained", "param_paths"]

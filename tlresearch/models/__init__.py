"""Backbone families. Every model exposes `.groups`: its ordered top-level group names."""
from __future__ import annotations

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


__all__ = ["FAMILIES", "ResNet", "build", "groups_of", "merge_pretrained"]

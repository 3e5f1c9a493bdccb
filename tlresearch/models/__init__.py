"""Backbone families. Every model exposes `.groups`: its ordered top-level group names.

`model.family` picks the family; the other keys of the model config are the family's
fields, plus `pretrained` (where the backbone's weights come from, see `pretrained_key`) and
`head` (the new classifier head, `heads.HeadSpec`). A key that is another family's field,
at that family's default value, is ignored, so one config can switch `model.family`.
"""
from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
from flax import traverse_util

from tlresearch.core.errors import choices, UserError
from tlresearch.models import (mobilenet_v2 as mobilenet_v2_lib, resnet50 as resnet50_lib,
                               vgg as vgg_lib)
from tlresearch.models.heads import DEFAULT_HEAD, HeadSpec
from tlresearch.models.merge import merge_pretrained
from tlresearch.models.mobilenet_v2 import MobileNetV2
from tlresearch.models.resnet import ResNet, group_names
from tlresearch.models.resnet50 import ResNet50
from tlresearch.models.vgg import VGG16

FAMILIES = {"resnet": ResNet, "vgg16": VGG16, "resnet50": ResNet50, "mobilenet_v2": MobileNetV2}
# Families whose weights come from Keras applications (see models/keras_import.py).
KERAS_FAMILIES = {"vgg16": vgg_lib, "resnet50": resnet50_lib, "mobilenet_v2": mobilenet_v2_lib}
TRAINABLE_TOPS = ("keras", "linear")  # "none" has no head for a strategy to train
MIN_INPUT_SIZE = 32  # Keras's minimum for its applications (five stride-2 reductions)
# Model-config keys added after results existed, with their defaults: part of an identity
# only away from them (`configs.pick`), so every earlier cell and backbone keeps its own.
IDENTITY_DEFAULTS = {"head": DEFAULT_HEAD}


def _fields(family) -> dict:
  return {f.name: f.default for f in dataclasses.fields(family)
          if f.name not in ("parent", "name")}


def _other_defaults(family: str) -> dict:
  """key -> the default values it has in the families other than `family`."""
  out = {}
  for name, cls in FAMILIES.items():
    if name != family:
      for key, default in _fields(cls).items():
        out.setdefault(key, []).append(default)
  return out


def _kwargs(model_cfg) -> dict:
  return {k: v for k, v in model_cfg.items() if k not in ("family", "pretrained", "head")}


def head_spec(model_cfg) -> HeadSpec:
  """The new head `model.head` asks for (the linear head when the key is absent)."""
  return HeadSpec.from_config(model_cfg.head if "head" in model_cfg else {})


def build(model_cfg, num_classes: int):
  """Module for `model_cfg` (a ConfigDict with `family` and the family's fields)."""
  family = model_cfg.family
  if family not in FAMILIES:
    raise UserError(f"unknown model.family '{family}'; valid: {choices(FAMILIES)}")
  kwargs = _kwargs(model_cfg)
  fields = set(_fields(FAMILIES[family]))
  if "input_size" not in fields:
    # Any size runs through the small ResNet; there the key only tells the data pipeline.
    size = kwargs.pop("input_size", None)
    if size is not None and int(size) < 1:
      raise UserError(f"model.input_size must be >= 1, got {size}")
  others = _other_defaults(family)
  for key in set(kwargs) - fields:
    if kwargs[key] in others.get(key, ()):
      del kwargs[key]
  fields -= {"head_spec"}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise UserError(f"model.{unknown[0]} is not a field of model.family '{family}'; valid: "
                    f"{choices(fields - {'num_classes'})}, pretrained, head")
  head = head_spec(model_cfg)
  # The family's own defaults stand for the keys a config leaves out.
  value = {**_fields(FAMILIES[family]), **kwargs}
  if family in KERAS_FAMILIES and value["top"] != "linear" and head != HeadSpec():
    raise UserError(f"model.head applies to model.top='linear' only (the new head), got "
                    f"top='{value['top']}'")
  kwargs["head_spec"] = head
  if family == "resnet":
    for key in ("width", "blocks_per_stage", "num_stages", "stem_strides"):
      if int(value[key]) < 1:
        raise UserError(f"model.{key} must be >= 1, got {value[key]}")
  else:
    top = value["top"]
    if top not in TRAINABLE_TOPS:
      raise UserError(f"model.top must be one of {', '.join(TRAINABLE_TOPS)} for training, "
                      f"got '{top}'")
    if int(value["input_size"]) < MIN_INPUT_SIZE:
      raise UserError(f"model.input_size must be >= {MIN_INPUT_SIZE} for {family}, got "
                      f"{value['input_size']}")
    if "width" in value and int(value["width"]) < 1:
      raise UserError(f"model.width must be >= 1, got {value['width']}")
    if "alpha" in value and float(value["alpha"]) <= 0:
      raise UserError(f"model.alpha must be > 0, got {value['alpha']}")
  return FAMILIES[family](num_classes=num_classes, **kwargs)


def groups_of(model_cfg) -> tuple[str, ...]:
  """Ordered group names of the model `model_cfg` describes, without building it."""
  if model_cfg.family == "resnet":
    return group_names({**_fields(ResNet), **_kwargs(model_cfg)}["num_stages"])
  if model_cfg.family in KERAS_FAMILIES:
    return KERAS_FAMILIES[model_cfg.family].group_names(model_cfg.top)
  raise UserError(f"unknown model.family '{model_cfg.family}'; valid: {choices(FAMILIES)}")


def input_size(model_cfg) -> int | None:
  """The image size the data pipeline resizes to; None keeps the dataset's own size."""
  size = model_cfg.input_size
  return int(size) if size else None


def pretrained_key(model_cfg) -> str | None:
  """A key naming the external weights `model_cfg` asks for, or None for the project's own
  source pretraining (`model.pretrained` empty or absent; the small ResNet only).

  `model.pretrained` is 'keras:imagenet' or 'keras:PATH' (see models/keras_import.py)."""
  source = model_cfg.pretrained
  family = model_cfg.family
  if family in KERAS_FAMILIES:
    if not source.startswith("keras:") or source == "keras:":
      raise UserError(f"model.pretrained must be keras:imagenet or keras:PATH for {family}, "
                      f"got '{source}'")
    if family != "mobilenet_v2" and int(model_cfg.width) != 64:
      raise UserError(f"model.width must be 64 to load Keras weights into {family}, got "
                      f"{model_cfg.width}")
    return (f"{family}/top={model_cfg.top}/size={input_size(model_cfg)}"
            f"/alpha={model_cfg.alpha}/{source}")
  if source:
    raise UserError(f"model.pretrained='{source}' is not available for model.family "
                    f"'{family}'; valid: '' (source pretraining); keras:... needs family "
                    f"{' or '.join(KERAS_FAMILIES)}")
  return None


def check_pretrained(model_cfg) -> None:
  """UserError now (not after other cells trained) if the external weights can't be had."""
  if pretrained_key(model_cfg) is not None:
    from tlresearch.models import keras_import
    keras_import.check_source(model_cfg.family, model_cfg.top == "keras",
                              model_cfg.pretrained, input_size(model_cfg) or 224,
                              float(model_cfg.alpha))


def load_pretrained(model_cfg) -> dict:
  """The external weights `model_cfg.pretrained` names, as variables of its family."""
  from tlresearch.models import keras_import
  return keras_import.load_source(model_cfg.family, model_cfg.top == "keras",
                                  model_cfg.pretrained, input_size(model_cfg) or 224,
                                  float(model_cfg.alpha))


def from_keras(keras_model):
  """`(module, variables)` with `module.apply(variables, x) == keras_model(x)`; see
  `tlresearch.models.keras_import.from_keras`."""
  from tlresearch.models import keras_import
  return keras_import.from_keras(keras_model)


def param_paths(model_cfg) -> tuple[str, ...]:
  """Every `/`-joined parameter path of the model (shapes only, nothing is computed), so
  strategies can be checked against the real parameter names before any training."""
  return _param_paths(json.dumps(model_cfg.to_dict(), sort_keys=True))


@functools.lru_cache(maxsize=None)
def _param_paths(model_json: str) -> tuple[str, ...]:
  import ml_collections
  model_cfg = ml_collections.ConfigDict(json.loads(model_json))
  model = build(model_cfg, 2)
  s = input_size(model_cfg) or 32
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, s, s, 3)))
  return tuple(traverse_util.flatten_dict(shapes["params"], sep="/"))


# The families' classes, FAMILIES and from_keras stay importable for the tools and tests.
__all__ = ["build", "check_pretrained", "groups_of", "head_spec", "load_pretrained",
           "merge_pretrained", "param_paths", "pretrained_key"]

"""ResNet50 (He et al. 2016, v1) in Flax Linen, layer for layer as Keras applications' ResNet50.

Groups, in input-to-output order: `stem` (7x7/2 convolution, BatchNorm, ReLU, 3x3/2 max
pooling: Keras's conv1 and pool1), `stage1`..`stage4` (Keras's conv2..conv5: 3, 4, 6, 3
bottleneck blocks), then `head`:

- `top="linear"` (the transfer head): global average pooling, dropout, `Dense(num_classes)`;
- `top="keras"`: Keras's own top (avg_pool, `predictions`), same shape as "linear";
- `top="none"`: no head; the output is stage4's feature map, or pooled when `pooling` is
  "avg" / "max" (Keras's `include_top=False`). Only for feature extraction and weight import.

As in Keras, the stride sits on the first 1x1 convolution of a stage's first block, every
convolution has a bias, and BatchNorm uses epsilon 1.001e-5 and momentum 0.99. `width`
scales every convolution (64 is ResNet50; only 64 loads Keras's weights). Input:
preprocessed float NHWC as `keras.applications.resnet50.preprocess_input` gives it (caffe
style: BGR, ImageNet mean subtracted).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from tlresearch.models.heads import Head, pool

STAGE_BLOCKS = (3, 4, 6, 3)
TOPS = ("linear", "keras", "none")


def _bn(use_running_average: bool, name: str):
  return nn.BatchNorm(use_running_average=use_running_average, momentum=0.99, epsilon=1.001e-5,
                      name=name)


class Bottleneck(nn.Module):
  """1x1 (strided) -> 3x3 -> 1x1 (x4 channels), projection shortcut on a stage's first block."""
  filters: int
  strides: int = 1
  project: bool = False

  @nn.compact
  def __call__(self, x, use_running_average: bool):
    s = (self.strides, self.strides)
    shortcut = x
    if self.project:
      shortcut = nn.Conv(4 * self.filters, (1, 1), s, padding="VALID", name="proj_conv")(x)
      shortcut = _bn(use_running_average, "proj_bn")(shortcut)
    y = nn.Conv(self.filters, (1, 1), s, padding="VALID", name="conv1")(x)
    y = nn.relu(_bn(use_running_average, "bn1")(y))
    y = nn.Conv(self.filters, (3, 3), padding="SAME", name="conv2")(y)
    y = nn.relu(_bn(use_running_average, "bn2")(y))
    y = nn.Conv(4 * self.filters, (1, 1), padding="VALID", name="conv3")(y)
    y = _bn(use_running_average, "bn3")(y)
    return nn.relu(shortcut + y)


class Stem(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x, use_running_average: bool):
    x = nn.Conv(self.features, (7, 7), (2, 2), padding=((3, 3), (3, 3)), name="conv")(x)
    x = nn.relu(_bn(use_running_average, "bn")(x))
    # Keras pads with zeros, then pools; after the ReLU that equals padding with -inf.
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class Stage(nn.Module):
  filters: int
  num_blocks: int
  strides: int

  @nn.compact
  def __call__(self, x, use_running_average: bool):
    for i in range(self.num_blocks):
      x = Bottleneck(self.filters, self.strides if i == 0 else 1, project=i == 0,
                     name=f"block{i + 1}")(x, use_running_average)
    return x


class ResNet50(nn.Module):
  num_classes: int
  top: str = "linear"
  width: int = 64
  pooling: str | None = None  # top="none" only: None (feature map), "avg" or "max"
  dropout_rate: float = 0.0   # top="linear" only: dropout on the pooled features
  classifier_activation: str | None = None  # None: logits (training); "softmax" as Keras
  input_size: int = 224       # the size the data pipeline resizes images to

  preprocessing: ClassVar[str] = "caffe"

  @property
  def groups(self) -> tuple[str, ...]:
    return group_names(self.top)

  @nn.compact
  def __call__(self, x, train: bool = False, frozen_bn: Sequence[str] = (),
               start: str = "stem", stop: str | None = None):
    """Runs groups `start`..`stop` (inclusive, default: the last) on `x`, the input of `start`."""
    groups = self.groups
    first, last = groups.index(start), groups.index(stop or groups[-1])
    bn_static = lambda g: (not train) or g in frozen_bn
    for g in groups[first:last + 1]:
      if g == "stem":
        x = Stem(self.width, name="stem")(x, bn_static(g))
      elif g == "head":
        keras = self.top == "keras"
        x = Head(self.num_classes, 0.0 if keras else self.dropout_rate, "avg",
                 "predictions" if keras else "dense", self.classifier_activation,
                 name="head")(x, train)
      else:
        i = int(g[len("stage"):]) - 1
        x = Stage(self.width * 2 ** i, STAGE_BLOCKS[i], 1 if i == 0 else 2, name=g)(
            x, bn_static(g))
    if self.top == "none" and groups[last] == groups[-1]:
      x = pool(x, self.pooling)
    return x


def group_names(top: str) -> tuple[str, ...]:
  stages = ("stem",) + tuple(f"stage{i + 1}" for i in range(len(STAGE_BLOCKS)))
  return stages if top == "none" else stages + ("head",)

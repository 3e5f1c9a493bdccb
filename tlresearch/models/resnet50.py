"""ResNet50 (He et al. 2016, v1) in Flax Linen, layer for layer as Keras applications' ResNet50.

Groups, in input-to-output order: `stem` (7x7/2 convolution, BatchNorm, ReLU, 3x3/2 max
pooling: Keras's conv1 and pool1), `stage1`..`stage4` (Keras's conv2..conv5: 3, 4, 6, 3
bottleneck blocks), then `head` unless `top="none"` (see `groups.KerasFamily`).

As in Keras, the stride sits on the first 1x1 convolution of a stage's first block, every
convolution has a bias, and BatchNorm uses epsilon 1.001e-5 and momentum 0.99. `width`
scales every convolution (64 is ResNet50; only 64 loads Keras's weights). Input:
preprocessed float NHWC as `keras.applications.resnet50.preprocess_input` gives it (caffe
style: BGR, ImageNet mean subtracted).
"""
from __future__ import annotations

from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from tlresearch.models import layers
from tlresearch.models.groups import KerasFamily, numbered

STAGE_BLOCKS = (3, 4, 6, 3)


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
      shortcut = layers.Conv(4 * self.filters, (1, 1), s, padding="VALID", name="proj_conv")(x)
      shortcut = _bn(use_running_average, "proj_bn")(shortcut)
    y = layers.Conv(self.filters, (1, 1), s, padding="VALID", name="conv1")(x)
    y = nn.relu(_bn(use_running_average, "bn1")(y))
    y = layers.Conv(self.filters, (3, 3), padding="SAME", name="conv2")(y)
    y = nn.relu(_bn(use_running_average, "bn2")(y))
    y = layers.Conv(4 * self.filters, (1, 1), padding="VALID", name="conv3")(y)
    y = _bn(use_running_average, "bn3")(y)
    return nn.relu(shortcut + y)


class Stem(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x, use_running_average: bool):
    x = layers.Conv(self.features, (7, 7), (2, 2), padding=((3, 3), (3, 3)), name="conv")(x)
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


class ResNet50(KerasFamily):
  width: int = 64

  body: ClassVar[tuple[str, ...]] = ("stem",) + numbered("stage", len(STAGE_BLOCKS))
  preprocessing: ClassVar[str] = "caffe"

  def group(self, g: str, x, use_running_average: bool):
    if g == "stem":
      return Stem(self.width, name="stem")(x, use_running_average)
    i = int(g[len("stage"):]) - 1
    return Stage(self.width * 2 ** i, STAGE_BLOCKS[i], 1 if i == 0 else 2, name=g)(
        x, use_running_average)


group_names = ResNet50.group_names

"""MobileNetV2 (Sandler et al. 2018) in Flax Linen, layer for layer as Keras applications'
MobileNetV2.

Keras numbers its 17 inverted-residual blocks 0..16; the groups follow the network's
resolution stages (a stride-2 block starts a stage):

- `stem`: Conv1 (3x3/2), BatchNorm, ReLU6, and block 0;
- `stage1`: blocks 1-2 (24 channels at alpha 1); `stage2`: blocks 3-5 (32);
  `stage3`: blocks 6-12 (64, 96); `stage4`: blocks 13-16 (160, 320) and Conv_1 (1280);
- `head` unless `top="none"` (see `groups.KerasFamily`).

`alpha` is Keras's width multiplier. BatchNorm: epsilon 1e-3, momentum 0.999, as Keras. A
stride-2 depthwise convolution pads as Keras's `correct_pad` (one pixel more at the bottom
and right for even sizes) and the stem pads as TensorFlow's "same". Input: preprocessed as
`keras.applications.mobilenet_v2.preprocess_input` does, i.e. scaled to [-1, 1].
"""
from __future__ import annotations

from typing import ClassVar

import flax.linen as nn

from tlresearch.models import layers
from tlresearch.models.groups import KerasFamily

# (expansion, filters, stride) of Keras's blocks 0..16.
BLOCKS = ((1, 16, 1),
          (6, 24, 2), (6, 24, 1),
          (6, 32, 2), (6, 32, 1), (6, 32, 1),
          (6, 64, 2), (6, 64, 1), (6, 64, 1), (6, 64, 1), (6, 96, 1), (6, 96, 1), (6, 96, 1),
          (6, 160, 2), (6, 160, 1), (6, 160, 1), (6, 320, 1))
# Blocks of each group (the stem also holds Conv1; stage4 also holds Conv_1).
GROUP_BLOCKS = {"stem": (0,), "stage1": (1, 2), "stage2": (3, 4, 5),
                "stage3": tuple(range(6, 13)), "stage4": (13, 14, 15, 16)}


def make_divisible(v: float, divisor: int = 8) -> int:
  """Keras's _make_divisible: round to a multiple of 8, never more than 10% down."""
  new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
  return new_v + divisor if new_v < 0.9 * v else new_v


def _bn(use_running_average: bool, name: str):
  return nn.BatchNorm(use_running_average=use_running_average, momentum=0.999, epsilon=1e-3,
                      name=name)


class InvertedResidual(nn.Module):
  expansion: int
  filters: int
  strides: int
  expand: bool  # block 0 has no expansion convolution

  @nn.compact
  def __call__(self, x, use_running_average: bool):
    inputs, channels = x, x.shape[-1]
    if self.expand:
      x = layers.Conv(self.expansion * channels, (1, 1), use_bias=False, name="expand")(x)
      x = nn.relu6(_bn(use_running_average, "expand_bn")(x))
    if self.strides == 2:
      h, w = x.shape[1:3]
      padding = ((h % 2, 1), (w % 2, 1))  # Keras's correct_pad: odd sizes pad both sides
    else:
      padding = "SAME"
    x = layers.Conv(x.shape[-1], (3, 3), (self.strides, self.strides), padding=padding,
                feature_group_count=x.shape[-1], use_bias=False, name="depthwise")(x)
    x = nn.relu6(_bn(use_running_average, "depthwise_bn")(x))
    x = layers.Conv(self.filters, (1, 1), use_bias=False, name="project")(x)
    x = _bn(use_running_average, "project_bn")(x)
    if channels == self.filters and self.strides == 1:
      x = inputs + x
    return x


class MobileNetV2(KerasFamily):
  alpha: float = 1.0

  body: ClassVar[tuple[str, ...]] = tuple(GROUP_BLOCKS)
  preprocessing: ClassVar[str] = "tf"

  def group(self, g: str, x, use_running_average: bool):
    return Stage(self.alpha, g, name=g)(x, use_running_average)


class Stage(nn.Module):
  alpha: float
  group: str

  @nn.compact
  def __call__(self, x, use_running_average: bool):
    if self.group == "stem":
      x = layers.Conv(make_divisible(32 * self.alpha), (3, 3), (2, 2), padding="SAME",
                  use_bias=False, name="conv")(x)
      x = nn.relu6(_bn(use_running_average, "bn")(x))
    for b in GROUP_BLOCKS[self.group]:
      expansion, filters, strides = BLOCKS[b]
      x = InvertedResidual(expansion, make_divisible(int(filters * self.alpha)), strides,
                           expand=b > 0, name=f"block{b}")(x, use_running_average)
    if self.group == "stage4":
      features = make_divisible(1280 * self.alpha) if self.alpha > 1.0 else 1280
      x = layers.Conv(features, (1, 1), use_bias=False, name="conv")(x)
      x = nn.relu6(_bn(use_running_average, "bn")(x))
    return x


group_names = MobileNetV2.group_names

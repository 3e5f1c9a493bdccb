"""VGG16 (Simonyan & Zisserman 2015) in Flax Linen, layer for layer as Keras applications' VGG16.

Groups, in input-to-output order: `block1`..`block5` (each: its 3x3 convolutions with ReLU,
then 2x2 max pooling, exactly Keras's blocks), then the top (see `groups.KerasFamily`).
`top="keras"` has two groups: `fc` = flatten, fc1, fc2 (4096 each, ReLU; loaded from the
pretrained weights), then `head` = the `predictions` layer (new for a new task). Flatten
fixes the input size (224 for the ImageNet weights); `top="linear"` works at any size.

`width` scales every convolution (64 is VGG16); only width 64 can load Keras's weights,
smaller ones are for tests. Input: preprocessed float NHWC, as `keras.applications.vgg16
.preprocess_input` gives it (caffe style: BGR, ImageNet mean subtracted, no scaling).
"""
from __future__ import annotations

from typing import ClassVar

import flax.linen as nn

from tlresearch.models import layers
from tlresearch.models.groups import KerasFamily, numbered

# (convolutions, width multiple of `width`) per block.
BLOCKS = ((2, 1), (2, 2), (3, 4), (3, 8), (3, 8))


class Block(nn.Module):
  num_convs: int
  features: int

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_convs):
      x = nn.relu(layers.Conv(self.features, (3, 3), padding="SAME", name=f"conv{i + 1}")(x))
    return nn.max_pool(x, (2, 2), (2, 2))


class Fc(nn.Module):
  """Keras's flatten, fc1, fc2."""
  features: int = 4096

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))  # NHWC row-major, as Keras's Flatten (channels_last)
    x = nn.relu(nn.Dense(self.features, name="fc1")(x))
    return nn.relu(nn.Dense(self.features, name="fc2")(x))


class VGG16(KerasFamily):
  """`frozen_bn` is accepted for the common model interface; VGG16 has no BatchNorm."""
  width: int = 64
  fc_features: int = 4096     # fc1/fc2 width of top="keras"

  body: ClassVar[tuple[str, ...]] = numbered("block", len(BLOCKS))
  keras_top: ClassVar[tuple[str, ...]] = ("fc", "head")
  keras_pooling: ClassVar[str | None] = None  # fc has flattened already
  preprocessing: ClassVar[str] = "caffe"

  def group(self, g: str, x, use_running_average: bool):
    if g == "fc":
      return Fc(self.fc_features, name="fc")(x)
    n, mult = BLOCKS[int(g[len("block"):]) - 1]
    return Block(n, self.width * mult, name=g)(x)


group_names = VGG16.group_names

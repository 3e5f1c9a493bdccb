"""VGG16 (Simonyan & Zisserman 2015) in Flax Linen, layer for layer as Keras applications' VGG16.

Groups, in input-to-output order: `block1`..`block5` (each: its 3x3 convolutions with ReLU,
then 2x2 max pooling, exactly Keras's blocks), then the top:

- `top="linear"` (the transfer head): `head` = global average pooling, dropout, a new
  `Dense(num_classes)`. Works at any input size.
- `top="keras"`: Keras's own classifier: `fc` = flatten, fc1, fc2 (4096 each, ReLU; loaded
  from the pretrained weights), `head` = the `predictions` layer (new for a new task).
  Flatten fixes the input size (224 for the ImageNet weights).
- `top="none"`: no top; the output is block5's feature map, or pooled when `pooling` is
  "avg" / "max" (Keras's `include_top=False`). Only for feature extraction and weight
  import: strategies need a head.

`width` scales every convolution (64 is VGG16); only width 64 can load Keras's weights,
smaller ones are for tests. Input: preprocessed float NHWC, as `keras.applications.vgg16
.preprocess_input` gives it (caffe style: BGR, ImageNet mean subtracted, no scaling).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import flax.linen as nn

from tlresearch.models.heads import Head, pool

# (convolutions, width multiple of `width`) per block.
BLOCKS = ((2, 1), (2, 2), (3, 4), (3, 8), (3, 8))
TOPS = ("linear", "keras", "none")


class Block(nn.Module):
  num_convs: int
  features: int

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_convs):
      x = nn.relu(nn.Conv(self.features, (3, 3), padding="SAME", name=f"conv{i + 1}")(x))
    return nn.max_pool(x, (2, 2), (2, 2))


class Fc(nn.Module):
  """Keras's flatten, fc1, fc2."""
  features: int = 4096

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))  # NHWC row-major, as Keras's Flatten (channels_last)
    x = nn.relu(nn.Dense(self.features, name="fc1")(x))
    return nn.relu(nn.Dense(self.features, name="fc2")(x))


class VGG16(nn.Module):
  num_classes: int
  top: str = "linear"
  width: int = 64
  fc_features: int = 4096     # fc1/fc2 width of top="keras"
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
               start: str = "block1", stop: str | None = None):
    """Runs groups `start`..`stop` (inclusive, default: the last) on `x`, the input of `start`.

    `frozen_bn` is accepted for the common model interface; VGG16 has no BatchNorm."""
    groups = self.groups
    first, last = groups.index(start), groups.index(stop or groups[-1])
    for g in groups[first:last + 1]:
      if g.startswith("block"):
        n, mult = BLOCKS[int(g[len("block"):]) - 1]
        x = Block(n, self.width * mult, name=g)(x)
      elif g == "fc":
        x = Fc(self.fc_features, name="fc")(x)
      elif self.top == "keras":  # fc has flattened already
        x = Head(self.num_classes, 0.0, None, "predictions", self.classifier_activation,
                 name="head")(x, train)
      else:
        x = Head(self.num_classes, self.dropout_rate, "avg", "dense", self.classifier_activation,
                 name="head")(x, train)
    if self.top == "none" and groups[last] == groups[-1]:
      x = pool(x, self.pooling)
    return x


def group_names(top: str) -> tuple[str, ...]:
  blocks = tuple(f"block{i + 1}" for i in range(len(BLOCKS)))
  return {"linear": blocks + ("head",), "keras": blocks + ("fc", "head"), "none": blocks}[top]

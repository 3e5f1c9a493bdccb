"""The layer-group interface every backbone family shares; a family adds only its layers.

A family's top-level submodules are its *layer groups*, in input-to-output order. Strategies
speak only in these names, so "freeze everything below stage3" is one rule for any family.
The model can run any contiguous slice of its groups (`start`/`stop`): a frozen prefix is
then evaluated once and its output cached, and training runs only the rest (see
`tlresearch.training.train`).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import flax.linen as nn

from tlresearch.models.heads import Head, HeadSpec, pool


def numbered(prefix: str, n: int) -> tuple[str, ...]:
  """`prefix1`..`prefix{n}`: the groups of a family's repeated stages."""
  return tuple(f"{prefix}{i + 1}" for i in range(n))


class Grouped(nn.Module):
  """A family gives `groups` (its names, ending in `head` unless it has no top), `group`
  (builds and runs any group but `head`), `head`, and optionally `output`."""

  @nn.compact
  def __call__(self, x, train: bool = False, frozen_bn: Sequence[str] = (),
               start: str | None = None, stop: str | None = None):
    """Runs groups `start`..`stop` (inclusive, default: all) on `x`, the input of `start`."""
    groups = self.groups
    first, last = groups.index(start or groups[0]), groups.index(stop or groups[-1])
    for g in groups[first:last + 1]:
      if g == "head":
        x = self.head()(x, train)
      else:
        # BatchNorm statistics of a frozen group must neither be used in batch mode nor
        # updated, even while the groups above it train.
        x = self.group(g, x, (not train) or g in frozen_bn)
    return self.output(x) if last == len(groups) - 1 else x

  def output(self, x):
    """The network's output from its last group's (only when the slice ends there)."""
    return x


class KerasFamily(Grouped):
  """A Keras application's network with one of three tops:

  - `top="linear"` (the transfer head): a new head as `head_spec` (`model.head`) describes;
    by default global average pooling, dropout, a new `Dense(num_classes)` named `dense`;
  - `top="keras"`: Keras's own top, whose classifier is named `predictions` as in Keras
    (groups `keras_top`; only `head` is new for a new task);
  - `top="none"`: no head; the output is the last group's feature map, or pooled when
    `pooling` is "avg" / "max" (Keras's `include_top=False`). Only for feature extraction and
    weight import: strategies need a head.
  """
  num_classes: int
  top: str = "linear"
  pooling: str | None = None  # top="none" only: None (feature map), "avg" or "max"
  dropout_rate: float = 0.0   # top="linear" only: dropout on the classifier's input
  head_spec: HeadSpec = HeadSpec()  # top="linear" only: the new head (`model.head`)
  classifier_activation: str | None = None  # None: logits (training); "softmax" as Keras
  input_size: int = 224       # the size the data pipeline resizes images to

  body: ClassVar[tuple[str, ...]]  # the groups below the top
  keras_top: ClassVar[tuple[str, ...]] = ("head",)
  keras_pooling: ClassVar[str | None] = "avg"  # of Keras's own head

  @classmethod
  def group_names(cls, top: str) -> tuple[str, ...]:
    if top == "none":
      return cls.body
    return cls.body + (cls.keras_top if top == "keras" else ("head",))

  @property
  def groups(self) -> tuple[str, ...]:
    return self.group_names(self.top)

  def head(self):
    if self.top == "keras":
      return Head(self.num_classes, 0.0, self.keras_pooling, "predictions",
                  self.classifier_activation, name="head")
    return Head.of(self.head_spec, self.num_classes, self.dropout_rate,
                   self.classifier_activation)

  def output(self, x):
    return pool(x, self.pooling) if self.top == "none" else x

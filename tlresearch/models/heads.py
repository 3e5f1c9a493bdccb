"""Classifier heads, shared by every backbone family.

A head is one layer group (`head`): pooling of the last feature map, optional hidden Dense
layers, dropout, and the classifier. `HeadSpec` is its config (`model.head`):

- the linear head (the default): global average pooling, dropout, `Dense(num_classes)`;
- an MLP head: `pooling` ("avg", "max" or "flatten", Keras's `Flatten`), then for each width
  in `hidden` a Dense layer, its activation and dropout, then the classifier. The Keras
  transfer-learning recipe's top `Flatten -> Dense(256, relu) -> Dropout(0.5) -> Dense` is
  `HeadSpec("flatten", (256,), "relu")` with `model.dropout_rate=0.5`.

Dropout (`model.dropout_rate`) is always on the classifier's input, and also after every
hidden layer before the last.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from tlresearch.core import schema
from tlresearch.core.errors import choices, UserError

POOLINGS = (None, "avg", "max")     # top="none" (Keras's `pooling` argument)
HEAD_POOLINGS = ("avg", "max", "flatten")
ACTIVATIONS = {"relu": nn.relu, "gelu": nn.gelu, "tanh": jnp.tanh, "sigmoid": nn.sigmoid,
               "swish": nn.swish}


def pool(x, pooling: str | None):
  """Keras's `pooling` argument: None keeps the feature map, "avg" / "max" pool it globally,
  "flatten" flattens it (row-major NHWC, as Keras's `Flatten` with channels_last)."""
  if pooling == "avg":
    return jnp.mean(x, axis=(1, 2))
  if pooling == "max":
    return jnp.max(x, axis=(1, 2))
  if pooling == "flatten":
    return x.reshape((x.shape[0], -1))
  return x


def activation(x, name: str | None):
  if name is None or name == "linear":
    return x
  if name == "softmax":
    return nn.softmax(x)
  if name == "sigmoid":
    return nn.sigmoid(x)
  raise ValueError(f"unsupported classifier_activation {name!r}; valid: None, linear, softmax, "
                   "sigmoid")


_DEFAULT = schema.head()  # the schema's model.head


@dataclasses.dataclass(frozen=True)
class HeadSpec:
  """What `model.head` asks for (hashable, so a module holding it can be a static argument)."""
  pooling: str = _DEFAULT.pooling
  hidden: tuple[int, ...] = tuple(_DEFAULT.hidden)
  activation: str = _DEFAULT.activation

  @property
  def linear(self) -> bool:
    """A pooling and one Dense: a convex problem on cached features (the converged probe)."""
    return not self.hidden

  @classmethod
  def from_config(cls, cfg) -> "HeadSpec":
    """From a `model.head` ConfigDict or dict; UserError for any invalid value."""
    cfg = {**HeadSpec().to_config(), **dict(cfg)}
    unknown = sorted(set(cfg) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise UserError(f"model.head.{unknown[0]} is not a head field; valid: pooling, hidden, "
                      "activation")
    pooling = cfg["pooling"]
    if pooling not in HEAD_POOLINGS:
      raise UserError(f"model.head.pooling must be one of {choices(HEAD_POOLINGS)}, got "
                      f"'{pooling}'")
    hidden = cfg["hidden"]
    if isinstance(hidden, int) or not all(isinstance(h, int) and not isinstance(h, bool)
                                          and h >= 1 for h in hidden):
      raise UserError(f"model.head.hidden must be a list of layer widths >= 1, e.g. [256], got "
                      f"{hidden!r}")
    act = cfg["activation"]
    if act not in ACTIVATIONS:
      raise UserError(f"model.head.activation must be one of {choices(ACTIVATIONS)}, got "
                      f"'{act}'")
    return cls(pooling, tuple(int(h) for h in hidden), act)

  def to_config(self) -> dict:
    return {"pooling": self.pooling, "hidden": list(self.hidden), "activation": self.activation}


DEFAULT_HEAD = HeadSpec().to_config()


class Head(nn.Module):
  """Pooling, the spec's hidden layers, dropout, the classifier, optional activation (None:
  logits)."""
  num_classes: int
  dropout_rate: float = 0.0
  pooling: str | None = "avg"
  dense_name: str = "dense"   # "predictions" when it is Keras's own layer
  classifier_activation: str | None = None
  hidden: tuple[int, ...] = ()
  hidden_activation: str = "relu"

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = pool(x, self.pooling)
    for i, width in enumerate(self.hidden):
      x = ACTIVATIONS[self.hidden_activation](nn.Dense(width, name=f"hidden{i + 1}")(x))
      if i < len(self.hidden) - 1:
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, name=self.dense_name)(x)
    return activation(x, self.classifier_activation)

  @classmethod
  def of(cls, spec: HeadSpec, num_classes: int, dropout_rate: float,
         classifier_activation: str | None = None) -> "Head":
    """The new transfer head `spec` describes, as a family's `head` group."""
    return cls(num_classes, dropout_rate, spec.pooling, "dense", classifier_activation,
               spec.hidden, spec.activation, name="head")

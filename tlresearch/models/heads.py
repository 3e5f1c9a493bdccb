"""Classifier tops shared by the ImageNet backbones."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

POOLINGS = (None, "avg", "max")


def pool(x, pooling: str | None):
  """Keras's `pooling` argument: None keeps the feature map, "avg" / "max" pool it globally."""
  if pooling == "avg":
    return jnp.mean(x, axis=(1, 2))
  if pooling == "max":
    return jnp.max(x, axis=(1, 2))
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


class Head(nn.Module):
  """Optional global pooling, dropout, the classifier, optional activation (None: logits)."""
  num_classes: int
  dropout_rate: float = 0.0
  pooling: str | None = "avg"
  dense_name: str = "dense"   # "predictions" when it is Keras's own layer
  classifier_activation: str | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = pool(x, self.pooling)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, name=self.dense_name)(x)
    return activation(x, self.classifier_activation)

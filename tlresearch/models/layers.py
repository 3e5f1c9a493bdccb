"""Layers every family builds with: flax's own, with a kernel init that compiles fast.

`Conv` is `nn.Conv` with flax's default kernel init (lecun_normal) drawn as a 2-D
(fan_in, features) array and reshaped to the kernel's 4-D shape. Threefry numbers its draws
in row-major order, so the values are bitwise those of the 4-D draw (tested against flax's
initializer); XLA:CPU compiles a 4-D random draw several times slower than a 2-D one, which
made a model's init the slowest program to compile (docs/performance.md).
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax.numpy as jnp

_LECUN_NORMAL = nn.initializers.lecun_normal()


def lecun_normal(key, shape, dtype=jnp.float32):
  """flax's `lecun_normal()` (fan-in scaling: a 2-D shape with the same fan-in draws the same
  numbers), compiled as a 2-D draw."""
  if len(shape) <= 2:
    return _LECUN_NORMAL(key, shape, dtype)
  return _LECUN_NORMAL(key, (math.prod(shape[:-1]), shape[-1]), dtype).reshape(shape)


Conv = functools.partial(nn.Conv, kernel_init=lecun_normal)

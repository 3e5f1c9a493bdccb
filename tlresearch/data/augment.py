"""The classic image augmentations, on device, in JAX: rotation, width/height shift, shear,
zoom and horizontal flip (the Keras `ImageDataGenerator` list), as one random affine map per
image sampled with bilinear interpolation. Points outside the image are filled as Keras's
`fill_mode` says, i.e. as `scipy.ndimage` modes of those names, which Keras's
`apply_affine_transform` calls: "nearest" (the edge pixel), "reflect" (d c b a | a b c d),
"wrap" (a b c d | a b c d, with scipy's period of n - 1: the last and first pixels overlap)
or "constant" (black beyond the edges, no interpolation into them). JAX's own "wrap" and
"constant" interpolate across the edge (scipy's "grid-" modes), so those two are built from
"nearest" here (tested against scipy)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

FILL_MODES = ("nearest", "reflect", "wrap", "constant")


@dataclasses.dataclass(frozen=True)
class AugmentSpec:
  rotation: float = 0.0       # max degrees, uniform in [-r, r]
  width_shift: float = 0.0    # max fraction of the width
  height_shift: float = 0.0   # max fraction of the height
  shear: float = 0.0          # max shear angle in degrees
  zoom: float = 0.0           # scale uniform in [1 - z, 1 + z], x and y independently
  horizontal_flip: bool = False
  fill_mode: str = "nearest"  # FILL_MODES

  @classmethod
  def from_config(cls, cfg) -> "AugmentSpec | None":
    if not cfg.enabled:
      return None
    return cls(float(cfg.rotation), float(cfg.width_shift), float(cfg.height_shift),
               float(cfg.shear), float(cfg.zoom), bool(cfg.horizontal_flip),
               str(cfg.fill_mode))


def _one(key, image, spec: AugmentSpec):
  h, w, c = image.shape
  k = jax.random.split(key, 7)
  u = lambda key, m: jax.random.uniform(key, (), minval=-m, maxval=m)
  theta = jnp.deg2rad(u(k[0], spec.rotation))
  shear = jnp.deg2rad(u(k[1], spec.shear))
  zy, zx = 1.0 + u(k[2], spec.zoom), 1.0 + u(k[3], spec.zoom)
  ty, tx = u(k[4], spec.height_shift) * h, u(k[5], spec.width_shift) * w
  flip = jax.random.bernoulli(k[6]) & spec.horizontal_flip
  # Inverse map: for each output pixel, where to read in the input (rotation @ shear @ zoom).
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  rot = jnp.array([[cos, -sin], [sin, cos]])
  shr = jnp.array([[1.0, 0.0], [jnp.sin(shear), jnp.cos(shear)]])
  zoom = jnp.diag(jnp.array([zy, zx]))
  m = rot @ shr @ zoom
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                        indexing="ij")
  xx = jnp.where(flip, w - 1 - xx, xx)
  src = m @ jnp.stack([(yy - cy).ravel(), (xx - cx).ravel()])
  sy = (src[0] + cy + ty).reshape(h, w)
  sx = (src[1] + cx + tx).reshape(h, w)
  return jax.vmap(lambda ch: _sample(ch, sy, sx, spec.fill_mode), in_axes=2, out_axes=2)(image)


def _sample(channel, sy, sx, fill_mode: str):
  """Bilinear samples of one [H, W] channel at (sy, sx), filled as scipy's `fill_mode`."""
  h, w = channel.shape
  if fill_mode == "wrap":
    sy, sx = jnp.mod(sy, max(h - 1, 1)), jnp.mod(sx, max(w - 1, 1))
  mode = "nearest" if fill_mode in ("wrap", "constant") else fill_mode
  out = jax.scipy.ndimage.map_coordinates(channel, [sy, sx], order=1, mode=mode)
  if fill_mode == "constant":
    out = jnp.where((sy >= 0) & (sy <= h - 1) & (sx >= 0) & (sx <= w - 1), out, 0.0)
  return out


def augment(key, images, spec: AugmentSpec):
  """Independently augmented copies of `images` [B, H, W, C] (float)."""
  keys = jax.random.split(key, images.shape[0])
  return jax.vmap(lambda k, x: _one(k, x, spec))(keys, images)

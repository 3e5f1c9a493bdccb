"""One resize for every dataset: Pillow's bilinear filter, antialiased when shrinking (its
support widens with the scale factor), rounded to uint8. Built-in, `tfds:` and `folder:`
images of the same pixels therefore reach a model as the same pixels."""
from __future__ import annotations

import numpy as np


def resize_pil(img, size: int):
  """A PIL image resized to size x size (bilinear, antialiased)."""
  from PIL import Image
  return img.resize((size, size), Image.BILINEAR, reducing_gap=None)


def rgb(image: np.ndarray) -> np.ndarray:
  """uint8 [H, W, 3] from a decoded [H, W], [H, W, 1] (grey), [H, W, 3] or [H, W, 4] (alpha
  dropped) image."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  return image[..., :3]


def resize(images, size: int) -> np.ndarray:
  """uint8 [N, size, size, 3] from a sequence of uint8 RGB images (any sizes)."""
  from PIL import Image
  out = np.empty((len(images), size, size, 3), np.uint8)
  for i, image in enumerate(images):
    image = np.asarray(image)
    out[i] = image if image.shape[:2] == (size, size) else \
        np.asarray(resize_pil(Image.fromarray(image), size))
  return out

"""Per-backbone input preprocessing, on device: uint8 RGB images -> the model's float input.

Each model class declares its style in `preprocessing` (a class attribute); models without
one get the project's `standard`. The styles are Keras applications' `preprocess_input`
modes, so a Keras-trained backbone sees exactly the inputs it was trained on:

- `standard`: (x / 255 - 0.5) / 0.25, the project's own backbones;
- `caffe`: RGB -> BGR, minus the ImageNet channel means, no scaling (VGG16, ResNet50);
- `tf`: x / 127.5 - 1, i.e. [-1, 1] (MobileNetV2, EfficientNet-style "tf" mode);
- `torch`: / 255, minus the ImageNet mean, / std (DenseNet-style).
"""
from __future__ import annotations

import jax.numpy as jnp

STANDARD_MEAN, STANDARD_STD = 0.5, 0.25
# keras.applications.imagenet_utils: caffe means in BGR order, torch mean/std in RGB.
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
TORCH_MEAN, TORCH_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _standard(x):
  return (x / 255.0 - STANDARD_MEAN) / STANDARD_STD


def _caffe(x):
  # jnp.flip (a reverse), not x[..., ::-1]: the same values, and with a symbolic batch the
  # slice lowers to a dynamic gather that TFLite's converter cannot take (tlresearch.deploy.export).
  return jnp.flip(x, -1) - jnp.asarray(CAFFE_BGR_MEAN, jnp.float32)


def _tf(x):
  return x / 127.5 - 1.0


def _torch(x):
  return (x / 255.0 - jnp.asarray(TORCH_MEAN, jnp.float32)) / jnp.asarray(TORCH_STD, jnp.float32)


STYLES = {"standard": _standard, "caffe": _caffe, "tf": _tf, "torch": _torch}


def style_of(model) -> str:
  return getattr(model, "preprocessing", "standard")


def apply(style: str, x):
  """`x` (uint8 or float in [0, 255], NHWC RGB) preprocessed in `style`, as float32."""
  return STYLES[style](jnp.asarray(x).astype(jnp.float32))

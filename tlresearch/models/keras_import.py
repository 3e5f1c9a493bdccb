"""Keras applications -> Flax: `from_keras(keras_model)` and the `keras:` pretrained weights.

`from_keras` reads a Keras VGG16, ResNet50 or MobileNetV2 (with or without its top, any input
size and class count Keras allows) and returns `(module, variables)` such that
`module.apply(variables, x)` equals `keras_model(x)` for the same preprocessed NHWC float32
batch. Keras is imported only here, and only when these functions run.

`model.pretrained` in a config:
- `keras:imagenet`: the ImageNet weights through Keras's own loader and cache
  (`$KERAS_HOME/models/`, default `~/.keras/models/`). With a network Keras downloads them
  once; offline, the file must already be there. The cache is checked here first and, when
  the file is missing, whether Keras's download host answers within 3 s (never, when
  TLRESEARCH_OFFLINE=1), so an offline run fails at once with the file name and the folder to
  put it in, instead of waiting on a download that cannot succeed.
- `keras:PATH`: a weights file Keras can load into the same application (`.h5` or
  `.weights.h5`), e.g. the ImageNet file kept somewhere else, or a Keras backbone of your own.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import urllib.parse

import jax
import numpy as np
from flax import traverse_util

from tlresearch.core.errors import UserError
from tlresearch.models import mobilenet_v2 as mnv2
from tlresearch.models.resnet50 import STAGE_BLOCKS, ResNet50
from tlresearch.models.vgg import BLOCKS, VGG16

ORIGIN = "https://storage.googleapis.com/tensorflow/keras-applications/"
ORIGIN_DIRS = {"vgg16": "vgg16/", "resnet50": "resnet/", "mobilenet_v2": "mobilenet_v2/"}
# Input sizes Keras has MobileNetV2 ImageNet weights for; other sizes load the 224 ones.
MOBILENET_V2_SIZES = (96, 128, 160, 192, 224)
ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)  # MobileNetV2 widths with ImageNet weights

log = logging.getLogger(__name__)


def weight_file(family: str, include_top: bool, input_size: int = 224, alpha: float = 1.0) -> str:
  """Keras's file name for the ImageNet weights (keras/src/applications/*.py)."""
  if family == "mobilenet_v2":
    rows = input_size if input_size in MOBILENET_V2_SIZES else 224
    return (f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(alpha)}_{rows}"
            + ("" if include_top else "_no_top") + ".h5")
  return f"{family}_weights_tf_dim_ordering_tf_kernels" + ("" if include_top else "_notop") + ".h5"


def keras_home() -> str:
  """Keras's cache root, computed as Keras does (keras/src/backend/config.py), without
  importing it."""
  if "KERAS_HOME" in os.environ:
    return os.environ["KERAS_HOME"]
  base = os.path.expanduser("~")
  return os.path.join(base if os.access(base, os.W_OK) else "/tmp", ".keras")


def imagenet_weights_path(family: str, include_top: bool, input_size: int = 224,
                          alpha: float = 1.0) -> str:
  """Where Keras's loader looks for (and would download) the ImageNet weights file."""
  return os.path.join(keras_home(), "models", weight_file(family, include_top, input_size, alpha))


def _import_keras():
  # JAX is Keras's backend here unless the user chose another: the weights load the same,
  # and the [keras] extra then needs no TensorFlow.
  os.environ.setdefault("KERAS_BACKEND", "jax")
  try:
    import keras
  except ImportError:
    raise UserError("model.pretrained='keras:...' needs Keras: pip install -e \".[keras]\"") \
        from None
  return keras


def check_source(family: str, include_top: bool, source: str, input_size: int,
                 alpha: float = 1.0) -> None:
  """UserError unless `source` ('keras:imagenet' or 'keras:PATH') can be loaded now."""
  what = source[len("keras:"):]
  if what == "imagenet":
    path = imagenet_weights_path(family, include_top, input_size, alpha)
    if family == "mobilenet_v2" and alpha not in ALPHAS:
      raise UserError(f"no ImageNet weights for MobileNetV2 with model.alpha={alpha}; valid: "
                      + ", ".join(map(str, ALPHAS)))
    if include_top and input_size != 224:
      raise UserError(f"model.top='keras' with ImageNet weights needs model.input_size=224 "
                      f"(Keras's flatten size), got {input_size}; use model.top='linear' for "
                      "other sizes")
    url = ORIGIN + ORIGIN_DIRS[family] + os.path.basename(path)
    if not os.path.exists(path) and not _reachable(url):
      raise UserError(
          f"ImageNet weights for {family} are not in Keras's cache and there is no network: "
          f"Keras expects the file {os.path.basename(path)} in {os.path.dirname(path)}/ "
          f"($KERAS_HOME/models if KERAS_HOME is set); download it from {url} and put it there")
  elif not os.path.isfile(os.path.expanduser(what)):
    raise UserError(f"model.pretrained='{source}': no such weights file '{what}'; valid: "
                    "keras:imagenet or keras:PATH to a Keras weights file")


def _reachable(url: str, timeout: float = 3.0) -> bool:
  """Whether a connection to `url`'s host opens within `timeout` seconds, name lookup included
  (a lookup alone can hang for longer offline, hence the thread)."""
  if os.environ.get("TLRESEARCH_OFFLINE", "") not in ("", "0"):
    return False
  host = urllib.parse.urlsplit(url).hostname
  ok = []

  def probe():
    try:
      socket.create_connection((host, 443), timeout=timeout).close()
      ok.append(True)
    except OSError:
      pass

  thread = threading.Thread(target=probe, daemon=True)
  thread.start()
  thread.join(timeout)
  return bool(ok)


def keras_application(family: str, include_top: bool, weights, input_size: int,
                      classes: int = 1000, alpha: float = 1.0):
  """The Keras application (built with Keras's own loader for `weights`)."""
  keras = _import_keras()
  kwargs = {"include_top": include_top, "weights": weights, "classes": classes,
            "input_shape": (input_size, input_size, 3)}
  if family == "mobilenet_v2":
    return keras.applications.MobileNetV2(alpha=alpha, **kwargs)
  return {"vgg16": keras.applications.VGG16, "resnet50": keras.applications.ResNet50}[family](
      **kwargs)


def load_source(family: str, include_top: bool, source: str, input_size: int,
                alpha: float = 1.0) -> dict:
  """Variables of `family` from 'keras:imagenet' or 'keras:PATH' (checked first)."""
  check_source(family, include_top, source, input_size, alpha)
  what = source[len("keras:"):]
  weights = "imagenet" if what == "imagenet" else os.path.expanduser(what)
  log.info("loading %s weights from %s through Keras", family, source)
  try:
    keras_model = keras_application(family, include_top, weights, input_size, alpha=alpha)
  except Exception as e:  # noqa: BLE001 - a failed download or a file of another model
    where = imagenet_weights_path(family, include_top, input_size, alpha) if what == "imagenet" \
        else weights
    first = (str(e).strip().splitlines() or [""])[0][:200]
    raise UserError(f"Keras could not load {family} weights from {where} ({type(e).__name__}: "
                    f"{first}); it must be a complete Keras {family} weights file") from None
  return from_keras(keras_model)[1]


# ---------------------------------------------------------------- conversion

def _family(layers: dict) -> str:
  if "block1_conv1" in layers and "block5_conv3" in layers:
    return "vgg16"
  if "Conv1" in layers and "block_16_project" in layers and "Conv_1" in layers:
    return "mobilenet_v2"
  if "conv1_conv" in layers and "conv5_block3_3_conv" in layers and "conv4_block6_out" in layers \
      and "conv4_block7_out" not in layers:
    return "resnet50"
  raise ValueError("from_keras supports keras.applications VGG16, ResNet50 and MobileNetV2; "
                   f"this model ({', '.join(list(layers)[:5])}, ...) is none of them")


def _conv(layer) -> dict:
  kernel, *bias = layer.get_weights()  # Keras and Flax both store HWIO kernels
  return {"kernel": kernel, "bias": bias[0]} if bias else {"kernel": kernel}


def _depthwise(layer) -> dict:
  # Keras: [h, w, channels, multiplier 1]; Flax's grouped conv: [h, w, 1, channels].
  (kernel,) = layer.get_weights()
  return {"kernel": kernel.reshape(kernel.shape[:2] + (1, kernel.shape[2]))}


def _bn(layer) -> tuple[dict, dict]:
  gamma, beta, mean, var = layer.get_weights()
  return {"scale": gamma, "bias": beta}, {"mean": mean, "var": var}


def _vgg_variables(layers: dict) -> dict:
  params = {}
  for b, (n, _) in enumerate(BLOCKS, start=1):
    params[f"block{b}"] = {f"conv{i}": _conv(layers[f"block{b}_conv{i}"]) for i in range(1, n + 1)}
  if "predictions" in layers:
    params["fc"] = {"fc1": _conv(layers["fc1"]), "fc2": _conv(layers["fc2"])}
    params["head"] = {"predictions": _conv(layers["predictions"])}
  return {"params": params}


def _resnet50_variables(layers: dict) -> dict:
  params, stats = {"stem": {"conv": _conv(layers["conv1_conv"])}}, {"stem": {}}
  params["stem"]["bn"], stats["stem"]["bn"] = _bn(layers["conv1_bn"])
  for s, n in enumerate(STAGE_BLOCKS, start=1):
    p, st = params.setdefault(f"stage{s}", {}), stats.setdefault(f"stage{s}", {})
    for b in range(1, n + 1):
      prefix = f"conv{s + 1}_block{b}"
      bp, bs = p.setdefault(f"block{b}", {}), st.setdefault(f"block{b}", {})
      for keras_i, flax_name in (("0", "proj"), ("1", "1"), ("2", "2"), ("3", "3")):
        if f"{prefix}_{keras_i}_conv" not in layers:
          continue  # identity shortcut
        conv, bn = (f"{flax_name}_conv", f"{flax_name}_bn") if keras_i == "0" else \
            (f"conv{flax_name}", f"bn{flax_name}")
        bp[conv] = _conv(layers[f"{prefix}_{keras_i}_conv"])
        bp[bn], bs[bn] = _bn(layers[f"{prefix}_{keras_i}_bn"])
  if "predictions" in layers:
    params["head"] = {"predictions": _conv(layers["predictions"])}
  return {"params": params, "batch_stats": stats}


def _mobilenet_v2_variables(layers: dict) -> dict:
  params = {g: {} for g in mnv2.GROUP_BLOCKS}
  stats = {g: {} for g in mnv2.GROUP_BLOCKS}
  params["stem"]["conv"] = _conv(layers["Conv1"])
  params["stem"]["bn"], stats["stem"]["bn"] = _bn(layers["bn_Conv1"])
  params["stage4"]["conv"] = _conv(layers["Conv_1"])
  params["stage4"]["bn"], stats["stage4"]["bn"] = _bn(layers["Conv_1_bn"])
  for g, blocks in mnv2.GROUP_BLOCKS.items():
    for b in blocks:
      prefix = f"block_{b}_" if b else "expanded_conv_"
      p, st = params[g].setdefault(f"block{b}", {}), stats[g].setdefault(f"block{b}", {})
      if b:
        p["expand"] = _conv(layers[prefix + "expand"])
        p["expand_bn"], st["expand_bn"] = _bn(layers[prefix + "expand_BN"])
      p["depthwise"] = _depthwise(layers[prefix + "depthwise"])
      p["depthwise_bn"], st["depthwise_bn"] = _bn(layers[prefix + "depthwise_BN"])
      p["project"] = _conv(layers[prefix + "project"])
      p["project_bn"], st["project_bn"] = _bn(layers[prefix + "project_BN"])
  if "predictions" in layers:
    params["head"] = {"predictions": _conv(layers["predictions"])}
  return {"params": params, "batch_stats": stats}


def _mobilenet_v2_alpha(layers: dict) -> float:
  widths = (layers["Conv1"].filters, layers["block_16_project"].filters, layers["Conv_1"].filters)
  for alpha in ALPHAS + tuple(a / 100 for a in range(10, 301, 5)):
    last = mnv2.make_divisible(1280 * alpha) if alpha > 1.0 else 1280
    if widths == (mnv2.make_divisible(32 * alpha), mnv2.make_divisible(int(320 * alpha)), last):
      return alpha
  raise ValueError(f"from_keras: no MobileNetV2 alpha gives the layer widths {widths}")


def _activation_name(layer) -> str | None:
  name = getattr(layer.activation, "__name__", str(layer.activation))
  return None if name == "linear" else name


def from_keras(keras_model):
  """`(module, variables)` equal to a Keras VGG16, ResNet50 or MobileNetV2 on preprocessed
  NHWC input.

  With Keras's top the module has `top="keras"` and its classifier activation (softmax by
  default), so outputs are probabilities as in Keras; without it `top="none"` and Keras's
  `pooling` (None, "avg" or "max"). Raises ValueError for any other model, or if a weight is
  missing, unexpected or mis-shaped.
  """
  layers = {layer.name: layer for layer in keras_model.layers}
  family = _family(layers)
  size = keras_model.input_shape[1] or 224
  if "predictions" in layers:
    kwargs = {"top": "keras", "num_classes": int(layers["predictions"].units),
                  "classifier_activation": _activation_name(layers["predictions"])}
    if family == "vgg16":
      kwargs["fc_features"] = int(layers["fc1"].units)
  else:
    pooling = None
    for layer in keras_model.layers[-1:]:
      kind = type(layer).__name__
      pooling = {"GlobalAveragePooling2D": "avg", "GlobalMaxPooling2D": "max"}.get(kind)
    kwargs = {"top": "none", "num_classes": 0, "pooling": pooling}
  if family == "mobilenet_v2":
    kwargs["alpha"] = _mobilenet_v2_alpha(layers)
  cls, convert = {"vgg16": (VGG16, _vgg_variables), "resnet50": (ResNet50, _resnet50_variables),
                  "mobilenet_v2": (mnv2.MobileNetV2, _mobilenet_v2_variables)}[family]
  module = cls(input_size=int(size), **kwargs)
  variables = convert(layers)
  _check_against(module, variables, int(size))
  return module, jax.tree.map(np.asarray, variables)


def _check_against(module, variables, size: int) -> None:
  shapes = jax.eval_shape(module.init, jax.random.key(0), np.zeros((1, size, size, 3), np.float32))
  want = {p: v.shape for p, v in traverse_util.flatten_dict(shapes, sep="/").items()}
  got = {p: np.shape(v) for p, v in traverse_util.flatten_dict(variables, sep="/").items()}
  problems = sorted(set(want) ^ set(got)) + sorted(
      f"{p}: keras {got[p]} vs flax {want[p]}" for p in set(want) & set(got) if got[p] != want[p])
  if problems:
    raise ValueError("Keras weights do not match the Flax model: " + "; ".join(problems[:10]))

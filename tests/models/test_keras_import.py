"""from_keras reproduces Keras applications' VGG16, ResNet50 and MobileNetV2, with and without
the top; the data pipeline preprocesses as Keras does.

Keras's models are built with random weights (weights=None: nothing is downloaded) and random
BatchNorm statistics, so every weight and statistic has to land in the right place."""
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tlresearch.core import schema
from tlresearch import models
from tlresearch.core.errors import UserError
from tlresearch.data import preprocess
from tlresearch.methods import strategies

keras = pytest.importorskip("keras")


def _keras_model(family, include_top, size, pooling=None):
  app = {"vgg16": keras.applications.VGG16, "resnet50": keras.applications.ResNet50,
         "mobilenet_v2": keras.applications.MobileNetV2}[family]
  kwargs = {"classes": 10} if include_top else {"pooling": pooling}
  keras.utils.set_random_seed(0)  # Keras's random init: the same weights on every run
  model = app(weights=None, include_top=include_top, input_shape=(size, size, 3), **kwargs)
  rng = np.random.default_rng(0)
  for layer in model.layers:
    if type(layer).__name__ == "BatchNormalization":
      gamma, beta, mean, var = layer.get_weights()
      layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.1, beta.shape),
                         rng.normal(0, 0.1, mean.shape), rng.uniform(0.5, 2.0, var.shape)])
  return model


# MobileNetV2's Keras build is the slowest (~20 s): in the slow group, for default-run time.
@pytest.mark.parametrize("family", ["vgg16", "resnet50",
                                    pytest.param("mobilenet_v2", marks=pytest.mark.slow)])
@pytest.mark.parametrize("include_top, size, pooling", [
    (False, 32, None), (False, 48, "avg"), (True, 32, None), (True, 49, None)])
def test_from_keras_matches_keras(family, include_top, size, pooling):
  keras_model = _keras_model(family, include_top, size, pooling)
  # A preprocessed batch: caffe style (BGR minus the ImageNet means) or [-1, 1].
  low, high = (-1, 1) if family == "mobilenet_v2" else (-124, 152)
  x = np.random.default_rng(1).uniform(low, high, (2, size, size, 3)).astype(np.float32)
  want = np.asarray(keras_model(x))
  module, variables = models.from_keras(keras_model)
  got = np.asarray(jax.jit(module.apply)(variables, x))
  assert got.shape == want.shape
  scale = np.abs(want).max()
  diff = np.abs(got - want).max()
  print(f"{family} top={include_top} size={size}: max abs diff {diff:.2e}, output scale "
        f"{scale:.2e}")
  assert diff <= 1e-4 * scale
  assert module.groups[:2] == (("block1", "block2") if family == "vgg16" else ("stem", "stage1"))


@pytest.mark.parametrize("module, family", [
    ("vgg16", "vgg16"), ("resnet50", "resnet50"), ("mobilenet_v2", "mobilenet_v2")])
def test_pipeline_preprocessing_equals_keras_preprocess_input(module, family):
  x = np.random.default_rng(0).integers(0, 256, (2, 5, 5, 3)).astype(np.uint8)
  want = getattr(keras.applications, module).preprocess_input(x.astype(np.float32))
  got = preprocess.apply(preprocess.style_of(models.FAMILIES[family]), x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-4)


def test_from_keras_rejects_other_models():
  inputs = keras.Input((8, 8, 3))
  other = keras.Model(inputs, keras.layers.Conv2D(2, 3, name="conv")(inputs))
  with pytest.raises(ValueError, match="supports keras.applications VGG16, ResNet50 and MobileNetV2"):
    models.from_keras(other)


def _random_variables(model, size):
  """Variables of the right shapes without running (and compiling) the model's init."""
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))

  def fill(path, s):
    name = path[-1].key
    if name in ("var", "scale"):
      return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
    std = 1 / np.sqrt(np.prod(s.shape[:-1])) if name == "kernel" else 0.1
    return rng.normal(0, std, s.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.mark.parametrize("family, groups, width", [
    ("vgg16", ("block1", "block2", "block3", "block4", "block5", "head"), {"width": 4}),
    ("resnet50", ("stem", "stage1", "stage2", "stage3", "stage4", "head"), {"width": 4}),
    ("mobilenet_v2", ("stem", "stage1", "stage2", "stage3", "stage4", "head"), {"alpha": 0.1})])
def test_groups_are_top_level_params_and_any_slice_runs(family, groups, width):
  cfg = schema.keras_model(family=family, input_size=32, **width)
  model = models.build(cfg, 3)
  v = _random_variables(model, 32)
  assert model.groups == groups == models.groups_of(cfg) and set(v["params"]) == set(groups)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
  mid, whole = jax.jit(lambda v, x: (model.apply(v, x, stop=groups[2]), model.apply(v, x)))(v, x)
  rest = jax.jit(lambda v, x: model.apply(v, x, start=groups[3]))(v, mid)
  np.testing.assert_allclose(rest, whole, rtol=1e-5, atol=1e-5)
  rules = strategies.get("partial:k=2", model.groups).stages[0].rules
  assert [p for p, r in rules if r != strategies.FROZEN] == [
      f"{g}/.*" for g in groups[-3:]]


def test_vgg_keras_top_has_a_pretrained_fc_group():
  cfg = schema.keras_model(width=4, input_size=32, top="keras")
  cfg.fc_features = 8
  model = models.build(cfg, 3)
  v = _random_variables(model, 32)
  assert model.groups[-2:] == ("fc", "head") and set(v["params"]["fc"]) == {"fc1", "fc2"}
  assert set(v["params"]["head"]) == {"predictions"}


def test_missing_imagenet_weights_fail_fast_naming_the_file(tmp_path, monkeypatch):
  monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
  monkeypatch.setenv("TLRESEARCH_OFFLINE", "1")
  cfg = schema.keras_model()
  t0 = time.perf_counter()
  with pytest.raises(UserError) as err:
    models.check_pretrained(cfg)
  assert time.perf_counter() - t0 < 30  # no download tried
  message = str(err.value)
  assert "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5" in message
  assert str(tmp_path / "keras" / "models") in message and "\n" not in message
  cfg.family = "mobilenet_v2"
  with pytest.raises(UserError, match="mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"):
    models.check_pretrained(cfg)
  cfg.pretrained = "keras:/no/such/file.h5"
  with pytest.raises(UserError, match="no such weights file '/no/such/file.h5'"):
    models.check_pretrained(cfg)


def test_keras_weights_file_loads_through_keras(tmp_path):
  path = str(tmp_path / "vgg16.weights.h5")
  keras_model = _keras_model("vgg16", False, 32)
  keras_model.save_weights(path)
  cfg = schema.keras_model(pretrained=f"keras:{path}", input_size=32)
  loaded = models.load_pretrained(cfg)
  np.testing.assert_array_equal(loaded["params"]["block3"]["conv2"]["kernel"],
                                keras_model.get_layer("block3_conv2").get_weights()[0])
  cfg.family = "resnet50"  # a file of another model: one line, no traceback
  with pytest.raises(UserError, match="Keras could not load resnet50 weights from .*vgg16"):
    models.load_pretrained(cfg)


def test_default_paths_do_not_import_keras(tmp_path):
  code = ("import sys\nfrom tlresearch.experiment import cli as run, sweep\nrun.main(['--list'])\n"
          "assert 'keras' not in sys.modules, 'keras imported'\n"
          "assert 'tensorflow' not in sys.modules, 'tensorflow imported'\n"
          "assert 'tlresearch.models.keras_import' not in sys.modules\n")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=False,
                     env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, timeout=120)
  assert r.returncode == 0, r.stderr

"""The Keras recipe is the same recipe: its head trained here for one epoch on the frozen
base's features matches Keras `model.fit` from the same initial weights; its pieces
(head_then_top, fill_mode, a constant schedule, the per-class report) do what they say."""
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from sklearn import metrics as skm

from tests.conftest import fit_one, make_dataset, tiny_model_cfg, tiny_train_cfg
from tlresearch import models
from tlresearch.analysis import report
from tlresearch.data import augment as augment_lib, preprocess
from tlresearch.deploy import recognizer
from tlresearch.methods import optim, strategies
from tlresearch.training import programs, train


@pytest.mark.slow
def test_one_epoch_of_the_recipes_head_matches_keras_fit():
  keras = pytest.importorskip("keras")
  data = make_dataset(n_train=48, classes=4)
  cfg = tiny_model_cfg()
  cfg.head = ml_collections.ConfigDict({"pooling": "flatten", "hidden": [16],
                                        "activation": "relu"})
  model = models.build(cfg, 4)
  keys = train.CellKeys.from_seed(0)
  start = programs.init_variables(model, keys.init, data.train_x.shape[1:])
  tcfg = tiny_train_cfg(epochs=1, batch_size=8, optimizer="adam", lr=1e-3, weight_decay=0.0,
                        schedule="constant")
  tcfg.early_stopping.enabled = False
  result = fit_one(model, start, strategies.get("linear_probe", model.groups), data, tcfg, keys)
  assert result.cached_prefix and result.probe is None  # an MLP head trains on cached features

  # Keras: the recipe's top on the same frozen features, the same initial weights, and the
  # same batches (this epoch's permutation, so no shuffling).
  features = np.asarray(model.apply(start, preprocess.apply("standard", data.train_x),
                                    stop=model.groups[-2]))
  perm = np.asarray(jax.random.permutation(jax.random.fold_in(keys.order, 0), 48))
  top = keras.Sequential([keras.Input(features.shape[1:]), keras.layers.Flatten(),
                          keras.layers.Dense(16, activation="relu"),
                          keras.layers.Dense(4, activation="softmax")])
  head = start["params"]["head"]
  top.set_weights([np.asarray(head[layer][w]) for layer in ("hidden1", "dense")
                   for w in ("kernel", "bias")])
  top.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy")
  onehot = np.eye(4, dtype=np.float32)[data.train_y]
  fit = top.fit(features[perm], onehot[perm], batch_size=8, epochs=1, shuffle=False, verbose=0)
  assert abs(fit.history["loss"][0] - result.history[0]["train_loss"]) < 1e-4
  # The trained heads agree: their loss on every training example, and their weights.
  ours = model.apply(result.variables, features, start="head")
  ours_loss = float(np.mean(-jax.nn.log_softmax(ours)[np.arange(48), data.train_y]))
  theirs_loss = float(top.evaluate(features, onehot, verbose=0))
  assert abs(ours_loss - theirs_loss) < 1e-4
  trained = result.variables["params"]["head"]
  for (layer, w), k in zip([(l, w) for l in ("hidden1", "dense") for w in ("kernel", "bias")],
                           top.get_weights()):
    # Keras adds Adam's epsilon (1e-7) to sqrt(v) before bias correction, optax (1e-8) after:
    # weights whose gradients are ~0 (dead ReLU units) move by up to ~lr times differently.
    np.testing.assert_allclose(trained[layer][w], k, atol=1e-3)


def test_head_then_top_trains_the_head_then_the_top_block_at_a_lower_rate():
  groups = ("block1", "block2", "block3", "head")
  s = strategies.get("head_then_top:k=1,lr_scale=0.1,head=0.5", groups)
  paths = [f"{g}/conv/kernel" for g in groups[:-1]] + ["head/dense/kernel"]
  head, top = (strategies.resolve(st.rules, paths) for st in s.stages)
  assert head == {"block1/conv/kernel": "frozen", "block2/conv/kernel": "frozen",
                  "block3/conv/kernel": "frozen", "head/dense/kernel": 1.0}
  assert top == {"block1/conv/kernel": "frozen", "block2/conv/kernel": "frozen",
                 "block3/conv/kernel": 0.1, "head/dense/kernel": 0.1}
  assert strategies.stage_epochs(s.stages, 30) == [15, 15]
  with pytest.raises(strategies.UserError, match="lr_scale must be in"):
    strategies.get("head_then_top:lr_scale=2", groups)


@pytest.mark.parametrize("mode", augment_lib.FILL_MODES)
def test_fill_mode_fills_outside_the_image_as_keras_scipy_does(mode):
  scipy_ndimage = pytest.importorskip("scipy.ndimage")
  rng = np.random.default_rng(0)
  channel = rng.normal(size=(6, 7)).astype(np.float32)
  sy, sx = rng.uniform(-4, 10, (2, 400)).astype(np.float32)  # inside and outside the image
  ours = augment_lib._sample(jnp.asarray(channel), jnp.asarray(sy), jnp.asarray(sx), mode)
  keras_way = scipy_ndimage.map_coordinates(channel, [sy, sx], order=1, mode=mode, cval=0.0)
  np.testing.assert_allclose(ours, keras_way, atol=1e-5)


def test_constant_schedule_keeps_the_peak_rate():
  s = optim.schedule(0.1, 100, 10, "constant")
  assert [float(s(t)) for t in (0, 50, 99)] == pytest.approx([0.1, 0.1, 0.1])
  assert float(optim.schedule(0.1, 100, 10)(0)) == 0.0  # the default warms up from 0


def test_classification_report_text_is_scikit_learns():
  y, p = [0, 1, 2, 2, 1, 0, 1], [0, 2, 2, 2, 1, 0, 0]
  names = ["cat", "dog", "eel"]
  as_dict = skm.classification_report(y, p, target_names=names, output_dict=True)
  assert report.classification_report_text(as_dict) == skm.classification_report(
      y, p, target_names=names, digits=3)


@pytest.mark.slow
def test_the_documented_smoke_override_runs_the_recipe_on_a_folder(tmp_path):
  """experiments/keras_recipe.py's CPU smoke override, on a generated folder (the source
  backbone pretrained on mocked glyphs, 1 epoch): table, per-class reports, a kept model."""
  import tensorflow_datasets as tfds
  from tests.deploy.test_keep import _folder
  from tlresearch.experiment import cli as run
  root = _folder(tmp_path / "imgs")
  args = ["--experiment=keras_recipe", f"--workdir={tmp_path / 'work'}",
          f"--results_dir={tmp_path / 'results'}", "--no_progress",
          f"--config.targets=['folder:{root}']", "--config.model.family=resnet",
          "--config.model.pretrained=", "--config.model.width=16",
          "--config.model.input_size=32", "--config.seeds=[0]", "--config.train.epochs=2",
          "--config.selection.enabled=False", f"--config.cache_dir={tmp_path / 'cache'}",
          f"--config.data_dir={tmp_path / 'data'}", "--config.pretrain.train.epochs=1"]
  with tfds.testing.mock_data(num_examples=16):
    assert run.main(args) == 0
  out = tmp_path / "results" / "keras_recipe"
  table = (out / "table.md").read_text()
  for s in ("head_then_top:k=1,lr_scale=0.1,head=0.5", "linear_probe", "partial:k=1", "full",
            "lp_ft:probe=0.5"):
    assert f"| {s} |" in table
  reports = (out / "classification_reports.md").read_text()
  assert reports.count("weighted avg") == 5 and "precision    recall  f1-score" in reports
  kept = json.loads((tmp_path / "work" / "kept" / "keras_recipe.json").read_text())
  (best,) = kept["best"].values()
  card = recognizer.read_card(best["model"])
  assert card["model"]["head"] == {"pooling": "flatten", "hidden": [256], "activation": "relu"}
  assert card["config"]["train"]["augment"]["fill_mode"] == "nearest"

"""Real datasets: `folder:PATH` image folders and `tfds:NAME` catalog datasets, end to end."""
import importlib.abc
import json
import os
import sys
import time

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from experiments import finetune_sweep
from tests.conftest import tiny_train_cfg
from tlresearch import data as data_lib
from tlresearch.core.errors import UserError
from tlresearch.data import tfds_catalog
from tlresearch.experiment import cli as run, sweep


def _image_folder(root, classes=("cat", "dog", "eel"), per_class=6, splits=("train",)):
  """Class folders of small images in several formats and sizes, plus files that are not
  images (a corrupt JPEG, a text file) and a hidden file."""
  rng = np.random.default_rng(0)
  formats = ["png", "jpg", "bmp", "gif", "tiff", "webp"]
  for split in splits:
    for c, name in enumerate(classes):
      d = root / split / name
      d.mkdir(parents=True)
      for i in range(per_class):
        h, w = 20 + 4 * (i % 3), 24 + 2 * c
        pixels = np.clip(rng.normal(60 + 70 * c, 30, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(d / f"img{i}.{formats[i % len(formats)]}")
  (root / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
  (root / "train" / "dog" / "notes.txt").write_text("not an image")
  (root / "train" / "dog" / ".DS_Store").write_bytes(b"\0\1")
  return root


def test_folder_decodes_resizes_carves_and_reports_skipped_files(tmp_path, caplog):
  root = _image_folder(tmp_path / "imgs")
  data = data_lib.load(f"folder:{root}", image_size=16)
  assert data.class_names == ("cat", "dog", "eel") and data.num_classes == 3
  for x in (data.train_x, data.val_x, data.test_x):
    assert x.shape[1:] == (16, 16, 3) and x.dtype == np.uint8
  # 18 images: per class 1 test (0.2 of 6), then 1 validation (0.1 of 5, at least 1).
  assert (len(data.train_y), len(data.val_y), len(data.test_y)) == (12, 3, 3)
  assert sorted(os.path.basename(p) for p in data.skipped) == ["broken.jpg", "notes.txt"]
  assert any("carved 3 examples" in n for n in data.notes)
  # Colour survives decoding: class means stay ordered (cat darkest, eel brightest).
  means = [data.train_x[data.train_y == c].mean() for c in range(3)]
  assert means[0] < means[1] < means[2]
  caplog.set_level("INFO", logger="tlresearch")
  fields = data_lib.report(data)
  lines = [r.getMessage() for r in caplog.records]
  assert fields["skipped_files"]["count"] == 2 and len(fields["skipped_files"]["first"]) == 2
  assert any("skipped 2 files" in line and "broken.jpg" in line for line in lines)
  # Seeded and fixed: the same split every time.
  again = data_lib.load(f"folder:{root}", image_size=16, options={"split_seed": 0})
  np.testing.assert_array_equal(again.test_x, data.test_x)


def test_folder_uses_its_own_validation_and_test_folders(tmp_path):
  root = _image_folder(tmp_path / "imgs", per_class=4, splits=("train", "val", "test"))
  data = data_lib.load(f"folder:{root}", image_size=12)
  assert (len(data.train_y), len(data.val_y), len(data.test_y)) == (12, 12, 12)
  assert data.notes == ()
  (root / "test" / "yak").mkdir()
  (root / "test" / "yak" / "a.png").write_bytes(b"")
  with pytest.raises(UserError, match="class folder 'yak' in .* is not in train; valid: cat, dog"):
    data_lib.load(f"folder:{root}", image_size=12)


def test_folder_errors_are_one_line_and_fast(tmp_path):
  t0 = time.perf_counter()
  with pytest.raises(UserError, match=r"no train folder .*/nowhere/train; expected PATH/train/"):
    data_lib.load(f"folder:{tmp_path / 'nowhere'}", image_size=16)
  root = _image_folder(tmp_path / "imgs", per_class=2)
  (root / "train" / "fox").mkdir()
  with pytest.raises(UserError, match=r"class folder .*train/fox is empty"):
    data_lib.load(f"folder:{root}", image_size=16)
  (root / "train" / "fox" / "x.png").write_text("not an image")
  with pytest.raises(UserError, match=r"class folder .*train/fox has no readable images"):
    data_lib.load(f"folder:{root}", image_size=16)
  (root / "train" / "fox" / "x.png").unlink()
  (root / "train" / "fox").rmdir()
  with pytest.raises(UserError, match="images differ in size .*: set model.input_size"):
    data_lib.load(f"folder:{root}")
  assert time.perf_counter() - t0 < 30  # each error before decoding the whole folder


def test_tfds_dataset_not_prepared_fails_fast_saying_how_to_prepare(tmp_path):
  t0 = time.perf_counter()
  with pytest.raises(UserError) as err:
    data_lib.load("tfds:cifar10", data_dir=str(tmp_path))
  assert time.perf_counter() - t0 < 30  # no download tried
  assert f"`tfds build cifar10 --data_dir={tmp_path}`" in str(err.value)
  assert "--config.data.download=True" in str(err.value)
  with pytest.raises(UserError, match=r"unknown TFDS dataset 'tfds:cifar1'; did you mean .*tfds:cifar10"):
    data_lib.load("tfds:cifar1", data_dir=str(tmp_path))
  assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("array_record", [True, False], ids=["array_record", "tfrecord"])
def test_tfds_catalog_dataset_resized_with_carved_validation(tmp_path, monkeypatch,
                                                             array_record):
  monkeypatch.setattr(tfds_catalog, "_array_record", lambda builder: array_record)
  with tfds.testing.mock_data(num_examples=40):
    data = data_lib.load("tfds:cifar10", data_dir=str(tmp_path), image_size=48, k_shot=1,
                         seed=0)
    with pytest.raises(UserError, match="data.vtab1k needs 1000 training examples"):
      data_lib.load("tfds:cifar10", data_dir=str(tmp_path), options={"vtab1k": True})
  assert data.num_classes == 10 and len(data.class_names) == 10
  assert data.train_x.shape[1:] == (48, 48, 3) and len(data.train_y) == 10
  assert len(data.test_y) == 40 and 0 < len(data.val_y) < 40
  assert any("no validation split; carved" in n for n in data.notes)


def test_tfrecord_dataset_without_tensorflow_fails_naming_the_extra(tmp_path, monkeypatch):
  class NoTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
      if name == "tensorflow":
        raise ImportError("No module named 'tensorflow'")

  # As on a machine without TensorFlow: not imported, and `import tensorflow` fails.
  monkeypatch.delitem(sys.modules, "tensorflow", raising=False)
  monkeypatch.setattr(sys, "meta_path", [NoTensorFlow(), *sys.meta_path])
  monkeypatch.setattr(tfds_catalog, "_array_record", lambda builder: False)
  with tfds.testing.mock_data(num_examples=8):
    with pytest.raises(UserError, match=r'tfds:cifar10 is stored as TFRecord, which needs '
                       r'TensorFlow: pip install -e "\.\[tf\]".*--file_format=array_record'):
      data_lib.load("tfds:cifar10", data_dir=str(tmp_path))


def _read_json(path):
  return json.loads(path.read_text())


def _folder_sweep_config(root):
  c = finetune_sweep.get_config()
  c.targets = [f"folder:{root}"]
  c.seeds = [0]
  c.k_shot = 0
  c.model.width = 4
  c.model.input_size = 16  # the images differ in size: the pipeline resizes them
  c.train = tiny_train_cfg(epochs=1)
  c.pretrain.train.epochs = 1
  c.grid = [{"strategy": ["linear_probe", "full"]}]
  c.selection.enabled = False  # two final cells: the folder pipeline is under test
  return c


@pytest.mark.slow
def test_tiny_sweep_on_an_image_folder(tmp_path):
  root = _image_folder(tmp_path / "imgs")
  config = _folder_sweep_config(root)
  config.cache_dir = str(tmp_path / "cache")
  config.data_dir = str(tmp_path / "data")
  # The source backbone is pretrained on mocked glyphs (the folder itself is real).
  with tfds.testing.mock_data(num_examples=16):
    summary = sweep.run_grid(config, "folder_sweep", str(tmp_path / "work"),
                             str(tmp_path / "results"), progress=False)
  assert summary["cells"] == 2
  for cell in os.listdir(tmp_path / "work" / "cells"):
    final = _read_json(tmp_path / "work" / "cells" / cell / "final.json")
    assert final["status"] == "ok" and final["train_examples"] == 12
    assert final["skipped_files"]["count"] == 2
    assert {os.path.basename(p) for p in final["skipped_files"]["first"]} == {"broken.jpg",
                                                                              "notes.txt"}
  table = (tmp_path / "results" / "folder_sweep" / "table.md").read_text()
  assert "linear_probe" in table and "full" in table


@pytest.mark.slow
def test_tiny_sweep_on_tfds_cifar10_with_keras_vgg16(tmp_path):
  keras = pytest.importorskip("keras")
  weights = str(tmp_path / "vgg16_notop.weights.h5")
  keras.applications.VGG16(weights=None, include_top=False,
                           input_shape=(32, 32, 3)).save_weights(weights)
  args = ["--experiment=finetune_sweep_imagenet", f"--workdir={tmp_path / 'work'}",
          f"--results_dir={tmp_path / 'results'}", "--no_progress",
          f"--config.data_dir={tmp_path / 'data'}", f"--config.cache_dir={tmp_path / 'cache'}",
          "--config.targets=['tfds:cifar10']", "--config.model.input_size=32",
          f"--config.model.pretrained=keras:{weights}", "--config.seeds=[0]",
          "--config.train.epochs=1", "--config.train.batch_size=8",
          "--config.grid=[{'strategy': ['linear_probe', 'partial:k=1']}]"]
  with tfds.testing.mock_data(num_examples=20):
    assert run.main(args) == 0
  finals = [_read_json(tmp_path / "work" / "cells" / c / "final.json")
            for c in os.listdir(tmp_path / "work" / "cells")]
  assert sorted(f["strategy"] for f in finals) == ["linear_probe", "partial:k=1"]
  probe = next(f for f in finals if f["strategy"] == "linear_probe")
  assert probe["trainable_params"] == 512 * 10 + 10 and probe["cached_prefix"]
  top1 = next(f for f in finals if f["strategy"] == "partial:k=1")  # block5 and the head
  assert top1["trainable_params"] == 3 * (3 * 3 * 512 * 512 + 512) + 512 * 10 + 10
  assert top1["cached_prefix"]  # block1..block4 ran once per split
  assert any("carved" in n for n in probe["data_notes"])


def test_imagenet_experiment_without_weights_exits_before_training(tmp_path, monkeypatch):
  monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
  monkeypatch.setenv("TLRESEARCH_OFFLINE", "1")
  t0 = time.perf_counter()
  with pytest.raises(UserError, match="vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"):
    run.main(["--experiment=finetune_sweep_imagenet", f"--results_dir={tmp_path / 'r'}",
              f"--workdir={tmp_path / 'w'}", f"--config.data_dir={tmp_path / 'data'}"])
  assert not (tmp_path / "r").exists() and not (tmp_path / "w" / "cells").exists()
  assert time.perf_counter() - t0 < 30  # no download tried, no dataset built


def test_config_values_of_real_data_are_checked():
  c = ml_collections.ConfigDict({"val_fraction": 1.5})
  with pytest.raises(UserError, match=r"data.val_fraction must be in \(0, 1\)"):
    data_lib.load("digits", options=c)
  with pytest.raises(UserError, match="unknown data option 'bogus'; valid: download"):
    data_lib.load("digits", options={"bogus": 1})

"""The offline datasets: deterministic generation, real TFDS builds, k-shot subsets, mocking."""
import importlib
import socket

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tlresearch.core.errors import UserError
from tlresearch.data import Dataset, DATASETS, default_data_dir, load
from tlresearch.data.builders import digits, glyphs

load_module = importlib.import_module("tlresearch.data.loader")  # the package exports `load`


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds_digits"))


def _counts(labels, n):
  return np.bincount(labels, minlength=n)


def _sorted_rows(images):
  """The images as a sorted list of byte strings: equality up to order."""
  return sorted(x.tobytes() for x in images)


# --- glyphs.generate -----------------------------------------------------------------------

@pytest.mark.parametrize("config", list(glyphs.CONFIGS))
def test_generate_is_deterministic_and_balanced(config):
  cfg = glyphs.CONFIGS[config]
  x, y = glyphs.generate(config, "train", examples_per_class=3)
  x2, y2 = glyphs.generate(config, "train", examples_per_class=3)
  assert x.tobytes() == x2.tobytes() and y.tobytes() == y2.tobytes()
  n = len(cfg.class_names)
  assert x.shape == (3 * n, 32, 32, 3) and x.dtype == np.uint8
  assert y.shape == (3 * n,) and y.dtype == np.int64
  assert (_counts(y, n) == 3).all()  # every class, exactly its share
  xt, _ = glyphs.generate(config, "test", examples_per_class=3)
  assert not np.array_equal(x, xt)
  assert x.std() > 20  # not blank


def test_configs_use_their_own_seeds():
  # Same classes, fonts and sizes, different streams: target images are not source copies.
  a, _ = glyphs.generate("source", "train", examples_per_class=2)
  b, _ = glyphs.generate("output_shift", "train", examples_per_class=2)
  assert not np.array_equal(a, b)
  assert len({cfg.seed for cfg in glyphs.CONFIGS.values()}) == len(glyphs.CONFIGS)


def test_output_shift_labels_are_a_derangement():
  perm = np.array(glyphs.OUTPUT_SHIFT_PERMUTATION)
  assert sorted(perm) == list(range(len(glyphs.SOURCE_CHARS)))
  assert not np.any(perm == np.arange(perm.size))
  names = glyphs.CONFIGS["output_shift"].class_names
  for i, char in enumerate(glyphs.SOURCE_CHARS):
    assert names[perm[i]] == char  # class name = the character drawn


def test_font_partition():
  assert not set(glyphs.SOURCE_FONTS) & set(glyphs.HELDOUT_FONTS)
  for cfg in glyphs.CONFIGS.values():
    for char in cfg.chars:
      assert any(glyphs.has_glyph(f, char) for f in cfg.fonts), char
  assert glyphs.CONFIGS["feature_shift"].fonts == glyphs.HELDOUT_FONTS
  for name in ("source", "new_classes", "input_shift", "output_shift"):
    assert glyphs.CONFIGS[name].fonts == glyphs.SOURCE_FONTS


def test_generate_rejects_unknown_names():
  with pytest.raises(UserError, match="valid: .*source"):
    glyphs.generate("nope", "train")
  with pytest.raises(UserError, match="valid: test, train, validation"):
    glyphs.generate("source", "dev")


# --- digits --------------------------------------------------------------------------------

def test_digits_split_is_stratified_and_disjoint():
  _, labels = digits.images_and_labels()
  parts = digits.split_indices(labels)
  all_idx = np.concatenate(list(parts.values()))
  assert np.array_equal(np.sort(all_idx), np.arange(labels.size))  # a partition
  totals = _counts(labels, 10)
  for split, frac in (("train", 0.60), ("validation", 0.15), ("test", 0.25)):
    per_class = _counts(labels[parts[split]], 10)
    assert np.all(np.abs(per_class - frac * totals) <= 1), split


def test_digits_tfds_build_is_reproducible_and_offline(digits_dir, tmp_path, monkeypatch):
  a = load("digits", data_dir=digits_dir)

  def no_network(*args, **kwargs):
    raise AssertionError("a dataset build tried to open a network connection")
  monkeypatch.setattr(socket.socket, "connect", no_network)
  monkeypatch.setattr(socket, "getaddrinfo", no_network)
  b = load("digits", data_dir=str(tmp_path))  # a second, independent build

  assert (len(a.train_y), len(a.val_y), len(a.test_y)) == (1078, 269, 450)
  assert a.num_classes == 10 and a.class_names == tuple("0123456789")
  for field in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
    assert np.array_equal(getattr(a, field), getattr(b, field)), field
  assert a.train_x.dtype == np.uint8 and a.train_x.shape[1:] == (32, 32, 3)
  assert a.train_y.dtype == np.int32
  # The stored split is the generated one (PNG is lossless), up to TFDS's record order.
  x, y = digits.generate("test")
  assert _sorted_rows(x) == _sorted_rows(a.test_x)
  assert np.array_equal(_counts(y, 10), _counts(a.test_y, 10))


def test_glyph_tfds_build(tmp_path):
  data = load("glyphs_new_classes", data_dir=str(tmp_path))
  assert data.class_names == glyphs.GREEK_NAMES
  for labels, n in ((data.train_y, 100), (data.val_y, 25), (data.test_y, 50)):
    assert (_counts(labels, 12) == n).all()
  x, _ = glyphs.generate("new_classes", "validation")
  assert _sorted_rows(x) == _sorted_rows(data.val_x)


def test_loaded_arrays_are_cached_and_read_only(digits_dir):
  a = load("digits", data_dir=digits_dir)
  assert load("digits", data_dir=digits_dir).train_x is a.train_x
  with pytest.raises(ValueError):
    a.train_x[0, 0, 0, 0] = 1


# --- k-shot --------------------------------------------------------------------------------

def test_k_shot_subsets(digits_dir):
  full = load("digits", data_dir=digits_dir)
  five = load("digits", data_dir=digits_dir, k_shot=5, seed=3)
  assert (_counts(five.train_y, 10) == 5).all()
  assert five.train_x.shape == (50, 32, 32, 3)
  assert np.array_equal(five.test_x, full.test_x) and np.array_equal(five.val_y, full.val_y)
  again = load("digits", data_dir=digits_dir, k_shot=5, seed=3)
  assert np.array_equal(again.train_x, five.train_x)
  other = load("digits", data_dir=digits_dir, k_shot=5, seed=4)
  assert not np.array_equal(other.train_x, five.train_x)
  # Each kept example is a training example, with its own label.
  rows = {x.tobytes(): y for x, y in zip(full.train_x, full.train_y)}
  assert all(rows[x.tobytes()] == y for x, y in zip(five.train_x, five.train_y))
  # With one seed, k-shot subsets grow by adding examples.
  ten = load("digits", data_dir=digits_dir, k_shot=10, seed=3)
  assert {x.tobytes() for x in five.train_x} <= {x.tobytes() for x in ten.train_x}


def test_k_shot_errors(digits_dir):
  with pytest.raises(UserError, match=r"k_shot=105 .* 104 training examples of class '8'"):
    load("digits", data_dir=digits_dir, k_shot=105)
  with pytest.raises(UserError, match="positive"):
    load("digits", data_dir=digits_dir, k_shot=0)
  assert (_counts(load("digits", data_dir=digits_dir, k_shot=104).train_y, 10) == 104).all()


def test_unknown_dataset_lists_choices(tmp_path):
  with pytest.raises(UserError) as err:
    load("cifar10", data_dir=str(tmp_path))
  assert str(err.value) == (
      "unknown dataset 'cifar10'; valid: digits, glyphs_feature_shift, glyphs_input_shift, "
      "glyphs_new_classes, glyphs_output_shift, glyphs_source, tfds:NAME, folder:PATH")
  assert not any(tmp_path.iterdir())


def test_registry():
  assert DATASETS["glyphs_source"].tfds_name == "tlr_glyphs/source"
  assert DATASETS["digits"][0] == "tlr_digits"
  assert all(spec.description for spec in DATASETS.values())


def test_default_data_dir(monkeypatch):
  monkeypatch.setenv("TLRESEARCH_DATA_DIR", "/some/where")
  assert default_data_dir() == "/some/where"
  monkeypatch.delenv("TLRESEARCH_DATA_DIR")
  assert default_data_dir().endswith(".cache/tlresearch/tensorflow_datasets")


# --- mocking -------------------------------------------------------------------------------

def test_mock_data_builds_nothing(tmp_path, digits_dir):
  with tfds.testing.mock_data(num_examples=20):
    data = load("digits", data_dir=str(tmp_path))
    mocked_cached_dir = load("digits", data_dir=digits_dir)  # the cache is bypassed too
  assert isinstance(data, Dataset)
  for x, y in ((data.train_x, data.train_y), (data.val_x, data.val_y),
               (data.test_x, data.test_y)):
    assert x.shape == (20, 32, 32, 3) and x.dtype == np.uint8
    assert y.shape == (20,) and y.dtype == np.int32 and 0 <= y.min() and y.max() < 10
  assert data.num_classes == 10
  assert len(mocked_cached_dir.train_y) == 20
  assert not any(tmp_path.iterdir())
  assert len(load("digits", data_dir=digits_dir).train_y) == 1078  # real data afterwards
  assert ("digits", str(tmp_path)) not in load_module._cache


def test_a_data_dir_with_the_older_tfrecord_build_is_rebuilt_once_saying_so(tmp_path, capsys):
  old = tmp_path / "tlr_digits" / "1.0.0"
  old.mkdir(parents=True)
  (old / "dataset_info.json").write_text("{}")  # a complete build of the old format
  data = load("digits", data_dir=str(tmp_path))
  err = capsys.readouterr().err
  assert f"building dataset digits into {tmp_path}" in err
  assert f"the older format in {old} is no longer read and may be deleted" in err
  assert len(data.train_y) == 1078 and (tmp_path / "tlr_digits" / "2.0.0").is_dir()
  load_module._cache.clear()
  assert len(load("digits", data_dir=str(tmp_path)).train_y) == 1078
  assert "building" not in capsys.readouterr().err  # built once

"""The data checks before training (tlresearch.data.checks) and the data card
(tlresearch.data.card): a table of bad image folders, each with what must happen."""
import logging
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from tlresearch import data as data_lib
from tlresearch.core.errors import UserError
from tlresearch.data import card, checks
from tests.experiment.test_reliability import _expect_bad_input


def _image(value: int, path) -> None:
  # Distinct content per value (a gradient plus the value): no accidental duplicates.
  a = (np.arange(8 * 8 * 3).reshape(8, 8, 3) * 3 + value * 17) % 256
  Image.fromarray(a.astype(np.uint8)).save(path)


def _folder(root, classes=("cat", "dog"), per_class=(4, 2, 2), splits=("train", "validation",
                                                                       "test")):
  value = 0
  for split, n in zip(splits, per_class):
    for c in classes:
      d = root / split / c
      d.mkdir(parents=True, exist_ok=True)
      for i in range(n):
        _image(value, d / f"{c}{i}.png")
        value += 1
  return root


def _load(root, **options):
  return data_lib.load(f"folder:{root}", options=options or None)


def test_a_clean_folder_has_no_warning_and_its_counts(tmp_path):
  root = _folder(tmp_path / "d")
  check = checks.inspect(_load(root))
  assert check.warnings == ()
  assert check.counts == {"train": [4, 4], "validation": [2, 2], "test": [2, 2]}
  assert check.duplicates == {} and check.conflicts["count"] == 0


def test_a_test_image_copied_from_train_is_counted_named_and_droppable(tmp_path):
  root = _folder(tmp_path / "d")
  shutil.copy(root / "train/cat/cat1.png", root / "test/cat/copy.png")
  shutil.copy(root / "train/dog/dog2.png", root / "test/dog/other.png")
  data = _load(root)
  check = checks.inspect(data)
  (warning,) = check.warnings
  assert warning.startswith(f"folder:{root}: 2 test images duplicate train images: ")
  assert f"{root}/test/cat/copy.png = {root}/train/cat/cat1.png" in warning
  assert "data.drop_duplicates=True" in warning
  assert check.duplicates["test~train"]["count"] == 2
  assert len(data.test_y) == 6  # reported, never silently dropped
  (tmp_path / "r").mkdir()
  card.write(str(tmp_path / "r"), [(data, check)], str(tmp_path))
  text = (tmp_path / "r" / "data.md").read_text()
  assert "- 2 test images that are also train images; first: " in text
  assert f"`{root}/test/cat/copy.png = {root}/train/cat/cat1.png`" in text
  assert (tmp_path / "r" / "data_folder-" f"{card.slug(str(root))}_8px.png").exists()
  dropped = _load(root, drop_duplicates=True)
  assert len(dropped.test_y) == 4 and len(dropped.val_y) == 4 and len(dropped.train_y) == 8
  assert any("dropped 0 validation and 2 test images" in n for n in dropped.notes)
  assert checks.inspect(dropped).warnings == ()
  assert "copy.png" not in " ".join(dropped.sources[2])


def test_copies_within_a_split_and_one_image_under_two_labels(tmp_path):
  root = _folder(tmp_path / "d")
  shutil.copy(root / "train/cat/cat0.png", root / "train/cat/again.png")
  shutil.copy(root / "train/cat/cat1.png", root / "train/dog/stray.png")
  check = checks.inspect(_load(root))
  assert check.duplicates["train"]["count"] == 2
  assert check.conflicts["count"] == 1
  assert f"{root}/train/cat/cat1.png ('cat', 'dog')" in check.conflicts["first"][0]
  assert any("under more than one label" in w for w in check.warnings)


def test_a_class_without_test_images_is_warned_of(tmp_path):
  root = _folder(tmp_path / "d", classes=("cat", "dog", "eel"))
  shutil.rmtree(root / "test/eel")
  check = checks.inspect(_load(root))
  (warning,) = check.warnings
  assert "1 class has no test image ('eel')" in warning and "macro-F1" in warning


def test_a_class_too_small_to_carve_validation_is_warned_of(tmp_path):
  root = tmp_path / "d"
  _folder(root, per_class=(6,), splits=("train",))
  for f in ["dog1.png", "dog2.png", "dog3.png", "dog4.png", "dog5.png"]:
    os.remove(root / "train/dog" / f)
  check = checks.inspect(_load(root))
  assert any("no validation image ('dog')" in w and "needs 2 training images" in w
             for w in check.warnings)


def test_macro_f1_is_over_the_classes_the_test_split_has():
  # What final_record computes: a class with no test example is not averaged in as 0.
  from sklearn import metrics as skm
  y, pred = np.array([0, 0, 1, 1]), np.array([0, 0, 1, 2])
  labels = np.unique(y).tolist()
  assert labels == [0, 1]
  assert skm.f1_score(y, pred, labels=labels, average="macro", zero_division=0) == \
      pytest.approx((1 + 2 / 3) / 2)


def _case_folded(root):
  _folder(root, classes=("Cat", "cat"))


def _one_class(root):
  _folder(root, classes=("cat",))


def _unicode_forms(root):
  _folder(root, classes=("caf\u00e9", "cafe\u0301"))  # é precomposed and decomposed


def _newline_in_a_class_name(root):
  _folder(root, classes=("cat", "do\ng"))


# (how the folder is made, expected message): one line, exit 2, nothing trained or written.
BAD_DATA = [
    (_case_folded, "classes 'Cat' and 'cat' differ only in case or Unicode form"),
    (_one_class, "has 1 class (cat): a classifier needs at least 2"),
    (_unicode_forms, "differ only in case or Unicode form"),
    (_newline_in_a_class_name, "class folder train/ 'do\\ng' holds a control character"),
]


@pytest.mark.parametrize("make, message", BAD_DATA, ids=[m for _, m in BAD_DATA])
def test_bad_data_table(tmp_path, monkeypatch, capsys, make, message):
  root = tmp_path / "images"
  make(root)
  _expect_bad_input(tmp_path, monkeypatch, capsys, [f"--config.targets=['folder:{root}']"],
                    message)


def test_inspect_raises_before_anything_else_for_a_class_without_training_images():
  from tlresearch.data.loader import Dataset
  x = np.zeros((4, 2, 2, 3), np.uint8)
  data = Dataset("toy", x, np.array([0, 0, 0, 0], np.int32), x[:1], np.array([1], np.int32),
                 x[:1], np.array([1], np.int32), num_classes=2, class_names=("a", "b"))
  with pytest.raises(UserError, match="toy: class 'b' has no training example"):
    checks.inspect(data)


def test_the_sweep_logs_each_warning_once_per_dataset(tmp_path, caplog):
  from experiments import finetune_sweep
  from tlresearch.experiment import cell as cell_lib, grid
  root = _folder(tmp_path / "d")
  shutil.copy(root / "train/cat/cat1.png", root / "validation/cat/copy.png")
  c = finetune_sweep.get_config()
  c.targets = [f"folder:{root}"]
  c.model.input_size = 8
  c.k_shot = 0
  with caplog.at_level(logging.WARNING, logger="tlresearch"):
    checked = cell_lib.check_all(grid.expand(c))
  lines = [r.getMessage() for r in caplog.records if "duplicate" in r.getMessage()]
  assert len(lines) == 1 and "1 validation image duplicates train images" in lines[0]
  assert len(checked) == 1 and checked[0][1].duplicates["validation~train"]["count"] == 1


# ---------------------------------------------------------------- names that are not UTF-8
# Linux gives a byte that is not UTF-8 to Python as a lone surrogate ("\udce9" for 0xe9):
# these paths are the names an old archive or file system would have.

def test_a_class_folder_whose_name_is_not_utf8_is_refused_in_one_line(tmp_path, monkeypatch,
                                                                      capsys):
  root = _folder(tmp_path / "images", classes=("cat", "caf\udce9"))
  _expect_bad_input(tmp_path, monkeypatch, capsys, [f"--config.targets=['folder:{root}']"],
                    f"folder:{root}: class folder train/ 'caf\\xe9' is not a UTF-8 name")


def test_a_dataset_path_that_is_not_utf8_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
  root = _folder(tmp_path / "images\udcff")
  _expect_bad_input(tmp_path, monkeypatch, capsys, [f"--config.targets=['folder:{root}']"],
                    "images\\xff']' is not a UTF-8 name")
  with pytest.raises(UserError, match=r"dataset folder '.*images\\xff' is not a UTF-8 name"):
    _load(root)  # the library, called without the command line


def test_file_names_that_are_not_utf8_are_read_and_shown_escaped(tmp_path):
  from tlresearch.data import folder
  from tlresearch.deploy import predict
  root = _folder(tmp_path / "d")
  shutil.copy(root / "train/cat/cat1.png", root / "test/cat/copy\udce9.png")
  (root / "train/dog/bad\udcfe.png").write_bytes(b"not an image")
  data = _load(root)
  assert len(data.test_y) == 5 and len(data.skipped) == 1  # read, as the OS gives them
  check = checks.inspect(data)
  (warning,) = check.warnings
  assert f"{root}/test/cat/copy\\xe9.png = {root}/train/cat/cat1.png" in warning
  (tmp_path / "r").mkdir()
  card.write(str(tmp_path / "r"), [(data, check)], str(tmp_path))
  text = (tmp_path / "r" / "data.md").read_text(encoding="utf-8")
  assert f"`{root}/test/cat/copy\\xe9.png = " in text and f"`{root}/train/dog/bad\\xfe.png`" in text
  # The folder's digest (what a cell records of it) and what predict prints: text too.
  assert len(folder.content_digest(str(root))) == 64
  csv = predict.csv_text([(str(root / "test/cat/copy\udce9.png"), [("cat", 0.9)])], 1)
  assert "copy\\xe9.png,cat,0.900000" in csv

"""Deployment: a kept model's exports give its probabilities (jax without tlresearch,
SavedModel, TFLite), predict labels files as training read them, bad input exits 2."""
import csv
import importlib.util
import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from tests.conftest import tiny_model_cfg
from tlresearch import models
from tlresearch.core.errors import UserError
from tlresearch.data import folder
from tlresearch.deploy import export, predict, recognizer
from tlresearch.training import checkpoint

SIZE, CLASSES = 16, ("cat", "dog", "eel")
HAS_TF = importlib.util.find_spec("tensorflow") is not None
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOL = 1e-5


def _card(style="standard"):
  cfg = ml_collections.ConfigDict({"target": "folder:pets", "seed": 0,
                                   "model": tiny_model_cfg(input_size=SIZE)})
  final = {"cell_id": "cell0", "strategy": "scratch", "hparams": {"lr": 0.1},
           "test_accuracy": 0.5, "test_macro_f1": 0.4, "val_accuracy": 0.6, "best_epoch": 1,
           "epochs_run": 1, "classification_report": {}}
  c = recognizer.card(cfg, final, CLASSES, (SIZE, SIZE), "standard")
  c["input"]["preprocessing"] = style
  return c


def _variables():
  """Seeded random variables of the tiny ResNet (filled on the host: no init to compile)."""
  module = models.build(tiny_model_cfg(input_size=SIZE), len(CLASSES))
  shapes = jax.eval_shape(module.init, jax.random.key(0), np.zeros((1, SIZE, SIZE, 3)))
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    name, shape = jax.tree_util.keystr(path), leaf.shape
    if name.endswith("['var']") or name.endswith("['scale']"):
      value = rng.uniform(0.5, 1.5, shape)
    elif name.endswith("['kernel']"):
      # A sharp head, so that different images get different labels.
      value = rng.normal(0, 1 / np.sqrt(np.prod(shape[:-1])), shape)
      if "['head']" in name:  # centred: the features' common part adds no class
        value = 30.0 * (value - value.mean(0))
    else:
      value = rng.normal(0, 0.1, shape)
    return value.astype(leaf.dtype)
  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def kept(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("kept") / "model")
  recognizer.save(path, _variables(), _card())
  return path


@pytest.fixture(scope="module")
def rec(kept):
  return recognizer.load(kept)


@pytest.fixture(scope="module")
def exported(kept, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("export") / "out")
  formats = ["jax", "saved_model", "tflite"] if HAS_TF else ["jax"]
  done = export.export(kept, out, formats, log=lambda _: None)
  assert [d["format"] for d in done] == formats
  return out


def _images(n, seed=1):
  return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


_JAX_ONLY = """
import sys, numpy as np, jax
exp = jax.export.deserialize(bytearray(open(sys.argv[1], "rb").read()))
for n in sys.argv[3:]:
  x = np.load(sys.argv[2])[:int(n)]
  np.save(f"{sys.argv[2]}.{n}.npy", np.asarray(exp.call(x)))
assert not any(m.split(".")[0] in ("tlresearch", "flax") for m in sys.modules), "imported"
"""


def test_jax_export_matches_the_kept_model_and_loads_with_jax_alone(rec, exported, tmp_path):
  x = _images(7)
  np.save(tmp_path / "x.npy", x)
  r = subprocess.run([sys.executable, "-c", _JAX_ONLY, os.path.join(exported, "model.jax"),
                      str(tmp_path / "x.npy"), "1", "7"], capture_output=True, text=True,
                     timeout=120, cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""})
  assert r.returncode == 0, r.stderr
  for n in (1, 7):
    got = np.load(tmp_path / f"x.npy.{n}.npy")
    assert got.shape == (n, len(CLASSES))
    assert np.max(np.abs(got - rec.probabilities(x[:n]))) <= TOL
  card = json.load(open(os.path.join(exported, "export.json")))
  assert card["class_names"] == list(CLASSES)
  assert card["input"] == rec.card["input"]
  assert card["source"] == {"cell_id": "cell0", "target": "folder:pets", "seed": 0,
                            "strategy": "scratch"}
  assert card["metrics"]["test_accuracy"] == 0.5 and "jax" in card["how_to_load"]
  assert json.load(open(os.path.join(exported, "model_card.json"))) == rec.card


@pytest.mark.skipif(not HAS_TF, reason="TensorFlow is not installed")
def test_saved_model_matches_the_kept_model(rec, exported):
  import tensorflow as tf
  serve = tf.saved_model.load(os.path.join(exported, "saved_model")).signatures["serving_default"]
  x = _images(7)
  for n in (1, 7):
    got = serve(images=tf.constant(x[:n]))["probabilities"].numpy()
    assert got.shape == (n, len(CLASSES))
    assert np.max(np.abs(got - rec.probabilities(x[:n]))) <= TOL


@pytest.mark.skipif(not HAS_TF, reason="TensorFlow is not installed")
@pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated")
def test_tflite_converts_and_matches_the_kept_model(rec, exported):
  # TensorFlow 2.21's converter legalizes the XlaCallModule's StableHLO to builtin ops.
  import tensorflow as tf
  run = tf.lite.Interpreter(model_path=os.path.join(exported, "model.tflite")) \
      .get_signature_runner("serving_default")
  x = _images(7)
  for n in (1, 7):
    got = run(images=x[:n])["probabilities"]
    assert got.shape == (n, len(CLASSES))
    assert np.max(np.abs(got - rec.probabilities(x[:n]))) <= TOL


@pytest.mark.skipif(not HAS_TF, reason="TensorFlow is not installed")
def test_a_caffe_model_exports_to_tflite_and_matches(tmp_path):
  # `caffe` preprocessing (VGG16, ResNet50) flips channels; as a slice with a symbolic batch
  # that was a dynamic gather, which TFLite's converter refused.
  kept = str(tmp_path / "caffe")
  recognizer.save(kept, _variables(), _card("caffe"))
  export.export(kept, str(tmp_path / "out"), ["tflite"], log=lambda _: None)
  import tensorflow as tf
  run = tf.lite.Interpreter(str(tmp_path / "out" / export.TFLITE_FILE)).get_signature_runner()
  x = np.random.default_rng(3).integers(0, 256, (7, SIZE, SIZE, 3), dtype=np.uint8)
  got = run(images=x)["probabilities"]
  assert np.max(np.abs(got - recognizer.load(kept).probabilities(x))) <= TOL


def test_export_refuses_a_non_empty_out_unless_overwrite(kept, tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "old.txt").write_text("keep me")
  with pytest.raises(UserError, match="exists and is not empty: pass --overwrite"):
    export.export(kept, str(out), ["jax"], log=lambda _: None)
  assert os.listdir(out) == ["old.txt"]
  lines = []
  export.export(kept, str(out), ["jax"], overwrite=True, log=lines.append)
  assert sorted(os.listdir(out)) == ["export.json", "model.jax", "model_card.json"]
  assert len(lines) == 1 and lines[0].startswith(f"jax: {out / 'model.jax'} (")
  with pytest.raises(UserError, match="holds the kept model"):
    export.export(kept, os.path.dirname(kept), ["jax"], overwrite=True, log=lambda _: None)


def test_tf_formats_without_tensorflow_name_the_install_command(kept, tmp_path, monkeypatch):
  def missing():
    raise ImportError("No module named 'tensorflow'")
  monkeypatch.setattr(export, "_tf", missing)
  with pytest.raises(UserError, match=r'need TensorFlow .*: pip install -e "\.\[tf\]"$'):
    export.export(kept, str(tmp_path / "out"), ["jax", "saved_model"], log=lambda _: None)
  assert os.listdir(tmp_path) == []


def _write_images(root):
  """Good images of several sizes and formats, a broken JPEG, a text file, hidden files."""
  rng = np.random.default_rng(2)
  (root / "sub").mkdir(parents=True)
  (root / ".hidden").mkdir()
  def px(*shape, lo=0, hi=256):
    return rng.integers(lo, hi, shape, dtype=np.uint8)
  Image.fromarray(px(40, 50, 3, hi=90)).save(root / "a.png")
  Image.fromarray(px(64, 64, 3, lo=150)).save(root / "b.jpg", quality=90)  # JPEG draft: 1/4
  Image.fromarray(px(30, 20)).save(root / "sub" / "c.bmp")                 # greyscale
  Image.fromarray(px(16, 16, 4)).save(root / "sub" / "d.webp")             # alpha dropped
  Image.fromarray(px(24, 24, 3)).convert("P").save(root / "sub" / "e.gif")  # palette
  Image.fromarray(px(70, 33, 3, lo=100, hi=200)).save(root / "f.tiff")
  (root / "broken.jpg").write_bytes((root / "b.jpg").read_bytes()[:300])
  (root / "notes.txt").write_text("not an image")
  (root / ".hidden.png").write_bytes((root / "a.png").read_bytes())
  (root / ".hidden" / "g.png").write_bytes((root / "a.png").read_bytes())
  good = ["a.png", "b.jpg", "f.tiff", "sub/c.bmp", "sub/d.webp", "sub/e.gif"]
  return [str(root / g) for g in good], [str(root / "broken.jpg"), str(root / "notes.txt")]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  return _write_images(tmp_path_factory.mktemp("images") / "photos")


def test_predict_labels_files_as_training_read_them(rec, kept, exported, images):
  good, bad = images
  # What training's folder reader makes of each file, through the kept model.
  expected = rec.probabilities(np.stack([folder._decode(p, SIZE) for p in good]))
  assert len(set(np.argmax(expected, -1))) >= 2  # the check can tell labels apart
  for model_dir in (kept, exported):
    results, skipped = predict.predict(model_dir, [os.path.dirname(good[0])], top_k=3,
                                       batch_size=4)
    assert [p for p, _ in results] == good and skipped == sorted(bad)
    for (path, labels), probs in zip(results, expected):
      assert labels[0][0] == CLASSES[int(np.argmax(probs))]
      got = np.array([dict(labels)[c] for c in CLASSES])
      assert np.max(np.abs(got - probs)) <= TOL
      assert [p for _, p in labels] == sorted((p for _, p in labels), reverse=True)
  assert predict.read_image(good[0], (8, 12)).shape == (8, 12, 3)  # a non-square input size


def test_predict_command_prints_reports_and_writes_csv(exported, images, tmp_path):
  good, bad = images
  out = tmp_path / "predictions.csv"
  r = subprocess.run([sys.executable, "-m", "tlresearch.deploy.predict", f"--model={exported}",
                      "--top_k=2", f"--out={out}", os.path.dirname(good[0])],
                     capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert r.returncode == 0, r.stderr
  expected, _ = predict.predict(exported, [os.path.dirname(good[0])], top_k=2)
  lines = r.stdout.splitlines()
  assert lines == [p + "".join(f"\t{label} {q:.3f}" for label, q in labels)
                   for p, labels in expected]
  err = r.stderr.splitlines()
  assert [f"skipped: {b} (not a readable image)" for b in sorted(bad)] == err[:2]
  assert err[-1].startswith(f"{len(good)} images, 2 skipped, ") and "images/s" in err[-1]
  rows = list(csv.reader(open(out)))
  assert rows[0] == ["path", "rank1_label", "rank1_prob", "rank2_label", "rank2_prob"]
  assert [row[0] for row in rows[1:]] == good
  assert [row[1] for row in rows[1:]] == [labels[0][0] for _, labels in expected]


def test_predict_exits_1_when_no_image_is_readable(exported, images, capsys):
  _, bad = images
  assert predict.main([f"--model={exported}", *bad]) == 1
  err = capsys.readouterr().err
  assert "skipped: " in err and err.splitlines()[-1].startswith("0 images, 2 skipped")


def test_predict_walks_a_folder_as_training_does_each_file_once(tmp_path):
  root, outside = tmp_path / "photos", tmp_path / "outside"
  (root / "a").mkdir(parents=True)
  outside.mkdir()
  for path in (root / "a" / "x.png", outside / "y.png"):
    path.write_bytes(b"not read here")
  os.link(root / "a" / "x.png", root / "a" / "x_again.png")  # a hard link: one file
  os.symlink("..", root / "a" / "loop")                     # a loop back into the folder
  os.symlink(outside, root / "a" / "out")                    # a link out of it: followed
  notes = []
  files = predict.image_files([str(root)], notes)
  assert files == [str(root / "a" / "out" / "y.png"), str(root / "a" / "x.png")]
  assert len(notes) == 2 and any("loop" in n for n in notes)
  assert any("x_again.png (the same file" in n for n in notes)


def test_model_card_round_trip(rec, kept):
  card = recognizer.read_card(kept)
  assert card == _card() | {"created": card["created"]}
  assert rec.class_names == list(CLASSES) and rec.image_size == (SIZE, SIZE)
  assert rec.card["input"] == {"height": SIZE, "width": SIZE, "channels": 3, "dtype": "uint8",
                               "color": "RGB", "resize": "pillow_bilinear_antialiased",
                               "preprocessing": "standard", "decode": "draft"}
  saved = jax.tree_util.tree_leaves_with_path(_variables())
  loaded = jax.tree_util.tree_leaves_with_path(rec.variables)
  assert [p for p, _ in saved] == [p for p, _ in loaded]
  for (_, a), (_, b) in zip(saved, loaded):
    assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
  assert checkpoint.checksum(rec.variables) == checkpoint.checksum(_variables())


@pytest.mark.parametrize("change, problem", [
    (lambda c: c.pop("class_names"), "class_names must be a non-empty list"),
    (lambda c: c["input"].update(height="16"), "input.height must be an integer >= 1"),
    (lambda c: c["input"].update(preprocessing="bgr"), "input.preprocessing must be one of"),
    (lambda c: c["input"].update(decode="lazy"), "input.decode must be one of draft, full"),
])
def test_a_damaged_card_is_a_one_line_error(kept, tmp_path, change, problem):
  import shutil
  copy = tmp_path / "copy"
  shutil.copytree(kept, copy)
  card = json.loads((copy / recognizer.CARD).read_text())
  change(card)
  (copy / recognizer.CARD).write_text(json.dumps(card))
  with pytest.raises(UserError, match=f"is damaged: {problem}"):
    recognizer.load(str(copy))
  (copy / recognizer.CARD).write_text("[1, 2]")
  with pytest.raises(UserError, match="has format None"):
    recognizer.read_card(str(copy))


def test_probabilities_come_in_chunks_of_one_compiled_shape(rec):
  x = np.random.default_rng(5).integers(0, 256, (recognizer.CHUNK + 3, SIZE, SIZE, 3),
                                        dtype=np.uint8)
  whole = rec.probabilities(x)
  assert whole.shape == (recognizer.CHUNK + 3, len(CLASSES))
  np.testing.assert_allclose(whole[-3:], rec.probabilities(x[-3:]), atol=1e-6)


@pytest.mark.parametrize("command, args, message", [
    ("export", ["--model={tmp}", "--out={tmp}/out"], "is not a kept model: no readable "
     "model_card.json"),
    ("export", ["--model={kept}", "--out={tmp}/out", "--format=jax,onnx"],
     "unknown format 'onnx'; valid: jax, saved_model, tflite"),
    ("export", ["--model={kept}", "--out={tmp}/out", "--fromat=jax"], "unknown flag '--fromat'"),
    ("predict", ["--model={tmp}", "{tmp}"], "is not a kept model: no readable model_card.json"),
])
def test_bad_input_exits_2_with_one_line(kept, tmp_path, command, args, message):
  args = [a.format(tmp=tmp_path, kept=kept) for a in args]
  r = subprocess.run([sys.executable, "-m", f"tlresearch.deploy.{command}", *args],
                     capture_output=True, text=True, timeout=120, cwd=ROOT)
  assert r.returncode == 2, r.stderr
  assert r.stderr.startswith("error: ") and message in r.stderr
  assert len(r.stderr.strip().splitlines()) == 1 and r.stdout == ""
  assert os.listdir(tmp_path) == []  # nothing written

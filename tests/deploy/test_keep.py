"""save_model: which trained models a sweep keeps, with their model cards, through resume,
sharded tasks and --merge; a kept model exported and predicted. (Slow group: real sweeps,
which share their compiled programs within the process.)"""
import json
import os

import numpy as np
import pytest
from PIL import Image

from experiments import finetune_sweep
from tests.conftest import tiny_train_cfg
from tlresearch.core.errors import UserError
from tlresearch.deploy import export, predict, recognizer
from tlresearch.experiment import sweep


def _folder(root, classes=("cat", "dog", "eel"), n=(8, 3)):
  rng = np.random.default_rng(0)
  for split, count in zip(("train", "test"), n):
    for c, name in enumerate(classes):
      (root / split / name).mkdir(parents=True)
      for i in range(count):
        px = np.clip(rng.normal(50 + 70 * c, 30, (18, 20, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(px).save(root / split / name / f"{i}.png")
  return root


def _config(tmp_path, save_model):
  c = finetune_sweep.get_config()
  c.targets = [f"folder:{_folder(tmp_path / 'imgs')}"] if not (tmp_path / "imgs").exists() \
      else [f"folder:{tmp_path / 'imgs'}"]
  c.seeds, c.k_shot = [0, 1], 0
  c.model.width, c.model.input_size = 4, 16
  c.train = tiny_train_cfg(epochs=1)
  c.selection.enabled = False
  c.cache_dir, c.data_dir = str(tmp_path / "cache"), str(tmp_path / "data")
  # scratch needs no pretrained backbone; two configurations, two seeds each.
  c.grid = [{"strategy": ["scratch"], "model.dropout_rate": [0.0, 0.5]}]
  c.save_model = save_model
  return c


def _run(tmp_path, c, **kw):
  return sweep.run_grid(c, "keep", str(tmp_path / "work"), str(tmp_path / "results"),
                        progress=False, **kw)


def _kept(tmp_path):
  """The cell ids of the store's folders that hold a kept model."""
  cells = tmp_path / "work" / "cells"
  return sorted(json.loads((cells / d / "config.json").read_text())["cell_id"]
                for d in os.listdir(cells) if recognizer.has_model(str(cells / d)))


def _finals(tmp_path):
  out = {}
  for d in os.listdir(tmp_path / "work" / "cells"):
    p = tmp_path / "work" / "cells" / d / "final.json"
    if p.exists():
      final = json.loads(p.read_text())
      out[final["cell_id"]] = final
  return out


@pytest.mark.slow
def test_best_keeps_the_best_configurations_best_seed_with_its_card(tmp_path):
  _run(tmp_path, _config(tmp_path, "best"))
  finals = _finals(tmp_path)
  by_config = {}
  for f in finals.values():
    by_config.setdefault(f["axes"]["model.dropout_rate"], []).append(f)
  # Ties go to the first configuration in grid order (dropout 0.0, then 0.5).
  best_config = max((by_config[k] for k in sorted(by_config)),
                    key=lambda fs: np.mean([f["val_accuracy"] for f in fs]))
  want = max(sorted(best_config, key=lambda f: f["seed"]), key=lambda f: f["val_accuracy"])
  assert _kept(tmp_path) == [want["cell_id"]]
  record = json.loads((tmp_path / "work" / "kept" / "keep.json").read_text())
  (target,) = record["best"]
  assert record["best"][target]["cell_id"] == want["cell_id"]
  # The card round trip: what the model is, how to feed it, how it scored.
  path = record["best"][target]["model"]
  card = recognizer.read_card(path)
  assert card["class_names"] == ["cat", "dog", "eel"] and card["strategy"] == "scratch"
  assert card["input"] == {"height": 16, "width": 16, "channels": 3, "dtype": "uint8",
                           "color": "RGB", "resize": recognizer.RESIZE,
                           "preprocessing": "standard", "decode": "draft"}
  assert card["metrics"]["test_accuracy"] == want["test_accuracy"]
  assert card["config"]["model"]["dropout_rate"] == want["axes"]["model.dropout_rate"]
  r = recognizer.load(path)
  probs = r.probabilities(np.zeros((3, 16, 16, 3), np.uint8))
  assert probs.shape == (3, 3) and np.allclose(probs.sum(-1), 1, atol=1e-6)

  # Deploy it: export, then predict the test folder (plus two bad files) from the export.
  out = tmp_path / "export"
  export.export(path, str(out), ["jax"], log=lambda _: None)
  test_dir = tmp_path / "imgs" / "test"
  (test_dir / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
  (test_dir / "notes.txt").write_text("not an image")
  results, skipped = predict.predict(str(out), [str(test_dir)], top_k=1)
  assert sorted(os.path.basename(p) for p in skipped) == ["broken.jpg", "notes.txt"]
  # The same labels as the kept model in this process, and the cell's own test accuracy.
  files = [p for p, _ in results]
  images = np.stack([predict.read_image(p, (16, 16), "draft") for p in files])
  in_process = np.asarray(r.class_names)[r.probabilities(images).argmax(-1)]
  assert [labels[0][0] for _, labels in results] == list(in_process)
  correct = [labels[0][0] == os.path.basename(os.path.dirname(p)) for p, labels in results]
  assert np.float32(np.mean(correct)) == np.float32(want["test_accuracy"])


@pytest.mark.slow
def test_all_keeps_every_final_cell_and_none_keeps_nothing(tmp_path):
  _run(tmp_path, _config(tmp_path, "all"))
  assert len(_kept(tmp_path)) == 4
  assert len(os.listdir(tmp_path / "work" / "cells")) == 4  # no selection cells
  _run(tmp_path, _config(tmp_path, "none"), overwrite=True)
  assert _kept(tmp_path) == [] and not (tmp_path / "work" / "kept" / "keep.json").exists()


@pytest.mark.slow
def test_resume_keeps_the_best_by_retraining_only_that_cell(tmp_path, caplog):
  _run(tmp_path, _config(tmp_path, "none"))
  before = _finals(tmp_path)
  caplog.set_level("INFO", logger="tlresearch")
  summary = _run(tmp_path, _config(tmp_path, "best"))
  assert summary["reused"] == 4  # no cell trained for the table ...
  (kept,) = _kept(tmp_path)      # ... one trained again to keep its model,
  assert sum("retraining" in r.getMessage() for r in caplog.records) == 1
  after = _finals(tmp_path)
  for k in ("test_accuracy", "val_accuracy", "classification_report"):  # bitwise the same
    assert after[kept][k] == before[kept][k]
  assert not any("differs from its first run" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_sharded_tasks_keep_every_model_and_merge_keeps_the_best(tmp_path):
  c = _config(tmp_path, "best")
  for i in range(2):
    _run(tmp_path, c, task_index=i, num_tasks=2)
  assert len(_kept(tmp_path)) == 4  # the best is known only at the merge
  sweep.merge_grid(c, "keep", str(tmp_path / "work"), str(tmp_path / "results"))
  assert len(_kept(tmp_path)) == 1


@pytest.mark.slow
def test_merge_fails_when_the_best_cell_kept_no_model(tmp_path):
  c = _config(tmp_path, "none")
  for i in range(2):
    _run(tmp_path, c, task_index=i, num_tasks=2)
  c = _config(tmp_path, "best")
  with pytest.raises(UserError, match="finished without save_model; rerun the task"):
    sweep.merge_grid(c, "keep", str(tmp_path / "work"), str(tmp_path / "results"))
  with pytest.raises(UserError, match="save_model must be one of all, best, none"):
    _run(tmp_path, _config(tmp_path, "some"))

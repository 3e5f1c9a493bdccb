"""No silent corruption, no tracebacks: image folders read exactly once and faithfully, the
file system checked before training and its later refusals reported in one line, finished
cells that mean what they say, SIGTERM, damaged datasets. (Bad config values and overrides
the grid would ignore: the table in tests/test_reliability.py.)"""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from tests.deploy.test_keep import _config as _folder_sweep_config
from tests.deploy.test_keep import _folder
from tlresearch import data as data_lib
from tlresearch.core import io
from tlresearch.core.errors import UserError
from tlresearch.data import folder
from tlresearch.experiment import cli as run, sweep


def _png(path, value, size=(6, 6)):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.full((*size, 3), value, np.uint8)).save(path)


def _load(root, **opts):
  return data_lib.load(f"folder:{root}", image_size=6, options=opts)


# ---------------------------------------------------------------- folders

def test_a_link_back_up_the_tree_adds_no_image_and_no_label(tmp_path):
  root = tmp_path / "ds"
  for c, v in (("a", 10), ("b", 120), ("c", 240)):
    for i in range(4):
      _png(root / "train" / c / f"{i}.png", v + i)
  os.symlink("..", root / "train" / "a" / "loop")            # train/a/loop -> train
  os.symlink(root / "train" / "b", root / "train" / "a" / "b_again")
  d = _load(root)
  # 12 images in all (train + the carved validation and test), each with its own folder's label.
  x = np.concatenate([d.train_x, d.val_x, d.test_x])
  y = np.concatenate([d.train_y, d.val_y, d.test_y])
  assert len(x) == 12
  for label, base in enumerate((10, 120, 240)):
    assert set(x[y == label][:, 0, 0, 0]) <= set(range(base, base + 4))
  # No image is in two splits (no leakage through the carve).
  pixels = [tuple(p) for p in x[:, 0, 0, :]]
  assert len(set(pixels)) == 12
  assert any("links not followed" in n and "loop" in n for n in d.notes)


def test_a_file_is_counted_once_whatever_links_reach_it(tmp_path):
  root = tmp_path / "ds"
  for c, v in (("a", 10), ("b", 200)):
    for i in range(3):
      _png(root / "train" / c / f"{i}.png", v + i)
      _png(root / "test" / c / f"t{i}.png", v + 50 + i)
  os.link(root / "train" / "a" / "0.png", root / "test" / "a" / "hard.png")   # a hard link
  os.symlink(root / "train" / "b" / "1.png", root / "test" / "b" / "soft.png")
  d = _load(root)
  assert len(d.train_x) + len(d.val_x) == 6 and len(d.test_x) == 6  # the links add nothing
  assert not set(d.test_x[:, 0, 0, 0]) & {10, 201}


def test_links_outside_the_dataset_only_when_allowed(tmp_path):
  root, outside = tmp_path / "ds", tmp_path / "elsewhere"
  for c in ("a", "b"):
    for i in range(3):
      _png(root / "train" / c / f"{i}.png", 20 + 100 * (c == "b") + i)
  for i in range(2):
    _png(outside / f"{i}.png", 90 + i)
  os.symlink(outside, root / "train" / "a" / "more")
  before = _load(root)
  n = len(before.train_x) + len(before.val_x) + len(before.test_x)
  assert n == 6 and any("outside the dataset" in note for note in before.notes)
  after = _load(root, follow_external_links=True)
  assert len(after.train_x) + len(after.val_x) + len(after.test_x) == 8


@pytest.mark.parametrize("mode, array, expected", [
    # 16-bit grey: scaled from 0..65535, not clipped (a clip makes everything above 255 white)
    ("I;16", np.array([[0, 257 * 100], [65535, 257 * 3]], np.uint16), [[0, 100], [255, 3]]),
    ("I", np.array([[0, 257 * 100], [65535, 257 * 3]], np.int32), [[0, 100], [255, 3]]),
    ("F", np.array([[0.0, 0.5], [1.0, 0.25]], np.float32), [[0, 128], [255, 64]]),
    ("L", np.array([[0, 100], [255, 3]], np.uint8), [[0, 100], [255, 3]]),
])
def test_bit_depths_are_scaled_to_8_bits(tmp_path, mode, array, expected):
  img = Image.fromarray(array) if mode != "F" else Image.fromarray(array, "F")
  if mode == "I":
    img = img.convert("I")
  assert img.mode == mode
  rgb = np.asarray(folder.to_rgb(img))
  assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
  np.testing.assert_array_equal(rgb[..., 0], np.asarray(expected))
  assert (rgb[..., 0] == rgb[..., 2]).all()


def test_a_16_bit_png_file_reads_scaled(tmp_path):
  ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
  Image.fromarray(ramp).save(tmp_path / "deep.png")  # a 16-bit greyscale PNG
  got = folder._decode(str(tmp_path / "deep.png"), None)[..., 0]
  np.testing.assert_array_equal(got, np.round(ramp / 257.0).astype(np.uint8))
  assert (got < 255).mean() > 0.9  # the clip made 99.6% white


@pytest.mark.parametrize("mode", ["LA", "P", "RGBA", "CMYK", "1", "RGB"])
def test_every_pillow_mode_becomes_rgb_as_pillow_converts_it(mode):
  base = Image.fromarray(np.random.default_rng(0).integers(0, 256, (4, 4, 3), dtype=np.uint8))
  img = base.convert(mode)
  np.testing.assert_array_equal(np.asarray(folder.to_rgb(img)), np.asarray(img.convert("RGB")))


def test_images_of_other_sizes_name_the_files(tmp_path):
  root = tmp_path / "ds"
  _png(root / "train" / "a" / "small.png", 10, (6, 6))
  _png(root / "train" / "a" / "large.png", 10, (9, 7))
  _png(root / "train" / "b" / "x.png", 10, (6, 6))
  with pytest.raises(UserError, match=r"large.png is 9x7, .*small.png is 6x6\): set "
                     r"model.input_size to resize them all, e.g. --config.model.input_size"):
    data_lib.load(f"folder:{root}")


# ---------------------------------------------------------------- the file system

def _cli(monkeypatch, capsys, argv):
  import logging
  # A fresh log handler on this test's stdout (an earlier cli() bound one to its own).
  monkeypatch.setattr(logging.getLogger("tlresearch"), "handlers", [])
  monkeypatch.setattr(sys, "argv", ["tlresearch.run", *argv])
  with pytest.raises(SystemExit) as e:
    run.cli()
  err = capsys.readouterr().err
  assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
  return e.value.code, err


def _sweep_args(tmp_path, work, results):
  root = _folder(tmp_path / "imgs") if not (tmp_path / "imgs").exists() else tmp_path / "imgs"
  return ["--experiment=finetune_sweep", f"--workdir={work}", f"--results_dir={results}",
          "--no_progress", f"--config.targets=['folder:{root}']", "--config.seeds=[0]",
          "--config.k_shot=0", "--config.model.width=4", "--config.model.input_size=16",
          "--config.train.epochs=1", "--config.selection.enabled=False",
          f"--config.cache_dir={tmp_path / 'cache'}", f"--config.data_dir={tmp_path / 'data'}",
          "--config.grid=[{'strategy': ['scratch']}]"]


@pytest.mark.parametrize("case, message", [
    ("results_is_a_file", "exists and is not a folder"),
    ("workdir_under_a_file", "the workdir (--workdir)"),
    ("workdir_inside_results", "is inside"),
    ("foreign_results", "is not an earlier output of this project"),
    ("results_is_a_link", "is a symbolic link"),
    ("a_foreign_file_among_the_tables", "notes.md was not written by this project"),
])
def test_folders_that_cannot_be_written_fail_before_training(tmp_path, monkeypatch, capsys,
                                                              case, message):
  work, results = tmp_path / "work", tmp_path / "results"
  if case == "results_is_a_file":
    results.write_text("not a folder")
  elif case == "workdir_under_a_file":
    (tmp_path / "file").write_text("x")
    work = tmp_path / "file" / "work"
  elif case == "workdir_inside_results":
    work = results / "finetune_sweep" / "work"
  elif case == "foreign_results":
    (results / "finetune_sweep").mkdir(parents=True)
    (results / "finetune_sweep" / "thesis.tex").write_text("months of work")
  elif case == "a_foreign_file_among_the_tables":
    (results / "finetune_sweep").mkdir(parents=True)
    for n in ("runs.csv", "table.md"):
      (results / "finetune_sweep" / n).write_text("earlier tables")
    (results / "finetune_sweep" / folder_manifest()).write_text("runs.csv\ntable.md\n")
    (results / "finetune_sweep" / "notes.md").write_text("my notes on these tables")
  elif case == "results_is_a_link":
    (tmp_path / "real").mkdir()
    results.mkdir()
    os.symlink(tmp_path / "real", results / "finetune_sweep")
  code, err = _cli(monkeypatch, capsys, _sweep_args(tmp_path, work, results))
  assert code == 2 and message in err, err
  assert not (tmp_path / "cache" / "jax_compilation_cache").exists()  # before anything ran
  if case == "foreign_results":
    assert (results / "finetune_sweep" / "thesis.tex").read_text() == "months of work"
  if case == "a_foreign_file_among_the_tables":
    assert (results / "finetune_sweep" / "notes.md").exists()


def folder_manifest():
  from tlresearch.analysis import report
  return report.MANIFEST


@pytest.mark.slow
def test_an_os_error_mid_sweep_is_one_line_exit_3_and_releases_the_lock(tmp_path, monkeypatch,
                                                                         capsys):
  real = io.write_text

  def full_disk(path, text):
    if path.endswith("final.json"):
      raise OSError(errno.ENOSPC, "No space left on device", path)
    return real(path, text)

  monkeypatch.setattr(io, "write_text", full_disk)
  work = tmp_path / "work"
  code, err = _cli(monkeypatch, capsys, _sweep_args(tmp_path, work, tmp_path / "results"))
  assert code == 3 and err.startswith("error: No space left on device: ") and "final.json" in err
  assert not (tmp_path / "results").exists()
  lock = io.directory_lock(str(work))
  assert lock.acquire()  # released
  lock.release()
  monkeypatch.setattr(io, "write_text", real)  # the disk has room again: the same command
  assert run.main(_sweep_args(tmp_path, work, tmp_path / "results")) == 0
  assert (tmp_path / "results" / "finetune_sweep" / "runs.csv").exists()


def test_sigterm_is_handled_as_an_interrupt(monkeypatch, capsys):
  def terminated(argv):
    run._on_sigterm(signal.SIGTERM, None)

  monkeypatch.setattr(run, "main", terminated)
  monkeypatch.setattr(sys, "argv", ["tlresearch.run"])
  with pytest.raises(SystemExit) as e:
    run.cli()
  err = capsys.readouterr().err
  assert e.value.code == 143
  assert err.startswith("terminated (SIGTERM): finished cells and checkpoints are kept")


# ---------------------------------------------------------------- finished cells

@pytest.mark.slow
def test_a_final_json_that_only_says_ok_is_retrained_not_reused(tmp_path, caplog):
  c = _folder_sweep_config(tmp_path, "none")
  sweep.run_grid(c, "keep", str(tmp_path / "work"), str(tmp_path / "results"), progress=False)
  work = tmp_path / "work" / "cells"
  cell = sorted(os.listdir(work))[0]
  before = json.loads((work / cell / "final.json").read_text())
  (work / cell / "final.json").write_text(json.dumps({"status": "ok"}))
  caplog.set_level("WARNING", logger="tlresearch")
  summary = sweep.run_grid(c, "keep", str(tmp_path / "work"), str(tmp_path / "results"),
                           progress=False)
  assert summary["reused"] == 3
  assert any("final.json cannot be reused (it has no 'cell_id')" in r.getMessage()
             for r in caplog.records)
  after = json.loads((work / cell / "final.json").read_text())
  assert after["test_accuracy"] == before["test_accuracy"]


@pytest.mark.slow
def test_a_changed_folder_is_not_served_by_old_cells(tmp_path):
  c = _folder_sweep_config(tmp_path, "none")
  work = str(tmp_path / "work")
  sweep.run_grid(c, "keep", work, str(tmp_path / "results"), progress=False)
  assert sweep.run_grid(c, "keep", work, str(tmp_path / "results"),
                        progress=False)["reused"] == 4
  time.sleep(0.01)
  _png(tmp_path / "imgs" / "train" / "cat" / "new.png", 77, (18, 20))
  assert sweep.run_grid(c, "keep", work, str(tmp_path / "results"),
                        progress=False)["reused"] == 0


# ---------------------------------------------------------------- damaged datasets

def test_a_damaged_builtin_dataset_is_rebuilt_with_a_warning(tmp_path, caplog):
  data_dir = str(tmp_path / "data")
  first = data_lib.load("digits", data_dir=data_dir)
  shards = [os.path.join(r, f) for r, _, fs in os.walk(data_dir) for f in fs
            if "array_record" in f and "train" in f]
  assert shards
  with open(shards[0], "r+b") as f:  # zero 4 KiB in the middle of a shard
    f.seek(os.path.getsize(shards[0]) // 2)
    f.write(b"\0" * 4096)
  sys.modules["tlresearch.data.loader"]._cache.clear()  # a new process would read the files
  caplog.set_level("WARNING", logger="tlresearch")
  again = data_lib.load("digits", data_dir=data_dir)
  assert any("cannot be read" in r.getMessage() and "rebuilding it" in r.getMessage()
             for r in caplog.records)
  np.testing.assert_array_equal(again.train_x, first.train_x)
  np.testing.assert_array_equal(again.test_y, first.test_y)


@pytest.mark.slow
def test_a_real_sigterm_keeps_progress_releases_the_lock_and_resumes(tmp_path):
  work = tmp_path / "work"
  args = _sweep_args(tmp_path, work, tmp_path / "results") + [
      "--config.train.epochs=400", "--config.train.early_stopping.enabled=False",
      "--config.checkpoint.min_seconds=0"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  p = subprocess.Popen([sys.executable, "-m", "tlresearch.run", *args], env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 240
  while time.monotonic() < deadline and not list(work.glob("cells/*/checkpoints/step-*")):
    time.sleep(0.2)
  assert list(work.glob("cells/*/checkpoints/step-*")), "training never started"
  p.send_signal(signal.SIGTERM)
  _, err = p.communicate(timeout=120)
  assert p.returncode == 143, err[-2000:]
  assert err.strip().splitlines()[-1].startswith("terminated (SIGTERM): finished cells and "
                                                 "checkpoints are kept")
  assert "Traceback" not in err
  assert list(work.glob("cells/*/checkpoints/step-*"))  # the progress is kept
  lock = io.directory_lock(str(work))
  assert lock.acquire()
  lock.release()
  # The same command resumes (saving rarely now: the checkpoint policy is operational).
  again = [a for a in args if a != "--config.checkpoint.min_seconds=0"]
  r = subprocess.run([sys.executable, "-m", "tlresearch.run", *again,
                      "--config.checkpoint.min_seconds=60"], env=env, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "resum" in r.stdout.lower()

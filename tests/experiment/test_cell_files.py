"""A cell folder is its own or it is moved aside (tlresearch.experiment.cell.not_its_own,
set_aside), and a checkpoint that cannot be written is said once while the cell finishes:
a table of foreign or damaged folders, each with what must happen."""
import json
import logging
import os

import numpy as np
import pytest

from experiments import finetune_sweep
from tlresearch.core import io
from tlresearch.experiment import cell as cell_lib, grid
from tlresearch.training import checkpoint
from tests.experiment.test_reliability import _fit, _logs


def _cell(**overrides):
  c = finetune_sweep.get_config()
  c.targets = ["digits"]
  c.seeds = [0]
  c.grid = [{"strategy": ["linear_probe"]}]
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  (cell,) = grid.expand(c)
  return cell


def _final(cell, **changes):
  """A final.json the tables would accept for `cell`."""
  record = {"cell_id": cell.id, "axes": cell.axes, "status": "ok", "strategy": "linear_probe",
            "target": cell.config.target, "seed": cell.config.seed, "test_accuracy": 0.5,
            "test_loss": 1.0, "test_macro_f1": 0.5, "val_accuracy": 0.5, "best_epoch": 1,
            "epochs_run": 1, "budget_limited": False, "trainable_params": 10,
            "hparams": {}, "classification_report": {}, "wall_seconds": 1.0,
            "compile_seconds": 0.0}
  return {**record, **changes}


def _write(cell_dir, cell, config_of=None, final=None, files=()):
  """A cell folder: config.json of `config_of` (default: `cell` itself), final.json, and
  other files by name."""
  os.makedirs(cell_dir, exist_ok=True)
  if config_of is not False:
    owner = config_of or cell
    io.write_json(os.path.join(cell_dir, "config.json"),
                  {"cell_id": owner.id, "axes": owner.axes, "config": owner.config.to_dict(),
                   "data_digest": None})
  if final is not None:
    io.write_json(os.path.join(cell_dir, "final.json"), final)
  for name in files:
    io.write_text(os.path.join(cell_dir, name), "{}\n")


def _other_epochs(cell, cell_dir):
  _write(cell_dir, cell, config_of=_cell(**{"train.epochs": 2}),
         final=_final(cell, epochs_run=2), files=["metrics.jsonl"])


def _no_config(cell, cell_dir):
  _write(cell_dir, cell, config_of=False, final=_final(cell), files=["metrics.jsonl"])


def _damaged_final(cell, cell_dir):
  _write(cell_dir, cell, final={"status": "ok"})


def _final_of_another_seed(cell, cell_dir):
  _write(cell_dir, cell, final=_final(cell, seed=3))


def _unreadable_config(cell, cell_dir):
  _write(cell_dir, cell, config_of=False, files=["metrics.jsonl"])
  with open(os.path.join(cell_dir, "config.json"), "w") as f:
    f.write('{"cell_id": ')  # cut short


# (how the folder is made, what the one warning line says): moved aside, trains from scratch.
NOT_ITS_OWN = [
    (_other_epochs, "its config.json is another cell's (train.epochs 2, this cell's "),
    (_no_config, "holds final.json, metrics.jsonl but no readable config.json"),
    (_unreadable_config, "no readable config.json"),
    (_damaged_final, "its final.json cannot be reused (it has no 'cell_id')"),
    (_final_of_another_seed, "its final.json cannot be reused (it is another cell's record)"),
]


@pytest.mark.parametrize("make, message", NOT_ITS_OWN, ids=[m for _, m in NOT_ITS_OWN])
def test_a_folder_not_its_own_is_moved_aside_whole(tmp_path, caplog, make, message):
  cell = _cell()
  cell_dir = str(tmp_path / "cells" / cell_lib.folder(cell.config))
  make(cell, cell_dir)
  before = {n: open(os.path.join(cell_dir, n)).read() for n in os.listdir(cell_dir)}
  assert cell_lib.finished(cell_dir, cell) is None  # never reused
  caplog.set_level(logging.WARNING, logger="tlresearch")
  aside = cell_lib.set_aside(cell_dir, cell)
  (line,) = _logs(caplog)
  assert line.startswith(f"warning: {cell_dir}: ") and message in line, line
  assert line.endswith(f"moved it to {os.path.basename(cell_dir)}.stale-1: the cell trains "
                       "from scratch")
  assert not os.path.exists(cell_dir)  # the cell starts from an empty folder
  assert {n: open(os.path.join(aside, n)).read() for n in os.listdir(aside)} == before
  make(cell, cell_dir)  # a second one goes next to the first, never over it
  assert cell_lib.set_aside(cell_dir, cell) == f"{cell_dir}.stale-2"


def test_its_own_files_stay_finished_or_interrupted(tmp_path, caplog):
  cell = _cell()
  caplog.set_level(logging.WARNING, logger="tlresearch")
  finished_dir, interrupted_dir, empty_dir = (str(tmp_path / n) for n in ("a", "b", "c"))
  _write(finished_dir, cell, final=_final(cell), files=["metrics.jsonl"])
  _write(interrupted_dir, cell, files=["checkpoints/step-000001/meta.json"])
  os.makedirs(empty_dir)
  for d in (finished_dir, interrupted_dir, empty_dir, str(tmp_path / "missing")):
    assert cell_lib.not_its_own(d, cell) is None
    assert cell_lib.set_aside(d, cell) is None
  assert cell_lib.finished(finished_dir, cell)["test_accuracy"] == 0.5
  assert cell_lib.finished(interrupted_dir, cell) is None
  assert os.path.exists(os.path.join(interrupted_dir, "checkpoints")) and not _logs(caplog)


def test_a_changed_folder_dataset_moves_even_an_interrupted_cell_aside(tmp_path, caplog):
  # Its checkpoint was trained on the old files: resuming it would mix two datasets.
  from tests.data.test_data_checks import _folder
  root = _folder(tmp_path / "images")
  cell = _cell(targets=[f"folder:{root}"], **{"model.input_size": 8})
  cell_dir = str(tmp_path / "cell")
  _write(cell_dir, cell, files=["checkpoints/step-000001/meta.json"])
  with open(os.path.join(cell_dir, "config.json")) as f:
    saved = json.load(f)
  io.write_json(os.path.join(cell_dir, "config.json"),
                {**saved, "data_digest": cell_lib.data_digest(cell.config)})
  assert cell_lib.not_its_own(cell_dir, cell) is None
  os.remove(root / "train" / "cat" / "cat0.png")
  caplog.set_level(logging.WARNING, logger="tlresearch")
  assert cell_lib.set_aside(cell_dir, cell) == f"{cell_dir}.stale-1"
  assert f"the files of folder:{root} changed since it trained" in _logs(caplog)[0]


def test_a_checkpoint_that_cannot_be_written_is_said_once_and_the_cell_finishes(
    dataset, tmp_path, monkeypatch, caplog):
  calls = []

  def full_disk(path, tree, meta=None):
    calls.append(path)
    raise OSError(28, "No space left on device", path)

  monkeypatch.setattr(checkpoint, "save", full_disk)
  caplog.set_level(logging.WARNING, logger="tlresearch")
  ckpt = checkpoint.FitCheckpointer(str(tmp_path / "ck"), "fp")
  result = _fit(dataset, ckpt)  # 6 epochs, a save due after each
  (line,) = _logs(caplog)
  assert line.startswith(f"warning: {tmp_path / 'ck'}: a checkpoint could not be written "
                         "(No space left on device: ")
  assert "saves no more" in line
  assert len(calls) == 1 and ckpt.rolling.steps() == []
  assert result.epochs_run == 6 and len(result.history) == 6  # it finished
  assert np.isfinite(result.test["accuracy"])

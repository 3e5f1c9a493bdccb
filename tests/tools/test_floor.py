"""The compute floor's image counts, its arithmetic and its argument errors."""
import json
import subprocess
import sys

import pytest

from tlresearch.core.errors import UserError
from tlresearch.tools import floor


def _final(target, n, epochs, trainable, total=100):
  return {"target": target, "train_examples": n, "epochs_run": epochs,
          "trainable_params": trainable, "total_params": total, "status": "ok"}


def test_count_images_splits_full_network_cells_from_the_rest():
  sizes = {"a": (30, 50), "b": (7, 11)}
  finals = [_final("a", 100, 3, 100),  # 2 steps of 64 per epoch
            _final("b", 20, 5, 100),   # batch capped at the 20 examples: 1 step of 20
            _final("a", 100, 2, 10)]   # a probe or partial cell
  images = floor.count_images(finals, sizes, batch_size=64)
  assert images["full_network"] == {"cells": 2, "train": 3 * 128 + 5 * 20,
                                    "eval": (4 * 30 + 50) + (6 * 7 + 11)}
  assert images["other"] == {"cells": 1, "train": 2 * 128, "eval": 3 * 30 + 50}


def test_floor_seconds_divide_the_full_network_images_by_each_layouts_summed_rates():
  images = {"full_network": {"train": 1000, "eval": 3000, "cells": 2},
            "other": {"train": 10 ** 9, "eval": 10 ** 9, "cells": 1}}
  rates = {"x": {"train_total": 100.0, "eval_total": 1000.0},
           "y": {"train_total": 200.0, "eval_total": 300.0}}
  assert floor.floor_seconds(images, rates) == {"x": 13.0, "y": 15.0}


def test_bad_arguments_are_one_line_errors(tmp_path):
  with pytest.raises(UserError, match="--workdir=W is required"):
    floor._parse([])
  with pytest.raises(UserError, match="unknown argument '--fast'"):
    floor._parse(["--fast"])
  with pytest.raises(UserError, match="no finished cell"):
    floor._parse([f"--workdir={tmp_path}"])
  (tmp_path / "c").mkdir()
  (tmp_path / "c" / "final.json").write_text(json.dumps(_final("a", 1, 1, 1)))
  assert floor._parse([f"--workdir={tmp_path}"])["target"] == "glyphs_input_shift"
  r = subprocess.run([sys.executable, "-m", "tlresearch.tools.floor"], capture_output=True, text=True)
  assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
  assert "--workdir=W is required" in r.stderr

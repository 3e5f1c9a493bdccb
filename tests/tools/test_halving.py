"""Successive halving replayed on recorded selection curves (tlresearch.tools.halving)."""
import json
import os

import pytest

from tlresearch.core import io
from tlresearch.core.errors import UserError
from tlresearch.tools import halving


def _cell(work, name, strategy, lr, curve, seed=100, epochs=8):
  d = os.path.join(work, "cells", name)
  os.makedirs(d)
  config = {"target": "t", "strategy": strategy, "seed": seed,
            "train": {"lr": lr, "weight_decay": 0.0, "epochs": epochs}}
  io.write_json(os.path.join(d, "config.json"), {"cell_id": name, "config": config})
  io.write_jsonl(os.path.join(d, "metrics.jsonl"),
                 [{"epoch": i + 1, "val_accuracy": v} for i, v in enumerate(curve)])
  io.write_json(os.path.join(d, "final.json"), {"status": "ok", "epochs_run": len(curve),
                                                "val_accuracy": max(curve)})


def test_halving_agrees_where_the_winner_leads_early_and_says_where_it_does_not(tmp_path,
                                                                                capsys):
  work = str(tmp_path)
  # "full": the best final score belongs to lr 0.3, which starts slowest: cut at the rung.
  _cell(work, "a", "full", 0.01, [0.2, 0.4, 0.5, 0.55, 0.6, 0.6, 0.6, 0.6])
  _cell(work, "b", "full", 0.1, [0.3, 0.5, 0.6, 0.65, 0.7, 0.7, 0.7, 0.7])
  _cell(work, "c", "full", 0.3, [0.1, 0.2, 0.3, 0.5, 0.8, 0.9, 0.9, 0.9])
  # "probe": the winner leads throughout; one candidate stopped early (3 epochs).
  _cell(work, "d", "probe", 0.01, [0.5, 0.7, 0.8, 0.85, 0.9, 0.9, 0.9, 0.9])
  _cell(work, "e", "probe", 0.1, [0.4, 0.5, 0.5])
  _cell(work, "f", "full", 0.1, [0.9] * 8, seed=0)            # a final cell: not selection
  os.rename(os.path.join(work, "cells", "a"), os.path.join(work, "cells", "a.stale-1"))
  _cell(work, "a", "full", 0.01, [0.2, 0.4, 0.5, 0.55, 0.6, 0.6, 0.6, 0.6])
  assert halving.main([f"--workdir={work}", "--rungs=0.25", "--keep=0.5"]) == 0
  out = json.loads(capsys.readouterr().out)
  assert out["configurations"] == 2 and out["agree"] == 1 and out["agree_fraction"] == 0.5
  (miss,) = out["disagreements"]
  assert miss["configuration"].startswith("t full epochs=8")
  assert miss["exhaustive"] == [0.3, 0.0] and miss["halving"] == [0.1, 0.0]
  assert (miss["val_exhaustive"], miss["val_halving"]) == (0.9, 0.7)
  # Rung at epoch 2: "full" keeps 2 of 3 (lr 0.3 stops after 2 of its 8), "probe" 1 of 2
  # (lr 0.1 stops after 2 of its 3).
  assert out["epochs"] == {"exhaustive": 8 * 3 + 8 + 3, "halving": 8 * 2 + 2 + 8 + 2}


@pytest.mark.parametrize("argv, message", [
    ([], "--workdir must be a sweep's workdir"),
    (["--workdir={w}", "--keep=2"], "must be in (0, 1)"),
    (["--workdir={w}", "--rungs=a"], "--rungs and --keep numbers"),
    (["--workdir={w}"], "no configuration with >= 2 finished selection cells"),
])
def test_bad_arguments_are_one_line(tmp_path, argv, message):
  os.makedirs(tmp_path / "cells")
  with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
    halving.main([a.format(w=tmp_path) for a in argv])

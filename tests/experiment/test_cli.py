"""The command line: bad input exits 2 with one line; a tiny sweep writes its tables."""
import csv
import json
import os
import re
import subprocess
import sys

import pytest
import tensorflow_datasets as tfds

from tlresearch.experiment import cli as run


def _cli(*args, cwd=None):
  return subprocess.run([sys.executable, "-m", "tlresearch.run", *args], capture_output=True,
                        text=True, cwd=cwd, timeout=120)


@pytest.mark.parametrize("args, message", [
    (["--experiment=nope"], "unknown experiment 'nope'; valid: data_efficiency, "),
    (["--experiment=finetune_sweep", "--config.trian.lr=1"],
     "unknown config key 'trian.lr': 'trian' is not in config; valid: "),
    (["--experiment=finetune_sweep", "--config.train.lrr=1"], "valid: augment, batch_size"),
    (["--experiment=finetune_sweep", "--config.train.lr=abc"], "expected float"),
    (["--bogus"], "unknown flag '--bogus'"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, args, message):
  r = _cli(*args, f"--results_dir={tmp_path / 'results'}", cwd=tmp_path)
  assert r.returncode == 2, r.stderr
  assert message in r.stderr
  assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
  assert not (tmp_path / "results").exists()


def test_bench_bad_flag_exits_2_with_one_line():
  r = subprocess.run([sys.executable, "-m", "tlresearch.tools.bench", "--fast"], capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 2
  assert r.stderr.strip() == ("error: unknown argument '--fast'; valid: --baseline, --skip_sweep")
  assert r.stdout == ""


def test_list_names_experiments(capsys):
  assert run.main(["--list"]) == 0
  out = capsys.readouterr().out
  assert "finetune_sweep" in out and "pretrain_source" in out


def _tiny_args(tmp_path, grid):
  return [
      "--experiment=finetune_sweep", f"--workdir={tmp_path / 'work'}",
      f"--results_dir={tmp_path / 'results'}", "--no_progress",
      f"--config.data_dir={tmp_path / 'data'}", f"--config.cache_dir={tmp_path / 'cache'}",
      "--config.model.width=4", "--config.train.epochs=1", "--config.pretrain.train.epochs=1",
      "--config.k_shot=0", "--config.seeds=[0, 1]",
      "--config.targets=['digits', 'glyphs_input_shift']", f"--config.grid={grid}",
      "--config.selection.enabled=False",  # final cells only (selection: test_experiment_...)
  ]


def test_invalid_values_fail_before_training(tmp_path):
  for override, message in [("--config.train.lr=-1", "train.lr must be > 0"),
                            ("--config.model.dropout_rate=1.0", "dropout_rate must be in [0, 1)"),
                            ("--config.train.epochs=0", "train.epochs must be >= 1")]:
    with pytest.raises(run.UserError, match=re.escape(message)):
      run.main(_tiny_args(tmp_path, "[{'strategy': ['full']}]") + [override])
  with pytest.raises(run.UserError, match="unknown strategy 'nope'"):
    run.main(_tiny_args(tmp_path, "[{'strategy': ['nope']}]"))
  assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_tiny_sweep_end_to_end_writes_tables(tmp_path, capsys):
  grid = ("[{'strategy': ['linear_probe', 'partial:k=1', 'full', 'scratch']},"
          " {'strategy': ['linear_probe'], 'model.dropout_rate': [0.5]}]")
  with tfds.testing.mock_data(num_examples=24):
    assert run.main(_tiny_args(tmp_path, grid)) == 0
  out_dir = tmp_path / "results" / "finetune_sweep"
  rows = list(csv.DictReader(open(out_dir / "runs.csv")))
  assert len(rows) == 5 * 2 * 2  # (4 strategies + 1 dropout cell) x 2 targets x 2 seeds
  assert {r["strategy"] for r in rows} == {"linear_probe", "partial:k=1", "full", "scratch"}
  for r in rows:
    assert 0.0 <= float(r["test_accuracy"]) <= 1.0 and r["status"] == "ok"
    assert int(r["epochs_run"]) == 1 and int(r["trainable_params"]) > 0
  table = open(out_dir / "table.md").read()
  assert "| strategy | dropout | digits | glyphs_input_shift | trainable params |" in table
  assert "± " in table
  for name in ("table.tex", "accuracy.png"):
    assert (out_dir / name).stat().st_size > 0
  cells = os.listdir(tmp_path / "work" / "cells")
  assert len(cells) == 20
  for c in cells:
    # A finished cell keeps its record, not its training checkpoints.
    assert set(os.listdir(tmp_path / "work" / "cells" / c)) == {"config.json", "metrics.jsonl",
                                                               "final.json"}
  # The pretrained backbone was built once and cached; a rerun reuses cells and checkpoint.
  built = [p for p in os.listdir(tmp_path / "cache" / "pretrained") if not p.endswith(".lock")]
  assert len(built) == 1
  capsys.readouterr()
  with tfds.testing.mock_data(num_examples=24):
    assert run.main(_tiny_args(tmp_path, grid)) == 0
  assert "20 cells (20 reused)" in capsys.readouterr().out


@pytest.mark.slow
def test_experiment_with_selection_probes_and_findings(tmp_path):
  """lp_ft end to end on mock data: selection on validation, probes, findings.md."""
  args = [
      "--experiment=lp_ft", f"--workdir={tmp_path / 'work'}",
      f"--results_dir={tmp_path / 'results'}", "--no_progress",
      f"--config.data_dir={tmp_path / 'data'}", f"--config.cache_dir={tmp_path / 'cache'}",
      "--config.model.width=4", "--config.train.epochs=2", "--config.pretrain.train.epochs=1",
      "--config.k_shot=0", "--config.seeds=[0, 1]", "--config.targets=['digits']",
      "--config.selection.lr=[0.01, 0.1]", "--config.selection.weight_decay=[0.0]",
      "--config.selection.widen=0",
  ]
  with tfds.testing.mock_data(num_examples=24):
    assert run.main(args) == 0
  out_dir = tmp_path / "results" / "lp_ft"
  sel = list(csv.DictReader(open(out_dir / "selection.csv")))
  # full and lp_ft x learning rates (one selection seed); the converged probe has no lr.
  assert len(sel) == 2 * 2 and {s["strategy"] for s in sel} == {"full", "lp_ft:probe=0.5"}
  rows = list(csv.DictReader(open(out_dir / "runs.csv")))
  assert len(rows) == 3 * 2
  for r in rows:
    # The probe, and LP-FT's probe stage, are solved with an L2 chosen on validation.
    assert (r["probe_l2"] != "") == (r["strategy"] != "full")
    if r["strategy"] == "linear_probe":
      assert float(r["feature_change"]) == 0.0 and r["epochs_run"] == "1"
      continue
    won = [s for s in sel if s["strategy"] == r["strategy"] and s["selected"] == "1"]
    assert len(won) == 1 and float(won[0]["train.lr"]) == float(r["lr"])
    # The winner has the best validation accuracy of its configuration (first on ties).
    cands = [float(s["val_accuracy"]) for s in sel if s["strategy"] == r["strategy"]]
    assert float(won[0]["val_accuracy"]) == max(cands)
    assert 0 <= float(r["ood_test_accuracy"]) <= 1
    assert float(r["feature_change"]) > 0.0
  table = open(out_dir / "table.md").read()
  assert "lr, wd selected on validation (per target)" in table and "L-BFGS, l2 " in table
  assert "OOD (corrupted test) accuracy" in table
  md = open(out_dir / "findings.md").read()
  assert "Kumar" in md and "--experiment=lp_ft" in md
  # Two seeds are too few for any verdict.
  assert "Overall verdict: **inconclusive**" in md
  # the selection cells are in the store beside the final ones
  assert len(os.listdir(tmp_path / "work" / "cells")) == len(rows) + len(sel)


_NO_TENSORFLOW = """
import importlib.abc, importlib.machinery, sys
class NoTensorFlow(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  # TensorFlow stays findable (libraries may look), but importing it fails.
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] == 'tensorflow':
      return importlib.machinery.ModuleSpec(name, self)
  def create_module(self, spec):
    raise ImportError('tensorflow imported')
sys.meta_path.insert(0, NoTensorFlow())
from tlresearch.experiment import cli as run
code = run.main(sys.argv[1:])
assert 'tensorflow' not in sys.modules, 'tensorflow imported'
sys.exit(code)
"""


@pytest.mark.slow
def test_sweep_builds_and_reads_its_datasets_without_tensorflow(tmp_path):
  # Real builds (not mocked) into an empty data dir, the backbone pretrained, two strategies
  # trained and the reports written, in a process where importing TensorFlow fails.
  args = _tiny_args(tmp_path, "[{'strategy': ['linear_probe', 'full']}]")
  args = [a for a in args if not a.startswith(("--config.seeds", "--config.targets"))]
  r = subprocess.run([sys.executable, "-c", _NO_TENSORFLOW, *args,
                      "--config.seeds=[0]", "--config.targets=['digits']"],
                     capture_output=True, text=True, timeout=600, cwd=tmp_path,
                     env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
  assert r.returncode == 0, r.stderr[-3000:]
  assert "building dataset digits" in r.stderr and "building dataset glyphs_source" in r.stderr
  assert (tmp_path / "results" / "finetune_sweep" / "table.md").exists()


@pytest.mark.slow
def test_device_check_runs_green_on_the_cpu(tmp_path):
  out = tmp_path / "check.json"
  r = subprocess.run([sys.executable, "-m", "tlresearch.tools.device_check", f"--out={out}", "--quick",
                      "--skip_sweep"], capture_output=True, text=True, timeout=900,
                     env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 0, r.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["ok"] and result["environment"]["backend"] == "cpu"
  for check in ("vmap_vs_loop", "data_parallel", "determinism", "bfloat16"):
    assert result[check]["ok"], check
  assert result["data_parallel"]["devices"] == 4  # forced host devices on a one-device machine
  rates = result["throughput"]["resnet8_32px_batch64"]
  assert rates["float32"]["images_per_s"] > 0 and rates["bfloat16"]["flops_per_step"] > 0
  assert result["vmap_seeds"]["seeds_mode_auto"]["picks"] == "loop"
  assert not result["environment"]["tensorflow_imported"]


def test_device_check_bad_arguments_exit_2_with_one_line(tmp_path):
  for args, message in ([[], "--out=FILE.json is required"],
                        [["--out=x.json", "--fast"], "unknown argument '--fast'"],
                        [[f"--out={tmp_path}/no/such/x.json"], "does not exist"]):
    r = subprocess.run([sys.executable, "-m", "tlresearch.tools.device_check", *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1

"""Fault tolerance, done for real: SIGKILL and resume, corrupted checkpoints, a forced NaN,
a locked workdir, and a table of bad inputs with their messages and exit codes."""
import csv
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from tlresearch import models
from tlresearch.core import io
from tlresearch.experiment import cli as run
from tlresearch.methods import strategies
from tlresearch.training import checkpoint, pretrain, train
from tests.conftest import fit_one, tiny_model_cfg, tiny_train_cfg

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _args(tmp_path, tag, *extra):
  """A tiny two-cell sweep whose cells run long enough (30 one-step epochs) to be killed."""
  return [
      "--experiment=finetune_sweep", f"--workdir={tmp_path / ('work-' + tag)}",
      f"--results_dir={tmp_path / ('results-' + tag)}", "--no_progress",
      f"--config.cache_dir={tmp_path / 'cache'}", "--config.model.width=4",
      "--config.train.epochs=30", "--config.train.early_stopping.enabled=False",
      "--config.pretrain.train.epochs=1", "--config.k_shot=0", "--config.seeds=[0]",
      "--config.targets=['digits']", "--config.checkpoint.min_seconds=0",
      "--config.grid=[{'strategy': ['full', 'partial:k=1']}]",
      "--config.selection.enabled=False", *extra]  # final cells only


def _runner(tmp_path) -> str:
  """A script running the real CLI under TFDS mock data (in a separate process)."""
  path = tmp_path / "runner.py"
  path.write_text(textwrap.dedent("""
      import sys
      import tensorflow_datasets as tfds
      from tlresearch.experiment import cli as run
      with tfds.testing.mock_data(num_examples=24):
        sys.argv = ["tlresearch.run", *sys.argv[1:]]
        run.cli()
  """))
  return str(path)


def _env():
  return {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "3"}


def _cell_checkpoints(workdir):
  """Cell folders that hold a checkpoint but no final.json (i.e. interrupted mid-cell)."""
  workdir = os.path.join(workdir, "cells")
  if not os.path.isdir(workdir):
    return []
  out = []
  for cell in os.listdir(workdir):
    d = os.path.join(workdir, cell, "checkpoints")
    if (os.path.isdir(d) and any(n.startswith("step-") for n in os.listdir(d))
        and not os.path.exists(os.path.join(workdir, cell, "final.json"))):
      out.append(cell)
  return out


def _rows(path):
  with open(path) as f:
    return list(csv.DictReader(f))


@pytest.mark.slow
def test_sigkill_mid_cell_then_resume_gives_the_uninterrupted_table(tmp_path, capsys):
  # The reference: one uninterrupted run (in this process).
  with tfds.testing.mock_data(num_examples=24):
    assert run.main(_args(tmp_path, "ref")) == 0
  capsys.readouterr()
  reference = (tmp_path / "results-ref" / "finetune_sweep" / "runs.csv").read_text()

  runner, work = _runner(tmp_path), tmp_path / "work-killed"
  proc = subprocess.Popen([sys.executable, runner, *_args(tmp_path, "killed")], cwd=REPO,
                          env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 240
  while not _cell_checkpoints(work):
    assert proc.poll() is None, "the sweep ended before any cell checkpoint appeared"
    assert time.monotonic() < deadline, "no cell checkpoint appeared within 240 s"
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  interrupted = _cell_checkpoints(work)
  assert interrupted, "the kill did not land mid-cell"
  assert not (tmp_path / "results-killed").exists()

  r = subprocess.run([sys.executable, runner, *_args(tmp_path, "killed")], cwd=REPO, env=_env(),
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "resuming from" in r.stdout, r.stdout[-2000:]
  resumed = (tmp_path / "results-killed" / "finetune_sweep" / "runs.csv").read_text()
  assert resumed == reference
  # Nothing counted twice, no checkpoint left behind.
  assert len(_rows(tmp_path / "results-killed" / "finetune_sweep" / "runs.csv")) == 2
  assert not _cell_checkpoints(work)


def _fit_setup(spec="full"):
  model = models.build(tiny_model_cfg(), 4)
  variables = model.init(jax.random.key(1), jnp.zeros((1, 16, 16, 3)))
  return model, variables, strategies.get(spec, model.groups)


def _fit(dataset, ckpt, on_epoch=None, spec="full"):
  model, variables, strategy = _fit_setup(spec)
  cfg = tiny_train_cfg(epochs=6)
  cfg.early_stopping.enabled = False
  return fit_one(model, variables, strategy, dataset, cfg, train.CellKeys.from_seed(0),
                 on_epoch=on_epoch, checkpointer=ckpt)


def _logs(caplog):
  return [("warning: " if r.levelno >= logging.WARNING else "") + r.getMessage()
          for r in caplog.records]


def _same_result(a, b):
  strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]
  assert strip(a.history) == strip(b.history)
  assert a.test == b.test
  for x, y in zip(jax.tree.leaves(a.variables), jax.tree.leaves(b.variables)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# Multi-stage strategies resume inside their second stage (lp_ft: one converged probe solve,
# then full epochs;
# gradual_unfreeze: one group per epoch); l2_sp needs its anchor (the starting weights) back.
@pytest.mark.parametrize("spec, stop_after", [
    ("full", 3), ("lp_ft", 5), pytest.param("gradual_unfreeze", 4, marks=pytest.mark.slow),
    ("l2_sp", 3)])
def test_fit_interrupted_mid_run_resumes_bitwise(dataset, tmp_path, spec, stop_after, caplog):
  uninterrupted = _fit(dataset, None, spec=spec)

  class Interrupt(Exception):
    pass

  def stop(record, state):
    if record["epoch"] == stop_after:
      raise Interrupt

  ckpt = checkpoint.FitCheckpointer(str(tmp_path / "ck"), "fp", keep=2)
  with pytest.raises(Interrupt):
    _fit(dataset, ckpt, on_epoch=stop, spec=spec)
  # bounded: keep=2
  assert checkpoint.Rolling(str(tmp_path / "ck")).steps() == [stop_after - 2, stop_after - 1]
  caplog.set_level(logging.INFO, logger="tlresearch")
  resumed = _fit(dataset, checkpoint.FitCheckpointer(str(tmp_path / "ck"), "fp"), spec=spec)
  assert any("resuming from" in m and f"{stop_after - 1} epochs done" in m for m in _logs(caplog))
  _same_result(resumed, uninterrupted)
  assert len({r["stage"] for r in uninterrupted.history}) >= (2 if spec in ("lp_ft", "gradual_unfreeze") else 1)


def _largest_file(directory):
  files = [os.path.join(d, n) for d, _, ns in os.walk(directory) for n in ns]
  return max(files, key=os.path.getsize)


def _zero_4k(path):
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.seek(max(0, size // 2 - 2048))
    f.write(b"\0" * min(4096, size))


def test_checkpoint_checksum_catches_zeroed_and_truncated_files(tmp_path):
  tree = {"w": jnp.arange(40000, dtype=jnp.float32).reshape(200, 200), "b": jnp.ones(7)}
  checkpoint.save(str(tmp_path / "a"), tree)
  restored, _ = checkpoint.restore(str(tmp_path / "a"), tree)
  np.testing.assert_array_equal(restored["w"], tree["w"])
  _zero_4k(_largest_file(tmp_path / "a" / "arrays"))
  with pytest.raises(checkpoint.CheckpointError, match=str(tmp_path / "a")):
    checkpoint.restore(str(tmp_path / "a"), tree)
  checkpoint.save(str(tmp_path / "b"), tree)
  victim = _largest_file(tmp_path / "b" / "arrays")
  os.truncate(victim, os.path.getsize(victim) // 3)
  with pytest.raises(checkpoint.CheckpointError, match=str(tmp_path / "b")):
    checkpoint.restore(str(tmp_path / "b"), tree)


def test_corrupted_cell_checkpoint_restarts_from_scratch(dataset, tmp_path, caplog):
  uninterrupted = _fit(dataset, None)
  ckpt = checkpoint.FitCheckpointer(str(tmp_path / "ck"), "fp", keep=1)
  _fit(dataset, ckpt)
  (step,) = ckpt.rolling.steps()
  _zero_4k(_largest_file(os.path.join(ckpt.rolling.path(step), "arrays")))
  caplog.set_level(logging.INFO, logger="tlresearch")
  again = _fit(dataset, checkpoint.FitCheckpointer(str(tmp_path / "ck"), "fp"))
  logs = _logs(caplog)
  assert any("corrupted" in m and "from scratch" in m for m in logs), logs
  _same_result(again, uninterrupted)


def test_checkpoint_of_another_config_is_ignored(dataset, tmp_path, caplog):
  _fit(dataset, checkpoint.FitCheckpointer(str(tmp_path / "ck"), "old-config"))
  caplog.set_level(logging.INFO, logger="tlresearch")
  ckpt = checkpoint.FitCheckpointer(str(tmp_path / "ck"), "new-config")
  _fit(dataset, ckpt)
  logs = _logs(caplog)
  assert not any("resuming" in m for m in logs)
  assert any("different config" in m for m in logs)
  # Only the new run's checkpoints remain (keep=2 of its 6 epochs).
  assert ckpt.rolling.steps() == [5, 6]
  assert all(checkpoint.read_meta(ckpt.rolling.path(s))["fingerprint"] == "new-config"
             for s in ckpt.rolling.steps())


def test_corrupted_pretrained_checkpoint_is_rebuilt_with_a_warning(tmp_path, monkeypatch,
                                                                  caplog):
  from tlresearch.core import schema
  pcfg = schema.pretrain()
  built = []

  def fake_train_source(pcfg, checkpointer=None):
    built.append(1)
    return {"params": {"w": np.full((64, 64), 3.0, np.float32)}}, {"test_accuracy": 0.5,
                                                                     "seconds": 0.0}

  monkeypatch.setattr(pretrain, "train_source", fake_train_source)
  cache = str(tmp_path / "cache")
  variables, path = pretrain.get_or_build(pcfg, cache)
  assert len(built) == 1
  pretrain.get_or_build(pcfg, cache)
  assert len(built) == 1  # cached
  _zero_4k(_largest_file(os.path.join(path, "variables", "arrays")))
  caplog.set_level(logging.INFO, logger="tlresearch")
  again, _ = pretrain.get_or_build(pcfg, cache)
  logs = _logs(caplog)
  assert len(built) == 2
  assert any(m.startswith("warning:") and path in m and "rebuilding" in m for m in logs), logs
  np.testing.assert_array_equal(again["params"]["w"], variables["params"]["w"])


@pytest.mark.slow  # a sweep with source pretraining (~20-30 s)
def test_forced_nan_marks_the_cell_and_the_grid_goes_on(tmp_path, capsys):
  # lr 1e38 overflows float32 logits after one step: a NaN loss, forced for real.
  args = _args(tmp_path, "nan", "--config.train.epochs=8", "--config.train.warmup_epochs=0.0",
               "--config.grid=[{'strategy': ['full', 'linear_probe'], 'train.lr': [1e38]}]")
  with tfds.testing.mock_data(num_examples=24):
    assert run.main(args) == 0
  capsys.readouterr()
  work = tmp_path / "work-nan" / "cells"
  finals = {f["strategy"]: f for f in (io.read_json(work / c / "final.json")
                                       for c in os.listdir(work))}
  full = finals["full"]
  assert full["status"] == "diverged"
  assert full["diverged_at"]["epoch"] >= 1 and full["diverged_at"]["step"] >= 1
  assert full["epochs_run"] == full["diverged_at"]["epoch"] < 8  # stopped there
  table = (tmp_path / "results-nan" / "finetune_sweep" / "table.md").read_text()
  assert "diverged" in table and "nan" not in table.lower().replace("non-finite", "")
  rows = {r["strategy"]: r for r in _rows(tmp_path / "results-nan" / "finetune_sweep" / "runs.csv")}
  assert rows["full"]["status"] == "diverged"


def test_second_sweep_on_a_workdir_in_use_exits_at_once(tmp_path):
  lock = io.directory_lock(str(tmp_path / "work-busy"))
  assert lock.acquire()
  try:
    r = subprocess.run([sys.executable, _runner(tmp_path), *_args(tmp_path, "busy")],
                       cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
  finally:
    lock.release()
  assert r.returncode == 2
  # (TFDS's mock data logs deprecation warnings first; the error is the one last line.)
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and "is in use by another sweep" in last
  assert str(os.getpid()) in last and "Traceback" not in r.stderr
  assert not (tmp_path / "results-busy").exists()
  # A lock whose holder died (here: released) does not block the next sweep.
  assert io.directory_lock(str(tmp_path / "work-busy")).acquire()


@pytest.mark.slow
def test_two_sweeps_side_by_side_with_different_workdirs(tmp_path):
  # Both need the same (missing) pretrained backbone: one builds it, the other waits on its
  # lock and reuses it; neither disturbs the other's cells or tables.
  runner = _runner(tmp_path)
  tiny = ["--config.train.epochs=2", "--config.grid=[{'strategy': ['linear_probe']}]"]
  procs = [subprocess.Popen([sys.executable, runner, *_args(tmp_path, tag, *tiny)], cwd=REPO,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for tag in ("a", "b")]
  outs = [p.communicate(timeout=300) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
  built = [n for n in os.listdir(tmp_path / "cache" / "pretrained") if not n.endswith(".lock")]
  assert len(built) == 1
  assert sum("building" in o for o, _ in outs) == 1  # the other one reused it
  a, b = ((tmp_path / f"results-{t}" / "finetune_sweep" / "runs.csv").read_text()
          for t in ("a", "b"))
  assert a == b and len(a.splitlines()) == 2


def test_a_killed_lock_holder_leaves_no_stale_lock(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
      import sys, time
      from tlresearch.core import io
      assert io.directory_lock({str(tmp_path)!r}).acquire()
      print("locked", flush=True)
      time.sleep(600)
  """)], cwd=REPO, env=_env(), stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "locked"
  assert not io.directory_lock(str(tmp_path)).acquire()
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  assert io.directory_lock(str(tmp_path)).acquire()


def test_results_folder_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
  from tlresearch.analysis import report
  finals = [{"cell_id": f"c{s}", "axes": {"strategy": "full", "target": "t", "seed": s},
             "status": "ok", "test_accuracy": 0.5 + s / 10, "test_macro_f1": 0.4,
             "best_epoch": 1, "epochs_run": 1, "trainable_params": 10} for s in range(3)]
  out = str(tmp_path / "results" / "x")
  report.write(finals, ["strategy", "target", "seed"], out, "x")
  before = {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)}

  def crash(*a, **k):
    raise RuntimeError("disk full")

  monkeypatch.setattr(report, "plot", crash)  # fails after the CSVs and tables are written
  changed = [{**f, "test_accuracy": 0.1} for f in finals]
  with pytest.raises(RuntimeError):
    report.write(changed, ["strategy", "target", "seed"], out, "x")
  after = {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)}
  assert after == before
  assert sorted(os.listdir(tmp_path / "results")) == ["x"]  # no temporary folder left


# (extra CLI arguments, expected message fragment) -> exit 2, one line, nothing written.
BAD_INPUTS = [
    (["--experiment=nope"], "unknown experiment 'nope'; valid: "),
    (["--config.trian.lr=1"], "unknown config key 'trian.lr'"),
    (["--config.grid=[{'strategy': ['nope']}]"], "unknown strategy 'nope'"),
    (["--config.targets=['imagenet21k']"], "unknown dataset 'imagenet21k'; valid: "),
    (["--config.model.family=vit"], "unknown model.family 'vit'; valid: "),
    (["--config.train.lr=0"], "train.lr must be > 0, got 0"),
    (["--config.train.lr=-0.1"], "train.lr must be > 0, got -0.1"),
    (["--config.model.dropout_rate=1.0"], "model.dropout_rate must be in [0, 1), got 1.0"),
    (["--config.model.dropout_rate=-0.5"], "model.dropout_rate must be in [0, 1)"),
    (["--config.k_shot=100000"], "k_shot=100000 is more than the"),
    (["--config.grid=[{'strategy': ['partial:k=9']}]"], "partial:k=9"),
    (["--config.grid=[{'strategy': ['partial:k=two']}]"], "partial:k=two"),
    (["--config.train.epochs=0"], "train.epochs must be >= 1, got 0"),
    (["--config.train.optimizer=lion"], "unknown train.optimizer 'lion'; valid: "),
    (["--config.train.batch_size=0"], "train.batch_size must be >= 1"),
    (["--config.grid=[{'train.lrr': [1]}]"], "grid axis 'train.lrr' is not a config key"),
    (["--config.train.lr=abc"], "expected float"),
    (["--bogus"], "unknown flag '--bogus'"),
    # Values accepted before, then meaningless or crashing later:
    (["--config.seeds=[]"], "config.seeds must be a non-empty list"),
    (["--config.targets=[]"], "config.targets must be a non-empty list"),
    (["--config.grid=[{'strategy': []}]"], "grid values for 'strategy' (block 0) are empty"),
    (["--config.grid=[{}]"], "config.grid block 0 is empty"),
    (["--config.seeds=[-1]"], "config.seeds must be integers in [0, 2147483647], got -1"),
    (["--config.seeds=[1099511627776]"], "config.seeds must be integers in [0, 2147483647]"),
    (["--config.seeds=[0.5]"], "config.seeds must be integers"),
    (["--config.seeds=[0, 0]"], "config.seeds has a repeated seed"),
    (["--config.train.lr=1e999"], "config.train.lr must be a finite number, got inf"),
    (["--config.selection.lr=[0.1, nan]"], "expected"),  # not a literal: a bare string
    (["--config.train.augment.rotation=-5.0"], "train.augment.rotation must be >= 0"),
    (["--config.train.augment.shear=-1.0"], "train.augment.shear must be >= 0"),
    (["--config.train.augment.zoom=1.5"], "train.augment.zoom must be in [0, 1), got 1.5"),
    (["--config.train.augment.width_shift=1.0"], "train.augment.width_shift must be in [0, 1)"),
    (["--config.train.augment.fill_mode=mirror"], "train.augment.fill_mode must be one of"),
    (["--config.train.schedule=step"], "train.schedule must be one of constant, warmup_cosine"),
    (["--config.model.head.pooling=mean"], "model.head.pooling must be one of"),
    (["--config.save_model=some"], "save_model must be one of all, best, none"),
    (["--workdir="], "--workdir is empty"),
    (["--results_dir="], "--results_dir is empty"),
    # Overrides the grid would silently ignore:
    (["--config.strategy=full"], "--config.strategy has no effect: every cell of the grid "
                                 "sets strategy itself; restrict the grid instead"),
    (["--config.target=digits"], "--config.target has no effect"),
    (["--config.seed=3"], "--config.seed has no effect"),
    # Beyond the list:
    (["--config.selection.enabled=True", "--config.selection.seeds=[-1]"],
     "selection.seeds must be integers in [0, 2147483647], got -1"),
    (["--config.train.early_stopping.min_delta=-1.0"], "min_delta must be >= 0"),
    (["--config.train.momentum=1.5"], "train.momentum must be in [0, 1), got 1.5"),
    (["--config.report.metrics=['nope']"], "unknown report.metrics entry 'nope'; valid: "),
    (["--config.pretrain.seed=-1"], "pretrain.seed must be an integer in [0, 2147483647]"),
    (["--config.data.split_seed=-1"], "data.split_seed must be an integer in [0, 2147483647]"),
    (["--config.checkpoint.keep=0"], "checkpoint.keep must be >= 1, got 0"),
    (["--config.checkpoint.every_epochs=0"], "checkpoint.every_epochs must be >= 1, got 0"),
    (["--config.grid=[{'strategy': ['full'], 'seed': [1]}]"],
     "grid axis 'seed' is set by config.seeds"),
    (["--config.grid=[{'strategy': ['full'], 'target': ['digits']}]"],
     "grid axis 'target' is set by config.targets"),
    (["--config.targets=['digits', 'digits']"], "config.targets has a repeated target"),
    (["--config.train={'lr': 0.1}"], "config.train is a block of settings, not one value: "
                                     "set its keys one at a time, e.g. --config.train."),
    (["--config.data=\"{'download': True}\""], "config.data is a block of settings"),
]


def _folder(root, layout: dict) -> str:
  """An image folder: {"train/a": n valid PNGs, "train/b": "junk" (one unreadable file)...}."""
  from PIL import Image
  for sub, content in layout.items():
    d = root / sub
    d.mkdir(parents=True, exist_ok=True)
    if content == "junk":
      (d / "broken.png").write_bytes(b"this is not an image")
    else:
      for i in range(content):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(d / f"{i}.png")
  return str(root)


# (folder layout, expected message): a bad dataset folder is bad input too.
BAD_FOLDERS = [
    (None, "no train folder"),                                     # the folder does not exist
    ({"validation/a": 2}, "no train folder"),
    ({"train": 0}, "no class folders in"),
    ({"train/a": 2, "train/b": 0}, "train/b is empty"),
    ({"train/a": 2, "train/b": "junk"}, "train/b has no readable"),
]


@pytest.mark.parametrize("layout, message", BAD_FOLDERS, ids=[m for _, m in BAD_FOLDERS])
def test_bad_dataset_folder_table(tmp_path, monkeypatch, capsys, layout, message):
  root = tmp_path / "images"
  if layout is not None:
    _folder(root, layout)
  _expect_bad_input(tmp_path, monkeypatch, capsys,
                    [f"--config.targets=['folder:{root}']"], message)


@pytest.mark.parametrize("extra, message", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_input_table(tmp_path, monkeypatch, capsys, extra, message):
  _expect_bad_input(tmp_path, monkeypatch, capsys, extra, message)


# (environment variable, what it is set to, expected message): folders the command needs.
BAD_ENVIRONMENT = [
    ("TLRESEARCH_DATA_DIR", "a-file", "$TLRESEARCH_DATA_DIR="),
    ("TLRESEARCH_CACHE_DIR", "a-file", "$TLRESEARCH_CACHE_DIR="),
    ("HOME", "", "no home folder: $HOME is not set (or empty)"),
    ("HOME", "relative/home", "no home folder"),
    ("TLRESEARCH_CACHE_DIR", "cache\udcff", "$TLRESEARCH_CACHE_DIR 'cache\\xff' is not a UTF-8"),
]


@pytest.mark.parametrize("var, value, message", BAD_ENVIRONMENT,
                         ids=[f"{v}={x}" for v, x, _ in BAD_ENVIRONMENT])
def test_bad_environment_table(tmp_path, monkeypatch, capsys, var, value, message):
  if value == "a-file":
    value = str(tmp_path / "a-file")
    (tmp_path / "a-file").write_text("not a folder")
  monkeypatch.setenv(var, value)
  if var == "HOME":  # the folders under it are what the command would use
    for other in ("TLRESEARCH_DATA_DIR", "TLRESEARCH_CACHE_DIR"):
      monkeypatch.delenv(other, raising=False)
  _expect_bad_input(tmp_path, monkeypatch, capsys, [], message, cache_flag=False)


def _expect_bad_input(tmp_path, monkeypatch, capsys, extra, message, cache_flag=True):
  base = [a for a in _args(tmp_path, "bad") if not a.startswith("--experiment")
          and (cache_flag or not a.startswith("--config.cache_dir"))]
  if extra and extra[0].startswith("--experiment"):
    argv = [*extra, *base]
  else:
    argv = ["--experiment=finetune_sweep", *base, *extra]
  monkeypatch.setattr(sys, "argv", ["tlresearch.run", *argv])
  t0 = time.monotonic()
  with tfds.testing.mock_data(num_examples=24), pytest.raises(SystemExit) as exit_info:
    run.cli()
  err = capsys.readouterr().err
  assert exit_info.value.code == 2
  assert message in err, err
  assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
  assert "Traceback" not in err
  assert not (tmp_path / "results-bad").exists()
  assert not (tmp_path / "cache" / "pretrained").exists()  # nothing trained
  assert time.monotonic() - t0 < 30

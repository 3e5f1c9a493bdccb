"""A grid split across the tasks of an array job (--task_index/--num_tasks), then --merge:
whole configurations per task, and the same results folder as one process makes."""
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
import tensorflow_datasets as tfds

from experiments import dropout_ablation, finetune_sweep
from tlresearch import data as data_lib, models
from tlresearch.core import configs, io
from tlresearch.experiment import cli as run, grid, selection, sweep
from tlresearch.training import pretrain

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Byte for byte equal between one process and tasks + merge (timing.csv holds wall seconds).
SAME_BYTES = ("runs.csv", "table.md", "table.tex")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  """One pretrained backbone and one compilation cache for every sweep of this module.

  The backbone is cached, restored and merged as usual but not trained (its initial
  weights): what it has learned plays no part in how a grid is split and merged, and source
  training would only add its own compilations and epoch to this module's time.
  """
  def untrained(pcfg, checkpointer=None):
    variables = models.build(pcfg.model, 36).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    return jax.device_get(variables), {"test_accuracy": 0.0, "seconds": 0.0}

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(pretrain, "train_source", untrained)
    yield tmp_path_factory.mktemp("cache")


def _args(root, cache, experiment, tag, *extra):
  """A tiny sweep on mock data: one target, one seed, one epoch, a 4-channel ResNet."""
  return [f"--experiment={experiment}", f"--workdir={root / ('work-' + tag)}",
          f"--results_dir={root / ('results-' + tag)}", "--no_progress",
          f"--config.cache_dir={cache}", "--config.model.width=4", "--config.train.epochs=1",
          "--config.pretrain.train.epochs=1", "--config.k_shot=0", "--config.seeds=[0]",
          "--config.targets=['digits']", *extra]


def _main(argv):
  with tfds.testing.mock_data(num_examples=24):
    return run.main(argv)


def _trains_nothing(monkeypatch):
  """Any attempt to read data or load a backbone fails the test."""
  def forbidden(*a, **k):
    raise AssertionError("--merge must not read data or load a backbone")
  for module, fn in ((data_lib, "load"), (data_lib, "load_for"), (pretrain, "get_or_build"),
                     (models, "load_pretrained")):
    monkeypatch.setattr(module, fn, forbidden)


def _folder(root, tag, name):
  return root / f"results-{tag}" / name


# --- which task runs which cells -------------------------------------------------------------

def _configurations(cells):
  return {configs.configuration(c.axes) for c in cells}


def _without_selection_keys(axes):
  return {k: v for k, v in axes.items() if k not in (selection.LR, selection.WD)}


@pytest.mark.parametrize("num_tasks", [1, 2, 3, 5, 7, 30])
def test_every_cell_in_exactly_one_task_and_configurations_whole(num_tasks):
  # finetune_sweep: 3 blocks, 14 configurations of 5 seeds (30 tasks: some idle).
  cells = grid.expand(finetune_sweep.get_config())
  shards = [grid.shard(cells, i, num_tasks) for i in range(num_tasks)]
  ids = [c.id for s in shards for c in s]
  assert sorted(ids) == sorted(c.id for c in cells) and len(set(ids)) == len(ids)
  position = {c.id: i for i, c in enumerate(cells)}
  for s in shards:
    assert [position[c.id] for c in s] == sorted(position[c.id] for c in s)  # grid order
    for key in _configurations(s):
      assert len([c for c in s if configs.configuration(c.axes) == key]) == 5  # all its seeds
  counts = [len(_configurations(s)) for s in shards]
  assert sum(counts) == 14 and max(counts) - min(counts) <= 1
  expanded_again = grid.expand(finetune_sweep.get_config())
  again = [grid.shard(expanded_again, i, num_tasks) for i in range(num_tasks)]
  assert [[c.id for c in s] for s in again] == [[c.id for c in s] for s in shards]


def test_selection_cells_go_with_their_configuration():
  config = dropout_ablation.get_config()  # selection on: 16 configurations
  cells = grid.expand(config)
  sel_cells = selection.first_round(config, cells)
  assert sel_cells
  owner = {}
  for i in range(3):
    mine = grid.shard(cells, i, 3)
    for c in selection.first_round(config, mine):
      assert c.id not in owner
      owner[c.id] = i
      assert configs.configuration(_without_selection_keys(c.axes)) in _configurations(mine)
  assert set(owner) == {c.id for c in sel_cells}


def test_assignment_does_not_depend_on_hash_randomisation():
  script = ("from experiments import finetune_sweep\nfrom tlresearch.experiment import grid\n"
            "print(' '.join(c.id for c in grid.shard(grid.expand(finetune_sweep.get_config()),"
            " 1, 4)))")
  env = {**os.environ, "PYTHONPATH": REPO, "PYTHONHASHSEED": "12345"}
  out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120, check=True).stdout.split()
  assert out == [c.id for c in grid.shard(grid.expand(finetune_sweep.get_config()), 1, 4)]


# --- tasks + merge == one process ------------------------------------------------------------

def _same_results(root, name, also=()):
  single, merged = _folder(root, "single", name), _folder(root, "shard", name)
  assert sorted(os.listdir(single)) == sorted(os.listdir(merged))
  for f in SAME_BYTES + also:
    assert (single / f).read_bytes() == (merged / f).read_bytes(), f


@pytest.mark.slow
def test_two_tasks_and_merge_equal_one_process(tmp_path, cache, monkeypatch, capsys):
  grid_flag = "--config.grid=[{'strategy': ['linear_probe', 'full', 'scratch']}]"
  args = lambda tag, *extra: _args(tmp_path, cache, "finetune_sweep", tag, grid_flag,
                                   "--config.selection.enabled=False", *extra)
  assert _main(args("single")) == 0
  assert _main(args("shard", "--task_index=0", "--num_tasks=2")) == 0
  out = capsys.readouterr().out
  assert "--task_index=0 of --num_tasks=2 ran its 2 of 3 configurations, 2 cells" in out
  assert "--merge" in out and not (tmp_path / "results-shard").exists()
  with pytest.raises(run.UserError, match=r"cannot merge: 1 of 3 cells are not finished"):
    _main(args("shard", "--merge"))
  assert not (tmp_path / "results-shard").exists()
  assert _main(args("shard", "--task_index=1", "--num_tasks=2")) == 0
  assert {".lock", ".lock-finetune_sweep-task-0-of-2", ".lock-finetune_sweep-task-1-of-2"} <= set(
      os.listdir(tmp_path / "work-shard"))
  _trains_nothing(monkeypatch)
  assert run.main(args("shard", "--merge")) == 0
  assert "finetune_sweep: merged 3 cells from" in capsys.readouterr().out
  _same_results(tmp_path, "finetune_sweep")


def _without_command(findings_md: str) -> str:
  return "\n".join(l for l in findings_md.splitlines() if not l.startswith("python -m"))


@pytest.mark.slow  # two sharded sweeps with selection and a merge: ~17 s
def test_two_tasks_and_merge_equal_one_process_with_selection(tmp_path, cache, monkeypatch,
                                                              capsys):
  extra = ("--config.grid=[{'strategy': ['linear_probe', 'full']}]",
           "--config.selection.lr=[0.01, 0.1]", "--config.selection.weight_decay=[0.0]",
           "--config.train.probe_solver=sgd",  # the SGD probe has an lr to select
           "--config.selection.widen=0")
  args = lambda tag, *more: _args(tmp_path, cache, "dropout_ablation", tag, *extra, *more)
  assert _main(args("single")) == 0
  for i in range(2):
    assert _main(args("shard", f"--task_index={i}", "--num_tasks=2")) == 0
  assert "1 cells and 2 selection cells" in capsys.readouterr().out
  _trains_nothing(monkeypatch)
  assert run.main(args("shard", "--merge")) == 0
  assert "merged 2 cells and 4 selection cells" in capsys.readouterr().out
  _same_results(tmp_path, "dropout_ablation", also=("selection.csv",))
  # findings.md names the command that made it: the single run's, or the merge's.
  single, merged = (_folder(tmp_path, t, "dropout_ablation") / "findings.md" for t in
                    ("single", "shard"))
  assert "--merge" in merged.read_text()
  assert _without_command(single.read_text()) == _without_command(merged.read_text())


# --- a merge before every task has finished --------------------------------------------------

def _finish_fake(cell_dir, cell):
  """A cell folder as a finished run leaves it (every field cell.finished checks)."""
  io.write_json(cell_dir / "config.json", {"cell_id": cell.id, "config": cell.config.to_dict()})
  record = {"cell_id": cell.id, "axes": cell.axes, "status": "ok",
            "strategy": cell.config.strategy, "target": cell.config.target,
            "seed": cell.config.seed, "hparams": {}, "classification_report": {}}
  record.update({k: 0.5 for k in ("test_accuracy", "test_loss", "test_macro_f1",
                                  "val_accuracy", "wall_seconds", "compile_seconds")})
  record.update({"best_epoch": 1, "epochs_run": 1, "budget_limited": False,
                 "trainable_params": 1})
  io.write_json(cell_dir / "final.json", record)


def test_merge_with_a_task_unfinished_fails_and_leaves_results_untouched(tmp_path, cache,
                                                                         monkeypatch, capsys):
  # The SGD probe has an lr, so both configurations run selection cells.
  extra = ["--config.grid=[{'strategy': ['linear_probe', 'full']}]",
           "--config.selection.lr=[0.01, 0.1]", "--config.selection.weight_decay=[0.0]",
           "--config.train.probe_solver=sgd"]
  argv = _args(tmp_path, cache, "dropout_ablation", "shard", *extra)
  config = dropout_ablation.get_config()
  for a in argv:
    if a.startswith("--config."):
      run.apply_override(config, *a[len("--config."):].split("=", 1))
  cells = grid.expand(config)
  # Task 0 of 2 finished its selection cells, and nothing else.
  for c in selection.first_round(config, grid.shard(cells, 0, 2)):
    _finish_fake(pathlib.Path(sweep.cell_dir(str(tmp_path / "work-shard"), c)), c)
  old = _folder(tmp_path, "shard", "dropout_ablation")
  old.mkdir(parents=True)
  (old / "table.md").write_text("the previous tables\n")
  _trains_nothing(monkeypatch)
  monkeypatch.setattr(sys, "argv", ["tlresearch.run", *argv, "--merge"])
  with pytest.raises(SystemExit) as exit_info:
    run.cli()
  err = capsys.readouterr().err
  assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1, err
  # Task 1's two selection cells (the merge stops at the first round it cannot read).
  assert err.startswith("error: cannot merge: 2 of 4 cells are not finished in "), err
  assert "(cells/" in err and "the tasks that run them must finish first" in err
  assert os.listdir(old) == ["table.md"] and (old / "table.md").read_text() == (
      "the previous tables\n")


# --- bad flags and busy workdirs -------------------------------------------------------------

BAD_FLAGS = [
    (["--task_index=2", "--num_tasks=2"],
     "--task_index must be an integer in [0, 1] for --num_tasks=2, got 2"),
    (["--task_index=-1", "--num_tasks=4"], "--task_index must be an integer in [0, 3]"),
    (["--task_index=one", "--num_tasks=2"], "got 'one'"),
    (["--task_index=0", "--num_tasks=0"], "--num_tasks must be an integer >= 1, got 0"),
    (["--task_index=0", "--num_tasks=2.5"], "--num_tasks must be an integer >= 1, got '2.5'"),
    (["--task_index=1"], "--task_index and --num_tasks go together"),
    (["--num_tasks=4"], "--task_index and --num_tasks go together"),
    (["--task_index=0", "--num_tasks=2", "--overwrite"],
     "--overwrite cannot be used with --num_tasks > 1"),
    (["--merge", "--task_index=0", "--num_tasks=2"], "--merge builds the tables from every"),
    (["--merge", "--overwrite"], "--merge trains nothing, so --overwrite does not apply"),
]


@pytest.mark.parametrize("extra, message", BAD_FLAGS, ids=[" ".join(e) for e, _ in BAD_FLAGS])
def test_bad_task_flags_exit_2_with_one_line(tmp_path, monkeypatch, capsys, extra, message):
  argv = _args(tmp_path, tmp_path / "cache", "finetune_sweep", "bad", *extra)
  monkeypatch.setattr(sys, "argv", ["tlresearch.run", *argv])
  with pytest.raises(SystemExit) as exit_info:
    run.cli()
  err = capsys.readouterr().err
  assert exit_info.value.code == 2
  assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
  for path in ("results-bad", "work-bad", "cache"):
    assert not (tmp_path / path).exists()


def test_task_and_whole_grid_locks(tmp_path, cache):
  args = lambda *extra: _args(tmp_path, cache, "finetune_sweep", "busy",
                              "--config.grid=[{'strategy': ['full']}]", *extra)
  work = str(tmp_path / "work-busy")
  running_task = io.directory_lock(work)
  assert running_task.acquire(shared=True)  # as a task of an array holds it
  try:
    # A whole-grid sweep could clear the workdir under the running tasks: refused.
    with pytest.raises(run.UserError, match="is in use by another sweep"):
      _main(args())
    # Another task of the array may run alongside, but not the same task twice.
    other_task = io.directory_lock(work)
    assert other_task.acquire(shared=True)
    other_task.release()
    own = io.task_lock(work, "finetune_sweep", 0, 2)
    assert own.acquire()
    with pytest.raises(run.UserError, match=r"--task_index=0 of --num_tasks=2 is already "
                                            r"running on workdir .*\(pid \d+\)"):
      _main(args("--task_index=0", "--num_tasks=2"))
    own.release()
  finally:
    running_task.release()

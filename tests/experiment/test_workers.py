"""Cells trained by worker processes (config.workers) and the timing ledger.

The slow tests run real sweeps on the offline digits dataset with `scratch` (no pretrained
backbone to build), because worker processes cannot see an in-process TFDS mock.
"""
import glob
import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from tlresearch.core import layout, timing
from tlresearch.core.errors import UserError
from tlresearch.experiment import cli as run, workers

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_auto_uses_one_worker_per_core_only_for_enough_cpu_work():
  cores = len(layout.cores())
  assert workers.count(0, 1000, "cpu", False) == max(1, min(cores, 1000 // workers.MIN_GROUPS_PER_WORKER))
  assert workers.count(0, 1000, "gpu", False) == 1
  assert workers.count(0, 1000, "cpu", True) == 1  # mocked data lives in this process only
  assert workers.count(0, 3, "cpu", False) == 1
  assert workers.count(3, 1, "cpu", False) == 3
  with pytest.raises(UserError, match="gpu backend"):
    workers.count(2, 10, "gpu", False)
  with pytest.raises(UserError, match="mocked"):
    workers.count(2, 10, "cpu", True)
  for bad in (-1, 1.5, True, "2"):
    with pytest.raises(UserError, match="workers must be an integer >= 0"):
      workers.check(bad)


def test_nested_phases_are_counted_once(monkeypatch):
  ticks = iter([0.0, 1.0, 3.0, 10.0])
  monkeypatch.setattr(timing.time, "perf_counter", lambda: next(ticks))
  timing.reset()
  with timing.phase("train"):        # 0 .. 10
    with timing.phase("eval"):       # 1 .. 3
      pass
    timing.nested("compile", 0.5)    # reported by JAX while "train" is open
  assert timing.snapshot() == {"eval": 2.0, "compile": 0.5, "train": 7.5}
  timing.add_all({"train": 1.0, "files": 0.25})  # a worker's ledger
  assert timing.snapshot() == {"eval": 2.0, "compile": 0.5, "train": 8.5, "files": 0.25}
  timing.reset()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
  """A real digits build and a compilation cache, shared by the sweeps below."""
  root = tmp_path_factory.mktemp("workers")
  return {"data": str(root / "data"), "cache": str(root / "cache")}


def _args(tmp_path, shared, tag, n_workers, epochs=8):
  return ["--experiment=finetune_sweep", f"--workdir={tmp_path / ('work-' + tag)}",
          f"--results_dir={tmp_path / ('results-' + tag)}", "--no_progress",
          f"--config.data_dir={shared['data']}", f"--config.cache_dir={shared['cache']}",
          "--config.targets=['digits']", "--config.seeds=[0, 1, 2]", "--config.k_shot=5",
          "--config.model.width=4", f"--config.train.epochs={epochs}",
          "--config.train.early_stopping.enabled=False",
          "--config.grid=[{'strategy': ['scratch'], 'train.batch_size': [16, 25]}]",
          "--config.selection.lr=[0.02, 0.05]", "--config.selection.widen=1",
          "--config.checkpoint.min_seconds=0", f"--config.workers={n_workers}"]


def _outputs(tmp_path, tag) -> dict:
  """runs.csv, selection.csv and every cell's metrics (without their seconds)."""
  out = {}
  for name in ("runs.csv", "selection.csv"):
    out[name] = (tmp_path / f"results-{tag}" / "finetune_sweep" / name).read_text()
  work = tmp_path / f"work-{tag}"
  for path in sorted(work.rglob("metrics.jsonl")):
    records = [json.loads(line) for line in path.read_text().splitlines()]
    out[str(path.relative_to(work))] = [{k: v for k, v in r.items() if k != "seconds"}
                                        for r in records]
  return out


class _Lines(logging.Handler):
  def __init__(self):
    super().__init__()
    self.lines = []

  def emit(self, record):
    self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def serial(shared, tmp_path_factory) -> dict:
  """The sweep in one process: the reference for the concurrent ones."""
  tmp_path = tmp_path_factory.mktemp("serial")
  assert run.main(_args(tmp_path, shared, "serial", 1)) == 0
  return _outputs(tmp_path, "serial")


@pytest.mark.slow
def test_concurrent_cells_equal_one_process(tmp_path, shared, serial):
  logger, lines = logging.getLogger("tlresearch"), _Lines()
  level = logger.level
  logger.addHandler(lines)
  logger.setLevel(logging.INFO)
  try:
    assert run.main(_args(tmp_path, shared, "workers", 2)) == 0
  finally:
    logger.removeHandler(lines)
    logger.setLevel(level)
  assert "training on 2 worker processes" in lines.lines
  # every cell's summary line reached the sweep's log (final and selection cells)
  assert sum(line.startswith("[ok] strategy=scratch") for line in lines.lines) >= 6 + 4
  assert len(serial) > 2 + 6  # final cells and selection cells
  assert _outputs(tmp_path, "workers") == serial  # bitwise: floats compare exactly


def _finished(work) -> int:
  """Final and selection cells with a final.json in the store (glob, unlike rglob, ignores
  the checkpoint folders that appear and vanish meanwhile)."""
  return len(glob.glob(f"{work}/cells/*/final.json"))


def _children(pid: int) -> list[int]:
  out = []
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        with open(f"/proc/{entry}/stat") as f:
          if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry))
      except (OSError, IndexError, ValueError):
        pass
  return out


@pytest.mark.slow
def test_kill_during_a_concurrent_sweep_resumes_to_the_same_table(tmp_path, shared, serial):
  args = _args(tmp_path, shared, "killed", 2)
  env = {**os.environ, "PYTHONPATH": REPO}
  proc = subprocess.Popen([sys.executable, "-m", "tlresearch.run", *args], cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  work = tmp_path / "work-killed"
  deadline = time.monotonic() + 300
  while _finished(work) < 3:
    assert proc.poll() is None, "the sweep ended before the kill"
    assert time.monotonic() < deadline, "no cell finished within 300 s"
    time.sleep(0.05)
  pool = _children(proc.pid)  # the workers (and multiprocessing's helper process)
  assert len(pool) >= 2
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  finished = _finished(work)
  assert finished < len(serial) - 2, "the kill came after the last cell"
  # The workers die with the sweep: nothing goes on writing into the workdir.
  deadline = time.monotonic() + 30
  while any(os.path.exists(f"/proc/{p}") and _state(p) != "Z" for p in pool):
    assert time.monotonic() < deadline, "a worker outlived the killed sweep"
    time.sleep(0.05)
  assert not (tmp_path / "results-killed").exists()

  r = subprocess.run([sys.executable, "-m", "tlresearch.run", *args], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  assert _outputs(tmp_path, "killed") == serial


def _state(pid: int) -> str:
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0]
  except (OSError, IndexError):
    return "gone"


def test_a_pool_shared_by_several_experiments_has_the_compile_cache(tmp_path, monkeypatch):
  # The workers take the persistent compilation cache when they start: it must be set first.
  import jax
  from experiments import dropout_ablation, finetune_sweep
  seen = []

  class FakePool:
    def __init__(self, n, threads):
      seen.append((n, threads, jax.config.jax_compilation_cache_dir))

    def __enter__(self):
      return self

    def __exit__(self, *_):
      return False

  monkeypatch.setattr(workers, "Pool", FakePool)
  monkeypatch.setattr(workers, "count", lambda *_: 2)
  before = jax.config.jax_compilation_cache_dir
  loaded = []
  for module in (finetune_sweep, dropout_ablation):
    c = module.get_config()
    c.cache_dir = str(tmp_path / "cache")
    loaded.append((module.__name__, c, module))
  try:
    with run._shared_pool(loaded) as pool:
      assert isinstance(pool, FakePool)
  finally:
    jax.config.update("jax_compilation_cache_dir", before)
  assert seen == [(2, 1, str(tmp_path / "cache" / "jax_compilation_cache"))]

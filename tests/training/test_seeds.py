"""Seeds trained together (one vmapped `train.fit`) give what each seed's own run gives."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from tlresearch import models
from tlresearch.methods import strategies
from tlresearch.training import checkpoint, train
from tests.conftest import fit_one, make_dataset, tiny_model_cfg, tiny_train_cfg

SEEDS = (0, 1, 2)


@functools.lru_cache(maxsize=None)
def _model():
  # One stage: the smallest network with a frozen prefix to cache; compiling dominates here.
  return models.build(tiny_model_cfg(num_stages=1), 4)


def _cfg(mode="vmap"):
  # One config for the single-stage cases, so they share compiled programs.
  cfg = tiny_train_cfg(epochs=4, lr=0.5)  # fast enough learning for seed 1 to overfit
  cfg.early_stopping.monitor = "val_loss"
  cfg.early_stopping.patience = 1
  cfg.seeds_mode = mode
  return cfg


def _datas():
  """Seed 1's validation labels disagree with its training labels: its validation loss
  rises as it learns, so it stops early while the others go on."""
  datas = [make_dataset(n_train=32, seed=s) for s in SEEDS]
  datas[1] = dataclasses.replace(datas[1], val_y=(datas[1].val_y + 1) % datas[1].num_classes)
  return datas


def _sweep_config(mode="vmap"):
  from experiments import finetune_sweep
  c = finetune_sweep.get_config()
  c.targets, c.seeds = ["digits"], list(SEEDS)
  c.model = tiny_model_cfg(num_stages=1)
  c.train = _cfg(mode)
  c.selection.enabled = False  # the final cells' grouping is what these tests look at
  return c


def _starts(model):
  keys = [train.CellKeys.from_seed(s) for s in SEEDS]
  return keys, [model.init(k.init, jnp.zeros((1, 16, 16, 3))) for k in keys]


def _both(spec, cfg, datas, starts=None):
  """(one train.fit per seed, one train.fit of all seeds vmapped) on the same inputs."""
  model = _model()
  keys, variables = _starts(model)
  variables = starts or variables
  strategy = strategies.get(spec, model.groups)
  alone = [fit_one(model, v, strategy, d, cfg, k) for v, d, k in zip(variables, datas, keys)]
  together = train.fit(model, variables, strategy, datas, cfg, keys)
  return alone, together


_RUNS = {}


def _run(name):
  """Each case is trained once per module (the tests only read the results)."""
  if name not in _RUNS:
    starts = None
    if name == "diverged":
      _, starts = _starts(_model())
      # Seed 2 starts with a NaN head: its first loss is NaN, the others are untouched.
      starts[2]["params"]["head"] = jax.tree.map(lambda a: a * jnp.nan,
                                                 starts[2]["params"]["head"])
    _RUNS[name] = _both("full" if name == "diverged" else name, _cfg(), _datas(), starts)
  return _RUNS[name]


def _flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def _assert_same(alone, together):
  assert len(alone) == len(together)
  for s, (a, b) in enumerate(zip(alone, together)):
    for key in ("best_epoch", "epochs_run", "cached_prefix", "notes", "diverged"):
      assert getattr(a, key) == getattr(b, key), (s, key)
    assert len(a.history) == len(b.history)
    for ra, rb in zip(a.history, b.history):
      assert ra.keys() == rb.keys()
      assert (ra["epoch"], ra["stage"]) == (rb["epoch"], rb["stage"])
      for k in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "l2"):
        if ra.get(k) is None:  # a converged probe's solve has no lr; an epoch has no l2
          assert rb.get(k) is None, (s, k)
          continue
        assert ra[k] == pytest.approx(rb[k], rel=1e-4, abs=1e-6, nan_ok=True), (s, k)
    assert a.test == pytest.approx(b.test, rel=1e-4, nan_ok=True), s
    np.testing.assert_array_equal(a.test_predictions, b.test_predictions)
    for part in ("params", "batch_stats"):
      fa, fb = _flat(a.variables[part]), _flat(b.variables[part])
      assert fa.keys() == fb.keys()
      for p in fa:
        # The batched program sums in another order: after a few epochs single weights
        # differ by float noise relative to the tensor's scale, not to each weight's own
        # (a seed mixed with another would differ by the scale itself).
        scale = max(1.0, float(np.abs(fb[p]).max()))
        np.testing.assert_allclose(fa[p], fb[p], rtol=1e-4, atol=1e-5 * scale,
                                   err_msg=f"{s} {p}")


@pytest.mark.parametrize("name", ["full", "linear_probe", "lp_ft"])
def test_seeds_together_equal_seeds_alone(name):
  alone, together = _run(name)
  _assert_same(alone, together)
  if name == "linear_probe":
    assert all(r.cached_prefix for r in together)
  if name == "lp_ft":  # seed 1 stops early in each stage: the stages start at other epochs
    stages = [[h["stage"] for h in r.history] for r in together]
    assert all(set(st) == {"probe", "fine_tune"} for st in stages)
    assert len(stages[1]) < len(stages[0]), stages


def test_early_stopping_is_per_seed():
  alone, together = _run("full")
  runs = [r.epochs_run for r in together]
  assert len(set(runs)) > 1, runs  # the seeds really stopped at different epochs
  assert runs[1] < 4 and together[1].best_epoch < runs[1]
  _assert_same(alone, together)


def test_divergence_stops_only_that_seed():
  alone, together = _run("diverged")
  _assert_same(alone, together)
  assert together[2].diverged == {"epoch": 1, "step": 1}
  assert together[0].diverged is None and together[1].diverged is None
  healthy, _ = _run("full")
  for s in (0, 1):  # what the other seeds learn does not depend on their neighbour
    assert together[s].epochs_run == healthy[s].epochs_run
    assert together[s].test == pytest.approx(healthy[s].test, rel=1e-4)


def test_auto_mode_loops_on_cpu_and_vmaps_on_accelerators():
  cfg = tiny_train_cfg()
  assert cfg.seeds_mode == "auto"
  assert train.seeds_mode(cfg, backend="cpu") == "loop"
  assert train.seeds_mode(cfg, backend="gpu") == "vmap"
  cfg.seeds_mode = "vmap"
  assert train.seeds_mode(cfg, backend="cpu") == "vmap"
  from tlresearch.experiment import cell, grid
  from tlresearch.core.errors import UserError
  bad = grid.expand(_sweep_config("threads"))[0].config
  with pytest.raises(UserError, match="train.seeds_mode must be one of auto, loop, vmap"):
    cell.check(bad)  # before anything trains


def test_different_train_sizes_fall_back_to_one_run_per_seed():
  model = _model()
  keys, variables = _starts(model)
  datas = [make_dataset(n_train=n, seed=i) for i, n in enumerate((32, 48, 32))]
  cfg = _cfg()
  cfg.epochs = 1
  out = train.fit(model, variables, strategies.get("full", model.groups), datas, cfg, keys)
  assert [r.history[0]["epoch"] for r in out] == [1, 1, 1]
  alone = fit_one(model, variables[1], strategies.get("full", model.groups), datas[1], cfg,
                  keys[1])
  assert out[1].history[0]["train_loss"] == alone.history[0]["train_loss"]


def test_vmapped_seeds_resume_bitwise_from_a_checkpoint(tmp_path):
  """A vmapped fit killed mid-stage resumes from its one checkpoint to the same result."""
  model = _model()
  keys, variables = _starts(model)
  strategy = strategies.get("lp_ft", model.groups)
  datas, cfg = _datas(), _cfg()
  ckpt = lambda: checkpoint.FitCheckpointer(str(tmp_path / "ck"), "fp")  # noqa: E731
  whole = train.fit(model, variables, strategy, datas, cfg, keys)

  class Killed(Exception):
    pass

  def kill(seed, record, _):
    if seed == 0 and record["epoch"] == 3:  # in the second stage
      raise Killed

  with pytest.raises(Killed):
    train.fit(model, variables, strategy, datas, cfg, keys, checkpointer=lambda _: ckpt(),
              on_epoch=kill)
  assert checkpoint.Rolling(str(tmp_path / "ck")).steps()  # progress was saved
  resumed = train.fit(model, variables, strategy, datas, cfg, keys,
                      checkpointer=lambda _: ckpt())
  for a, b in zip(whole, resumed):
    assert a.history == [{**r, "seconds": a_r["seconds"]} for r, a_r in zip(b.history,
                                                                            a.history)]
    assert a.test == b.test and a.best_epoch == b.best_epoch
    np.testing.assert_array_equal(a.test_predictions, b.test_predictions)


def test_sweep_groups_are_the_seeds_of_one_configuration_and_mode_is_operational():
  from tlresearch.experiment import cell, grid, sweep
  cells = grid.expand(_sweep_config("vmap"))
  groups = sweep.seed_groups(cells)
  assert sorted(c.id for g in groups for c in g) == sorted(c.id for c in cells)
  for g in groups:
    assert sorted(m.config.seed for m in g) == list(SEEDS)
    assert all({**m.axes, "seed": 0} == {**g[0].axes, "seed": 0} for m in g)
  assert all(len(g) == 1 for g in sweep.seed_groups(grid.expand(_sweep_config("loop"))))
  # Same cells, same fingerprints, whichever way their seeds train (and configs saved before
  # the key existed still match).
  loop = grid.expand(_sweep_config("loop"))
  assert [cell.fingerprint(c.config) for c in cells] == [cell.fingerprint(c.config) for c in loop]
  saved = cells[0].config.to_dict()
  del saved["train"]["seeds_mode"]
  assert cell.identity(saved) == cell.identity(loop[0].config)


def test_seeds_trained_together_write_what_one_run_each_writes(tmp_path, monkeypatch):
  from tlresearch.experiment import cell, grid
  from tlresearch.core import io
  monkeypatch.setattr(cell.data_lib, "load_for", lambda cfg: _datas()[cfg.seed])
  config = _sweep_config()
  config.grid = [{"strategy": ["scratch"]}]  # no pretrained backbone to build
  cells = grid.expand(config)
  assert len(cells) == len(SEEDS)
  for c in cells:
    cell.run([c], [str(tmp_path / "loop" / c.id)], None)
  cell.run(cells, [str(tmp_path / "vmap" / c.id) for c in cells], None)
  timings = ("compile_seconds", "wall_seconds", "seconds")
  for c in cells:
    loop, vmap = tmp_path / "loop" / c.id, tmp_path / "vmap" / c.id
    assert sorted(p.name for p in loop.iterdir()) == ["config.json", "final.json",
                                                      "metrics.jsonl"]
    assert sorted(p.name for p in vmap.iterdir()) == sorted(p.name for p in loop.iterdir())
    assert (loop / "config.json").read_text() == (vmap / "config.json").read_text()
    a, b = io.read_json(loop / "final.json"), io.read_json(vmap / "final.json")
    assert a.keys() == b.keys()
    for k in a.keys() - set(timings):
      if isinstance(a[k], float):
        assert a[k] == pytest.approx(b[k], rel=1e-4), k
      elif k != "classification_report":
        assert a[k] == b[k], k
    lines = [(loop / "metrics.jsonl").read_text().splitlines(),
             (vmap / "metrics.jsonl").read_text().splitlines()]
    assert len(lines[0]) == len(lines[1]) == a["epochs_run"]


def test_sweep_trains_a_configurations_seeds_in_one_group(tmp_path, monkeypatch):
  from tlresearch.experiment import cell, sweep
  monkeypatch.setattr(cell.data_lib, "load_for", lambda cfg: _datas()[cfg.seed])
  groups = []
  run = cell.run
  monkeypatch.setattr(cell, "run", lambda cells, *a, **k: groups.append(
      [c.config.seed for c in cells]) or run(cells, *a, **k))
  config = _sweep_config()
  config.grid = [{"strategy": ["scratch"]}]
  config.cache_dir = str(tmp_path / "cache")
  summary = sweep.run_grid(config, "s", str(tmp_path / "work"), str(tmp_path / "results"),
                           progress=False)
  assert groups == [list(SEEDS)] and summary["cells"] == len(SEEDS)
  rows = (tmp_path / "results" / "s" / "runs.csv").read_text().splitlines()[1:]
  assert len(rows) == len(SEEDS) and all(",ok," in r for r in rows)

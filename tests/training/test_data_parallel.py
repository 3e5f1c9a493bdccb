"""Data-parallel training equals one-device training, and really runs over the devices.

JAX fixes its device count when it starts, so the data-parallel fits run in a subprocess
that sees 4 forced host (CPU) devices; this process trains the same cells on one device
(`train.data_parallel=False`) as the reference, at the same time.
"""
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from tlresearch import models
from tlresearch.experiment import cell
from tlresearch.methods import strategies
from tlresearch.training import parallel, programs, train
from tests.conftest import fit_one, make_dataset, tiny_model_cfg, tiny_train_cfg

DEVICES = 4
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Evaluation splits of 18 examples: a chunk of 18 is padded to 20 to split over 4 devices.
CASES = {"full": dict(strategy="full", batch_size=16, epochs=2),
         "partial": dict(strategy="partial:k=1", batch_size=16, epochs=2),
         # 6 does not divide by 4: the largest device count that divides it is 3.
         "fallback": dict(strategy="linear_probe", batch_size=6, epochs=1,
                          probe_solver="sgd")}  # the SGD probe's step, not the solver


def _model():
  return models.build(tiny_model_cfg(), 4)


def _init_variables():
  """Random weights of the model's shapes, drawn with NumPy: `model.init` would compile its
  many small initializer programs, which takes longer here than all the fits."""
  shapes = jax.eval_shape(_model().init, jax.random.key(1), jnp.zeros((1, 16, 16, 3)))
  rng = np.random.default_rng(1)

  def draw(path, leaf):
    name, shape = path.split("/")[-1], leaf.shape
    if name == "kernel":
      return rng.normal(0, 1 / np.sqrt(np.prod(shape[:-1])), shape)
    if name in ("scale", "var"):  # positive, near one
      return 1 + 0.1 * np.abs(rng.normal(size=shape))
    return 0.1 * rng.normal(size=shape)  # bias, mean

  flat = traverse_util.flatten_dict(shapes, sep="/")
  return traverse_util.unflatten_dict(
      {p: jnp.asarray(draw(p, v), v.dtype) for p, v in flat.items()}, sep="/")


def _fit(case: dict, data_parallel: bool, variables):
  ds = make_dataset(n_val=18, n_test=18)
  model = _model()
  cfg = tiny_train_cfg(epochs=case["epochs"], batch_size=case["batch_size"],
                       data_parallel=data_parallel,
                       probe_solver=case.get("probe_solver", "lbfgs"))
  cfg.early_stopping.enabled = False  # compare the last epoch's weights, not a choice
  return fit_one(model, variables, strategies.get(case["strategy"], model.groups), ds, cfg,
                   train.CellKeys.from_seed(0))


def _summary(out) -> dict:
  return {"history": [{k: v for k, v in h.items() if k != "seconds"} for h in out.history],
          "test": out.test, "notes": out.notes, "cached_prefix": out.cached_prefix}


def _flat_params(out) -> dict:
  return traverse_util.flatten_dict(jax.device_get(out.variables["params"]), sep="/")


def _step_facts(compiled) -> dict:
  """How a compiled train step is partitioned: the devices of its (replicated) inputs, the
  number of examples each device gathers for its part of the batch (the partitioned gather
  of x[batch_idx], [batch, 1, height, width, channels] in the per-device HLO), and whether
  it all-reduces (gradients, BatchNorm statistics)."""
  sharding = jax.tree.leaves(compiled.input_shardings)[0]
  hlo = compiled.as_text()
  gather = re.search(r"= \w+\[(\d+),1,\d+,\d+,\d+\]\{[\d,]*\} gather\(", hlo)
  return {"devices": len(sharding.device_set), "replicated": sharding.is_fully_replicated,
          "per_device_batch": int(gather.group(1)), "all_reduce": "all-reduce(" in hlo}


def _worker(out_dir: str) -> None:
  """In the 4-device subprocess: the data-parallel fits, their results and step facts."""
  assert jax.device_count() == DEVICES, jax.devices()
  # The parent's initial weights: the same start, and no second eager init (its many small
  # programs take longer to compile than the fits here).
  variables = traverse_util.unflatten_dict(dict(np.load(os.path.join(out_dir, "init.npz"))),
                                           sep="/")
  facts = {}
  step = programs.train_step
  for name, case in CASES.items():
    calls = []  # the train step's arguments, to lower it again and read its partitioning
    programs.train_step = lambda *a, calls=calls: calls.append(a) or step(*a)
    out = _fit(case, data_parallel=True, variables=variables)
    programs.train_step = step
    assert len({a[0] for a in calls}) == 1  # one step program for the whole fit
    facts[name] = {**_summary(out), "step": _step_facts(step.lower(*calls[0]).compile())}
    np.savez(os.path.join(out_dir, f"{name}.npz"), **_flat_params(out))
  with open(os.path.join(out_dir, "facts.json"), "w") as f:
    json.dump(facts, f)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  out_dir = str(tmp_path_factory.mktemp("data_parallel"))
  variables = _init_variables()
  np.savez(os.path.join(out_dir, "init.npz"),
           **traverse_util.flatten_dict(jax.device_get(variables), sep="/"))
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT,
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES}"}
  proc = subprocess.Popen(
      [sys.executable, "-c", f"from tests.training.test_data_parallel import _worker; _worker({out_dir!r})"],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    reference = {name: _fit(case, data_parallel=False, variables=variables)
                 for name, case in CASES.items()
                 if name != "fallback"}
    log, _ = proc.communicate(timeout=300)
  finally:
    proc.kill()
  assert proc.returncode == 0, log[-3000:]
  with open(os.path.join(out_dir, "facts.json")) as f:
    facts = json.load(f)
  params = {n: dict(np.load(os.path.join(out_dir, f"{n}.npz"))) for n in CASES}
  return reference, facts, params


@pytest.mark.slow
@pytest.mark.parametrize("name", ["full", "partial"])
def test_data_parallel_fit_matches_one_device(runs, name):
  reference, facts, params = runs
  ref, got = _summary(reference[name]), facts[name]
  assert got["cached_prefix"] is ref["cached_prefix"] is (name == "partial")
  assert len(got["history"]) == len(ref["history"]) == CASES[name]["epochs"]
  for r, g in zip(ref["history"] + [ref["test"]], got["history"] + [got["test"]]):
    for key in ("train_loss", "val_loss", "loss"):
      if key in r:  # the sums run in another order over 4 devices: equal up to float error
        np.testing.assert_allclose(g[key], r[key], rtol=1e-4, atol=1e-5, err_msg=key)
    for key in ("train_accuracy", "val_accuracy", "accuracy", "lr"):
      if key in r:
        assert g[key] == r[key], key
  ref_params = _flat_params(reference[name])
  assert ref_params.keys() == params[name].keys()
  for path, v in ref_params.items():
    np.testing.assert_allclose(params[name][path], v, rtol=1e-4, atol=1e-5, err_msg=path)
  assert got["notes"] == ref["notes"] == []


@pytest.mark.slow  # shares the 4-device subprocess with the other slow tests here
@pytest.mark.parametrize("name", ["full", "partial"])
def test_the_step_really_runs_split_over_the_devices(runs, name):
  # Inputs replicated over all 4 devices, each convolution sees a quarter of the batch, and
  # the gradient / BatchNorm sums are all-reduced: not one device doing all the work.
  step = runs[1][name]["step"]
  assert step == {"devices": DEVICES, "replicated": True,
                  "per_device_batch": CASES[name]["batch_size"] // DEVICES, "all_reduce": True}


@pytest.mark.slow
def test_batch_not_divisible_by_the_devices_uses_the_largest_divisor(runs):
  facts = runs[1]["fallback"]
  assert facts["step"]["devices"] == 3 and facts["step"]["per_device_batch"] == 2
  assert facts["notes"] == ["batch size 6 does not divide over 4 devices: data parallel over 3"]
  assert np.isfinite(facts["history"][0]["train_loss"])


def test_width_is_the_largest_device_count_dividing_the_batch():
  assert [parallel.width(b, 4) for b in (16, 6, 10, 7, 3)] == [4, 3, 2, 1, 3]
  assert parallel.width(64, 1) == 1


def test_one_device_means_no_mesh_and_no_note():
  assert parallel.for_batch(64, enabled=False) == (None, None)
  if jax.local_device_count() == 1:
    assert parallel.for_batch(64) == (None, None)


def test_data_parallel_switch_is_operational():
  # Finished cells and cached pretraining, made before the switch existed or under the
  # other value, stay valid: it changes only float summation order.
  from tlresearch.core import schema
  cfg = schema.sweep()
  before = cfg.to_dict()
  del before["train"]["data_parallel"], before["pretrain"]["train"]["data_parallel"]
  cfg.train.data_parallel = False
  assert cell.identity(cfg) == cell.identity(before)
  assert "data_parallel" not in json.dumps(cell.identity(cfg))


def test_auto_seeds_mode_loops_where_each_seed_trains_data_parallel():
  # The vmapped seeds program runs on one device: with several, each looped seed uses all.
  cfg = tiny_train_cfg()
  assert train.seeds_mode(cfg, backend="gpu", devices=4) == "loop"
  assert train.seeds_mode(cfg, backend="gpu", devices=1) == "vmap"
  cfg.data_parallel = False
  assert train.seeds_mode(cfg, backend="gpu", devices=4) == "vmap"

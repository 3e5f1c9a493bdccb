"""The decisive properties of training: frozen means frozen, and free."""
import dataclasses
import json
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from tlresearch import models
from tlresearch.methods import optim, strategies
from tlresearch.training import programs, train
from tests.conftest import fit_one, make_dataset, tiny_model_cfg, tiny_train_cfg


def _setup(spec, classes=4, **model_kw):
  model = models.build(tiny_model_cfg(**model_kw), classes)
  variables = model.init(jax.random.key(1), jnp.zeros((1, 16, 16, 3)))
  # Non-trivial BatchNorm statistics, so "unchanged" is not "still at init".
  variables["batch_stats"] = jax.tree.map(lambda a: a + 0.3, variables["batch_stats"])
  return model, variables, strategies.get(spec, model.groups)


def _flat(tree):
  return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


@pytest.mark.parametrize("cache", [True, False])
def test_frozen_params_and_batchnorm_stats_bit_identical(dataset, cache):
  model, variables, strategy = _setup("partial:k=1")
  cfg = tiny_train_cfg(weight_decay=0.1, cache_frozen_prefix=cache)
  out = fit_one(model, variables, strategy, dataset, cfg, train.CellKeys.from_seed(0))
  before, after = _flat(variables), _flat(out.variables)
  frozen = ("stem", "stage1", "stage2")
  changed_trainable = False
  for path, v in before.items():
    group = path.split("/")[1]
    if group in frozen:
      assert np.array_equal(v, after[path]), f"{path} moved while frozen"
    elif not np.array_equal(v, after[path]):
      changed_trainable = True
  assert changed_trainable, "nothing trainable changed: the test would pass vacuously"
  assert out.cached_prefix is cache


def test_cached_feature_probe_equals_the_uncached_probe(dataset):
  """An SGD linear probe on features computed once trains exactly what running the frozen
  backbone every step trains: same accuracies, losses equal to float tolerance."""
  model, variables, strategy = _setup("linear_probe")
  outs = [fit_one(model, variables, strategy, dataset,
                    tiny_train_cfg(epochs=3, cache_frozen_prefix=cache, probe_solver="sgd"),
                    train.CellKeys.from_seed(0)) for cache in (True, False)]
  cached, uncached = outs
  assert cached.cached_prefix and not uncached.cached_prefix
  for key in ("train_accuracy", "val_accuracy"):
    assert [r[key] for r in cached.history] == [r[key] for r in uncached.history]
  for key in ("train_loss", "val_loss"):
    np.testing.assert_allclose([r[key] for r in cached.history],
                               [r[key] for r in uncached.history], rtol=1e-5)
  assert cached.test["accuracy"] == uncached.test["accuracy"]
  assert cached.val["accuracy"] == uncached.val["accuracy"]
  np.testing.assert_array_equal(cached.test_predictions, uncached.test_predictions)
  for a, b in zip(jax.tree.leaves(cached.variables), jax.tree.leaves(uncached.variables)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_no_optimizer_state_for_frozen_groups():
  model, variables, _ = _setup("linear_probe")
  params = variables["params"]
  for spec in ("linear_probe", "partial:k=2", "full"):
    s = strategies.get(spec, model.groups)
    rules = strategies.resolve(s.stages[0].rules, _flat(params).keys())
    tx, _ = optim.make(rules, params, optimizer="sgd", lr=optim.schedule(0.1, 10, 0),
                       weight_decay=1e-4)
    state = tx.init(params)
    # SGD with momentum keeps one trace entry per parameter it optimises, nothing else
    # with a shape: so the state's size is exactly the trainable count.
    state_size = sum(np.size(x) for x in jax.tree.leaves(state) if np.ndim(x) > 0)
    assert state_size == optim.count(params, rules), spec


def test_weight_decay_never_moves_frozen_weights():
  model, variables, _ = _setup("linear_probe")
  params = variables["params"]
  s = strategies.get("linear_probe", model.groups)
  rules = strategies.resolve(s.stages[0].rules, _flat(params).keys())
  tx, _ = optim.make(rules, params, optimizer="adamw", lr=optim.schedule(0.1, 10, 0),
                     weight_decay=0.5)
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  for path, u in _flat(updates).items():
    assert (np.all(u == 0)) == (rules[path] == "frozen"), path


def _epoch_flops(spec, start="stem"):
  model, variables, strategy = _setup(spec)
  rules = strategy.stages[0].rules
  rule_by_path = strategies.resolve(rules, _flat(variables["params"]).keys())
  step = programs.StepSpec(
      model=model, rules=rules, optimizer="sgd", total_steps=4, warmup_steps=0,
      momentum=0.9, start=start,
      frozen_bn=strategies.frozen_groups(rule_by_path, model.groups), augment=None,
      batch_size=16, steps_per_epoch=1)
  inputs = programs.step_inputs(0.1, 1e-4)
  state = programs.init_state(step, variables, inputs)
  x, y = jnp.zeros((16, 16, 16, 3), jnp.uint8), jnp.zeros((16,), jnp.int32)
  k = jax.random.key(0)
  compiled = programs.train_step.lower(
      step, state, x, y, jnp.arange(16), k, k, inputs).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return cost["flops"]


def test_cost_analysis_linear_probe_cheaper_than_full_and_falls_with_k():
  # Same input (raw images, no cached prefix): the only difference is what is differentiated.
  full = _epoch_flops("full")
  k2, k1 = _epoch_flops("partial:k=2"), _epoch_flops("partial:k=1")
  probe = _epoch_flops("linear_probe")
  assert probe < k1 < k2 < full
  # Forward-only backbone: a probe costs well under half of full fine-tuning.
  assert probe < 0.6 * full


def test_early_stopping_restores_best_epoch_weights():
  # Validation labels disagree with training labels, so validation loss gets worse as the
  # model learns: the best epoch is early, and training stops `patience` epochs later.
  ds = make_dataset(n_train=64, n_val=32)
  ds = dataclasses.replace(ds, val_y=(ds.val_y + 1) % ds.num_classes)
  model, variables, strategy = _setup("full")
  cfg = tiny_train_cfg(epochs=12, lr=0.2)
  cfg.early_stopping.monitor = "val_loss"
  cfg.early_stopping.patience = 2
  snapshots = {}
  out = fit_one(model, variables, strategy, ds, cfg, train.CellKeys.from_seed(0),
                  on_epoch=lambda r, s: snapshots.__setitem__(r["epoch"],
                                                              jax.device_get(s.params)))
  best, ran = out.best_epoch, out.epochs_run
  assert best < ran < 12, (best, ran)
  losses = [h["val_loss"] for h in out.history]
  assert best == int(np.argmin(losses)) + 1
  got = _flat(out.variables["params"])
  for path, v in _flat(snapshots[best]).items():
    assert np.array_equal(got[path], v), path
  assert any(not np.array_equal(got[p], v) for p, v in _flat(snapshots[ran]).items())


@pytest.mark.parametrize("early_stopping", [True, False])
def test_final_validation_is_the_returned_weights_own(early_stopping):
  # The final validation metrics come from the epoch whose weights are returned (no second
  # pass): they must equal a fresh evaluation of those weights, bit for bit.
  ds = make_dataset(n_train=64, n_val=32)
  ds = dataclasses.replace(ds, val_y=(ds.val_y + 1) % ds.num_classes)  # an early best epoch
  model, variables, strategy = _setup("full")
  cfg = tiny_train_cfg(epochs=6, lr=0.2)
  cfg.early_stopping.enabled = early_stopping
  cfg.early_stopping.patience = 2
  out = fit_one(model, variables, strategy, ds, cfg, train.CellKeys.from_seed(0))
  fresh, _ = programs.evaluate(model, out.variables, jnp.asarray(ds.val_x),
                               jnp.asarray(ds.val_y))
  assert out.val == fresh
  # with early stopping the best epoch's weights come back, without it the last epoch's
  assert (out.epochs_run < 6) == early_stopping and out.best_epoch < 6


def test_same_seed_same_result_across_runs(dataset):
  model, variables, strategy = _setup("full")
  cfg = tiny_train_cfg(epochs=1)
  run = lambda: fit_one(model, variables, strategy, dataset, cfg,
                          train.CellKeys.from_seed(3)).history
  a, b = run(), run()
  strip = lambda hs: [{k: v for k, v in h.items() if k != "seconds"} for h in hs]
  assert strip(a) == strip(b)


def test_augmentation_changes_images_but_keeps_shape():
  from tlresearch.data.augment import AugmentSpec, augment
  x = jnp.asarray(np.random.default_rng(0).random((4, 16, 16, 3)), jnp.float32)
  spec = AugmentSpec(rotation=20, width_shift=0.1, height_shift=0.1, shear=10, zoom=0.1)
  y = augment(jax.random.key(0), x, spec)
  assert y.shape == x.shape and not np.allclose(y, x)
  ident = augment(jax.random.key(0), x, AugmentSpec())
  np.testing.assert_allclose(ident, x, atol=1e-5)


def test_divergence_stops_training_and_is_reported(dataset):
  model, variables, strategy = _setup("full")
  cfg = tiny_train_cfg(epochs=5, lr=1e12, warmup_epochs=0.0)
  out = fit_one(model, variables, strategy, dataset, cfg, train.CellKeys.from_seed(0))
  assert not np.isfinite(out.history[-1]["train_loss"])
  assert out.epochs_run < 5
  assert any("non-finite training loss" in n for n in out.notes)


def test_learning_rate_and_weight_decay_share_one_compiled_step():
  dataset = make_dataset(n_train=40, seed=5)  # shapes no other test compiles for
  model, variables, strategy = _setup("full")
  out, compile_seconds = {}, {}
  for lr, wd in ((0.05, 5e-4), (0.2, 0.0)):
    cfg = tiny_train_cfg(epochs=1, lr=lr, weight_decay=wd)
    with programs.compile_clock() as clock:
      out[lr] = fit_one(model, variables, strategy, dataset, cfg, train.CellKeys.from_seed(0))
    compile_seconds[lr] = clock.seconds
  # The second fit, at another lr and weight decay, compiles nothing at all.
  assert compile_seconds[0.05] > 0 and compile_seconds[0.2] == 0
  # ... and the values still matter.
  assert out[0.05].history[0]["train_loss"] != out[0.2].history[0]["train_loss"]
  assert out[0.2].history[0]["lr"] > out[0.05].history[0]["lr"]


# `full` (BatchNorm in batch mode under bf16) compiles for ~20 s here: slow group.
@pytest.mark.parametrize("spec", [pytest.param("full", marks=pytest.mark.slow), "partial:k=1"])
def test_bfloat16_compute_stays_close_to_float32_with_float32_state(dataset, spec):
  model, variables, strategy = _setup(spec)
  outs = {dt: fit_one(model, variables, strategy, dataset,
                      tiny_train_cfg(epochs=2, compute_dtype=dt), train.CellKeys.from_seed(0))
          for dt in ("float32", "bfloat16")}
  # Master weights, BatchNorm statistics and cached features stay float32 ...
  for v in _flat(outs["bfloat16"].variables).values():
    assert v.dtype == np.float32
  assert outs["bfloat16"].cached_prefix is (spec != "full")
  # ... and a bf16 epoch tracks the fp32 one (bf16 keeps ~3 significant digits).
  a, b = ([h[k] for h in outs[dt].history for k in ("train_loss", "val_loss")]
          for dt in ("float32", "bfloat16"))
  np.testing.assert_allclose(b, a, rtol=0.05)
  assert a != b, "bf16 gave fp32's bits: the cast did not happen"


def test_compute_dtype_counts_in_identities_only_away_from_float32():
  from experiments import finetune_sweep
  from tlresearch.experiment import cell, grid
  from tlresearch.training import pretrain
  cfg = grid.expand(finetune_sweep.get_config())[0].config
  saved = cfg.to_dict()  # as a config saved before the key existed
  del saved["train"]["compute_dtype"]
  del saved["pretrain"]["train"]["compute_dtype"]
  assert cell.identity(saved) == cell.identity(cfg)
  assert "compute_dtype" not in json.dumps(cell.identity(cfg))
  bf16 = cfg.to_dict()
  bf16["train"]["compute_dtype"] = "bfloat16"
  assert cell.fingerprint(bf16) != cell.fingerprint(cfg)
  bf16["pretrain"]["train"]["compute_dtype"] = "bfloat16"
  assert pretrain.identity(bf16["pretrain"], bf16["model"]) != \
      pretrain.identity(saved["pretrain"], saved["model"])


def test_evaluation_chunks_are_balanced_and_do_not_change_logits():
  assert programs._chunk_size(269, 1) == 135   # 2 x 135, not 2 x 256
  assert programs._chunk_size(900, 1) == 225
  assert programs._chunk_size(256, 1) == 256
  assert programs._chunk_size(5, 1) == 5
  assert programs._chunk_size(269, 4) == 136   # splits over 4 devices
  model = models.build(tiny_model_cfg(), 4)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  x = jnp.asarray(make_dataset(n_train=20).train_x)
  spec = programs.EvalSpec(model)
  outs = []
  for chunk in (256, 8):  # one chunk of 20, three of 7
    with mock.patch.object(programs, "EVAL_CHUNK", chunk):
      outs.append(np.asarray(jax.jit(lambda v, x: programs._forward_chunks(spec, v, x))(
          variables, x)))
  assert all(np.array_equal(o, outs[0]) for o in outs[1:])

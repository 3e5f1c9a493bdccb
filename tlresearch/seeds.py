"""The seeds of one configuration trained together: one vmapped program instead of S.

`fit_seeds` returns what `train.fit` returns for each seed, equal within float tolerance:
the per-seed states, data and keys are stacked along a leading axis and train.py's compiled
pieces (the step at a batch index, the epoch order, the frozen-prefix outputs, evaluation)
run under `jax.vmap`, compiled once through `train._compiled`. Every seed keeps its own
k-shot subset, head init, data order, dropout and augmentation keys, early stopping and
divergence stop: a seed that is done stays in the program but its updates are masked
(`jnp.where` on a per-seed `active` flag), so what it keeps is exactly what a run of its own
would keep. The epoch loop ends when every seed is done.

Whether this pays depends on the device (`train.seeds_mode`, `resolve_mode`): on this
project's 2-core CPU three vmapped seeds trained ~3x slower than a loop over them, since
XLA:CPU gains nothing from the extra batch dimension; a small model that underuses a GPU or
TPU is where one program for all seeds is expected to help (not measured here).

No mid-fit checkpoints on the vmapped path: a group killed mid-training reruns from scratch.
Checkpointers are honoured where the seeds run one by one (`train.fit`), which is also what
happens when one of them holds progress to resume, or when the seeds' splits differ in size
(nothing to stack).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from tlresearch import grid, optim, train
from tlresearch.data.augment import AugmentSpec
from tlresearch.errors import UserError, choices
from tlresearch.strategies import stage_epochs

MODES = ("auto", "vmap", "loop")
SPLITS = ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")


def resolve_mode(train_cfg, backend: str | None = None, devices: int | None = None) -> str:
  """How seeds train under `train_cfg.seeds_mode`: "vmap" or "loop"; "auto" is loop on CPU
  (measured there, see the module docstring), vmap on a single accelerator. With several
  local devices and `train.data_parallel` on, "auto" loops too: the vmapped program runs on
  one device, while each looped seed trains data parallel over all of them."""
  mode = train_cfg.get("seeds_mode", "auto")
  if mode not in MODES:
    raise UserError(f"train.seeds_mode must be one of {choices(MODES)}, got '{mode}'")
  if mode != "auto":
    return mode
  if (backend or jax.default_backend()) == "cpu":
    return "loop"
  devices = jax.local_device_count() if devices is None else devices
  return "loop" if devices > 1 and train_cfg.get("data_parallel", True) else "vmap"


def group_key(cfg) -> str:
  """Cells with equal keys differ only in seed (and operational keys): one vmapped group."""
  identity = grid.identity(cfg.to_dict())
  identity.pop("seed", None)
  return json.dumps(identity, sort_keys=True)


def groups(cells) -> dict:
  """{cell id: the cells of its group} for the cells whose seeds train together (vmap
  mode, and at least one other seed of the same configuration among `cells`)."""
  by_key = {}
  for c in cells:
    if resolve_mode(c.config.train) == "vmap":
      by_key.setdefault(group_key(c.config), []).append(c)
  return {c.id: group for group in by_key.values() if len(group) > 1 for c in group}


# ---------------------------------------------------------------- vmapped programs

def _over_seeds(fn):
  """fn(static, *args) mapped over a leading seed axis of every arg; the name keys
  `train._compiled`'s cache, so it must differ from fn's."""
  def mapped(static, *args):
    return jax.vmap(functools.partial(fn, static))(*args)
  mapped.__name__ = f"seeds{fn.__name__}"
  return mapped


def _pick(flag, new, old):
  return jax.tree.map(lambda a, b: jnp.where(flag, a, b), new, old)


def _masked_step(spec, state, x, y, batch_idx, dropout_key, aug_key, inputs, active):
  """train's step, kept only where the seed is still training: a stopped or diverged seed's
  state stays exactly as it was."""
  new, metrics = train._train_step_at(spec, state, x, y, batch_idx, dropout_key, aug_key,
                                      inputs)
  return _pick(active, new, state), metrics


_step = _over_seeds(_masked_step)
_epoch_order = _over_seeds(train._epoch_order)
_init_opt_state = _over_seeds(train._init_opt_state)
_forward_chunks = _over_seeds(train._forward_chunks)
_evaluate = _over_seeds(train._evaluate)
_select = jax.jit(jax.vmap(_pick))  # per seed: new where flag, else old


def init_state(spec, variables, inputs) -> train.TrainState:
  """Stacked `train.init_state`."""
  params = variables["params"]
  opt_state = train._compiled(_init_opt_state, spec, params, inputs)(params, inputs)
  seeds = jax.tree.leaves(params)[0].shape[0]
  return train.TrainState(jnp.zeros((seeds,), jnp.int32), params,
                          variables.get("batch_stats", {}), opt_state)


def train_epoch(spec, state, x, y, order_keys, dropout_keys, aug_keys, inputs, active):
  """`train.train_epoch` for stacked seeds; seeds where `active` is False keep their state.
  Metrics are per seed; `step_losses` is [steps, seeds]."""
  order = train._compiled(_epoch_order, spec, y, order_keys)(y, order_keys)
  order = jnp.swapaxes(order, 0, 1)  # [steps, seeds, batch]: one slice per step
  step = train._compiled(_step, spec, state, x, y, order[0], dropout_keys, aug_keys, inputs,
                         active)
  losses, accs = [], []
  for i in range(spec.steps_per_epoch):
    state, (loss, acc) = step(state, x, y, order[i], dropout_keys, aug_keys, inputs, active)
    losses.append(loss)
    accs.append(acc)
  losses = jnp.stack(losses)
  return state, {"train_loss": jnp.mean(losses, 0), "train_accuracy": jnp.mean(jnp.stack(accs), 0),
                 "step_losses": losses}


def prefix_outputs(model, variables, x, stop: str):
  spec = train.EvalSpec(model, None, stop)
  return train._compiled(_forward_chunks, spec, variables, x)(variables, x)


def evaluate(model, variables, x, y, start: str | None = None):
  """Per-seed ({'loss', 'accuracy'} as numpy [seeds], predictions [seeds, n])."""
  spec = train.EvalSpec(model, start)
  metrics, pred = train._compiled(_evaluate, spec, variables, x, y)(variables, x, y)
  return jax.device_get(metrics), np.asarray(pred)


# ---------------------------------------------------------------- fit

def fit_seeds(model, variables_per_seed, strategy, datas, cfg, keys_per_seed, log=print,
              checkpointers=None) -> list[dict]:
  """`train.fit` for each seed (lists aligned by seed), as one vmapped program.

  Falls back to `train.fit` per seed when there is one seed, when the seeds' splits differ
  in size (nothing to stack), or when a checkpointer (one per seed, or None) holds progress
  to resume. Otherwise the checkpointers are not used: the vmapped path saves nothing
  mid-fit, so a group killed mid-training reruns from scratch.
  """
  why = _loop_reason(datas, checkpointers)
  if why is not None:
    if len(datas) > 1:
      log(f"training {len(datas)} seeds one by one: {why}")
    ckpts = checkpointers or [None] * len(datas)
    return [train.fit(model, v, strategy, d, cfg, k, log, checkpointer=c)
            for v, d, k, c in zip(variables_per_seed, datas, keys_per_seed, ckpts)]
  return _fit_stacked(model, variables_per_seed, strategy, datas, cfg, keys_per_seed)


def _loop_reason(datas, checkpointers) -> str | None:
  if len(datas) < 2:
    return "a single seed"
  shapes = {tuple(np.shape(getattr(d, s)) for s in SPLITS) for d in datas}
  if len(shapes) > 1:
    return "their splits differ in size"
  if checkpointers and any(c is not None and c.peek() is not None for c in checkpointers):
    return "a checkpoint to resume"
  return None


@dataclasses.dataclass
class _Seed:
  """What `train._fit` keeps in local variables, for one seed."""
  history: list = dataclasses.field(default_factory=list)
  notes: list = dataclasses.field(default_factory=list)
  best_epoch: int = 0
  cached: bool = False
  diverged: dict | None = None
  val: dict | None = None
  test: dict | None = None
  pred: np.ndarray | None = None


def _stack(trees):
  return jax.tree.map(lambda *a: jnp.stack(a), *trees)


def _fit_stacked(model, variables_per_seed, strategy, datas, cfg, keys_per_seed) -> list[dict]:
  groups, n_seeds = model.groups, len(datas)
  aug = AugmentSpec.from_config(cfg.augment)
  es = cfg.early_stopping
  sign = 1.0 if es.monitor == "val_accuracy" else -1.0
  seeds = [_Seed() for _ in range(n_seeds)]
  t_start = time.perf_counter()
  n = len(datas[0].train_x)
  batch_size = min(int(cfg.batch_size), n)
  steps = -(-n // batch_size)
  budget = optim.epoch_budget(int(cfg.epochs), steps, int(cfg.get("min_steps", 0)))
  variables = _stack(variables_per_seed)
  raw = {s: jnp.asarray(np.stack([getattr(d, s) for d in datas])) for s in SPLITS}
  keys = {f: jnp.stack([getattr(k, f) for k in keys_per_seed])
          for f in ("order", "dropout", "augment")}
  for stage, n_epochs in zip(strategy.stages, stage_epochs(strategy.stages, budget)):
    live = [s for s in range(n_seeds) if seeds[s].diverged is None]
    if n_epochs <= 0 or not live:
      continue  # a diverged seed runs no later stage, as in train._fit
    # Stacked variables give stacked penalty anchors: each seed's own stage start.
    spec, inputs = train.stage_spec(model, stage, variables, cfg, n, n_epochs)
    start, use_cache = spec.start, spec.start != groups[0]
    if aug is not None and spec.frozen_prefix:
      for s in live:
        seeds[s].notes.append(f"frozen prefix ({', '.join(spec.frozen_prefix)}) not cached: "
                              "augmentation is on")
    # lr and weight decay are shared: one value per seed.
    inputs = {**inputs, "lr": jnp.full((n_seeds,), inputs["lr"]),
              "weight_decay": jnp.full((n_seeds,), inputs["weight_decay"])}
    if use_cache:
      stop = groups[groups.index(start) - 1]
      train_in, val_in, test_in = (prefix_outputs(model, variables, raw[k], stop)
                                   for k in ("train_x", "val_x", "test_x"))
      for s in live:
        seeds[s].cached = True
    else:
      train_in, val_in, test_in = raw["train_x"], raw["val_x"], raw["test_x"]
    state = init_state(spec, variables, inputs)
    state, best = _train_stage(spec, state, train_in, val_in, raw, keys, inputs, seeds, live,
                               stage, n_epochs, steps, float(cfg.lr), es, sign)
    variables = _end_stage(state, best, seeds, live, es)
    ended = [s for s in live if seeds[s].diverged is not None]
    if ended:  # tested as train._fit tests them: on this stage's inputs
      _test(model, variables, (val_in, raw["val_y"]), (test_in, raw["test_y"]), start, seeds,
            ended)
  _test(model, variables, (val_in, raw["val_y"]), (test_in, raw["test_y"]), start, seeds,
        [s for s in range(n_seeds) if seeds[s].test is None])
  seconds = time.perf_counter() - t_start
  return [{"variables": jax.tree.map(lambda a, s=s: a[s], variables), "history": r.history,
           "best_epoch": r.best_epoch, "epochs_run": len(r.history), "val": r.val, "test": r.test,
           "test_predictions": r.pred, "cached_prefix": r.cached, "notes": r.notes,
           "diverged": r.diverged, "fit_seconds": seconds} for s, r in enumerate(seeds)]


def _train_stage(spec, state, train_in, val_in, raw, keys, inputs, seeds, live, stage,
                 n_epochs, steps, peak_lr, es, sign):
  """One stage's epochs for the `live` seeds, each with its own early stopping: (the last
  state, the per-seed best epochs and their weights)."""
  n_seeds = len(seeds)
  lr = spec.lr_schedule(peak_lr)
  active = np.isin(np.arange(n_seeds), live)
  best = _Best(n_seeds, state)
  for stage_epoch in range(n_epochs):
    if not active.any():
      break
    t0 = time.perf_counter()
    epochs = jnp.asarray([len(r.history) for r in seeds])
    order_keys = jax.vmap(jax.random.fold_in)(keys["order"], epochs)
    state, m = train_epoch(spec, state, train_in, raw["train_y"], order_keys, keys["dropout"],
                           keys["augment"], inputs, jnp.asarray(active))
    val, _ = evaluate(spec.model, train._variables(state.params, state.batch_stats), val_in,
                      raw["val_y"], spec.start)
    m = jax.device_get(m)
    seconds = time.perf_counter() - t0
    improved = np.zeros(n_seeds, bool)
    for s in np.flatnonzero(active):
      r, epoch = seeds[s], len(seeds[s].history)
      record = {"epoch": epoch + 1, "stage": stage.name,
                "train_loss": float(m["train_loss"][s]),
                "train_accuracy": float(m["train_accuracy"][s]),
                "val_loss": float(val["loss"][s]), "val_accuracy": float(val["accuracy"][s]),
                "lr": float(lr((stage_epoch + 1) * steps - 1)), "seconds": seconds}
      r.history.append(record)
      if not np.isfinite(record["train_loss"]):
        r.diverged = {"epoch": epoch + 1,
                      "step": epoch * steps + train._first_nonfinite(m["step_losses"][:, s]) + 1}
        r.notes.append(f"non-finite training loss at epoch {r.diverged['epoch']}, "
                       f"step {r.diverged['step']}: stopped")
        active[s] = False
      elif best.offer(s, sign * record[es.monitor], float(es.min_delta), epoch + 1):
        improved[s] = True
      elif es.enabled and best.wait[s] >= int(es.patience):
        active[s] = False
    best.keep(improved, state)
  return state, best


class _Best:
  """Per-seed early-stopping bookkeeping of one stage: best score, its epoch and weights."""

  def __init__(self, n_seeds, state):
    self.score = np.zeros(n_seeds)
    self.epoch = [None] * n_seeds  # None: no epoch scored yet
    self.wait = np.zeros(n_seeds, int)
    self.weights = (state.params, state.batch_stats)

  def offer(self, s, score, min_delta, epoch) -> bool:
    if self.epoch[s] is None or score > self.score[s] + min_delta:
      self.score[s], self.epoch[s], self.wait[s] = score, epoch, 0
      return True
    self.wait[s] += 1
    return False

  def keep(self, improved, state):
    if improved.any():
      self.weights = _select(jnp.asarray(improved), (state.params, state.batch_stats),
                             self.weights)


def _end_stage(state, best, seeds, live, es):
  """Each live seed's variables after the stage, as `train._fit` chooses them: the best
  epoch's with early stopping (unless it diverged), else the last state."""
  use_best = np.zeros(len(seeds), bool)
  for s in live:
    r = seeds[s]
    use_best[s] = es.enabled and best.epoch[s] is not None and r.diverged is None
    r.best_epoch = best.epoch[s] if best.epoch[s] is not None else len(r.history)
  params, stats = _select(jnp.asarray(use_best), best.weights, (state.params, state.batch_stats))
  return train._variables(params, stats)


def _test(model, variables, val, test, start, seeds, which):
  """The final validation and test metrics of the seeds in `which`, as train._fit ends."""
  if not which:
    return
  val_metrics, _ = evaluate(model, variables, *val, start)
  metrics, pred = evaluate(model, variables, *test, start)
  for s in which:
    seeds[s].val = {k: float(v[s]) for k, v in val_metrics.items()}
    seeds[s].test = {k: float(v[s]) for k, v in metrics.items()}
    seeds[s].pred = pred[s]


# ---------------------------------------------------------------- benchmark

def speedup(model_cfg=None, seeds: int = 3, n_train: int = 256, batch_size: int = 64,
            num_classes: int = 10, image_size: int = 32, strategy: str = "full",
            repeats: int = 2) -> dict:
  """Training throughput of `seeds` seeds vmapped vs looped, for tlresearch.bench.

  Times one epoch of each (best of `repeats`, after a first epoch that compiles) on random
  uint8 images, with the default backbone unless `model_cfg` is given. Returns images/s of
  both (all seeds' images) and vmap / loop; on a shared machine the numbers are rough.
  """
  from experiments import _common
  from tlresearch import models, strategies  # only the benchmark needs them here
  if model_cfg is None:
    model_cfg = _common.model()
  model = models.build(model_cfg, num_classes)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.integers(0, 256, (seeds, n_train, image_size, image_size, 3), np.uint8))
  y = jnp.asarray(rng.integers(0, num_classes, (seeds, n_train)), jnp.int32)
  keys = [train.CellKeys.from_seed(s) for s in range(seeds)]
  starts = [train.init_variables(model, k.init, (image_size, image_size, 3)) for k in keys]
  stage = strategies.get(strategy, model.groups).stages[0]
  cfg = _common.train(batch_size=batch_size, lr=0.01)
  spec, inputs = train.stage_spec(model, stage, starts[0], cfg, n_train, n_epochs=10)
  steps, batch = spec.steps_per_epoch, spec.batch_size
  loop_states = [train.init_state(spec, v, inputs) for v in starts]

  def loop():
    return [train.train_epoch(spec, st, x[s], y[s], k.order, k.dropout, k.augment, inputs)
            for s, (st, k) in enumerate(zip(loop_states, keys))]

  stacked_inputs = jax.tree.map(lambda a: jnp.stack([a] * seeds), inputs)
  state = init_state(spec, _stack(starts), stacked_inputs)
  stacked_keys = {f: jnp.stack([getattr(k, f) for k in keys])
                  for f in ("order", "dropout", "augment")}
  active = jnp.ones((seeds,), bool)

  def vmapped():
    return train_epoch(spec, state, x, y, stacked_keys["order"], stacked_keys["dropout"],
                       stacked_keys["augment"], stacked_inputs, active)

  images = seeds * steps * batch
  out = {"seeds": seeds, "backend": jax.default_backend(), "images_per_epoch": images}
  for name, epoch in (("vmap", vmapped), ("loop", loop)):
    jax.block_until_ready(epoch())  # compiles
    times = []
    for _ in range(max(1, repeats)):
      t0 = time.perf_counter()
      jax.block_until_ready(epoch())
      times.append(time.perf_counter() - t0)
    out[f"{name}_images_per_s"] = images / min(times)
  out["vmap_over_loop"] = out["vmap_images_per_s"] / out["loop_images_per_s"]
  return out

"""Jitted training and evaluation, with the data on device.

Decisive properties (each has a test):
- only trainable parameters are differentiated: params are split into trainable / frozen
  and `jax.grad` sees only the trainable part, so XLA drops the backward pass wherever
  nothing below can change;
- frozen parameters and the BatchNorm statistics of frozen groups are carried over
  untouched (not "updated by zero");
- a frozen prefix of groups (`start` > stem) is not run in training at all: its output is
  computed once per split (`prefix_outputs`) and the remaining groups train on it;
- compiled programs are cached by their static description and argument shapes, so cells
  that differ only in seed, data values, learning rate or weight decay reuse them (compile
  once per shape): the peak lr and weight decay are inputs of the step (`step_inputs`), not
  constants, so a learning-rate selection grid costs no extra compilation;
- with several local devices, training is data parallel (`tlresearch.parallel`): data and
  state replicated, each batch split over the devices inside the one jitted step, results
  equal to one device's up to float reduction order.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any

from flax import struct, traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tlresearch import optim, parallel, penalty
from tlresearch.checkpoint import CheckpointError
from tlresearch.data import preprocess as preprocessing
from tlresearch.data.augment import AugmentSpec, augment
from tlresearch.strategies import FROZEN, frozen_groups, resolve, stage_epochs

# Images are stored as uint8 and normalised on device, as the model declares.
MEAN, STD = preprocessing.STANDARD_MEAN, preprocessing.STANDARD_STD


def preprocess(x, model=None):
  return preprocessing.apply(preprocessing.style_of(model), x)


@struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """Everything static about a train step; equal specs share one compiled program."""
  model: Any                       # a hashable flax Module
  rules: tuple                     # ((pattern, rule), ...)
  optimizer: str
  total_steps: int
  warmup_steps: int
  momentum: float
  start: str                       # first group run in training (earlier ones are cached)
  frozen_bn: tuple[str, ...]       # groups whose BatchNorm is in inference mode
  augment: AugmentSpec | None
  batch_size: int
  steps_per_epoch: int
  penalty: tuple = ()              # the stage's loss penalty (tlresearch.penalty), if any
  mesh: Any = None                 # data-parallel jax.sharding.Mesh; None: one device
  frozen_prefix: tuple = ()        # the groups below the first trainable one

  def lr_schedule(self, peak_lr):
    # The shape is built for a peak of 1 and scaled: optax's schedule branches on its peak
    # value in Python, and here the peak is a traced input.
    shape = optim.schedule(1.0, self.total_steps, self.warmup_steps)
    return lambda step: peak_lr * shape(step)

  def rule_by_path(self, params) -> dict:
    return resolve(self.rules, traverse_util.flatten_dict(params, sep="/").keys())

  def tx(self, params, inputs: dict):
    return optim.make(self.rule_by_path(params), params, optimizer=self.optimizer,
                      lr=self.lr_schedule(inputs["lr"]), weight_decay=inputs["weight_decay"],
                      momentum=self.momentum)[0]


def step_inputs(peak_lr: float, weight_decay: float, anchor: dict | None = None) -> dict:
  """The dynamic inputs of a train step: peak lr, weight decay, and the penalty's anchor
  weights ({} without a penalty)."""
  return {"lr": jnp.float32(peak_lr), "weight_decay": jnp.float32(weight_decay),
          "anchor": anchor or {}}


# ---------------------------------------------------------------- compile cache

COMPILE_SECONDS = [0.0]  # total seconds spent compiling in this process
_COMPILED: dict = {}


def _compiled(fn, static, *args):
  shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), args)
  # A compiled program accepts only the input shardings it was lowered with: one for
  # replicated inputs must not serve single-device ones, or the reverse. One-device inputs
  # (host NumPy arrays included) all key as None, so they share programs as they always did.
  shardings = tuple(_multi_device_sharding(a) for a in jax.tree.leaves(args))
  key = (fn.__name__, static, jax.tree.structure(shapes), tuple(jax.tree.leaves(shapes)),
         shardings)
  if key not in _COMPILED:
    t0 = time.perf_counter()
    if not compile_reuse():
      # A new function object misses JAX's own trace and compile caches, which are keyed by
      # the function: what a training loop that jits a fresh closure per run pays.
      fn = functools.wraps(fn)(lambda *a, _fn=fn: _fn(*a))
    mesh = getattr(static, "mesh", None)
    # Data-parallel programs return replicated values, so that what one call returns (the
    # state, the cached prefix) is a valid input of the next, compiled for replicated inputs.
    out = {} if mesh is None else {"out_shardings": parallel.replicated(mesh)}
    _COMPILED[key] = jax.jit(fn, static_argnums=0, **out).lower(static, *args).compile()
    COMPILE_SECONDS[0] += time.perf_counter() - t0
  return _COMPILED[key]


def _multi_device_sharding(a):
  sharding = getattr(a, "sharding", None)
  return sharding if sharding is not None and len(sharding.device_set) > 1 else None


def clear_compile_cache():
  _COMPILED.clear()


def compile_reuse() -> bool:
  """False under `TLRESEARCH_COMPILE_CACHE=off`: every cell traces and compiles its own
  programs and nothing is cached on disk (how `tlresearch.bench --baseline` measures what
  reuse saves)."""
  return os.environ.get("TLRESEARCH_COMPILE_CACHE", "on") != "off"


def _init_variables(model, key, x):
  return model.init(key, x)


def init_variables(model, key, input_shape) -> dict:
  """`model.init` as one compiled program (cached like the steps, and on disk): run eagerly,
  the first init in a process dispatches and compiles every op on its own, 10-20 s on this
  CPU. The values are bitwise those of the eager init (tested)."""
  x = jnp.zeros((1,) + tuple(input_shape), jnp.float32)
  out = _compiled(_init_variables, model, key, x)(key, x)
  # A compiled program returns dicts with sorted keys; keep the groups in network order,
  # as the eager init does.
  order = {g: i for i, g in enumerate(model.groups)}
  return {c: dict(sorted(tree.items(), key=lambda kv: order.get(kv[0], len(order))))
          for c, tree in out.items()}


# ---------------------------------------------------------------- params split

def split_params(params, rule_by_path):
  flat = traverse_util.flatten_dict(params, sep="/")
  trainable = {p: v for p, v in flat.items() if rule_by_path[p] != FROZEN}
  frozen = {p: v for p, v in flat.items() if rule_by_path[p] == FROZEN}
  return trainable, frozen


def join_params(trainable, frozen):
  return traverse_util.unflatten_dict({**trainable, **frozen}, sep="/")


def _keep_frozen_stats(new_stats, old_stats, frozen_bn):
  """New BatchNorm statistics for trainable groups, the old ones for frozen groups."""
  return {g: (old_stats[g] if g in frozen_bn or g not in new_stats else new_stats[g])
          for g in old_stats}


# ---------------------------------------------------------------- programs

def _init_opt_state(spec: StepSpec, params, inputs):
  return spec.tx(params, inputs).init(params)


def init_state(spec: StepSpec, variables, inputs: dict | None = None) -> TrainState:
  params = variables["params"]
  inputs = inputs if inputs is not None else step_inputs(0.0, 0.0)
  opt_state = _compiled(_init_opt_state, spec, params, inputs)(params, inputs)
  return parallel.replicate(TrainState(jnp.zeros((), jnp.int32), params,
                                       variables.get("batch_stats", {}), opt_state), spec.mesh)


def loss_and_logits(spec, params, batch_stats, x, y, train, dropout_key):
  variables = {"params": params, "batch_stats": batch_stats}
  kwargs = dict(train=train, frozen_bn=spec.frozen_bn, start=spec.start)
  if train:
    logits, updates = spec.model.apply(variables, x, rngs={"dropout": dropout_key},
                                       mutable=["batch_stats"], **kwargs)
    new_stats = updates.get("batch_stats", {})
  else:
    logits, new_stats = spec.model.apply(variables, x, **kwargs), batch_stats
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss, (logits, new_stats)


def _train_step(spec: StepSpec, state: TrainState, x, y, keys, inputs):
  """One optimizer step on batch (x, y); keys = (dropout, augment) base keys; `inputs`:
  `step_inputs` (lr, weight decay, the penalty's anchor)."""
  rule_by_path = spec.rule_by_path(state.params)
  trainable, frozen = split_params(state.params, rule_by_path)
  if spec.start == spec.model.groups[0]:
    x = preprocess(x, spec.model)
    if spec.augment is not None:
      x = augment(jax.random.fold_in(keys[1], state.step), x, spec.augment)
  dropout_key = jax.random.fold_in(keys[0], state.step)

  def loss_fn(trainable):
    loss, aux = loss_and_logits(spec, join_params(trainable, frozen), state.batch_stats, x, y,
                                True, dropout_key)
    pen = penalty.value(spec.penalty, trainable, inputs["anchor"], spec.model.groups[-1])
    return loss + pen, aux

  (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
  # Frozen leaves get a zero placeholder gradient: set_to_zero() ignores it, and XLA never
  # computes it (it is a constant).
  full_grads = join_params(grads, jax.tree.map(jnp.zeros_like, frozen))
  updates, opt_state = spec.tx(state.params, inputs).update(full_grads, state.opt_state,
                                                            state.params)
  flat_updates = traverse_util.flatten_dict(updates, sep="/")
  new_trainable = {p: v + flat_updates[p].astype(v.dtype) for p, v in trainable.items()}
  new_state = TrainState(state.step + 1, join_params(new_trainable, frozen),
                         _keep_frozen_stats(new_stats, state.batch_stats, spec.frozen_bn),
                         opt_state)
  acc = jnp.mean(jnp.argmax(logits, -1) == y)
  return new_state, (loss, acc)


def _train_step_at(spec: StepSpec, state: TrainState, x, y, batch_idx, dropout_key, aug_key,
                   inputs):
  """`_train_step` on the batch x[batch_idx]: the gather happens on device.

  With a mesh, the gathered batch is split over the devices along its batch dimension; XLA
  partitions the rest of the step from there (gradient and BatchNorm all-reduces included).
  """
  xb, yb = (parallel.shard_batch(a[batch_idx], spec.mesh) for a in (x, y))
  return _train_step(spec, state, xb, yb, (dropout_key, aug_key), inputs)


def _epoch_order(spec: StepSpec, n_key, order_key):
  """[steps, batch] example indices: a seeded permutation; the last batch wraps around."""
  n = n_key.shape[0]
  perm = jax.random.permutation(order_key, n)
  return jnp.resize(perm, (spec.steps_per_epoch * spec.batch_size,)).reshape(
      spec.steps_per_epoch, spec.batch_size)


def train_epoch(spec: StepSpec, state, x, y, order_key, dropout_key, aug_key, inputs):
  """One pass over (x, y) in a seeded random order.

  A Python loop over one compiled step rather than a `lax.scan`: on XLA:CPU the scanned
  epoch ran 14-18x slower than the same steps dispatched one by one (88 vs 1,600 images/s
  for the default ResNet, measured here), while the per-step dispatch costs well under a
  millisecond. Data stays on device, batches are gathered there, and the host waits once
  per epoch (for the metrics).
  """
  # With a mesh every program input is replicated (the keys are made on one device).
  order_key, dropout_key, aug_key = parallel.replicate((order_key, dropout_key, aug_key),
                                                       spec.mesh)
  order = _compiled(_epoch_order, spec, y, order_key)(y, order_key)
  step = _compiled(_train_step_at, spec, state, x, y, order[0], dropout_key, aug_key, inputs)
  losses, accs = [], []
  for i in range(spec.steps_per_epoch):
    state, (loss, acc) = step(state, x, y, order[i], dropout_key, aug_key, inputs)
    losses.append(loss)
    accs.append(acc)
  losses = jnp.stack(losses)
  return state, {"train_loss": jnp.mean(losses), "train_accuracy": jnp.mean(jnp.stack(accs)),
                 "step_losses": losses}


# ---------------------------------------------------------------- evaluation

EVAL_CHUNK = 256


@dataclasses.dataclass(frozen=True)
class EvalSpec:
  model: Any
  start: str | None = None  # None: the model's first group
  stop: str | None = None   # None: its last
  mesh: Any = None          # data-parallel jax.sharding.Mesh (chunks split over it); None


def _chunk_size(n: int, devices: int) -> int:
  """Examples per evaluation chunk: a small split is not padded up to a whole chunk, and
  a chunk splits evenly over the devices."""
  chunk = max(1, min(EVAL_CHUNK, n))
  return -(-chunk // devices) * devices


def _forward_chunks(spec: EvalSpec, variables, x):
  """Inference-mode output of groups start..stop for all of x, in fixed-size chunks."""
  n = x.shape[0]
  chunk = _chunk_size(n, parallel.size(spec.mesh))
  pad = (-n) % chunk
  xs = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)])
  xs = parallel.shard_batch(xs.reshape((-1, chunk) + x.shape[1:]), spec.mesh, axis=1)
  groups = spec.model.groups
  start, stop = spec.start or groups[0], spec.stop or groups[-1]

  def one(xb):
    xb = parallel.shard_batch(xb, spec.mesh)
    if start == groups[0]:
      xb = preprocess(xb, spec.model)
    return spec.model.apply(variables, xb, train=False, start=start, stop=stop)

  out = jax.lax.map(one, xs)
  return out.reshape((-1,) + out.shape[2:])[:n]


def prefix_outputs(model, variables, x, stop: str, mesh=None):
  """Output of the frozen groups first..stop (inference mode): the cached training input.
  With a mesh, `variables` and `x` must be replicated over it (so is the output)."""
  spec = EvalSpec(model, None, stop, mesh)
  return _compiled(_forward_chunks, spec, variables, x)(variables, x)


def _evaluate(spec: EvalSpec, variables, x, y):
  logits = _forward_chunks(spec, variables, x)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  pred = jnp.argmax(logits, -1)
  return {"loss": loss, "accuracy": jnp.mean(pred == y)}, pred


def evaluate(model, variables, x, y, start: str | None = None, mesh=None):
  """({'loss', 'accuracy'}, predictions) of the whole model on (x, y). With a mesh,
  the arrays must be replicated over it."""
  spec = EvalSpec(model, start, mesh=mesh)
  metrics, pred = _compiled(_evaluate, spec, variables, x, y)(variables, x, y)
  return {k: float(v) for k, v in metrics.items()}, np.asarray(pred)


# ---------------------------------------------------------------- fit

@dataclasses.dataclass(frozen=True)
class CellKeys:
  """Named RNG streams of one seed. They do not depend on the strategy, so every strategy
  compared under a seed sees the same head init, data order, dropout masks and augmentation
  (paired design); the k-shot subset is drawn from the same integer seed by the loader."""
  init: jax.Array      # the whole network's random init (the head, and the backbone for scratch)
  order: jax.Array     # per-epoch data order
  dropout: jax.Array
  augment: jax.Array

  @classmethod
  def from_seed(cls, seed: int) -> "CellKeys":
    base = jax.random.key(seed)
    return cls(*(jax.random.fold_in(base, i) for i in range(4)))


def _first_trainable_group(rule_by_path, groups) -> int:
  return min(groups.index(p.split("/")[0]) for p, r in rule_by_path.items() if r != FROZEN)


def _variables(params, batch_stats):
  return {"params": params, "batch_stats": batch_stats}


def stage_spec(model, stage, variables, cfg, n_train: int, n_epochs: int,
               cache: bool | None = None, mesh=None) -> tuple[StepSpec, dict]:
  """The compiled-step description and step inputs of one strategy stage.

  `cfg` is the cell's `train` config; `cache` (default `cfg.cache_frozen_prefix`) starts
  training above the frozen prefix, whose output is then computed once per split; never
  with augmentation on, which changes the prefix's input every step. With a data-parallel
  `mesh` (`variables` replicated over it) the step splits each batch over its devices and
  the inputs are replicated.
  """
  groups = model.groups
  aug = AugmentSpec.from_config(cfg.augment)
  batch_size = min(int(cfg.batch_size), n_train)
  steps = -(-n_train // batch_size)
  flat_params = traverse_util.flatten_dict(variables["params"], sep="/")
  rule_by_path = resolve(stage.rules, flat_params)
  first = _first_trainable_group(rule_by_path, groups)
  cache = bool(cfg.cache_frozen_prefix) if cache is None else cache
  start = groups[first] if first > 0 and aug is None and cache else groups[0]
  # "frozen": every BatchNorm in inference mode with its statistics kept, trainable or not.
  frozen_bn = (tuple(groups) if cfg.get("bn_stats", "update") == "frozen"
               else frozen_groups(rule_by_path, groups))
  spec = StepSpec(
      model=model, rules=tuple(stage.rules), optimizer=cfg.optimizer,
      total_steps=n_epochs * steps, warmup_steps=round(cfg.warmup_epochs * steps),
      momentum=float(cfg.momentum), start=start, frozen_bn=frozen_bn,
      augment=aug if start == groups[0] else None, batch_size=batch_size,
      steps_per_epoch=steps, penalty=tuple(stage.penalty), frozen_prefix=tuple(groups[:first]),
      mesh=mesh)
  inputs = step_inputs(float(cfg.lr), float(cfg.weight_decay) if stage.weight_decay else 0.0,
                       penalty.anchor(stage, flat_params, rule_by_path))
  return spec, parallel.replicate(inputs, mesh)


def fit(model, variables, strategy, data, cfg, keys: CellKeys, log=print, on_epoch=None,
        checkpointer=None) -> dict:
  """Trains `variables` under `strategy` on `data` (a `tlresearch.data.Dataset`).

  `cfg` is the cell's `train` ConfigDict. Early stopping watches `cfg.early_stopping.monitor`
  on the validation split and, when it stops or the budget ends, restores the best epoch's
  weights. A non-finite training loss stops the run (`diverged` names the epoch and step).
  Returns the final variables, per-epoch history and test metrics/predictions.
  `on_epoch(record, state)` is called after every epoch (tests use it to snapshot weights).

  With a `checkpoint.FitCheckpointer`, progress is saved between epochs and a later call
  resumes from the newest checkpoint; the result is bitwise identical to an uninterrupted
  run because every random stream is keyed by seed, epoch and step, never by wall time. A
  damaged checkpoint is logged and the run starts from scratch.
  """
  if checkpointer is not None:
    resume = checkpointer.peek()
    if resume is not None:
      try:
        return _fit(model, variables, strategy, data, cfg, keys, log, on_epoch, checkpointer,
                    resume)
      except CheckpointError as e:
        log(f"warning: {e}; restarting this run from scratch")
        checkpointer.clear()
  return _fit(model, variables, strategy, data, cfg, keys, log, on_epoch, checkpointer, None)


def _progress_tree(state, best_params, best_stats, anchor) -> dict:
  """The arrays of a fit checkpoint (the rest of the progress is JSON meta)."""
  tree = {"state": state, "best_params": best_params, "best_stats": best_stats}
  return {**tree, "anchor": anchor} if anchor else tree


def _on_device(a, mesh):
  """A dataset array on device: on every device of the mesh, if there is one."""
  return parallel.replicate(jnp.asarray(a), mesh)


def _log_devices(mesh, note, notes, log) -> None:
  """Says once how many devices train, and why fewer than all when so."""
  if mesh is not None:
    log(f"data parallel over {mesh.size} devices")
  if note is not None:
    log(f"note: {note}")
    if note not in notes:  # a resumed run already carries it
      notes.append(note)


def _first_nonfinite(losses) -> int:
  return int(np.flatnonzero(~np.isfinite(np.asarray(losses)))[0])


def _fit(model, variables, strategy, data, cfg, keys, log, on_epoch, checkpointer, resume):
  groups = model.groups
  aug = AugmentSpec.from_config(cfg.augment)
  es = cfg.early_stopping
  sign = 1.0 if es.monitor == "val_accuracy" else -1.0
  history, notes = (list(resume["history"]), list(resume["notes"])) if resume else ([], [])
  if resume:
    log(f"resuming from {resume['path']} ({resume['epochs_done']} epochs done)")
  best_epoch, cached, diverged = 0, False, None
  t_start = time.perf_counter()
  n = len(data.train_x)
  batch_size = min(int(cfg.batch_size), n)
  steps = -(-n // batch_size)
  budget = optim.epoch_budget(int(cfg.epochs), steps, int(cfg.get("min_steps", 0)))
  mesh, note = parallel.for_batch(batch_size, bool(cfg.get("data_parallel", True)))
  _log_devices(mesh, note, notes, log)
  for stage_index, (stage, n_epochs) in enumerate(zip(strategy.stages,
                                                      stage_epochs(strategy.stages, budget))):
    if n_epochs <= 0:
      continue
    if resume is not None and stage_index < resume["stage"]:
      continue  # finished before the interruption; the checkpoint holds what it produced
    # With a mesh every array a program reads is replicated over it (a no-op when it is).
    variables = parallel.replicate(variables, mesh)
    spec, inputs = stage_spec(model, stage, variables, cfg, n, n_epochs, mesh=mesh)
    start = spec.start
    use_cache = start != groups[0]
    if aug is not None and spec.frozen_prefix:
      notes.append(f"frozen prefix ({', '.join(spec.frozen_prefix)}) not cached: "
                   "augmentation is on")
    lr = spec.lr_schedule(float(cfg.lr))
    state = init_state(spec, variables, inputs)
    best, wait, first_epoch, stopped = None, 0, 0, False
    if resume is not None:  # this is the stage the checkpoint was saved in
      tree = parallel.replicate(
          checkpointer.restore(resume, _progress_tree(state, state.params, state.batch_stats,
                                                      inputs["anchor"])), mesh)
      state = tree["state"]
      # The penalty's anchor is the stage's starting weights, saved with the progress.
      inputs = {**inputs, "anchor": tree.get("anchor", {})}
      best = (resume["best_score"], tree["best_params"], tree["best_stats"], resume["best_epoch"])
      wait, first_epoch, stopped = resume["wait"], resume["stage_epoch"], resume["stopped"]
      # Frozen params and frozen BatchNorm stats are untouched by training, so the restored
      # state runs the frozen prefix exactly as the stage's starting variables did.
      variables = _variables(state.params, state.batch_stats)
      resume = None
    if use_cache:
      stop = groups[groups.index(start) - 1]
      train_in, val_in, test_in = (prefix_outputs(model, variables, _on_device(a, mesh), stop,
                                                  mesh)
                                   for a in (data.train_x, data.val_x, data.test_x))
      cached = True
    else:
      train_in, val_in, test_in = (_on_device(a, mesh)
                                   for a in (data.train_x, data.val_x, data.test_x))
    ty, vy = _on_device(data.train_y, mesh), _on_device(data.val_y, mesh)
    for stage_epoch in range(first_epoch, n_epochs):
      if stopped:
        break
      epoch = len(history)
      t0 = time.perf_counter()
      state, m = train_epoch(spec, state, train_in, ty, jax.random.fold_in(keys.order, epoch),
                             keys.dropout, keys.augment, inputs)
      val, _ = evaluate(model, _variables(state.params, state.batch_stats), val_in, vy, start,
                        mesh)
      record = {"epoch": epoch + 1, "stage": stage.name,
                "train_loss": float(m["train_loss"]), "train_accuracy": float(m["train_accuracy"]),
                "val_loss": val["loss"], "val_accuracy": val["accuracy"],
                "lr": float(lr((stage_epoch + 1) * steps - 1)),  # at the epoch's last step
                "seconds": time.perf_counter() - t0}
      history.append(record)
      if on_epoch is not None:
        on_epoch(record, state)
      if not np.isfinite(record["train_loss"]):
        diverged = {"epoch": epoch + 1,
                    "step": epoch * steps + _first_nonfinite(m["step_losses"]) + 1}
        notes.append(f"non-finite training loss at epoch {diverged['epoch']}, "
                     f"step {diverged['step']}: stopped")
        break
      score = sign * record[es.monitor]
      if best is None or score > best[0] + float(es.min_delta):
        best, wait = (score, state.params, state.batch_stats, epoch + 1), 0
      else:
        wait += 1
        stopped = bool(es.enabled and wait >= int(es.patience))
      if checkpointer is not None:
        checkpointer.maybe_save(
            len(history),
            lambda s=state, b=best, a=inputs["anchor"]: _progress_tree(s, b[1], b[2], a),
            {"stage": stage_index, "stage_epoch": stage_epoch + 1, "stopped": stopped,
             "history": history, "notes": notes, "best_score": best[0], "best_epoch": best[3],
             "wait": wait})
    if es.enabled and best is not None and diverged is None:
      variables = _variables(best[1], best[2])
      best_epoch = best[3]
    else:
      variables = _variables(state.params, state.batch_stats)
      best_epoch = best[3] if best is not None else len(history)
    if diverged is not None:
      break
  # On the cached prefix outputs where there are any: no second pass through the backbone.
  val, _ = evaluate(model, variables, val_in, vy, start, mesh)
  test, pred = evaluate(model, variables, test_in, _on_device(data.test_y, mesh), start, mesh)
  return {"variables": parallel.unreplicate(variables, mesh), "history": history,
          "best_epoch": best_epoch,
          "epochs_run": len(history), "val": val, "test": test, "test_predictions": pred,
          "cached_prefix": cached, "notes": notes, "diverged": diverged,
          "fit_seconds": time.perf_counter() - t_start}

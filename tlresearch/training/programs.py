"""The compiled programs of training and evaluation, for one seed or several stacked ones.

Decisive properties (each has a test):
- only trainable parameters are differentiated: params are split into trainable / frozen
  and `jax.grad` sees only the trainable part, so XLA drops the backward pass wherever
  nothing below can change;
- frozen parameters and the BatchNorm statistics of frozen groups are carried over
  untouched (not "updated by zero");
- a frozen prefix of groups (`start` > stem) is not run in training at all: its output is
  computed once per split (`prefix_outputs`) and the remaining groups train on it;
- every program is a module-level `jax.jit` whose static argument is a hashable spec
  (`StepSpec`, `EvalSpec`), so cells that differ only in seed, data values, learning rate
  or weight decay reuse one compiled program (jit's own cache, keyed on the spec and the
  argument shapes and shardings): the peak lr and weight decay are inputs of the step
  (`step_inputs`), not constants;
- with several local devices, training is data parallel (`tlresearch.training.parallel`): data and
  state replicated, each batch split over the devices inside the one jitted step.

`Single` runs one seed with these programs; `Stacked` runs S seeds at once with their
`jax.vmap`ped form (one device). `tlresearch.training.train.fit` drives either through the same
interface, so there is one training loop.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any

from flax import struct, traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tlresearch.core import timing
from tlresearch.data import preprocess as preprocessing
from tlresearch.data.augment import augment, AugmentSpec
from tlresearch.methods import optim, penalty
from tlresearch.methods.strategies import FROZEN, resolve
from tlresearch.training import parallel

EVAL_CHUNK = 256


def preprocess(x, model):
  """uint8 images -> the model's input normalisation (on device)."""
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
  penalty: tuple = ()              # the stage's loss penalty (tlresearch.methods.penalty), if any
  mesh: Any = None                 # data-parallel jax.sharding.Mesh; None: one device
  frozen_prefix: tuple = ()        # the groups below the first trainable one
  compute_dtype: str = "float32"   # of convolutions and matmuls (`in_compute_dtype`)
  schedule: str = "warmup_cosine"  # optim.SCHEDULES

  def lr_schedule(self, peak_lr):
    # The shape is built for a peak of 1 and scaled: optax's schedule branches on its peak
    # value in Python, and here the peak is a traced input.
    shape = optim.schedule(1.0, self.total_steps, self.warmup_steps, self.schedule)
    return lambda step: peak_lr * shape(step)

  def rule_by_path(self, params) -> dict:
    return resolve(self.rules, traverse_util.flatten_dict(params, sep="/").keys())

  def tx(self, params, inputs: dict):
    return optim.make(self.rule_by_path(params), params, optimizer=self.optimizer,
                      lr=self.lr_schedule(inputs["lr"]), weight_decay=inputs["weight_decay"],
                      momentum=self.momentum)[0]


@dataclasses.dataclass(frozen=True)
class EvalSpec:
  model: Any
  start: str | None = None  # None: the model's first group
  stop: str | None = None   # None: its last
  mesh: Any = None          # data-parallel jax.sharding.Mesh (chunks split over it); None
  compute_dtype: str = "float32"


def step_inputs(peak_lr: float, weight_decay: float, anchor: dict | None = None) -> dict:
  """The dynamic inputs of a train step: peak lr, weight decay, and the penalty's anchor
  weights ({} without a penalty)."""
  return {"lr": jnp.float32(peak_lr), "weight_decay": jnp.float32(weight_decay),
          "anchor": anchor or {}}


def variables_of(state: TrainState) -> dict:
  return {"params": state.params, "batch_stats": state.batch_stats}


# ---------------------------------------------------------------- the functions compiled

def _split_params(params, rule_by_path):
  flat = traverse_util.flatten_dict(params, sep="/")
  trainable = {p: v for p, v in flat.items() if rule_by_path[p] != FROZEN}
  frozen = {p: v for p, v in flat.items() if rule_by_path[p] == FROZEN}
  return trainable, frozen


def _join_params(trainable, frozen):
  return traverse_util.unflatten_dict({**trainable, **frozen}, sep="/")


def _keep_frozen_stats(new_stats, old_stats, frozen_bn):
  """New BatchNorm statistics for trainable groups, the old ones for frozen groups."""
  return {g: (old_stats[g] if g in frozen_bn or g not in new_stats else new_stats[g])
          for g in old_stats}


def _init_variables(model, key, x):
  return model.init(key, x)


def _init_opt_state(spec: StepSpec, params, inputs):
  return parallel.constrain_replicated(spec.tx(params, inputs).init(params), spec.mesh)


def in_compute_dtype(tree, dtype: str):
  """Mixed precision: the float leaves of `tree` (params, an input batch) cast to `dtype` for
  one forward pass.

  The float32 params stay the optimizer's master copy (the cast's gradient is float32);
  BatchNorm statistics are not cast, and Flax computes batch statistics in float32. A
  model's output is cast back to float32 by the caller, so losses and cached features are
  float32."""
  if dtype == "float32":
    return tree
  return jax.tree.map(
      lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def _capture(groups):
  """Flax `capture_intermediates` filter: the outputs of these top-level layer groups."""
  wanted = frozenset(groups)
  return lambda module, method: (method == "__call__" and len(module.scope.path) == 1
                                 and module.scope.path[0] in wanted)


def _captured(updates, groups) -> dict:
  inter = updates.get("intermediates", {})
  return {g: inter[g]["__call__"][0].astype(jnp.float32) for g in groups}


def _loss_and_logits(spec, params, batch_stats, x, y, dropout_key, capture=()):
  """Cross-entropy and logits of one training forward pass, the new BatchNorm statistics,
  and the outputs of the `capture` groups (for a feature penalty)."""
  params, x = in_compute_dtype((params, x), spec.compute_dtype)
  variables = {"params": params, "batch_stats": batch_stats}
  kwargs = {"capture_intermediates": _capture(capture)} if capture else {}
  logits, updates = spec.model.apply(
      variables, x, rngs={"dropout": dropout_key},
      mutable=["batch_stats", "intermediates"] if capture else ["batch_stats"], train=True,
      frozen_bn=spec.frozen_bn, start=spec.start, **kwargs)
  logits = logits.astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return loss, (logits, updates.get("batch_stats", {}), _captured(updates, capture))


def _teacher_features(spec, teacher, x, capture) -> dict:
  """The captured group outputs of the frozen starting network on the same batch: what
  `delta` and `lwf` compare the trained network with.

  Its BatchNorm runs in the same mode as the trained network's (batch statistics where
  those are used; its own running statistics are not updated), so the comparison is 0 at
  the start and measures only what training changed in the weights. With the starting
  network in inference mode instead, on a target whose statistics differ from the source's
  the penalty would also charge the gap between batch and running statistics, which no
  weight change can close (docs/strategies.md)."""
  teacher, x = in_compute_dtype((teacher, x), spec.compute_dtype)
  _, updates = spec.model.apply(teacher, x, train=True, frozen_bn=spec.frozen_bn,
                                start=spec.start, stop=capture[-1],
                                capture_intermediates=_capture(capture),
                                mutable=["intermediates", "batch_stats"])
  return jax.lax.stop_gradient(_captured(updates, capture))


def _pooling(model) -> str:
  spec = getattr(model, "head_spec", None)
  return spec.pooling if spec is not None else "avg"


def _train_step(spec: StepSpec, state: TrainState, x, y, batch_idx, dropout_key, aug_key,
                inputs):
  """One optimizer step on the batch x[batch_idx] (gathered on device); `inputs`:
  `step_inputs` (lr, weight decay, the penalty's anchor).

  With a mesh, the gathered batch is split over the devices along its batch dimension; XLA
  partitions the rest of the step from there (gradient and BatchNorm all-reduces included).
  """
  x, y = (parallel.shard_batch(a[batch_idx], spec.mesh) for a in (x, y))
  rule_by_path = spec.rule_by_path(state.params)
  trainable, frozen = _split_params(state.params, rule_by_path)
  if spec.start == spec.model.groups[0]:
    x = preprocess(x, spec.model)
    if spec.augment is not None:
      x = augment(jax.random.fold_in(aug_key, state.step), x, spec.augment)
  dropout_key = jax.random.fold_in(dropout_key, state.step)
  capture = penalty.captured_groups(spec.penalty, spec.model.groups, spec.start)
  teacher = (_teacher_features(spec, inputs["anchor"]["teacher"], x, capture)
             if penalty.needs_teacher(spec.penalty) and capture else None)

  def loss_fn(trainable):
    loss, (logits, stats, features) = _loss_and_logits(
        spec, _join_params(trainable, frozen), state.batch_stats, x, y, dropout_key, capture)
    pen = penalty.value(spec.penalty, trainable, inputs["anchor"], spec.model.groups[-1],
                        features, teacher, _pooling(spec.model))
    return loss + pen, (logits, stats)

  (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
  # Frozen leaves get a zero placeholder gradient: set_to_zero() ignores it, and XLA never
  # computes it (it is a constant).
  full_grads = _join_params(grads, jax.tree.map(jnp.zeros_like, frozen))
  updates, opt_state = spec.tx(state.params, inputs).update(full_grads, state.opt_state,
                                                            state.params)
  flat_updates = traverse_util.flatten_dict(updates, sep="/")
  new_trainable = {p: v + flat_updates[p].astype(v.dtype) for p, v in trainable.items()}
  new_state = TrainState(state.step + 1, _join_params(new_trainable, frozen),
                         _keep_frozen_stats(new_stats, state.batch_stats, spec.frozen_bn),
                         opt_state)
  acc = jnp.mean(jnp.argmax(logits, -1) == y)
  # Data-parallel programs return replicated values, so that what one call returns is a
  # valid input of the next.
  return parallel.constrain_replicated((new_state, (loss, acc)), spec.mesh)


def _masked_step(spec, state, x, y, batch_idx, dropout_key, aug_key, inputs, active):
  """The step, kept only where the seed is still training: a stopped or diverged seed's
  state stays exactly as it was."""
  new, metrics = _train_step(spec, state, x, y, batch_idx, dropout_key, aug_key, inputs)
  return _pick(active, new, state), metrics


def _epoch_order(spec: StepSpec, y, order_key):
  """[steps, batch] example indices: a seeded permutation; the last batch wraps around."""
  perm = jax.random.permutation(order_key, y.shape[0])
  order = jnp.resize(perm, (spec.steps_per_epoch * spec.batch_size,)).reshape(
      spec.steps_per_epoch, spec.batch_size)
  return parallel.constrain_replicated(order, spec.mesh)


def _chunk_size(n: int, devices: int) -> int:
  """Examples per evaluation chunk: at most EVAL_CHUNK, as few chunks as that allows, all
  of one size (269 examples -> 2 x 135, not 2 x 256: the padding is computed too), and
  splitting evenly over the devices. Each example's output does not depend on the chunk
  size (tested bitwise)."""
  chunks = -(-max(1, n) // EVAL_CHUNK)
  chunk = -(-max(1, n) // chunks)
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
  # The params are cast once, outside the loop over chunks.
  variables = {**variables, "params": in_compute_dtype(variables["params"], spec.compute_dtype)}

  def one(xb):
    xb = parallel.shard_batch(xb, spec.mesh)
    if start == groups[0]:
      xb = preprocess(xb, spec.model)
    xb = in_compute_dtype(xb, spec.compute_dtype)
    return spec.model.apply(variables, xb, train=False, start=start,
                            stop=stop).astype(jnp.float32)

  out = jax.lax.map(one, xs)
  return parallel.constrain_replicated(out.reshape((-1,) + out.shape[2:])[:n], spec.mesh)


def _evaluate(spec: EvalSpec, variables, x, y):
  logits = _forward_chunks(spec, variables, x)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  pred = jnp.argmax(logits, -1)
  return parallel.constrain_replicated(({"loss": loss, "accuracy": jnp.mean(pred == y)}, pred),
                                       spec.mesh)


def _pick(flag, new, old):
  return jax.tree.map(lambda a, b: jnp.where(flag, a, b), new, old)


def _jit(fn):
  return jax.jit(fn, static_argnums=0)


def _over_seeds(fn):
  """fn(static, *args) mapped over a leading seed axis of every arg."""
  def mapped(static, *args):
    return jax.vmap(functools.partial(fn, static))(*args)
  return _jit(functools.wraps(fn)(mapped))


_init_variables_jit = _jit(_init_variables)
_init_opt_state_jit = _jit(_init_opt_state)
train_step = _jit(_train_step)
_epoch_order_jit = _jit(_epoch_order)
_forward_chunks_jit = _jit(_forward_chunks)
_evaluate_jit = _jit(_evaluate)
_seeds_init_opt_state = _over_seeds(_init_opt_state)
_seeds_step = _over_seeds(_masked_step)
_seeds_epoch_order = _over_seeds(_epoch_order)
_seeds_forward_chunks = _over_seeds(_forward_chunks)
_seeds_evaluate = _over_seeds(_evaluate)
_seeds_select = jax.jit(jax.vmap(_pick))  # per seed: new where flag, else old
_seeds_fold_in = jax.jit(jax.vmap(jax.random.fold_in))


# ---------------------------------------------------------------- one seed

def use_compile_cache(path: str | None) -> None:
  """JAX's persistent compilation cache in `path` (None: none): a later process loads a
  program instead of compiling it. Programs that compile in under 0.2 s are not stored."""
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def init_variables(model, key, input_shape) -> dict:
  """`model.init` as one compiled program (cached like the steps, and on disk): run eagerly,
  the first init in a process dispatches and compiles every op on its own. The values are
  bitwise those of the eager init (tested)."""
  x = jnp.zeros((1,) + tuple(input_shape), jnp.float32)
  out = _init_variables_jit(model, key, x)
  # A compiled program returns dicts with sorted keys; keep the groups in network order,
  # as the eager init does.
  order = {g: i for i, g in enumerate(model.groups)}
  return {c: dict(sorted(tree.items(), key=lambda kv: order.get(kv[0], len(order))))
          for c, tree in out.items()}


def init_state(spec: StepSpec, variables, inputs: dict | None = None) -> TrainState:
  params = variables["params"]
  inputs = inputs if inputs is not None else step_inputs(0.0, 0.0)
  opt_state = _init_opt_state_jit(spec, params, inputs)
  # Families without BatchNorm (VGG16) have no batch_stats collection.
  return parallel.replicate(TrainState(jnp.zeros((), jnp.int32), params,
                                       variables.get("batch_stats", {}), opt_state), spec.mesh)


def train_epoch(spec: StepSpec, state, x, y, order_key, dropout_key, aug_key, inputs):
  """One pass over (x, y) in a seeded random order: (state, {'train_loss', 'train_accuracy',
  'step_losses'}) as device arrays.

  A Python loop over one compiled step rather than a `lax.scan`: on XLA:CPU a scanned epoch
  ran many times slower than the same steps dispatched one by one (docs/performance.md).
  Data stays on device, batches are gathered there, and the host waits once per epoch.
  """
  # With a mesh every program input is replicated (the keys are made on one device).
  order_key, dropout_key, aug_key = parallel.replicate((order_key, dropout_key, aug_key),
                                                       spec.mesh)
  order = _epoch_order_jit(spec, y, order_key)
  losses, accs = [], []
  for i in range(spec.steps_per_epoch):
    state, (loss, acc) = train_step(spec, state, x, y, order[i], dropout_key, aug_key,
                                         inputs)
    losses.append(loss)
    accs.append(acc)
  losses = jnp.stack(losses)
  return state, {"train_loss": jnp.mean(losses), "train_accuracy": jnp.mean(jnp.stack(accs)),
                 "step_losses": losses}


def prefix_outputs(model, variables, x, stop: str, mesh=None, compute_dtype="float32"):
  """Output of the frozen groups first..stop (inference mode): the cached training input.
  With a mesh, `variables` and `x` must be replicated over it (so is the output)."""
  return _forward_chunks_jit(EvalSpec(model, None, stop, mesh, compute_dtype), variables, x)


def evaluate(model, variables, x, y, start: str | None = None, mesh=None,
             compute_dtype="float32"):
  """({'loss', 'accuracy'} as floats, predictions) of the whole model on (x, y). With a
  mesh, the arrays must be replicated over it."""
  metrics, pred = _evaluate_jit(EvalSpec(model, start, mesh=mesh, compute_dtype=compute_dtype),
                                variables, x, y)
  return {k: float(v) for k, v in metrics.items()}, np.asarray(pred)


# ---------------------------------------------------------------- lanes: 1 or S seeds

class Single:
  """One seed with the plain programs (data parallel over `mesh` when there is one).

  Per-seed values come back with a leading axis of length 1, as `Stacked`'s do, so the
  training loop reads both alike."""
  size = 1

  def __init__(self, mesh=None, compute_dtype: str = "float32"):
    self.mesh = mesh
    self.compute_dtype = compute_dtype

  def stack(self, trees):
    (tree,) = trees
    return parallel.replicate(jax.tree.map(jnp.asarray, tree), self.mesh)

  def unstack(self, tree) -> list:
    return [parallel.unreplicate(tree, self.mesh)]

  def per_seed_inputs(self, inputs):
    return inputs

  def fold_in(self, key, counts):
    return jax.random.fold_in(key, int(counts[0]))

  def init_state(self, spec, variables, inputs):
    return init_state(spec, variables, inputs)

  def train_epoch(self, spec, state, x, y, order_key, dropout_key, aug_key, inputs, active):
    del active  # one seed: the loop stops calling once it is done
    state, m = train_epoch(spec, state, x, y, order_key, dropout_key, aug_key, inputs)
    m = jax.device_get(m)
    return state, {"train_loss": np.asarray(m["train_loss"])[None],
                   "train_accuracy": np.asarray(m["train_accuracy"])[None],
                   "step_losses": np.asarray(m["step_losses"])[:, None]}

  def prefix_outputs(self, model, variables, x, stop):
    return prefix_outputs(model, variables, x, stop, self.mesh, self.compute_dtype)

  def evaluate(self, model, variables, x, y, start):
    metrics, pred = _evaluate_jit(EvalSpec(model, start, mesh=self.mesh,
                                           compute_dtype=self.compute_dtype),
                                  variables, x, y)
    return {k: np.asarray(v)[None] for k, v in jax.device_get(metrics).items()}, \
        np.asarray(pred)[None]

  def select(self, flags, new, old):
    return new if flags[0] else old


class Stacked:
  """S seeds in one vmapped program each (on one device): every per-seed value carries a
  leading seed axis. A seed that is done stays in the program with its updates masked, so
  what it keeps is exactly what a run of its own would keep."""
  mesh = None

  def __init__(self, size: int, compute_dtype: str = "float32"):
    self.size = size
    self.compute_dtype = compute_dtype

  def stack(self, trees):
    return jax.tree.map(lambda *a: jnp.stack([jnp.asarray(x) for x in a]), *trees)

  def unstack(self, tree) -> list:
    return [jax.tree.map(lambda a, s=s: a[s], tree) for s in range(self.size)]

  def per_seed_inputs(self, inputs):
    # lr and weight decay are shared: one value per seed. Anchors are already per seed
    # (made from the stacked variables).
    return {**inputs, "lr": jnp.full((self.size,), inputs["lr"]),
            "weight_decay": jnp.full((self.size,), inputs["weight_decay"])}

  def fold_in(self, keys, counts):
    return _seeds_fold_in(keys, jnp.asarray(counts, jnp.uint32))

  def init_state(self, spec, variables, inputs):
    params = variables["params"]
    opt_state = _seeds_init_opt_state(spec, params, inputs)
    return TrainState(jnp.zeros((self.size,), jnp.int32), params,
                      variables.get("batch_stats", {}), opt_state)

  def train_epoch(self, spec, state, x, y, order_keys, dropout_keys, aug_keys, inputs, active):
    order = jnp.swapaxes(_seeds_epoch_order(spec, y, order_keys), 0, 1)  # [steps, seeds, batch]
    active = jnp.asarray(active)
    losses, accs = [], []
    for i in range(spec.steps_per_epoch):
      state, (loss, acc) = _seeds_step(spec, state, x, y, order[i], dropout_keys, aug_keys,
                                       inputs, active)
      losses.append(loss)
      accs.append(acc)
    losses = jnp.stack(losses)  # [steps, seeds]
    return state, jax.device_get({"train_loss": jnp.mean(losses, 0),
                                  "train_accuracy": jnp.mean(jnp.stack(accs), 0),
                                  "step_losses": losses})

  def prefix_outputs(self, model, variables, x, stop):
    return _seeds_forward_chunks(EvalSpec(model, None, stop, None, self.compute_dtype),
                                 variables, x)

  def evaluate(self, model, variables, x, y, start):
    metrics, pred = _seeds_evaluate(EvalSpec(model, start, compute_dtype=self.compute_dtype),
                                    variables, x, y)
    return jax.device_get(metrics), np.asarray(pred)

  def select(self, flags, new, old):
    return _seeds_select(jnp.asarray(flags), new, old)


# ---------------------------------------------------------------- compile time

# JAX reports each compilation's phases (trace, lowering, XLA compile or persistent-cache
# load) as duration events; the timing ledger credits them to "compile".
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")


class CompileClock:
  seconds: float = 0.0


def _on_duration(event: str, duration: float, **_) -> None:
  if event in _COMPILE_EVENTS:
    timing.nested("compile", duration)


jax.monitoring.register_event_duration_secs_listener(_on_duration)


@contextlib.contextmanager
def compile_clock():
  """`with compile_clock() as c: ...` -> c.seconds spent compiling inside the block (read
  after it): the ledger's "compile" seconds added meanwhile."""
  clock = CompileClock()
  start = timing.snapshot().get("compile", 0.0)
  try:
    yield clock
  finally:
    clock.seconds = timing.snapshot().get("compile", 0.0) - start

"""`fit`: the one training loop, for one seed of a configuration or several at once.

A strategy is a list of stages; each stage trains the groups its rules leave trainable,
above a frozen prefix whose output is computed once per split. Early stopping watches the
validation split and restores the best epoch's weights; a non-finite loss stops a seed. A
stage that trains the head alone on cached features is solved to convergence instead, with
its L2 strength chosen on validation (`solves_probe`, tlresearch.probe): one history record.

S > 1 seeds train either one after another (`programs.Single`, each seed data parallel
over the local devices when there are several) or together in one vmapped program
(`programs.Stacked`), chosen by `seeds_mode`. The loop below is the same for both: every
per-seed quantity carries a seed axis, and a seed that is done is masked out.
"""
from __future__ import annotations

import dataclasses
import logging
import time

from flax import traverse_util
import jax
import numpy as np

from tlresearch import attention, optim, parallel, penalty, probe, programs, timing
from tlresearch import weight_space
from tlresearch.checkpoint import CheckpointError
from tlresearch.data.augment import FILL_MODES, AugmentSpec
from tlresearch.errors import UserError, choices
from tlresearch.strategies import FROZEN, frozen_groups, resolve, stage_epochs

log = logging.getLogger(__name__)

SEEDS_MODES = ("auto", "vmap", "loop")
SPLITS = ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")
BN_STATS = ("update", "frozen")
MONITORS = ("val_accuracy", "val_loss")
# The keys of a `train` config that decide a run's result (cell and pretrained-backbone
# identities list them); the others (seeds_mode, data_parallel) only decide how it runs.
IDENTITY_FIELDS = ("epochs", "batch_size", "optimizer", "lr", "warmup_epochs", "weight_decay",
                   "momentum", "cache_frozen_prefix", "min_steps", "bn_stats", "augment",
                   "early_stopping")
# Keys added after results existed: part of an identity only away from their default, so a
# result trained before they existed keeps its identity (`configs.pick`).
IDENTITY_DEFAULTS = {"compute_dtype": "float32", "schedule": "warmup_cosine",
                     "augment.fill_mode": "nearest"}
COMPUTE_DTYPES = ("float32", "bfloat16")


def check(cfg) -> None:
  """UserError for an invalid value of a `train` config, before anything trains."""
  es, aug = cfg.early_stopping, cfg.augment
  rules = [
      (cfg.epochs >= 1, f"train.epochs must be >= 1, got {cfg.epochs}"),
      (cfg.batch_size >= 1, f"train.batch_size must be >= 1, got {cfg.batch_size}"),
      (cfg.lr > 0, f"train.lr must be > 0, got {cfg.lr}"),
      (cfg.weight_decay >= 0, f"train.weight_decay must be >= 0, got {cfg.weight_decay}"),
      (0 <= cfg.momentum < 1, f"train.momentum must be in [0, 1), got {cfg.momentum}"),
      (es.min_delta >= 0, f"train.early_stopping.min_delta must be >= 0, got {es.min_delta}"),
      (cfg.warmup_epochs >= 0, f"train.warmup_epochs must be >= 0, got {cfg.warmup_epochs}"),
      (es.patience >= 1, f"train.early_stopping.patience must be >= 1, got {es.patience}"),
      (es.monitor in MONITORS,
       f"train.early_stopping.monitor must be one of {choices(MONITORS)}, got '{es.monitor}'"),
      (cfg.bn_stats in BN_STATS,
       f"train.bn_stats must be one of {choices(BN_STATS)}, got '{cfg.bn_stats}'"),
      (cfg.min_steps >= 0, f"train.min_steps must be >= 0, got {cfg.min_steps}"),
      (cfg.optimizer in optim.OPTIMIZERS,
       f"unknown train.optimizer '{cfg.optimizer}'; valid: {choices(optim.OPTIMIZERS)}"),
      (cfg.seeds_mode in SEEDS_MODES,
       f"train.seeds_mode must be one of {choices(SEEDS_MODES)}, got '{cfg.seeds_mode}'"),
      (cfg.probe_solver in probe.SOLVERS,
       f"train.probe_solver must be one of {choices(probe.SOLVERS)}, got '{cfg.probe_solver}'"),
      (cfg.get("schedule", "warmup_cosine") in optim.SCHEDULES,
       f"train.schedule must be one of {choices(optim.SCHEDULES)}, got '{cfg.get('schedule')}'"),
      (cfg.augment.get("fill_mode", "nearest") in FILL_MODES,
       f"train.augment.fill_mode must be one of {choices(FILL_MODES)}, got "
       f"'{cfg.augment.get('fill_mode')}'"),
      (aug.rotation >= 0, f"train.augment.rotation must be >= 0 (degrees), got {aug.rotation}"),
      (aug.shear >= 0, f"train.augment.shear must be >= 0 (degrees), got {aug.shear}"),
      *((0 <= aug[k] < 1, f"train.augment.{k} must be in [0, 1), got {aug[k]}")
        for k in ("width_shift", "height_shift", "zoom")),
      (cfg.compute_dtype in COMPUTE_DTYPES,
       f"train.compute_dtype must be one of {choices(COMPUTE_DTYPES)}, got "
       f"'{cfg.compute_dtype}'"),
  ]
  for ok, message in rules:
    if not ok:
      raise UserError(message)


def seeds_mode(cfg, backend: str | None = None, devices: int | None = None) -> str:
  """How the seeds of a configuration train under `cfg.seeds_mode`: "vmap" or "loop".

  "auto" is loop on CPU (where three vmapped seeds ran ~3x slower than a loop:
  docs/performance.md) and vmap on a single accelerator; with several local devices and
  `data_parallel` on it loops, since the vmapped program runs on one device while each
  looped seed trains data parallel over all of them."""
  if cfg.seeds_mode != "auto":
    return cfg.seeds_mode
  if (backend or jax.default_backend()) == "cpu":
    return "loop"
  devices = jax.local_device_count() if devices is None else devices
  return "loop" if devices > 1 and cfg.data_parallel else "vmap"


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


@dataclasses.dataclass
class FitResult:
  """What `fit` returns for one seed."""
  variables: dict              # the final weights (the best epoch's, with early stopping)
  history: list                # one record per epoch trained (train/val loss and accuracy, lr)
  best_epoch: int
  val: dict                    # {'loss', 'accuracy'} of the final weights on validation
  test: dict                   # ... and on test
  test_predictions: np.ndarray
  cached_prefix: bool          # whether a frozen prefix was run once instead of every step
  notes: list                  # what a reader of the results should know about this run
  diverged: dict | None        # {'epoch', 'step'} of the first non-finite loss, or None
  fit_seconds: float           # the whole fit's wall time (shared by seeds trained together)
  probe: dict | None = None    # the converged probe's solve (tlresearch.probe), if a stage had one
  weight_space: dict | None = None  # WiSE-FT's or a soup's record (tlresearch.weight_space)
  limited: bool | None = None  # a soup's budget_limited (of its members); None: from history

  @property
  def epochs_run(self) -> int:
    return len(self.history)

  @property
  def budget_limited(self) -> bool:
    """The best validation score came in the last epoch an optimizer trained: the budget,
    not the strategy, may have stopped it (flagged in the tables)."""
    if self.limited is not None:
      return self.limited
    return bool(self.history and self.best_epoch == self.epochs_run
                and self.history[-1].get("solver") != "lbfgs")


def _first_trainable_group(rule_by_path, groups) -> int:
  return min(groups.index(p.split("/")[0]) for p, r in rule_by_path.items() if r != FROZEN)


def stage_start(groups, stage, param_paths, cfg, cache: bool | None = None) -> str:
  """The group a stage's training starts at: above its frozen prefix when that prefix's
  output is cached (`cache`, default `cfg.cache_frozen_prefix`; never with augmentation, which
  changes the prefix's input every step), else the first group."""
  first = _first_trainable_group(resolve(stage.rules, param_paths), groups)
  cache = bool(cfg.cache_frozen_prefix) if cache is None else cache
  aug = AugmentSpec.from_config(cfg.augment)
  return groups[first] if first > 0 and aug is None and cache else groups[0]


def solves_probe(model, stage, param_paths, cfg) -> bool:
  """Whether `fit` solves this stage with the converged probe (tlresearch.probe) rather than
  training it with the optimizer."""
  groups = model.groups
  # An MLP head on cached features is not a convex problem: it trains like any stage.
  linear = getattr(model, "head_spec", None) is None or model.head_spec.linear
  return stage.solve and linear and probe.applies(
      cfg, getattr(model, "dropout_rate", 0.0), stage_start(groups, stage, param_paths, cfg),
      groups[-1])


def stage_spec(model, stage, variables, cfg, n_train: int, n_epochs: int,
               cache: bool | None = None, mesh=None) -> tuple[programs.StepSpec, dict]:
  """The compiled-step description and step inputs of one strategy stage.

  `cfg` is the cell's `train` config; `cache` (default `cfg.cache_frozen_prefix`) starts
  training above the frozen prefix, whose output is then computed once per split; never
  with augmentation on, which changes the prefix's input every step. With a data-parallel
  `mesh` (`variables` replicated over it) the step splits each batch over its devices and
  the inputs are replicated. `variables` may be stacked over seeds (their penalty anchors
  then are too).
  """
  groups = model.groups
  aug = AugmentSpec.from_config(cfg.augment)
  batch_size = min(int(cfg.batch_size), n_train)
  steps = -(-n_train // batch_size)
  flat_params = traverse_util.flatten_dict(variables["params"], sep="/")
  rule_by_path = resolve(stage.rules, flat_params)
  first = _first_trainable_group(rule_by_path, groups)
  start = stage_start(groups, stage, flat_params, cfg, cache)
  # "frozen": every BatchNorm in inference mode with its statistics kept, trainable or not.
  frozen_bn = tuple(groups) if cfg.bn_stats == "frozen" else frozen_groups(rule_by_path, groups)
  spec = programs.StepSpec(
      model=model, rules=tuple(stage.rules), optimizer=cfg.optimizer,
      total_steps=n_epochs * steps, warmup_steps=round(cfg.warmup_epochs * steps),
      momentum=float(cfg.momentum), start=start, frozen_bn=frozen_bn,
      augment=aug if start == groups[0] else None, batch_size=batch_size,
      steps_per_epoch=steps, penalty=tuple(stage.penalty), frozen_prefix=tuple(groups[:first]),
      mesh=mesh, compute_dtype=cfg.compute_dtype, schedule=cfg.get("schedule", "warmup_cosine"))
  inputs = programs.step_inputs(float(cfg.lr),
                                float(cfg.weight_decay) if stage.weight_decay else 0.0,
                                penalty.anchor(stage, variables, rule_by_path))
  return spec, parallel.replicate(inputs, mesh)


# ---------------------------------------------------------------- fit

def fit(model, starts, strategy, datas, cfg, keys, checkpointer=None,
        on_epoch=None) -> list[FitResult]:
  """`_fit_seeds`, or for a model soup (tlresearch.weight_space.soup) one `_fit_seeds` per
  ingredient, averaged."""
  if strategy.weight_space[:1] == ("soup",):
    return weight_space.soup(model, starts, strategy, datas, cfg, keys, checkpointer, on_epoch,
                             _fit_seeds)
  return _fit_seeds(model, starts, strategy, datas, cfg, keys, checkpointer, on_epoch)


def _fit_seeds(model, starts, strategy, datas, cfg, keys, checkpointer=None,
               on_epoch=None) -> list[FitResult]:
  """Trains each seed's starting variables under `strategy`; one `FitResult` per seed.

  Args:
    model: the Flax module (every seed's).
    starts, datas, keys: per seed, aligned: starting variables, `tlresearch.data.Dataset`,
      `CellKeys`.
    cfg: the `train` config (one for all seeds: they differ only in seed).
    checkpointer: `checkpointer(seed_indices)` -> a `checkpoint.FitCheckpointer` for the
      seeds that train together, or None. Progress is saved between epochs and a later call
      resumes from the newest checkpoint, bitwise identical to an uninterrupted run (every
      random stream is keyed by seed, epoch and step). A damaged checkpoint is logged and
      those seeds start from scratch.
    on_epoch: called as `on_epoch(seed_index, record, state)` after each seed's epoch
      (`state` is the stacked state when seeds train together; after a converged probe's
      solve, one record, it holds the solved variables and no step or optimizer state).

  Seeds train together (one vmapped program) when `seeds_mode(cfg)` is "vmap", there are
  several, and their splits have equal sizes; otherwise one after another.
  """
  indices = list(range(len(datas)))
  shapes = {tuple(np.shape(getattr(d, s)) for s in SPLITS) for d in datas}
  if len(datas) > 1 and seeds_mode(cfg) == "vmap":
    if len(shapes) == 1:
      return _fit_resuming(programs.Stacked(len(datas), cfg.compute_dtype), model, starts,
                           strategy, datas, cfg, keys, indices, checkpointer, on_epoch)
    log.info("training %d seeds one by one: their splits differ in size", len(datas))
  out = []
  for i in indices:
    mesh, note = parallel.for_batch(min(int(cfg.batch_size), len(datas[i].train_x)),
                                    bool(cfg.data_parallel))
    if mesh is not None:
      log.info("data parallel over %d devices", mesh.size)
    lanes = programs.Single(mesh, cfg.compute_dtype)
    out += _fit_resuming(lanes, model, [starts[i]], strategy, [datas[i]], cfg, [keys[i]], [i],
                         checkpointer, on_epoch, [note] if note else [])
  return out


def _fit_resuming(lanes, model, starts, strategy, datas, cfg, keys, indices, checkpointer,
                  on_epoch, notes=()) -> list[FitResult]:
  ckpt = checkpointer(indices) if checkpointer is not None else None
  resume = ckpt.peek() if ckpt is not None else None
  if resume is not None:
    try:
      return _Fit(lanes, model, strategy, datas, cfg, keys, indices, ckpt, on_epoch,
                  notes).run(starts, resume)
    except CheckpointError as e:
      log.warning("%s; restarting this run from scratch", e)
      ckpt.clear()
  return _Fit(lanes, model, strategy, datas, cfg, keys, indices, ckpt, on_epoch,
              notes).run(starts, None)


@dataclasses.dataclass
class _Seed:
  """One seed's bookkeeping: its record so far and, within a stage, its early stopping."""
  history: list = dataclasses.field(default_factory=list)
  notes: list = dataclasses.field(default_factory=list)
  best_epoch: int = 0
  cached: bool = False
  diverged: dict | None = None
  probe: dict | None = None    # the converged probe's solve, when a stage had one
  weight_space: dict | None = None  # a weight-space method's record (set after the stages)
  val: dict | None = None
  test: dict | None = None
  pred: np.ndarray | None = None
  active: bool = True          # still training in this stage
  best_score: float | None = None
  stage_best_epoch: int | None = None  # None: no epoch scored yet in this stage
  wait: int = 0

  def note(self, text: str) -> None:
    if text not in self.notes:
      self.notes.append(text)

  def progress(self) -> dict:
    """JSON meta for a checkpoint."""
    return {"history": self.history, "notes": self.notes, "active": self.active,
            "best_score": self.best_score, "stage_best_epoch": self.stage_best_epoch,
            "wait": self.wait, "best_epoch": self.best_epoch, "cached": self.cached,
            "diverged": self.diverged, "probe": self.probe}

  @classmethod
  def from_progress(cls, meta: dict) -> "_Seed":
    return cls(**meta)


def _first_nonfinite(losses) -> int:
  return int(np.flatnonzero(~np.isfinite(np.asarray(losses)))[0])


class _Fit:
  """One run of the training loop over `lanes` (1 seed, or S stacked ones)."""

  def __init__(self, lanes, model, strategy, datas, cfg, keys, indices, ckpt, on_epoch,
               notes):
    self.lanes, self.model, self.strategy, self.cfg = lanes, model, strategy, cfg
    self.datas = datas
    self.indices, self.ckpt, self.on_epoch = indices, ckpt, on_epoch
    self.seeds = [_Seed(notes=list(notes)) for _ in datas]
    self.data = {s: lanes.stack([getattr(d, s) for d in datas]) for s in SPLITS}
    self.keys = {f: lanes.stack([getattr(k, f) for k in keys])
                 for f in ("order", "dropout", "augment")}
    self.n = len(datas[0].train_x)
    self.steps = -(-self.n // min(int(cfg.batch_size), self.n))
    es = cfg.early_stopping
    self.es, self.sign = es, (1.0 if es.monitor == "val_accuracy" else -1.0)
    self.augmenting = AugmentSpec.from_config(cfg.augment) is not None
    self.epochs_done = 0

  def run(self, starts, resume) -> list[FitResult]:
    t_start = time.perf_counter()
    lanes = self.lanes
    if resume is not None:
      log.info("resuming from %s (%d epochs done)", resume["path"], resume["epochs_done"])
      self.seeds = [_Seed.from_progress(m) for m in resume["seeds"]]
      self.epochs_done = resume["epochs_done"]
    variables = lanes.stack(starts)
    # Collections beside params and batch_stats (the pretrained source head `lwf` reads)
    # are read-only inputs of the stages' penalties, never trained or returned.
    extras = {k: v for k, v in variables.items() if k not in ("params", "batch_stats")}
    variables = {k: v for k, v in variables.items() if k not in extras}
    budget = optim.epoch_budget(int(self.cfg.epochs), self.steps, int(self.cfg.min_steps))
    inputs, weights_start = None, None
    for stage_index, (stage, n_epochs) in enumerate(zip(self.strategy.stages,
                                                        stage_epochs(self.strategy.stages,
                                                                     budget))):
      live = [s for s, r in enumerate(self.seeds) if r.diverged is None]
      if n_epochs <= 0 or not live:
        continue  # a diverged seed runs no later stage
      if resume is not None and stage_index < resume["stage"]:
        continue  # finished before the interruption; the checkpoint holds what it produced
      spec, stage_inputs = stage_spec(self.model, stage, {**variables, **extras}, self.cfg,
                                      self.n, n_epochs, mesh=lanes.mesh)
      paths = traverse_util.flatten_dict(variables["params"], sep="/")
      if solves_probe(self.model, stage, paths, self.cfg):
        splits = self._inputs(spec, variables, live)
        variables = self._solve_probe(stage, variables, splits, live)
        continue
      inputs = lanes.per_seed_inputs(stage_inputs)
      if penalty.needs_attention(stage.penalty):  # before a restore: its tree has them
        with timing.phase("probe"):
          groups = penalty.captured_groups(stage.penalty, self.model.groups, spec.start)
          weights = lanes.stack([attention.delta_attention(self.model, v, groups, d)
                                 for v, d in zip(lanes.unstack(variables), self.datas)])
        inputs = {**inputs, "anchor": {**inputs["anchor"], "attention": weights}}
      if self.augmenting and spec.frozen_prefix:
        for s in live:
          self.seeds[s].note(f"frozen prefix ({', '.join(spec.frozen_prefix)}) not cached: "
                             "augmentation is on")
      state = lanes.init_state(spec, variables, inputs)
      first_epoch, best_weights = 0, (state.params, state.batch_stats)
      # A weight-space method reads the last stage's starting weights; saved with progress.
      weights_start = variables if self.strategy.weight_space[:1] == ("wise_ft",) else None
      if resume is None:
        for s in live:
          r = self.seeds[s]
          r.active, r.best_score, r.stage_best_epoch, r.wait = True, None, None, 0
      else:  # this is the stage the checkpoint was saved in
        tree = self.ckpt.restore(resume, self._progress_tree(state, best_weights,
                                                             inputs["anchor"], weights_start))
        tree = parallel.replicate(tree, lanes.mesh)
        state, best_weights = tree["state"], (tree["best_params"], tree["best_stats"])
        weights_start = tree.get("weights_start")
        # The penalty's anchor is the stage's starting weights, saved with the progress.
        inputs = {**inputs, "anchor": tree.get("anchor", {})}
        first_epoch = resume["stage_epoch"]
        # Frozen params and frozen BatchNorm stats are untouched by training, so the
        # restored state runs the frozen prefix exactly as the stage's start did.
        variables = programs.variables_of(state)
        resume = None
      splits = self._inputs(spec, variables, live)
      state, best_weights = self._epochs(spec, state, best_weights, splits, inputs, stage,
                                         stage_index, first_epoch, n_epochs, weights_start)
      variables = self._end_stage(state, best_weights, live)
      ended = [s for s in live if self.seeds[s].diverged is not None]
      self._test(variables, splits, spec.start, ended)  # on this stage's inputs
    if weights_start is not None:
      live = [s for s, r in enumerate(self.seeds) if r.diverged is None]
      with timing.phase("eval"):
        variables, records = weight_space.wise_ft(lanes, self.model, weights_start, variables,
                                                  splits, self.data, spec.start, live,
                                                  self.strategy.weight_space[1])
      for s, record in records.items():
        self.seeds[s].weight_space = record
        self.seeds[s].test = None  # tested again below, at the chosen point
    self._test(variables, splits, spec.start,
               [s for s, r in enumerate(self.seeds) if r.test is None])
    seconds = time.perf_counter() - t_start
    return [FitResult(variables=v, history=r.history, best_epoch=r.best_epoch, val=r.val,
                      test=r.test, test_predictions=r.pred, cached_prefix=r.cached,
                      notes=r.notes, diverged=r.diverged, fit_seconds=seconds, probe=r.probe,
                      weight_space=r.weight_space)
            for v, r in zip(lanes.unstack(variables), self.seeds)]

  def _solve_probe(self, stage, variables, splits, live) -> dict:
    """The converged probe (tlresearch.probe) for each live seed, on the cached inputs of
    the head: one history record per seed, and the solve in its FitResult."""
    lanes = self.lanes
    per_seed = lanes.unstack(variables)
    x = {k: lanes.unstack(splits[k]) for k in ("train", "val")}
    y = {k: lanes.unstack(self.data[f"{k}_y"]) for k in ("train", "val")}
    records = {}
    for s in live:
      t0 = time.perf_counter()
      with timing.phase("probe"):
        per_seed[s], sol = probe.solve(self.model, per_seed[s], x["train"][s], y["train"][s],
                                       x["val"][s], y["val"][s])
      r = self.seeds[s]
      r.probe = sol.record()
      record = {"epoch": len(r.history) + 1, "stage": stage.name, "solver": "lbfgs",
                "train_loss": sol.train_loss, "train_accuracy": sol.train_accuracy,
                "val_loss": sol.val_loss, "val_accuracy": sol.val_accuracy,
                "lr": None, "l2": sol.l2, "iterations": sol.iterations,
                "seconds": time.perf_counter() - t0}
      r.history.append(record)
      r.best_epoch = len(r.history)
      if probe.note(sol):
        r.note(probe.note(sol))
      records[s] = record
    self.epochs_done += 1  # the solve is one record of the history, as an epoch is
    variables = lanes.stack(per_seed)
    if self.on_epoch is not None:  # the state the solve leaves (no optimizer state)
      state = programs.TrainState(None, variables["params"], variables.get("batch_stats", {}),
                                  None)
      for s, record in records.items():
        self.on_epoch(self.indices[s], record, state)
    return variables

  def _inputs(self, spec, variables, live) -> dict:
    """The stage's training / validation / test inputs: the frozen prefix's outputs where it
    is cached, else the images."""
    groups, lanes, d = self.model.groups, self.lanes, self.data
    if spec.start == groups[0]:
      return {"train": d["train_x"], "val": d["val_x"], "test": d["test_x"]}
    stop = groups[groups.index(spec.start) - 1]
    for s in live:
      self.seeds[s].cached = True
    with timing.phase("prefix"):
      return {split: lanes.prefix_outputs(self.model, variables, d[f"{split}_x"], stop)
              for split in ("train", "val", "test")}

  def _epochs(self, spec, state, best_weights, splits, inputs, stage, stage_index,
              first_epoch, n_epochs, weights_start=None):
    lanes, seeds, es = self.lanes, self.seeds, self.es
    lr = spec.lr_schedule(float(self.cfg.lr))
    for stage_epoch in range(first_epoch, n_epochs):
      active = np.array([r.active and r.diverged is None for r in seeds])
      if not active.any():
        break
      t0 = time.perf_counter()
      order_keys = lanes.fold_in(self.keys["order"], [len(r.history) for r in seeds])
      with timing.phase("train"):
        state, m = lanes.train_epoch(spec, state, splits["train"], self.data["train_y"],
                                     order_keys, self.keys["dropout"], self.keys["augment"],
                                     inputs, active)
      with timing.phase("eval"):
        val, _ = lanes.evaluate(self.model, programs.variables_of(state), splits["val"],
                                self.data["val_y"], spec.start)
      seconds = time.perf_counter() - t0
      improved = np.zeros(len(seeds), bool)
      for s in np.flatnonzero(active):
        r, epoch = seeds[s], len(seeds[s].history)
        record = {"epoch": epoch + 1, "stage": stage.name,
                  "train_loss": float(m["train_loss"][s]),
                  "train_accuracy": float(m["train_accuracy"][s]),
                  "val_loss": float(val["loss"][s]), "val_accuracy": float(val["accuracy"][s]),
                  "lr": float(lr((stage_epoch + 1) * self.steps - 1)),  # the epoch's last step
                  "seconds": seconds}
        r.history.append(record)
        if self.on_epoch is not None:
          self.on_epoch(self.indices[s], record, state)
        if not np.isfinite(record["train_loss"]):
          r.diverged = {"epoch": epoch + 1,
                        "step": epoch * self.steps + _first_nonfinite(m["step_losses"][:, s]) + 1}
          r.notes.append(f"non-finite training loss at epoch {r.diverged['epoch']}, "
                         f"step {r.diverged['step']}: stopped")
          continue
        score = self.sign * record[es.monitor]
        if r.stage_best_epoch is None or score > r.best_score + float(es.min_delta):
          r.best_score, r.stage_best_epoch, r.wait = score, epoch + 1, 0
          improved[s] = True
        else:
          r.wait += 1
          r.active = not (es.enabled and r.wait >= int(es.patience))
      if improved.any():
        best_weights = lanes.select(improved, (state.params, state.batch_stats), best_weights)
      self.epochs_done += 1
      if self.ckpt is not None:
        with timing.phase("files"):
          self.ckpt.maybe_save(
              self.epochs_done,
              lambda st=state, b=best_weights, a=inputs["anchor"]: self._progress_tree(
                  st, b, a, weights_start),
              {"stage": stage_index, "stage_epoch": stage_epoch + 1,
               "seeds": [r.progress() for r in seeds]})
    return state, best_weights

  @staticmethod
  def _progress_tree(state, best_weights, anchor, weights_start=None) -> dict:
    """The arrays of a fit checkpoint (the rest of the progress is JSON meta)."""
    tree = {"state": state, "best_params": best_weights[0], "best_stats": best_weights[1]}
    if anchor:
      tree["anchor"] = anchor
    if weights_start is not None:
      tree["weights_start"] = weights_start
    return tree

  def _end_stage(self, state, best_weights, live) -> dict:
    """Each live seed's variables after the stage: the best epoch's with early stopping
    (unless it diverged), else the last state's."""
    use_best = np.zeros(len(self.seeds), bool)
    for s in live:
      r = self.seeds[s]
      use_best[s] = self.es.enabled and r.stage_best_epoch is not None and r.diverged is None
      r.best_epoch = r.stage_best_epoch if r.stage_best_epoch is not None else len(r.history)
    params, stats = self.lanes.select(use_best, best_weights, (state.params, state.batch_stats))
    return {"params": params, "batch_stats": stats}

  def _test(self, variables, splits, start, which) -> None:
    """Final validation and test metrics of the seeds in `which` (on the cached prefix
    outputs where there are any: no second pass through the backbone)."""
    if not which:
      return
    with timing.phase("eval"):
      val, _ = self.lanes.evaluate(self.model, variables, splits["val"], self.data["val_y"],
                                   start)
      test, pred = self.lanes.evaluate(self.model, variables, splits["test"],
                                       self.data["test_y"], start)
    for s in which:
      r = self.seeds[s]
      r.val = {k: float(v[s]) for k, v in val.items()}
      r.test = {k: float(v[s]) for k, v in test.items()}
      r.pred = pred[s]

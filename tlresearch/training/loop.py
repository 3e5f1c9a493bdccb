"""The one training loop, for one seed of a configuration or several at once.

A strategy is a list of stages; each stage trains the groups its rules leave trainable,
above a frozen prefix whose output is computed once per split. Early stopping watches the
validation split and restores the best epoch's weights; a non-finite loss stops a seed.
Methods plug in through `hooks.Hook` (a stage solved in closed form, extra step inputs,
weights combined after the stages); this file names none of them.

`lanes` is `programs.Single` (one seed, data parallel over the local devices when there are
several) or `programs.Stacked` (S seeds in one vmapped program). The loop is the same for
both: every per-seed quantity carries a seed axis, and a seed that is done is masked out.
"""
from __future__ import annotations

import logging
import time

import numpy as np

from tlresearch.core import timing
from tlresearch.data.augment import AugmentSpec
from tlresearch.methods import optim
from tlresearch.methods.strategies import stage_epochs
from tlresearch.training import parallel, programs
from tlresearch.training.checkpoint import CheckpointError
from tlresearch.training.ledger import FitResult, SeedLedger
from tlresearch.training.stage import stage_spec

log = logging.getLogger(__name__)

SPLITS = ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y")


def fit_seeds(model, starts, strategy, datas, cfg, keys, checkpointer, on_epoch, hooks,
              mode: str) -> list[FitResult]:
  """Trains each seed's starting variables under `strategy`; one `FitResult` per seed.

  The arguments are `tlresearch.training.train.fit`'s; `mode` is its `seeds_mode`. Seeds
  train together (one vmapped program) when `mode` is "vmap", there are several, and their
  splits have equal sizes; otherwise one after another."""
  indices = list(range(len(datas)))
  shapes = {tuple(np.shape(getattr(d, s)) for s in SPLITS) for d in datas}
  if len(datas) > 1 and mode == "vmap":
    if len(shapes) == 1:
      lanes = programs.Stacked(len(datas), cfg.compute_dtype)
      return _fit_resuming(lambda: FitRun(lanes, model, strategy, datas, cfg, keys, indices,
                                          on_epoch, hooks), indices, starts, checkpointer)
    log.info("training %d seeds one by one: their splits differ in size", len(datas))
  out = []
  for i in indices:
    mesh, note = parallel.for_batch(min(int(cfg.batch_size), len(datas[i].train_x)),
                                    bool(cfg.data_parallel))
    if mesh is not None:
      log.info("data parallel over %d devices", mesh.size)
    lanes = programs.Single(mesh, cfg.compute_dtype)
    out += _fit_resuming(lambda lanes=lanes, i=i, note=note: FitRun(
        lanes, model, strategy, [datas[i]], cfg, [keys[i]], [i], on_epoch, hooks,
        [note] if note else []), [i], [starts[i]], checkpointer)
  return out


def _fit_resuming(new_run, indices, starts, checkpointer) -> list[FitResult]:
  """A run (`new_run()`) from its newest checkpoint, or from the start when there is none or
  it is damaged (logged: those seeds then start from scratch, in a fresh run)."""
  ckpt = checkpointer(indices) if checkpointer is not None else None
  resume = ckpt.peek() if ckpt is not None else None
  if resume is not None:
    try:
      return new_run().run(starts, resume, ckpt)
    except CheckpointError as e:
      log.warning("%s; restarting this run from scratch", e)
      ckpt.clear()
  return new_run().run(starts, None, ckpt)


def _first_nonfinite(losses) -> int:
  return int(np.flatnonzero(~np.isfinite(np.asarray(losses)))[0])


def _progress_tree(state, best_weights, anchor, stage_start=None) -> dict:
  """The arrays of a fit checkpoint (the rest of the progress is JSON meta)."""
  tree = {"state": state, "best_params": best_weights[0], "best_stats": best_weights[1]}
  if anchor:
    tree["anchor"] = anchor
  if stage_start is not None:
    tree["weights_start"] = stage_start
  return tree


class FitRun:
  """One run of the loop over `lanes` (1 seed, or S stacked ones): plan each stage, run its
  epochs, record each epoch, finish."""

  def __init__(self, lanes, model, strategy, datas, cfg, keys, indices, on_epoch, hooks,
               notes=()):
    self.lanes, self.model, self.strategy, self.cfg = lanes, model, strategy, cfg
    self.datas, self.indices, self.on_epoch, self.hooks = datas, indices, on_epoch, hooks
    self.ckpt = None
    self.seeds = [SeedLedger(notes=list(notes)) for _ in datas]
    self.data = {s: lanes.stack([getattr(d, s) for d in datas]) for s in SPLITS}
    self.keys = {f: lanes.stack([getattr(k, f) for k in keys])
                 for f in ("order", "dropout", "augment")}
    self.n = len(datas[0].train_x)
    self.steps = -(-self.n // min(int(cfg.batch_size), self.n))
    self.sign = 1.0 if cfg.early_stopping.monitor == "val_accuracy" else -1.0
    self.keeps_start = any(h.keeps_stage_start for h in hooks)
    self.epochs_done = 0
    self.splits, self.start = None, None  # the last planned stage's inputs and start group
    # seed -> the history record whose weights the last stage ended with: its validation
    # metrics are the final ones, so the final pass does not evaluate them again.
    self.val_known = {}

  def live(self) -> list[int]:
    return [s for s, r in enumerate(self.seeds) if r.diverged is None]

  def run(self, starts, resume, ckpt=None) -> list[FitResult]:
    t_start = time.perf_counter()
    self.ckpt = ckpt
    lanes = self.lanes
    if resume is not None:
      log.info("resuming from %s (%d epochs done)", resume["path"], resume["epochs_done"])
      self.seeds = [SeedLedger.from_progress(m) for m in resume["seeds"]]
      self.epochs_done = resume["epochs_done"]
    variables = lanes.stack(starts)
    # Collections beside params and batch_stats (a pretrained source head a penalty reads)
    # are read-only inputs of the stages' penalties, never trained or returned.
    extras = {k: v for k, v in variables.items() if k not in ("params", "batch_stats")}
    variables = {k: v for k, v in variables.items() if k not in extras}
    budget = optim.epoch_budget(int(self.cfg.epochs), self.steps, int(self.cfg.min_steps))
    stage_start = None
    epochs = stage_epochs(self.strategy.stages, budget)
    for stage_index, (stage, n_epochs) in enumerate(zip(self.strategy.stages, epochs)):
      if n_epochs <= 0 or not self.live():
        continue  # a diverged seed runs no later stage
      if resume is not None and stage_index < resume["stage"]:
        continue  # finished before the interruption; the checkpoint holds what it produced
      variables, trained, start = self._stage(stage, stage_index, n_epochs, variables,
                                              extras, resume)
      if trained:
        stage_start, resume = start, None
    variables = self._finish(variables, stage_start)
    seconds = time.perf_counter() - t_start
    return [r.result(v, seconds) for v, r in zip(lanes.unstack(variables), self.seeds)]

  def _stage(self, stage, stage_index, n_epochs, variables, extras, resume):
    """Plans and runs one stage: (its variables, whether the optimizer trained it, its
    starting weights where a hook keeps them for `after_stages`, else None)."""
    live = self.live()
    self.val_known = {}
    spec, inputs = stage_spec(self.model, stage, {**variables, **extras}, self.cfg, self.n,
                              n_epochs, mesh=self.lanes.mesh)
    for hook in self.hooks:
      solved = hook.solve(self, stage, spec, variables, live)
      if solved is not None:
        return solved, False, None
    inputs = self.lanes.per_seed_inputs(inputs)
    for hook in self.hooks:  # before a restore: the checkpoint's tree has what they add
      inputs = hook.stage_inputs(self, stage, spec, variables, inputs)
    if AugmentSpec.from_config(self.cfg.augment) is not None and spec.frozen_prefix:
      for s in live:
        self.seeds[s].note(f"frozen prefix ({', '.join(spec.frozen_prefix)}) not cached: "
                           "augmentation is on")
    state = self.lanes.init_state(spec, variables, inputs)
    best_weights, first_epoch = (state.params, state.batch_stats), 0
    start = variables if self.keeps_start else None  # saved with the progress
    if resume is None:
      for s in live:
        self.seeds[s].stop.reset()
    else:  # this is the stage the checkpoint was saved in
      state, best_weights, inputs, start = self._restore(resume, state, best_weights, inputs,
                                                         start)
      first_epoch = resume["stage_epoch"]
      # Frozen params and frozen BatchNorm stats are untouched by training, so the
      # restored state runs the frozen prefix exactly as the stage's start did.
      variables = programs.variables_of(state)
    splits = self.stage_splits(spec, variables, live)
    state, best_weights = self._epochs(spec, state, best_weights, splits, inputs, stage,
                                       stage_index, first_epoch, n_epochs, start)
    variables = self._end_stage(state, best_weights, live)
    self._test(variables, [s for s in live if self.seeds[s].diverged is not None])
    return variables, True, start

  def _restore(self, resume, state, best_weights, inputs, start):
    tree = self.ckpt.restore(resume, _progress_tree(state, best_weights, inputs["anchor"],
                                                    start))
    tree = parallel.replicate(tree, self.lanes.mesh)
    # The penalty's anchor is the stage's starting weights, saved with the progress.
    inputs = {**inputs, "anchor": tree.get("anchor", {})}
    return (tree["state"], (tree["best_params"], tree["best_stats"]), inputs,
            tree.get("weights_start"))

  def stage_splits(self, spec, variables, live) -> dict:
    """The stage's training / validation / test inputs: the frozen prefix's outputs where it
    is cached, else the images. The last stage's are the ones the fit is tested on."""
    groups, d = self.model.groups, self.data
    self.start = spec.start
    if spec.start == groups[0]:
      self.splits = {"train": d["train_x"], "val": d["val_x"], "test": d["test_x"]}
      return self.splits
    stop = groups[groups.index(spec.start) - 1]
    for s in live:
      self.seeds[s].cached = True
    with timing.phase("prefix"):
      self.splits = {split: self.lanes.prefix_outputs(self.model, variables, d[f"{split}_x"],
                                                      stop)
                     for split in ("train", "val", "test")}
    return self.splits

  def record_solve(self, records: dict, variables) -> None:
    """A stage solved by a hook: `records` {seed: its one history record}; `variables` the
    solved (stacked) variables. One record counts as one epoch of the fit."""
    for s, record in records.items():
      r = self.seeds[s]
      r.record(record)
      r.best_epoch = len(r.history)
    self.epochs_done += 1
    if self.on_epoch is not None:  # the state the solve leaves (no optimizer state)
      state = programs.TrainState(None, variables["params"], variables.get("batch_stats", {}),
                                  None)
      for s, record in records.items():
        self.on_epoch(self.indices[s], record, state)

  def _epochs(self, spec, state, best_weights, splits, inputs, stage, stage_index,
              first_epoch, n_epochs, start=None):
    lanes, seeds = self.lanes, self.seeds
    lr = spec.lr_schedule(float(self.cfg.lr))
    for stage_epoch in range(first_epoch, n_epochs):
      active = np.array([r.stop.active and r.diverged is None for r in seeds])
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
        # The lr of the epoch's last step.
        improved[s] = self._record_epoch(s, stage, m, val, lr((stage_epoch + 1) * self.steps
                                                               - 1), seconds, state)
      if improved.any():
        best_weights = lanes.select(improved, (state.params, state.batch_stats), best_weights)
      self.epochs_done += 1
      if self.ckpt is not None:
        with timing.phase("files"):
          self.ckpt.maybe_save(
              self.epochs_done,
              lambda st=state, b=best_weights, a=inputs["anchor"]: _progress_tree(st, b, a,
                                                                                  start),
              {"stage": stage_index, "stage_epoch": stage_epoch + 1,
               "seeds": [r.progress() for r in seeds]})
    return state, best_weights

  def _record_epoch(self, s, stage, m, val, lr, seconds, state) -> bool:
    """Seed `s`'s record of the epoch, its divergence check and early stopping; True if
    the epoch is its stage's best so far."""
    r, epoch = self.seeds[s], len(self.seeds[s].history)
    record = {"epoch": epoch + 1, "stage": stage.name,
              "train_loss": float(m["train_loss"][s]),
              "train_accuracy": float(m["train_accuracy"][s]),
              "val_loss": float(val["loss"][s]), "val_accuracy": float(val["accuracy"][s]),
              "lr": float(lr), "seconds": seconds}
    r.record(record)
    if self.on_epoch is not None:
      self.on_epoch(self.indices[s], record, state)
    if not np.isfinite(record["train_loss"]):
      r.diverged = {"epoch": epoch + 1,
                    "step": epoch * self.steps + _first_nonfinite(m["step_losses"][:, s]) + 1}
      r.notes.append(f"non-finite training loss at epoch {r.diverged['epoch']}, "
                     f"step {r.diverged['step']}: stopped")
      return False
    monitor = self.cfg.early_stopping.monitor
    return r.stop.update(self.sign * record[monitor], epoch + 1, self.cfg.early_stopping)

  def _end_stage(self, state, best_weights, live) -> dict:
    """Each live seed's variables after the stage: the best epoch's with early stopping
    (unless it diverged), else the last state's."""
    use_best = np.zeros(len(self.seeds), bool)
    for s in live:
      r = self.seeds[s]
      best = r.stop.stage_best_epoch
      use_best[s] = self.cfg.early_stopping.enabled and best is not None and r.diverged is None
      r.best_epoch = best if best is not None else len(r.history)
      if r.diverged is None:
        self.val_known[s] = r.history[r.best_epoch - 1 if use_best[s] else -1]
    params, stats = self.lanes.select(use_best, best_weights, (state.params, state.batch_stats))
    return {"params": params, "batch_stats": stats}

  def _finish(self, variables, stage_start) -> dict:
    """The hooks' combination of the trained weights, then the final validation and test
    metrics of every seed not yet evaluated."""
    for hook in self.hooks:
      combined = hook.after_stages(self, stage_start, variables, self.splits, self.start,
                                   self.live())
      if combined is not variables:  # other weights than any epoch's: validate them again
        variables, self.val_known = combined, {}
    self._test(variables, [s for s, r in enumerate(self.seeds) if r.test is None])
    return variables

  def _test(self, variables, which) -> None:
    """Final validation and test metrics of the seeds in `which`, on the last planned
    stage's inputs (its cached prefix outputs where there are any: no second pass through
    the backbone)."""
    if not which:
      return
    known = all(s in self.val_known for s in which)
    with timing.phase("eval"):
      if not known:
        val, _ = self.lanes.evaluate(self.model, variables, self.splits["val"],
                                     self.data["val_y"], self.start)
      test, pred = self.lanes.evaluate(self.model, variables, self.splits["test"],
                                       self.data["test_y"], self.start)
    for s in which:
      r = self.seeds[s]
      r.val = ({"loss": self.val_known[s]["val_loss"],
                "accuracy": self.val_known[s]["val_accuracy"]} if known
               else {k: float(v[s]) for k, v in val.items()})
      r.test = {k: float(v[s]) for k, v in test.items()}
      r.pred = pred[s]

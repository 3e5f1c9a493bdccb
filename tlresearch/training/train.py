"""`fit`: train one seed of a configuration, or several at once, under a strategy.

The public face of training: the `train` config's check, how seeds are batched
(`seeds_mode`), each seed's named RNG streams (`CellKeys`), and `fit`, which hands the
strategy's stages to the one loop (tlresearch.training.loop) with the hooks of the methods
the strategy declares (tlresearch.training.method_hooks): the converged probe, DELTA's
attention, WiSE-FT, model soups.
"""
from __future__ import annotations

import dataclasses

import jax

from tlresearch.core import schema
from tlresearch.core.errors import choices, UserError
from tlresearch.data.augment import FILL_MODES
from tlresearch.methods import optim, probe
from tlresearch.training import loop, method_hooks
from tlresearch.training.hooks import Hook
from tlresearch.training.ledger import FitResult
from tlresearch.training.method_hooks import solves_probe
from tlresearch.training.stage import stage_spec

__all__ = ["CellKeys", "FitResult", "Hook", "check", "fit", "seeds_mode", "solves_probe",
           "stage_spec"]

SEEDS_MODES = ("auto", "vmap", "loop")
BN_STATS = ("update", "frozen")
MONITORS = ("val_accuracy", "val_loss")
# The keys of a `train` config that decide a run's result (cell and pretrained-backbone
# identities list them); the others (seeds_mode, data_parallel) only decide how it runs.
IDENTITY_FIELDS = ("epochs", "batch_size", "optimizer", "lr", "warmup_epochs", "weight_decay",
                   "momentum", "cache_frozen_prefix", "min_steps", "bn_stats", "augment",
                   "early_stopping")
# Keys added after results existed: part of an identity only away from their default, so a
# result trained before they existed keeps its identity (`configs.pick`).
_DEFAULT = schema.train()
IDENTITY_DEFAULTS = {"compute_dtype": _DEFAULT.compute_dtype, "schedule": _DEFAULT.schedule,
                     "augment.fill_mode": _DEFAULT.augment.fill_mode}
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
      (cfg.schedule in optim.SCHEDULES,
       f"train.schedule must be one of {choices(optim.SCHEDULES)}, got '{cfg.schedule}'"),
      (aug.fill_mode in FILL_MODES,
       f"train.augment.fill_mode must be one of {choices(FILL_MODES)}, got "
       f"'{aug.fill_mode}'"),
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


def fit(model, starts, strategy, datas, cfg, keys, checkpointer=None, on_epoch=None,
        hooks: list[Hook] | None = None) -> list[FitResult]:
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
    hooks: the methods that plug into the loop (`hooks.Hook`); default: those `strategy`
      declares (`method_hooks.hooks_for`).

  Seeds train together (one vmapped program) when `seeds_mode(cfg)` is "vmap", there are
  several, and their splits have equal sizes; otherwise one after another.
  """
  hooks = method_hooks.hooks_for(strategy) if hooks is None else list(hooks)
  for hook in hooks:
    rest = [h for h in hooks if h is not hook]
    out = hook.wrap(lambda *args, rest=rest: fit(*args, hooks=rest), model, starts, strategy,
                    datas, cfg, keys, checkpointer, on_epoch)
    if out is not None:
      return out
  return loop.fit_seeds(model, starts, strategy, datas, cfg, keys, checkpointer, on_epoch, hooks,
                        seeds_mode(cfg))

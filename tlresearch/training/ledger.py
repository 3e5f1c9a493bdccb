"""What `fit` keeps per seed: its early stopping within a stage, its ledger over the whole
fit (history, notes, final metrics), and the `FitResult` it returns.

A ledger round-trips through a checkpoint's JSON meta (`progress` / `from_progress`), so a
resumed fit continues each seed's early stopping exactly where it was.
"""
from __future__ import annotations

import dataclasses

import numpy as np


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
  probe: dict | None = None    # the converged probe's solve (tlresearch.methods.probe), if any
  weight_space: dict | None = None  # WiSE-FT's or a soup's record (training.weight_space)
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


@dataclasses.dataclass
class EarlyStopping:
  """One seed's early stopping within a stage: the best score so far (higher is better:
  the caller signs a loss), the epoch it came in, and the epochs waited since."""
  active: bool = True          # still training in this stage
  best_score: float | None = None
  stage_best_epoch: int | None = None  # None: no epoch scored yet in this stage
  wait: int = 0

  def reset(self) -> None:
    self.active, self.best_score, self.stage_best_epoch, self.wait = True, None, None, 0

  def update(self, score: float, epoch: int, es_cfg) -> bool:
    """Records `epoch`'s score under the `train.early_stopping` config; True if it is the
    stage's best so far (its weights are then kept)."""
    if self.stage_best_epoch is None or score > self.best_score + float(es_cfg.min_delta):
      self.best_score, self.stage_best_epoch, self.wait = score, epoch, 0
      return True
    self.wait += 1
    self.active = not (es_cfg.enabled and self.wait >= int(es_cfg.patience))
    return False


@dataclasses.dataclass
class SeedLedger:
  """One seed's record over the whole fit."""
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
  stop: EarlyStopping = dataclasses.field(default_factory=EarlyStopping)

  def note(self, text: str) -> None:
    if text not in self.notes:
      self.notes.append(text)

  def record(self, record: dict) -> None:
    """Appends one epoch's (or one solve's) record to the history."""
    self.history.append(record)

  def progress(self) -> dict:
    """JSON meta for a checkpoint."""
    return {"history": self.history, "notes": self.notes,
            **dataclasses.asdict(self.stop), "best_epoch": self.best_epoch,
            "cached": self.cached, "diverged": self.diverged, "probe": self.probe}

  @classmethod
  def from_progress(cls, meta: dict) -> "SeedLedger":
    stop = {f.name: meta[f.name] for f in dataclasses.fields(EarlyStopping)}
    rest = {k: v for k, v in meta.items() if k not in stop}
    return cls(**rest, stop=EarlyStopping(**stop))

  def result(self, variables, fit_seconds: float) -> FitResult:
    return FitResult(variables=variables, history=self.history, best_epoch=self.best_epoch,
                     val=self.val, test=self.test, test_predictions=self.pred,
                     cached_prefix=self.cached, notes=self.notes, diverged=self.diverged,
                     fit_seconds=fit_seconds, probe=self.probe,
                     weight_space=self.weight_space)

"""How a method plugs into `fit` without the loop knowing it by name.

The loop (tlresearch.training.loop) runs a strategy's stages and calls, at fixed points,
each hook a method declares; every default does nothing, so a hook overrides only the
points it needs. `run` is the loop's `FitRun`: its `lanes`, `model`, `datas`, stacked
`data`, per-seed `seeds` ledgers, `record_solve` and `stage_splits` are what a hook may use.

The points, in the order the loop reaches them:
- `wrap`: run the whole fit itself (a model soup fits once per ingredient, then averages);
- `solve`: solve a stage in closed form instead of training it (the converged probe);
- `stage_inputs`: add to a stage's step inputs before it trains (DELTA's channel attention);
- `after_stages`: combine weights once the stages are done (WiSE-FT's interpolation), with
  the last trained stage's starting weights when `keeps_stage_start`.
"""
from __future__ import annotations


class Hook:
  """A method's entry points into `fit`."""

  # Keep the last trained stage's starting weights (saved with the fit's progress, so a
  # resumed fit has them) for `after_stages`.
  keeps_stage_start = False

  def wrap(self, fit_once, model, starts, strategy, datas, cfg, keys, checkpointer,
           on_epoch) -> list | None:
    """The fit's `FitResult`s, computed by calling `fit_once` (same arguments, a strategy
    and config of the hook's choosing) as often as the method needs; None: fit as usual."""
    return None

  def solve(self, run, stage, spec, variables: dict, live: list[int]) -> dict | None:
    """The stage's variables solved without the optimizer (recorded through
    `run.record_solve`), or None to train the stage."""
    return None

  def stage_inputs(self, run, stage, spec, variables: dict, inputs: dict) -> dict:
    """The per-seed step inputs the stage trains with."""
    return inputs

  def after_stages(self, run, stage_start: dict | None, variables: dict, splits: dict,
                   start: str, live: list[int]) -> dict:
    """The variables the fit ends with. A hook that changes a seed's weights sets its
    ledger's `test` to None so that it is evaluated again."""
    return variables

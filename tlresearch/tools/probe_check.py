"""An independent check of a results folder's linear-probe rows against scikit-learn.

    python -m tlresearch.tools.probe_check --experiment=finetune_sweep [--results_dir=results]

For every target and seed of the experiment's base `linear_probe` configuration, this fits
scikit-learn's multinomial `LogisticRegression` (its own lbfgs, penalty on the weights only)
on the same frozen, pooled features of the same k-shot subset, with C chosen on the
validation split from its own grid (25 values over 6 decades, ties: the smaller C), and
compares its mean test accuracy with the `linear_probe` row of `runs.csv`. It shares nothing
with tlresearch.methods.probe but the features. One JSON line per target; exit status 1 when any
target differs by more than 1 point.
"""
from __future__ import annotations

import csv
import json
import os
import sys

import numpy as np

USAGE = ("usage: python -m tlresearch.tools.probe_check --experiment=NAME [--results_dir=DIR] "
         "[--config.KEY=VALUE ...]")
C_GRID = tuple(float(c) for c in np.logspace(-3, 3, 25))
TOLERANCE = 0.01


def features(cfg, pretrained) -> dict:
  """{split: (pooled features, labels)} of the cell `cfg`'s data under the frozen backbone."""
  import jax.numpy as jnp
  from tlresearch.experiment import cell as cell_lib
  from tlresearch import data as data_lib
  from tlresearch import models
  from tlresearch.training import programs, train
  from tlresearch.methods import strategies
  ds = data_lib.load_for(cfg)
  model = models.build(cfg.model, ds.num_classes)
  strategy = strategies.get("linear_probe", model.groups)
  keys = train.CellKeys.from_seed(cfg.seed)
  variables = models.merge_pretrained(
      programs.init_variables(model, keys.init, ds.train_x.shape[1:]), pretrained,
      cell_lib.not_loaded(cfg, strategy, model.groups))
  out = {}
  for split in ("train", "val", "test"):
    maps = programs.prefix_outputs(model, variables, jnp.asarray(getattr(ds, f"{split}_x")),
                                   model.groups[-2])
    out[split] = (np.asarray(maps, np.float64).mean(axis=(1, 2)), getattr(ds, f"{split}_y"))
  return out


def sklearn_probe(feats: dict) -> tuple[float, float]:
  """(test accuracy, chosen C) of logistic regression with C chosen on validation."""
  import warnings
  from sklearn.exceptions import ConvergenceWarning
  from sklearn.linear_model import LogisticRegression
  from threadpoolctl import threadpool_limits
  (x, y), (vx, vy), (tx, ty) = feats["train"], feats["val"], feats["test"]
  best = None
  for c in C_GRID:
    # One BLAS thread: these problems are tiny, and threads fighting over the cores made the
    # same fits ~30x slower.
    with warnings.catch_warnings(), threadpool_limits(1):
      warnings.simplefilter("error", ConvergenceWarning)
      try:
        clf = LogisticRegression(C=c, max_iter=2000, tol=1e-6).fit(x, y)
      except ConvergenceWarning:
        continue  # only converged fits compete
    score = clf.score(vx, vy)
    if best is None or score > best[0]:
      best = (score, c, clf)
  _, c, clf = best
  return float(clf.score(tx, ty)), c


def check(config, results_dir: str, name: str) -> list[dict]:
  from tlresearch.experiment import grid
  from tlresearch.training import pretrain
  rows = list(csv.DictReader(open(os.path.join(results_dir, name, "runs.csv"))))
  base = {**grid.base_axes(config), "strategy": "linear_probe"}
  cells = [c for c in grid.expand(config)
           if {k: c.axes[k] for k in base} == base]
  ours = {(r["target"], r["seed"]): float(r["test_accuracy"]) for r in rows
          if all(str(r[k]) == str(v) for k, v in base.items()) and r["status"] == "ok"}
  backbones, by_target = {}, {}
  for c in cells:
    pcfg = pretrain.for_model(c.config.pretrain, c.config.model)
    key = pretrain.cache_key(pcfg)
    if key not in backbones:
      backbones[key] = pretrain.get_or_build(pcfg, c.config.cache_dir or None)[0]
    acc, chosen = sklearn_probe(features(c.config, backbones[key]))
    mine = ours.get((c.config.target, str(c.config.seed)))
    by_target.setdefault(c.config.target, []).append((acc, mine, chosen))
  out = []
  for target, runs in by_target.items():
    sk = float(np.mean([a for a, _, _ in runs]))
    mine = [m for _, m, _ in runs if m is not None]
    ours_mean = float(np.mean(mine)) if len(mine) == len(runs) else float("nan")
    out.append({"target": target, "seeds": len(runs), "tlresearch_test_accuracy": ours_mean,
                "sklearn_test_accuracy": sk, "difference": ours_mean - sk,
                "sklearn_C": [c for _, _, c in runs],
                "within_1_point": bool(abs(ours_mean - sk) <= TOLERANCE)})
  return out


def main(argv: list[str]) -> int:
  from tlresearch.experiment import cli as run
  from tlresearch.core.errors import UserError
  flags, overrides = run.parse_args(argv)
  if "experiment" not in flags or set(flags) - {"experiment", "results_dir"}:
    raise UserError(USAGE)
  config, _ = run.load_config(flags["experiment"], overrides)
  lines = check(config, flags.get("results_dir", "results"), flags["experiment"])
  for line in lines:
    print(json.dumps(line))
  return 0 if all(line["within_1_point"] for line in lines) else 1


if __name__ == "__main__":
  from tlresearch.core.errors import UserError
  try:
    sys.exit(main(sys.argv[1:]))
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)

"""Weight-space methods applied after training: WiSE-FT and model soups (Wortsman et al. 2022).

WiSE-FT interpolates, per seed, between the fine-tuning's starting weights theta_0 (for
`wise_ft`, LP-FT's probe: the pretrained backbone with the converged probe's head) and the
fine-tuned weights theta_1: theta(a) = (1 - a) theta_0 + a theta_1 for a in ALPHAS. Each
seed's a is chosen on its validation split (highest accuracy, ties to the lower validation
loss, then to the larger a); the whole curve, validation and test, is recorded, so a table
can show where on it the chosen point lies.

BatchNorm running statistics are interpolated like the weights (`bn=interpolate`). They are
exact at a = 0 and a = 1; in between they are the interpolation of the two networks'
statistics, not the statistics of the interpolated network. `bn=recompute` recomputes them
for every point on the seed's training split (`recompute_batch_stats`), at the cost of a pass
over it per point; then a = 1 is LP-FT's network with recomputed statistics.
Frozen parameters are equal at both ends, so a cached frozen prefix stays valid along the
whole curve.
"""
from __future__ import annotations

import dataclasses
import functools

from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tlresearch.training import programs
from tlresearch.training.ledger import FitResult

ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))


def interpolate(start, end, alpha: float):
  return jax.tree.map(lambda a, b: (1.0 - alpha) * a + alpha * b, start, end)


def choose(val_accuracy, val_loss) -> int:
  """Index into ALPHAS of the best validation point (accuracy, then loss, then larger a)."""
  keys = [(float(acc), -float(loss), a) for acc, loss, a in zip(val_accuracy, val_loss, ALPHAS)]
  return max(range(len(keys)), key=keys.__getitem__)


def wise_ft(lanes, model, start, end, splits, data, group_start, seeds, bn="interpolate"):
  """The interpolated weights each seed chooses, and per seed the curve record.

  `start`, `end`: stacked variables (lanes' layout); `splits`: the model inputs of val and
  test (images, or a cached prefix's outputs starting at `group_start`); `seeds`: the seed
  indices to record (the others keep `end`); `bn`: "interpolate" the BatchNorm statistics
  like the weights, or "recompute" them for each point on its seed's training split (only
  where the stage ran on images: a cached prefix's outputs depend on its statistics)."""
  recompute = bn == "recompute" and group_start == model.groups[0]

  def point(alpha):
    v = interpolate(start, end, alpha)
    if not recompute:
      return v
    return lanes.stack([recompute_batch_stats(model, tree, x) for tree, x in
                        zip(lanes.unstack(v), lanes.unstack(data["train_x"]))])

  curves = []
  for alpha in ALPHAS:
    v = point(alpha)
    val, _ = lanes.evaluate(model, v, splits["val"], data["val_y"], group_start)
    test, _ = lanes.evaluate(model, v, splits["test"], data["test_y"], group_start)
    curves.append((val, test))
  records, chosen = {}, np.full(lanes.size, -1)
  for s in seeds:
    val_acc = [float(c[0]["accuracy"][s]) for c in curves]
    val_loss = [float(c[0]["loss"][s]) for c in curves]
    i = choose(val_acc, val_loss)
    chosen[s] = i
    records[s] = {"method": "wise_ft", "bn": bn, "alphas": list(ALPHAS), "alpha": ALPHAS[i],
                  "val_accuracy": val_acc, "val_loss": val_loss,
                  "test_accuracy": [float(c[1]["accuracy"][s]) for c in curves]}
  # Each seed's chosen point, assembled one alpha at a time (lanes.select works per seed).
  out = end  # seeds not recorded (diverged) keep theirs
  for i, alpha in enumerate(ALPHAS):
    flags = chosen == i
    if flags.any() and (recompute or i != len(ALPHAS) - 1):
      out = lanes.select(flags, point(alpha), out)
  return out, records


# ---------------------------------------------------------------- model soups

def average(trees):
  """The uniform average of variable trees (same structure)."""
  return jax.tree.map(lambda *a: sum(a[1:], a[0]) / len(a), *trees)


@functools.partial(jax.jit, static_argnums=0)
def _chunk_statistics(model, params, batch_stats, x):
  """Each BatchNorm layer's batch mean and (biased) variance on the chunk x, in training mode.

  Flax updates running statistics as s' = m s + (1 - m) b; applied once from all-zero and
  once from all-one statistics, the two updates give the momentum m (of any family) and the
  batch statistics b = s'_0 / (1 - m) without reaching into the layers."""
  x = programs.preprocess(x, model)
  key = jax.random.key(0)  # dropout is in the head, above every BatchNorm: it changes no statistic

  def update(fill):
    stats = jax.tree.map(lambda a: jnp.full_like(a, fill), batch_stats)
    _, u = model.apply({"params": params, "batch_stats": stats}, x, train=True,
                       mutable=["batch_stats"], rngs={"dropout": key})
    return u["batch_stats"]

  zero, one = update(0.0), update(1.0)
  return jax.tree.map(lambda a, b: a / (1.0 - (b - a)), zero, one)


def recompute_batch_stats(model, variables, x):
  """`variables` with BatchNorm running statistics recomputed for its weights on images x:
  the pooled mean and variance over chunks of at most programs.EVAL_CHUNK images (one chunk,
  i.e. exact population statistics, for a few-shot training split), each chunk normalised
  by its own statistics as in training (SWA's update_bn does the same)."""
  if not variables.get("batch_stats"):
    return variables
  n = len(x)
  bounds = np.linspace(0, n, -(-n // programs.EVAL_CHUNK) + 1).astype(int)
  sums = None  # per statistic: sum over chunks of n_c * mean_c, or n_c * (var_c + mean_c^2)
  for a, b in zip(bounds[:-1], bounds[1:]):
    stats = traverse_util.flatten_dict(
        _chunk_statistics(model, variables["params"], variables["batch_stats"],
                          jnp.asarray(x[a:b])), sep="/")
    w = float(b - a)
    moments = {p: w * (v if p.endswith("/mean") else v + jnp.square(stats[p[:-3] + "mean"]))
               for p, v in stats.items()}
    sums = moments if sums is None else {p: sums[p] + v for p, v in moments.items()}
  out = {p: v / n if p.endswith("/mean") else v / n - jnp.square(sums[p[:-3] + "mean"] / n)
         for p, v in sums.items()}
  return {**variables, "batch_stats": traverse_util.unflatten_dict(out, sep="/")}


def soup(model, starts, strategy, datas, cfg, keys, checkpointer, on_epoch, fit_fn) -> list:
  """Model soups (Wortsman et al. 2022): `strategy`'s stages fine-tuned once per lr
  multiplier by `fit_fn` (train.fit without the soup's hook), then averaged per seed; the
  greedy soup is the result (`FitResult`), the uniform soup and every ingredient are in its
  record.

  Greedy soup: ingredients sorted by validation accuracy (then loss), each added when the
  soup's validation accuracy does not drop. Diverged ingredients are left out."""
  _, multipliers, bn = strategy.weight_space
  base = dataclasses.replace(strategy, weight_space=())
  runs = []
  for i, m in enumerate(multipliers):
    c = ml_collections.ConfigDict(cfg.to_dict())
    c.lr = float(cfg.lr) * m
    ck = None if checkpointer is None else (lambda idx, i=i: checkpointer(idx).part(i))
    oe = None if on_epoch is None else (
        lambda s, r, st, i=i: on_epoch(s, {**r, "ingredient": i}, st))
    runs.append(fit_fn(model, starts, base, datas, c, keys, ck, oe))
  recompute = bn == "recompute" and cfg.bn_stats != "frozen"
  lrs = [float(cfg.lr) * m for m in multipliers]
  return [_soup_one(model, [run[s] for run in runs], datas[s], lrs, recompute, bn)
          for s in range(len(datas))]


def _soup_one(model, results, ds, lrs, recompute, bn):
  notes = list(dict.fromkeys(n for r in results for n in r.notes))
  history = [{**rec, "ingredient": i} for i, r in enumerate(results) for rec in r.history]
  ok = [i for i, r in enumerate(results) if r.diverged is None]
  ingredients = [{"lr": lr, "val_accuracy": r.val["accuracy"], "val_loss": r.val["loss"],
                  "test_accuracy": r.test["accuracy"], "diverged": r.diverged is not None}
                 for lr, r in zip(lrs, results)]
  seconds = sum(r.fit_seconds for r in results)
  if not ok:
    r = results[0]
    return dataclasses.replace(r, history=history, notes=notes + ["every soup ingredient "
                                                                  "diverged"],
                               fit_seconds=seconds)

  def cook(members):
    v = average([results[i].variables for i in members])
    if recompute:
      v = recompute_batch_stats(model, v, ds.train_x)
    val, _ = programs.evaluate(model, v, jnp.asarray(ds.val_x), jnp.asarray(ds.val_y))
    return v, val

  order = sorted(ok, key=lambda i: (-results[i].val["accuracy"], results[i].val["loss"], i))
  members = [order[0]]
  best, best_val = cook(members)
  for i in order[1:]:
    v, val = cook(members + [i])
    if val["accuracy"] >= best_val["accuracy"]:
      members, best, best_val = members + [i], v, val
  uniform, uniform_val = cook(ok)
  test, pred = programs.evaluate(model, best, jnp.asarray(ds.test_x), jnp.asarray(ds.test_y))
  uniform_test, _ = programs.evaluate(model, uniform, jnp.asarray(ds.test_x),
                                      jnp.asarray(ds.test_y))
  record = {"method": "soup", "bn": bn if recompute or bn == "average" else "frozen",
            "ingredients": ingredients,
            "uniform": {"val_accuracy": uniform_val["accuracy"],
                        "test_accuracy": uniform_test["accuracy"]},
            "greedy": {"lrs": [lrs[i] for i in members], "val_accuracy": best_val["accuracy"],
                       "test_accuracy": test["accuracy"]}}
  top = results[order[0]]
  return FitResult(variables=best, history=history, best_epoch=top.best_epoch, val=best_val,
                   test=test, test_predictions=pred, cached_prefix=False, notes=notes,
                   diverged=None, fit_seconds=seconds, weight_space=record,
                   limited=any(results[i].budget_limited for i in members))

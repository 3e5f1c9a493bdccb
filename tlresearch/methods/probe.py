"""The converged linear probe: a head trained alone on cached features, solved to its optimum.

The literature's probe protocol (Kornblith, Shlens, Le 2019, "Do Better ImageNet Models
Transfer Better?"; Kumar et al. 2022 for LP-FT's probe stage) is not a few epochs of SGD: it
is L2-regularised logistic regression solved to convergence, with the L2 strength chosen on
validation. A few dozen SGD steps leave the probe far from that optimum and overstate the gap
to fine-tuning.

`solve` minimises, full batch and deterministically,

    mean cross-entropy(head(features), y) + l2 / 2 * sum of the head's squared kernels

(biases unpenalised, as weight decay leaves them) with L-BFGS and a zoom line search
(`optax.lbfgs`), for every l2 in `L2_GRID` from the strongest to the weakest, each solve
warm-started from the previous solution (the regularisation path). The l2 with the best
validation accuracy wins (ties: the lower validation loss, then the stronger l2). The solver
stops when the gradient norm is below `GTOL`, when `STALL_STEPS` steps in a row no longer
lower the objective
(float32's resolution, reached on the weakly regularised, nearly separable end of the path),
or after `MAX_ITER` iterations; a chosen solve whose gradient norm is not below `GTOL` is
reported, never silent.

It applies (`applies`) to a stage whose only trainable group is the head and whose input is
the cached frozen prefix: `linear_probe`, LP-FT's probe stage, a fully frozen transfer. A
head with dropout, or augmented inputs, is not a deterministic objective: those stages train
with SGD as any other (`train.probe_solver = "sgd"` asks for SGD everywhere).
"""
from __future__ import annotations

import dataclasses

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax

SOLVERS = ("lbfgs", "sgd")
# 15 values over 7 decades, strongest first: 10, 3.2, 1, ..., 1e-6.
L2_GRID = tuple(float(v) for v in 10.0 ** np.arange(1.0, -6.25, -0.5))
MAX_ITER = 500   # per l2 of the path
STALL_STEPS = 10  # consecutive steps without a lower objective that end a solve
# A solve has converged when the L2 norm of its gradient (of the mean loss) is below GTOL:
# stricter than scikit-learn's lbfgs default (largest gradient component below 1e-4). Much
# lower is not reachable in float32 on the weakly regularised, nearly separable end of the path.
GTOL = 1e-4


def applies(train_cfg, dropout_rate: float, start: str, head: str) -> bool:
  """Whether a stage starting at group `start` is solved by `solve` (see the module doc)."""
  return (train_cfg.probe_solver == "lbfgs" and start == head and not float(dropout_rate))


@dataclasses.dataclass(frozen=True)
class Solution:
  """The chosen point of the path, and the whole path (one record per l2)."""
  l2: float
  grad_norm: float
  converged: bool
  iterations: int
  train_loss: float            # cross-entropy alone (no penalty), at the chosen l2
  train_accuracy: float
  val_loss: float
  val_accuracy: float
  path: tuple[dict, ...]

  def record(self) -> dict:
    return dataclasses.asdict(self) | {"path": list(self.path), "solver": "lbfgs"}


def _kernels_sq(params) -> jax.Array:
  flat = traverse_util.flatten_dict(params, sep="/")
  return sum(jnp.sum(jnp.square(v)) for p, v in flat.items() if p.endswith("kernel"))


def _solve_path(static, params0, variables, xtr, ytr, xva, yva, l2s):
  model, head, max_iter, gtol = static

  def logits(p, x):
    v = {**variables, "params": {**variables["params"], head: p}}
    return model.apply(v, x, train=False, start=head)

  def metrics(p, x, y):
    z = logits(p, x)
    return (optax.softmax_cross_entropy_with_integer_labels(z, y).mean(),
            jnp.mean(jnp.argmax(z, -1) == y))

  def solve_one(p, l2):
    def f(q):
      return metrics(q, xtr, ytr)[0] + 0.5 * l2 * _kernels_sq(q)

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(f)

    def step(carry):
      q, state, i, _, best, stalled = carry
      value, grad = value_and_grad(q, state=state)
      updates, state = opt.update(grad, state, q, value=value, grad=grad, value_fn=f)
      q = optax.apply_updates(q, updates)
      after, g = jax.value_and_grad(f)(q)
      stalled = jnp.where(after < best, 0, stalled + 1)
      return q, state, i + 1, optax.tree.norm(g), jnp.minimum(after, best), stalled

    def going(carry):
      _, _, i, gnorm, _, stalled = carry
      # Steps that no longer lower the objective have hit float32's resolution: stop there.
      return (i < max_iter) & (gnorm >= gtol) & (stalled < STALL_STEPS)

    v0, g0 = jax.value_and_grad(f)(p)
    q, _, iters, gnorm, _, _ = jax.lax.while_loop(
        going, step, (p, opt.init(p), 0, optax.tree.norm(g0), v0, 0))
    train_loss, train_acc = metrics(q, xtr, ytr)
    val_loss, val_acc = metrics(q, xva, yva)
    return q, (q, gnorm, iters, train_loss, train_acc, val_loss, val_acc)

  _, out = jax.lax.scan(solve_one, params0, l2s)
  return out


_solve_path_jit = jax.jit(_solve_path, static_argnums=0)


def solve(model, variables: dict, train_x, train_y, val_x, val_y,
          l2_grid=L2_GRID, max_iter: int = MAX_ITER, gtol: float = GTOL) -> tuple[dict,
                                                                                   Solution]:
  """The head of `variables` solved on (train_x, train_y), the cached inputs of the head,
  with its l2 chosen on (val_x, val_y); returns (variables with that head, Solution).
  The path starts from the head in `variables` (the seed's init), so it is deterministic."""
  head = model.groups[-1]
  params0 = variables["params"][head]
  out = _solve_path_jit((model, head, int(max_iter), float(gtol)), params0, variables,
                        jnp.asarray(train_x), jnp.asarray(train_y), jnp.asarray(val_x),
                        jnp.asarray(val_y), jnp.asarray(l2_grid, jnp.float32))
  heads, gnorm, iters, tr_loss, tr_acc, va_loss, va_acc = jax.device_get(out)
  path = tuple({"l2": float(l2), "grad_norm": float(g), "iterations": int(i),
                "train_loss": float(tl), "train_accuracy": float(ta),
                "val_loss": float(vl), "val_accuracy": float(va)}
               for l2, g, i, tl, ta, vl, va in zip(l2_grid, gnorm, iters, tr_loss, tr_acc,
                                                    va_loss, va_acc))
  # Best validation accuracy; ties: lower validation loss, then the stronger l2 (first).
  best = min(range(len(path)), key=lambda k: (-path[k]["val_accuracy"], path[k]["val_loss"], k))
  chosen = path[best]
  solution = Solution(l2=chosen["l2"], grad_norm=chosen["grad_norm"],
                      converged=bool(chosen["grad_norm"] < gtol),
                      iterations=chosen["iterations"], train_loss=chosen["train_loss"],
                      train_accuracy=chosen["train_accuracy"], val_loss=chosen["val_loss"],
                      val_accuracy=chosen["val_accuracy"], path=path)
  head_params = jax.tree.map(lambda a: jnp.asarray(a[best]), heads)
  new = {**variables, "params": {**variables["params"], head: head_params}}
  return new, solution


def note(solution: Solution) -> str | None:
  """The line a reader must see when the chosen solve did not converge."""
  if solution.converged:
    return None
  return (f"converged probe: the solve at the chosen l2 = {solution.l2:g} stopped after "
          f"{solution.iterations} iterations with gradient norm {solution.grad_norm:.2g} "
          f"(> {GTOL:g}): not converged")

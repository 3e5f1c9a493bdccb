"""Loss penalties a strategy stage adds to the task loss: regularised fine-tuning as data.

Each penalty is a tuple `(name, *numbers)` on the stage (`strategies.Stage.penalty`); the
train step adds `value(...)` to the cross-entropy. What the penalties pull toward:

- `l2_sp` (Li et al. 2018), `(alpha, beta)`: alpha/2 ||w - w0||^2 over the transferred
  backbone's kernels, w0 the stage's starting (pretrained) weights, plus beta/2 ||w||^2 over
  the new head's kernels (nothing pretrained to pull toward). It replaces weight decay,
  which would pull the backbone toward zero, away from what pretraining learned.
- `delta` (Li et al. 2019, DELTA), `(alpha, beta)`: alpha/2 x the squared distance between
  the network's feature maps and the frozen starting network's, on the same (augmented)
  batch, at the output of every backbone group the step runs, per example (summed over
  positions and channels, averaged over the batch); plus beta/2 ||w_head||^2. It constrains
  behaviour (what the layers output) rather than weights, and replaces weight decay. Every
  channel weighs 1 (the paper's "DELTA w/o attention"), or with `attention` its weight from
  tlresearch.training.attention (summing to 1 over a group's channels).
- `bss` (Chen et al. 2019, batch spectral shrinkage), `(eta, k)`: eta x the sum of the k
  smallest squared singular values of the batch's penultimate features (the backbone's
  pooled output), which the paper finds carry the untransferable, noisy directions. It is
  added to the usual weight decay.
- `lwf` (Li & Hoiem 2017, learning without forgetting), `(lam, temperature)`: lam x
  KL(p || q) between the temperature-softened source-task predictions of the frozen starting
  network (p) and of the current network (q) on the target images, both read out by the
  pretrained source head; added to weight decay. The source head stays at its pretrained
  values (the paper trains it too, after a warm-up; here it is a fixed readout, so the term
  measures only how far the features drift from what the source task needs). KL rather
  than the paper's cross-entropy: the gradient is the same, and the value is 0 where the
  network still predicts the source task as it did.

Biases and BatchNorm scales and shifts are never penalised, as they are exempt from weight
decay (`optim.decay_mask`).

The frozen starting network of `delta` and `lwf` runs its BatchNorm in the trained
network's mode (batch statistics, not its running ones; programs._teacher_features), so
both penalties are 0 at the start and charge only what the weight changes did. The
Transfer-Learning-Library evaluates it in inference mode instead; on a target whose
statistics differ from the source's, that also charges the gap between batch and running
statistics, which no weight change can close (docs/strategies.md has the measurement).

The anchor (reference weights, the frozen starting network, the source head) is a
non-trainable input of the train step, not a constant baked into the compiled program, so
one compiled step serves every seed; it is saved with a stage's checkpoints.
"""
from __future__ import annotations

from flax import traverse_util
import jax
import jax.numpy as jnp

from tlresearch.methods.strategies import FROZEN
from tlresearch.models.heads import pool

PENALTIES = ("l2_sp", "delta", "bss", "lwf")
# Penalties that compare the network with its frozen starting point on each batch.
_TEACHER = ("delta", "lwf")
SOURCE_HEAD = "source_head"  # the extra variables collection `lwf` reads (cell.py adds it)


def needs_teacher(pen: tuple) -> bool:
  return bool(pen) and pen[0] in _TEACHER


def needs_source_head(pen: tuple) -> bool:
  return bool(pen) and pen[0] == "lwf"


def needs_attention(pen: tuple) -> bool:
  """DELTA with channel attention: its anchor needs per-channel weights (tlresearch.training.attention)."""
  return bool(pen) and pen[0] == "delta" and "attention" in pen[3:]


def captured_groups(pen: tuple, groups, start: str) -> tuple[str, ...]:
  """The groups whose outputs the penalty reads (from the network being trained and, for
  `needs_teacher`, from the frozen starting one). A group below `start` (a cached frozen
  prefix) is not run in training, and its output equals the starting network's anyway."""
  if not pen or pen[0] == "l2_sp":
    return ()
  body = tuple(groups[groups.index(start):-1])
  if pen[0] == "delta":
    return body
  return body[-1:]  # bss, lwf: the backbone's last output, the penultimate features


def anchor(stage, variables: dict, rule_by_path: dict) -> dict:
  """The stage's reference values for its penalty, taken from its starting `variables`;
  {} when the stage has none, so nothing extra enters the step."""
  pen = stage.penalty
  if not pen or pen[0] == "bss":
    return {}
  if pen[0] == "l2_sp":
    flat = traverse_util.flatten_dict(variables["params"], sep="/")
    return {p: v for p, v in flat.items() if rule_by_path[p] != FROZEN and p.endswith("kernel")}
  out = {"teacher": {"params": variables["params"],
                     "batch_stats": variables.get("batch_stats", {})}}
  if needs_source_head(pen):
    if SOURCE_HEAD not in variables:
      raise ValueError("the lwf penalty needs the pretrained source head (variables "
                       f"'{SOURCE_HEAD}')")
    out[SOURCE_HEAD] = variables[SOURCE_HEAD]
  return out


def penultimate(feature_map, pooling: str = "avg"):
  """The pooled backbone output a linear head reads (a flat input passes unchanged)."""
  return pool(feature_map, pooling) if feature_map.ndim == 4 else feature_map


def _head_l2(trainable: dict, head: str, beta: float):
  return sum(0.5 * beta * jnp.sum(jnp.square(w)) for p, w in trainable.items()
             if p.split("/")[0] == head and p.endswith("kernel"))


def smallest_singular_values_sq(features, k: int):
  """The k smallest squared singular values of a [batch, dim] feature matrix (of its
  min(batch, dim) ones), from the smaller Gram matrix's eigenvalues."""
  f = features.astype(jnp.float32)
  gram = f.T @ f if f.shape[1] <= f.shape[0] else f @ f.T
  eig = jnp.linalg.eigvalsh(gram)  # ascending
  return jnp.maximum(eig[:k], 0.0)


def _source_logits(head_params: dict, features):
  return features @ head_params["kernel"] + head_params["bias"]


def value(pen: tuple, trainable: dict, anchor_values: dict, head: str, features=None,
          teacher_features=None, pooling: str = "avg"):
  """The penalty of `trainable` (flat path -> array) given the stage's anchor, and for the
  feature penalties the captured group outputs of the network (`features`, group -> array)
  and of its frozen starting point (`teacher_features`)."""
  if not pen:
    return 0.0
  name = pen[0]
  if name not in PENALTIES:
    raise ValueError(f"unknown penalty {name!r}")
  if name == "l2_sp":
    _, alpha, beta = pen
    total = 0.0
    for p, w0 in anchor_values.items():
      w = trainable[p]
      if p.split("/")[0] == head:
        total += 0.5 * beta * jnp.sum(jnp.square(w))
      else:
        total += 0.5 * alpha * jnp.sum(jnp.square(w - w0))
    return total
  if name == "delta":
    alpha, beta = pen[1], pen[2]
    if needs_attention(pen) and "attention" not in anchor_values:
      raise ValueError("delta with attention needs its channel weights in the anchor "
                       "(tlresearch.training.attention; train.fit computes them)")
    weights = anchor_values.get("attention", {})  # {group: [C]}; none: every channel 1

    def distance(g):
      sq = jnp.square(features[g] - teacher_features[g])
      if g in weights:
        sq = sq * weights[g]  # over the channel (last) axis
      return jnp.mean(jnp.sum(sq, axis=tuple(range(1, sq.ndim))))

    return 0.5 * alpha * sum(distance(g) for g in features) + _head_l2(trainable, head, beta)
  (g,) = features
  if name == "bss":
    _, eta, k = pen
    return eta * jnp.sum(smallest_singular_values_sq(penultimate(features[g], pooling), int(k)))
  _, lam, temperature = pen  # lwf
  source = anchor_values[SOURCE_HEAD]
  # The source head was pretrained on average-pooled features (the default head).
  q = _source_logits(source, penultimate(features[g])) / temperature
  p = jax.nn.softmax(_source_logits(source, penultimate(teacher_features[g])) / temperature)
  kl = jnp.sum(p * (jnp.log(jnp.maximum(p, 1e-30)) - jax.nn.log_softmax(q)), axis=-1)
  return lam * jnp.mean(kl)

"""DELTA's channel attention (Li et al. 2019): how much each channel of the pretrained
network's feature maps matters to the target task, as weights for the feature-map penalty.

For each group output the penalty reads, channel j's weight comes from the loss increase
when that channel is zeroed: with the pretrained backbone frozen and a head fitted on the
target (here the converged linear probe, tlresearch.methods.probe, on the training split with its L2
chosen on validation), d_j = L(channel j zeroed) - L on the training split; the d_j of a
group are standardised and turned into weights softmax(z / 5), which sum to 1 over its
channels (the paper's temperature; the Transfer-Learning-Library's choices). A channel the
target relies on is then held near its pretrained values; one it ignores may move freely.

The weights are computed once per stage, from the stage's starting network, and travel
with the penalty's anchor (saved in checkpoints).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tlresearch.methods import probe
from tlresearch.training import programs

TEMPERATURE = 5.0


@functools.partial(jax.jit, static_argnums=(0, 1))
def _zeroed_losses(model, start: str, variables, h, y):
  """Loss of the network from group `start` on input h ([n, H, W, C]) with each channel of
  h zeroed in turn, and with none: ([C], scalar), inference mode."""
  def loss(x):
    logits = model.apply(variables, x, train=False, start=start).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  channels = h.shape[-1]
  masks = 1.0 - jnp.eye(channels, dtype=h.dtype)
  return jax.lax.map(lambda m: loss(h * m), masks), loss(h)


def channel_weights(losses, base) -> np.ndarray:
  """softmax(standardised loss increases / TEMPERATURE) over one group's channels."""
  d = np.asarray(losses, np.float64) - float(base)
  sd = d.std()
  z = (d - d.mean()) / sd if sd > 0 else np.zeros_like(d)
  e = np.exp((z - z.max()) / TEMPERATURE)
  return (e / e.sum()).astype(np.float32)


def delta_attention(model, variables, groups, data) -> dict:
  """{group: [C] weights} for the outputs of `groups` (backbone groups, in order), from
  `variables` (one seed's starting network) and its `data` (train/val splits)."""
  last = model.groups[-2]
  feats = {s: programs.prefix_outputs(model, variables, jnp.asarray(getattr(data, f"{s}_x")),
                    last) for s in ("train", "val")}
  fitted, _ = probe.solve(model, variables, feats["train"], data.train_y, feats["val"],
              data.val_y)
  y = jnp.asarray(data.train_y)
  out = {}
  for g in groups:
    h = programs.prefix_outputs(model, fitted, jnp.asarray(data.train_x), g)
    nxt = model.groups[model.groups.index(g) + 1]
    losses, base = _zeroed_losses(model, nxt, fitted, h, y)
    out[g] = jnp.asarray(channel_weights(jax.device_get(losses), jax.device_get(base)))
  return out

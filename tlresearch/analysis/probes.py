"""Measurements of a fine-tuned model beyond its test accuracy, asked for by `cfg.probes`.

- `ood_corrupted`: accuracy on a corrupted copy of the target's test split (one of the
  glyph builder's input corruptions per image: noise, blur, low contrast, pixelation,
  salt-and-pepper; a fixed draw, so every cell sees the same images). The out-of-distribution
  test of Kumar et al. (2022).
- `feature_change`: how far fine-tuning moved the penultimate features (the pooled output of
  the last backbone group) on the test images: mean over images of
  ||f_after(x) - f_before(x)|| / ||f_before(x)||, where `before` is the network as fine-tuning
  found it (the pretrained backbone). A linear probe scores exactly 0.
- `transferability`: the transferability estimators (tlresearch.analysis.transferability) of the
  starting backbone on the target's training split, before any training: LogME and H-score
  from its penultimate features; LEEP and NCE from the pretrained source head's predictions
  when the backbone has one (the project's source pretraining; not random init or Keras
  weights). Fields `transferability_<name>`.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from tlresearch.analysis import transferability
from tlresearch.core.errors import choices, UserError
from tlresearch.data import corruptions
from tlresearch.training import programs

PROBES = ("ood_corrupted", "feature_change", "transferability")
CORRUPTION_SEED = 0  # one fixed corrupted test set per target


def corrupted(x: np.ndarray, seed: int = CORRUPTION_SEED) -> np.ndarray:
  """A corrupted copy of uint8 images [N, H, W, 3]; same input and seed, same bytes."""
  images = np.asarray(x, np.float32) / 255.0
  out = corruptions.corrupt_images(images, np.random.default_rng(seed))
  return np.round(np.clip(out, 0, 1) * 255).astype(np.uint8)


def penultimate(model, variables, x) -> jnp.ndarray:
  """Pooled features entering the head (inference mode), [N, D]."""
  maps = programs.prefix_outputs(model, variables, jnp.asarray(x), model.groups[-2])
  return jnp.mean(maps, axis=(1, 2))


def feature_change(model, before, after, x) -> float:
  f0, f1 = penultimate(model, before, x), penultimate(model, after, x)
  rel = jnp.linalg.norm(f1 - f0, axis=-1) / jnp.maximum(jnp.linalg.norm(f0, axis=-1), 1e-12)
  return float(jnp.mean(rel))


def check(names) -> None:
  bad = [n for n in names if n not in PROBES]
  if bad:
    raise UserError(f"unknown probe(s) {', '.join(map(str, bad))}; valid: {choices(PROBES)}")


def transferability_scores(model, variables, ds, source_head=None) -> dict:
  """{`transferability_<estimator>`: score} of the backbone in `variables` on ds's training
  split; `source_head` ({'kernel', 'bias'} on the pooled features) adds LEEP and NCE."""
  features = np.asarray(penultimate(model, variables, ds.train_x), np.float64)
  probs = None
  if source_head is not None:
    logits = features @ np.asarray(source_head["kernel"], np.float64) + np.asarray(
        source_head["bias"], np.float64)
    logits -= logits.max(-1, keepdims=True)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  scores = transferability.score_all(features, np.asarray(ds.train_y), probs)
  return {f"transferability_{k}": float(v) for k, v in scores.items()}


def measure(names, model, before, after, ds, source_head=None) -> dict:
  """{metric: value} for the probes in `names` (see the module docstring); `source_head`:
  the pretrained source classifier of `before`'s backbone, if it has one."""
  check(names)
  out = {}
  if "ood_corrupted" in names:
    metrics, _ = programs.evaluate(model, after, jnp.asarray(corrupted(ds.test_x)),
                                jnp.asarray(ds.test_y))
    out["ood_test_accuracy"] = metrics["accuracy"]
  if "feature_change" in names:
    out["feature_change"] = feature_change(model, before, after, ds.test_x)
  if "transferability" in names:
    out.update(transferability_scores(model, before, ds, source_head))
  return out

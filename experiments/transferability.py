"""Which pretrained backbone should I start from? Transferability estimators against the
accuracy transfer actually reaches (You et al. 2021, LogME; Nguyen et al. 2020, LEEP; Tran et
al. 2019, NCE; Bao et al. 2019, H-score).

Source backbones (each pretrained once and cached, like the default one): the glyph source
with all its classes; each half of its classes (`A`, `B`); the same source trained 2 epochs
instead of 12; the same with augmentation; a narrower network (width 8); and random init. On
each target every backbone is scored by each estimator from its outputs on the target's
training split, before any training (the `transferability` probe, tlresearch.analysis.probes), and is
transferred twice: a converged linear probe and full fine-tuning with the lr selected on
validation (random init: `random_features:n=4`, a probe on frozen random features, and
`scratch`). LEEP and NCE need the source head's predictions, which random init does not have.

The score of a backbone on a target is its mean over the 5 paired seeds (each seed draws its
own 20-per-class training subset); so is its accuracy. Rank agreement across the backbones,
per target: Kendall's tau (and the weighted tau the LogME paper reports), with a percentile
bootstrap interval over backbones (tlresearch.analysis.transferability.bootstrap_tau), wide with 7
backbones.
"""
from __future__ import annotations

import math
import os

import ml_collections
import numpy as np

from tlresearch.analysis import findings, transferability as tr
from tlresearch.core import io, schema

TARGETS = ("glyphs_input_shift", "digits")
# label -> (the grid axes that make the backbone, its probe row, its fine-tuned row)
SOURCE_AXES = ("pretrain.class_subset", "pretrain.train.epochs", "pretrain.train.augment.enabled",
               "model.width")
PRETRAINED = ("linear_probe", "full")
RANDOM = ("random_features:n=4", "scratch")
BACKBONES = {
    "glyphs, all classes": ({}, PRETRAINED),
    "glyphs, class half A": ({"pretrain.class_subset": "A"}, PRETRAINED),
    "glyphs, class half B": ({"pretrain.class_subset": "B"}, PRETRAINED),
    "glyphs, 2 epochs": ({"pretrain.train.epochs": 2}, PRETRAINED),
    "glyphs, augmented": ({"pretrain.train.augment.enabled": True}, PRETRAINED),
    "narrower (width 8)": ({"model.width": 8}, PRETRAINED),
    "random init": ({}, RANDOM),
}
ESTIMATORS = {"logme": "LogME", "leep": "LEEP", "nce": "NCE", "h_score": "H-score"}


def get_config() -> ml_collections.ConfigDict:
  c = schema.sweep(targets=list(TARGETS), k_shot=20, probes=["transferability"])
  c.grid = [{"strategy": list(rows), **{k: [v] for k, v in axes.items()}}
            for axes, rows in BACKBONES.values()]
  c.report.reference = "full"
  c.report.axis_labels = [("pretrain.class_subset", "source classes"),
                          ("pretrain.train.epochs", "source epochs"),
                          ("pretrain.train.augment.enabled", "source augmentation"),
                          ("model.width", "width")]
  c.report.metrics = ["test_accuracy"] + [f"transferability_{e}" for e in ESTIMATORS]
  return c


def _is(f: dict, label: str, row: int, target: str) -> bool:
  """Whether final `f` is backbone `label`'s probe (row 0) or fine-tuned (1) cell on
  `target`. Every cell's axes hold every source axis (at the base value where its block does
  not set it), so a backbone is its own settings plus none of the other backbones'."""
  axes, rows = BACKBONES[label]
  if f["axes"].get("strategy") != rows[row] or f["axes"].get("target") != target:
    return False
  for k in SOURCE_AXES:
    others = {a[k] for name, (a, _) in BACKBONES.items() if name != label and k in a}
    if (f["axes"].get(k) != axes[k]) if k in axes else (f["axes"].get(k) in others):
      return False
  return True


def _mean(r: findings.Results, label: str, row: int, target: str, metric: str) -> float:
  values = [f[metric] for f in r.finals
            if _is(f, label, row, target) and f.get(metric) is not None]
  return float(np.mean(values)) if values else math.nan


def ranking(r: findings.Results, target: str, estimator: str, row: int = 1):
  """(labels, mean scores, mean accuracies) of the backbones that have both; `row` 0: the
  probe's accuracy, 1: the fine-tuned one's."""
  out = []
  for label in BACKBONES:
    score = _mean(r, label, 0, target, f"transferability_{estimator}")
    acc = _mean(r, label, row, target, "test_accuracy")
    if math.isfinite(score) and math.isfinite(acc):
      out.append((label, score, acc))
  return [o[0] for o in out], np.array([o[1] for o in out]), np.array([o[2] for o in out])


def agreement(r, target, estimator, row=1) -> dict:
  labels, scores, accs = ranking(r, target, estimator, row)
  if len(labels) < 3:
    return {"n": len(labels), "tau": math.nan, "weighted": math.nan, "lo": math.nan,
            "hi": math.nan}
  lo, hi = tr.bootstrap_tau(scores, accs, "kendall", seed=0)
  return {"n": len(labels), "tau": tr.kendall_tau(scores, accs),
          "weighted": tr.weighted_tau(scores, accs), "lo": lo, "hi": hi}


def _claim(estimator: str):
  def check(r: findings.Results) -> findings.Verdict:
    statuses, evidence = [], []
    for t in TARGETS:
      a = agreement(r, t, estimator)
      if a["n"] < 3 or not math.isfinite(a["tau"]):
        statuses.append(findings.INCONCLUSIVE)
        evidence.append(f"{t}: fewer than 3 backbones with a score and an accuracy")
        continue
      status = (findings.REPRODUCED if a["lo"] > 0 else
                findings.PARTLY if a["tau"] > 0 else findings.NOT)
      statuses.append(status)
      evidence.append(f"{t}: Kendall's tau {a['tau']:+.2f}, 95% bootstrap interval over "
                      f"backbones [{a['lo']:+.2f}, {a['hi']:+.2f}], weighted tau "
                      f"{a['weighted']:+.2f} ({a['n']} backbones)")
    return findings.Verdict(findings.aggregate(statuses), tuple(evidence))
  return check


def _table(r: findings.Results, out_dir: str) -> str:
  """ranking.md: every backbone's mean scores and accuracies per target, and the taus."""
  lines = ["# transferability: backbones, their scores and their transfer accuracy", "",
           "Means over the paired seeds; scores from the backbone before any training; "
           "accuracies on the test split. tau: Kendall's tau of a score against the fine-tuned "
           "(FT) or probe (LP) accuracy across the backbones, with its 95% percentile bootstrap "
           "interval over backbones.", ""]
  for t in TARGETS:
    lines += [f"## {t}", "",
              "| backbone | LP accuracy (%) | FT accuracy (%) | "
              + " | ".join(ESTIMATORS.values()) + " |",
              "|---|---|---|" + "---|" * len(ESTIMATORS)]
    for label in BACKBONES:
      lp = _mean(r, label, 0, t, "test_accuracy")
      ft = _mean(r, label, 1, t, "test_accuracy")
      scores = [_mean(r, label, 0, t, f"transferability_{e}") for e in ESTIMATORS]
      cells = [f"{100 * lp:.1f}", f"{100 * ft:.1f}"] + [
          f"{s:.4g}" if math.isfinite(s) else "-" for s in scores]
      lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "| estimator | tau vs FT [95% CI] | weighted tau vs FT | tau vs LP [95% CI] |",
              "|---|---|---|---|"]
    for e, name in ESTIMATORS.items():
      ft, lp = agreement(r, t, e, 1), agreement(r, t, e, 0)
      fmt = lambda a: (f"{a['tau']:+.2f} [{a['lo']:+.2f}, {a['hi']:+.2f}]"  # noqa: E731
                       if math.isfinite(a["tau"]) else "-")
      w = f"{ft['weighted']:+.2f}" if math.isfinite(ft["weighted"]) else "-"
      lines.append(f"| {name} | {fmt(ft)} | {w} | {fmt(lp)} |")
    lines.append("")
  path = os.path.join(out_dir, "ranking.md")
  io.write_text(path, "\n".join(lines))
  return path


def _scatter(r: findings.Results, out_dir: str) -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(len(TARGETS), len(ESTIMATORS), figsize=(12, 5.5), squeeze=False)
  for i, t in enumerate(TARGETS):
    for j, (e, name) in enumerate(ESTIMATORS.items()):
      ax = axes[i][j]
      labels, scores, accs = ranking(r, t, e)
      ax.scatter(scores, 100 * accs, s=18)
      for label, x, y in zip(labels, scores, accs):
        ax.annotate(label, (x, 100 * y), fontsize=5)
      ax.set_title(f"{name} ({t})", fontsize=8)
      ax.tick_params(labelsize=6)
      if j == 0:
        ax.set_ylabel("fine-tuned test accuracy (%)", fontsize=7)
  fig.tight_layout()
  path = os.path.join(out_dir, "scores_vs_accuracy.png")
  io.save_figure(fig, path)
  return path


_READING = (
    "the LogME paper ranks 10 or more ImageNet models whose transfer accuracies differ; here "
    "7 backbones give wide bootstrap intervals (ranking.md), and on digits most backbones "
    "fine-tune to within seed noise of each other, so their fine-tuned order cannot be "
    "measured. ranking.md also has the taus against the probe's accuracies, which spread "
    "more.")


FINDINGS = findings.Findings(
    paper="You, Liu, Wang, Long. LogME: Practical Assessment of Pre-trained Models for Transfer "
          "Learning. ICML 2021. / Nguyen, Hassner, Seeger, Archambeau. LEEP. ICML 2020. / Tran, "
          "Nguyen, Hassner. Transferability and Hardness of Supervised Classification Tasks "
          "(NCE). ICCV 2019. / Bao et al. An Information-Theoretic Approach to Transferability "
          "in Task Transfer Learning (H-score). ICIP 2019.",
    setup="7 ResNet-8 backbones (glyph source variants and random init); targets "
          "glyphs_input_shift and digits, 20 examples per class; the LogME paper ranks 10+ "
          "ImageNet models, here there are 7 small ones, so a tau's bootstrap interval is "
          "wide.",
    method="A backbone's score and accuracy on a target are means over the 5 paired seeds "
           "(scores from the starting backbone on each seed's training subset; test-split "
           "accuracy). Kendall's tau (tau-b) across the backbones, its 95% percentile "
           "bootstrap interval over backbones (2,000 resamples, seed 0; resamples whose "
           "scores or accuracies are all tied are skipped) and the weighted tau the LogME "
           "paper reports: `tlresearch/analysis/transferability.py`. A claim is reproduced when the "
           "interval lies above 0 on both targets, partly when tau > 0 on at least one, not "
           "reproduced otherwise. `ranking.md` has every backbone's numbers and the taus "
           "against the probe's accuracy too.",
    claims=tuple(findings.Claim(f"{name} ranks the source backbones by their fine-tuned "
                                "accuracy (Kendall's tau > 0).", _claim(e), reading=_READING)
                 for e, name in ESTIMATORS.items()),
    plots=(_table, _scatter),
)

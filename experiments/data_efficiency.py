"""Data efficiency: linear probe vs partial vs full fine-tuning vs scratch across k shots.

Target `glyphs_new_classes` (12 Greek letters the source never saw; 100 training images per
class), k in {1, 5, 10, 25, 100} examples per class drawn by the seed (a smaller k is a
subset of a larger one under the same seed). A k-shot training set of one batch gets one
step per epoch, so the budget is raised to at least `train.min_steps` = 60 optimizer steps
(tlresearch.methods.optim.epoch_budget). lr selected per strategy and k on the validation split
(which keeps its 25 images per class at every k: a real few-shot task would not have them;
this measures the strategies at their best lr, not a deployable few-shot protocol).
"""
import ml_collections

from tlresearch.analysis import findings, report
from tlresearch.core import schema

KS = (1, 5, 10, 25, 100)
STRATEGIES = ("linear_probe", "partial:k=1", "full", "scratch")
TARGET = "glyphs_new_classes"


def get_config() -> ml_collections.ConfigDict:
  c = schema.sweep(targets=[TARGET])
  c.target = TARGET
  c.train.min_steps = 60
  c.grid = [{"strategy": list(STRATEGIES), "k_shot": list(KS)}]
  c.report.reference = "full"
  c.report.axis_labels = []
  return c


def _w(strategy, k):
  return {"strategy": strategy, "k_shot": k}


def _plot(r: findings.Results, out_dir: str) -> str:
  series = [(s, [(k, _w(s, k)) for k in KS]) for s in STRATEGIES]
  return report.line_plot(r.finals, series, f"{out_dir}/accuracy_vs_k.png",
                          f"data efficiency on {TARGET}: test accuracy vs examples per class",
                          xlabel="k: training examples per class (log scale)", log_x=True)


def _gap_shrinks(r):
  small, large = KS[0], KS[-1]
  gap = lambda k: findings.difference(r.values(_w("full", k)), r.values(_w("scratch", k)))
  return findings.better_values(gap(small), gap(large), f"(full - scratch) at k={small}",
                                f"(full - scratch) at k={large}")


FINDINGS = findings.Findings(
    paper="The few-shot transfer literature, e.g. Kornblith, Shlens, Le. Do Better ImageNet "
          "Models Transfer Better? CVPR 2019; Kolesnikov et al. Big Transfer (BiT). ECCV 2020.",
    setup="ResNet-8 pretrained on 36 rendered glyph classes; target: 12 unseen Greek letters; "
          "k in 1, 5, 10, 25, 100 per class; at least 60 optimizer steps; lr selected per "
          "strategy and k on the validation split.",
    claims=(
        findings.Claim(
            "Pretraining helps most when labelled data is scarce: the gain of fine-tuning over "
            "training from scratch is larger at k=1 than at k=100.",
            _gap_shrinks),
        findings.Claim(
            "Every pretrained strategy beats training from scratch at every k.",
            lambda r: findings.combine(findings.better(r, _w(s, k), _w("scratch", k),
                                                       f"{s} k={k}", "scratch")
                                       for s in STRATEGIES[:-1] for k in KS)),
        findings.Claim(
            "A linear probe is competitive with full fine-tuning with very few examples "
            "(within 1 point at k=1), while full fine-tuning wins with many (k=100).",
            lambda r: findings.combine([
                findings.not_worse(r, _w("linear_probe", 1), _w("full", 1), "probe k=1",
                                   "full k=1", 0.01),
                findings.better(r, _w("full", 100), _w("linear_probe", 100), "full k=100",
                                "probe k=100")])),
    ),
    plots=(_plot,),
)

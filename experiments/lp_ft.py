"""Kumar et al. (2022): LP-FT vs fine-tuning vs linear probing, in and out of distribution.

Strategies: `linear_probe`, `full` and `lp_ft` (a probe for half the budget, then full
fine-tuning for the whole budget starting from the probe's head). In-distribution (ID) is the
target's test split; out-of-distribution (OOD) is a corrupted copy of it (noise, blur, low
contrast, pixelation, salt-and-pepper; `probes = ["ood_corrupted"]`), never seen in training
or selection. `feature_change` measures how far the penultimate features moved from the
pretrained ones on the test images (mean relative L2 change; 0 for the probe).
Targets: `glyphs_feature_shift` (the source classes in held-out fonts) and `digits` (real
handwritten digits). Protocol: lr and weight decay selected per strategy and target on the
(ID) validation split, as in the paper; 5 paired seeds.
"""
import ml_collections

from tlresearch.analysis import findings, report
from tlresearch.core import schema

TARGETS = ("glyphs_feature_shift", "digits")
STRATEGIES = ("linear_probe", "full", "lp_ft:probe=0.5")


def get_config() -> ml_collections.ConfigDict:
  c = schema.sweep(targets=list(TARGETS), k_shot=20,
                    probes=["ood_corrupted", "feature_change"])
  c.selection.weight_decay = [0.0, 5e-4]
  c.grid = [{"strategy": list(STRATEGIES)}]
  c.report.reference = "full"
  c.report.axis_labels = []
  c.report.metrics = ["test_accuracy", "ood_test_accuracy", "feature_change"]
  return c


def _w(strategy, target):
  return {"strategy": strategy, "target": target}


def _plot(r: findings.Results, out_dir: str) -> str:
  series = [(f"{kind} ({t})", [(i, _w(s, t)) for i, s in enumerate(STRATEGIES)], metric)
            for t in TARGETS
            for kind, metric in (("ID", "test_accuracy"), ("OOD", "ood_test_accuracy"))]
  return report.line_plot(r.finals, series, f"{out_dir}/id_vs_ood.png",
                          "LP vs FT vs LP-FT: in-distribution and corrupted (OOD) test accuracy",
                          xlabel="strategy", xticklabels=list(STRATEGIES))


def _each_target(fn):
  return lambda r: findings.combine(fn(r, t) for t in TARGETS)


FINDINGS = findings.Findings(
    paper="Kumar, Raghunathan, Jones, Ma, Liang. Fine-Tuning can Distort Pretrained Features "
          "and Underperform Out-of-Distribution. ICLR 2022.",
    setup="ResNet-8 pretrained on rendered glyphs; targets glyphs_feature_shift and digits with "
          "20 examples per class; OOD = a fixed corrupted copy of each target's test split; "
          "lr and weight decay selected per strategy and target on the ID validation split.",
    claims=(
        findings.Claim(
            "Fine-tuning can underperform linear probing out of distribution.",
            _each_target(lambda r, t: findings.better(
                r, _w("linear_probe", t), _w("full", t), f"LP OOD ({t})", "FT OOD",
                "ood_test_accuracy"))),
        findings.Claim(
            "LP-FT beats fine-tuning out of distribution.",
            _each_target(lambda r, t: findings.better(
                r, _w("lp_ft:probe=0.5", t), _w("full", t), f"LP-FT OOD ({t})", "FT OOD",
                "ood_test_accuracy"))),
        findings.Claim(
            "LP-FT is at least as good as fine-tuning in distribution (within 1 point).",
            _each_target(lambda r, t: findings.not_worse(
                r, _w("lp_ft:probe=0.5", t), _w("full", t), f"LP-FT ID ({t})", "FT ID", 0.01))),
        findings.Claim(
            "Fine-tuning from a random head distorts the pretrained features more than LP-FT.",
            _each_target(lambda r, t: findings.better(
                r, _w("full", t), _w("lp_ft:probe=0.5", t), f"FT feature change ({t})",
                "LP-FT", "feature_change"))),
    ),
    plots=(_plot,),
)

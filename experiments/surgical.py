"""Lee et al. (2023): surgical fine-tuning, one group at a time, by kind of distribution shift.

Every network starts from the source network *including its head* (`pretrained_head`): the
three targets keep the source's 36 classes, so, as in the paper, tuning a single group is a
complete method. Strategies: `surgical:group=G` for each backbone group G (only G learns),
`linear_probe` (only the head learns: surgical tuning of the last layer) and `full`.
Targets, one per kind of shift:
- input level, `glyphs_input_shift` (noise, blur, contrast, pixelation corruptions);
- feature level, `glyphs_feature_shift` (13 held-out fonts);
- output level, `glyphs_output_shift` (the source images with permuted labels).
Protocol: as in the paper, the learning rate is selected per method and target on the
validation split (tlresearch.experiment.selection); 5 paired seeds report on test. The table's paired
section is relative to full fine-tuning.
"""
import ml_collections

from tlresearch.analysis import findings, report
from tlresearch.core import schema

GROUPS = ("stem", "stage1", "stage2", "stage3")
TARGETS = {"input": "glyphs_input_shift", "feature": "glyphs_feature_shift",
           "output": "glyphs_output_shift"}


def get_config() -> ml_collections.ConfigDict:
  c = schema.sweep(targets=list(TARGETS.values()), k_shot=20, pretrained_head=True)
  c.target = "glyphs_input_shift"
  c.grid = [{"strategy": [f"surgical:group={g}" for g in GROUPS] + ["linear_probe", "full"]}]
  c.report.reference = "full"
  c.report.axis_labels = []
  return c


def _s(group, target):
  strategy = "linear_probe" if group == "head" else f"surgical:group={group}"
  return {"strategy": strategy, "target": TARGETS[target]}


def _full(target):
  return {"strategy": "full", "target": TARGETS[target]}


def _where_best(best: str, others: tuple, target: str):
  def check(r):
    return findings.combine(findings.better(r, _s(best, target), _s(o, target),
                                            f"{best} ({target} shift)", o) for o in others)
  return check


def _plot(r: findings.Results, out_dir: str) -> str:
  order = GROUPS + ("head",)
  series = [(f"{kind} shift", [(i, _s(g, kind)) for i, g in enumerate(order)])
            for kind in TARGETS]
  series += [(f"full ({kind})", [(i, _full(kind)) for i in range(len(order))])
             for kind in TARGETS]
  return report.line_plot(r.finals, series, f"{out_dir}/accuracy_by_group.png",
                          "surgical fine-tuning: test accuracy when only one group learns",
                          xlabel="the one group that learns",
                          xticklabels=list(GROUPS) + ["head (linear_probe)"])


FINDINGS = findings.Findings(
    paper="Lee, Chen, Tajwar, Kumar, Yao, Liang, Finn. Surgical Fine-Tuning Improves "
          "Adaptation to Distribution Shifts. ICLR 2023.",
    setup="ResNet-8 (stem, 3 stages, head) pretrained on 36 rendered glyph classes; 20 "
          "examples per class; lr selected per method and target on validation; the paper's "
          "'first block' is our stage1, its 'later blocks' our stage3, its 'last layer' our head.",
    claims=(
        findings.Claim(
            "Input-level shift: tuning the first block beats tuning the later block or the "
            "last layer alone.",
            _where_best("stage1", ("stage3", "head"), "input")),
        findings.Claim(
            "Feature-level shift: tuning a later block beats tuning the first block or the "
            "last layer alone.",
            _where_best("stage3", ("stage1", "head"), "feature")),
        findings.Claim(
            "Output-level shift: tuning the last layer beats tuning the first or a later "
            "block alone.",
            _where_best("head", ("stage1", "stage3"), "output")),
        findings.Claim(
            "Tuning the right single group matches full fine-tuning (within 1 point) on each "
            "kind of shift.",
            lambda r: findings.combine(
                findings.not_worse(r, _s(g, t), _full(t), f"{g} ({t} shift)", "full", 0.01)
                for g, t in (("stage1", "input"), ("stage3", "feature"), ("head", "output")))),
    ),
    plots=(_plot,),
)

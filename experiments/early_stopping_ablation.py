"""Early stopping off vs patience {2, 5, 10}: accuracy, and the epochs (compute) it saves.

A 30-epoch budget (warmup, then cosine decay to 0 over the whole budget, so the schedule does
not know when training will stop), monitoring validation accuracy and restoring the best
epoch's weights when it stops. Strategies `linear_probe` and `full`, targets
`glyphs_input_shift` and `digits`, 20 examples per class, 5 paired seeds. Protocol: the
stopping rule is the only variable, so every configuration uses the project's fixed lr (no
selection). Rows with early stopping off show patience 5 (the base value), which they ignore.
The probe is the SGD probe (`train.probe_solver = "sgd"`): a solved probe has no epochs to
stop.
"""
import ml_collections

from tlresearch.analysis import findings, report
from tlresearch.core import schema

PATIENCE = (2, 5, 10)
STRATEGIES = ("linear_probe", "full")
TARGETS = ("glyphs_input_shift", "digits")
EPOCHS = 30


def get_config() -> ml_collections.ConfigDict:
  c = schema.sweep(targets=list(TARGETS))
  c.train.epochs = EPOCHS
  c.selection.enabled = False  # the stopping rule is the only variable
  c.train.probe_solver = "sgd"  # epochs to stop, for the probe too
  c.grid = [
      {"strategy": list(STRATEGIES), "train.early_stopping.enabled": [False]},
      {"strategy": list(STRATEGIES), "train.early_stopping.patience": list(PATIENCE)},
  ]
  c.report.reference = "full"
  c.report.metrics = ["test_accuracy", "epochs_run"]
  c.report.axis_labels = [("train.early_stopping.enabled", "early stopping"),
                          ("train.early_stopping.patience", "patience")]
  return c


def _off(strategy, target):
  return {"strategy": strategy, "train.early_stopping.enabled": False, "target": target}


def _on(strategy, patience, target):
  return {"strategy": strategy, "train.early_stopping.enabled": True,
          "train.early_stopping.patience": patience, "target": target}


def _plot(r: findings.Results, out_dir: str) -> str:
  series = [(f"{s} ({t})", [(p, _on(s, p, t)) for p in PATIENCE] + [(EPOCHS, _off(s, t))])
            for s in STRATEGIES for t in TARGETS]
  return report.line_plot(r.finals, series, f"{out_dir}/accuracy_vs_patience.png",
                          f"early stopping: test accuracy vs patience ({EPOCHS} = off)",
                          xlabel=f"patience in epochs ({EPOCHS}: early stopping off)")


def _each(fn):
  return lambda r: findings.combine(fn(r, s, t) for s in STRATEGIES for t in TARGETS)


FINDINGS = findings.Findings(
    paper="Prechelt. Early Stopping - But When? In Neural Networks: Tricks of the Trade, 1998.",
    setup=f"Pretrained ResNet-8, {EPOCHS}-epoch budget with a cosine schedule, validation "
          "accuracy monitored, best weights restored; fixed lr; 20 examples per class.",
    claims=(
        findings.Claim(
            "Early stopping saves training time: with patience 2 fewer epochs run than the "
            "full budget.",
            _each(lambda r, s, t: findings.better(r, _off(s, t), _on(s, 2, t),
                                                  f"epochs off ({s}, {t})", "patience 2",
                                                  "epochs_run"))),
        findings.Claim(
            "Slower stopping criteria (larger patience) lose less accuracy but save less time: "
            "patience 10 runs more epochs than patience 2.",
            _each(lambda r, s, t: findings.better(r, _on(s, 10, t), _on(s, 2, t),
                                                  f"epochs patience 10 ({s}, {t})",
                                                  "patience 2", "epochs_run"))),
        findings.Claim(
            "The accuracy cost is small: patience 5 is within 1 point of training the whole "
            "budget.",
            _each(lambda r, s, t: findings.not_worse(r, _on(s, 5, t), _off(s, t),
                                                     f"patience 5 ({s}, {t})", "off", 0.01))),
    ),
    plots=(_plot,),
)

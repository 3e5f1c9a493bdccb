"""Head dropout in {0, 0.2, 0.5, 0.8} for the linear probe and full fine-tuning.

Dropout acts on the pooled features before the classifier (`model.dropout_rate`). Targets
`glyphs_input_shift` and `digits`, 20 examples per class; lr selected per strategy, dropout
rate and target on the validation split (a higher dropout rate may want a different lr);
5 paired seeds. The probe here is the SGD probe (`train.probe_solver = "sgd"`) at every rate:
dropout makes its objective stochastic, so the converged probe (tlresearch.methods.probe) cannot run
it, and comparing an SGD probe with dropout against a solved one without would measure the
solver, not dropout. The reference row of the paired table is `full` without dropout; the claim
rules compare each strategy with its own no-dropout row.
"""
import ml_collections

from tlresearch.analysis import findings, report
from tlresearch.core import schema

RATES = (0.0, 0.2, 0.5, 0.8)
STRATEGIES = ("linear_probe", "full")
TARGETS = ("glyphs_input_shift", "digits")


def get_config() -> ml_collections.ConfigDict:
  c = schema.sweep(targets=list(TARGETS))
  c.grid = [{"strategy": list(STRATEGIES), "model.dropout_rate": list(RATES)}]
  c.train.probe_solver = "sgd"  # the same probe training at every dropout rate
  c.report.reference = "full"
  return c


def _w(strategy, rate, target):
  return {"strategy": strategy, "model.dropout_rate": rate, "target": target}


def _plot(r: findings.Results, out_dir: str) -> str:
  series = [(f"{s} ({t})", [(p, _w(s, p, t)) for p in RATES])
            for s in STRATEGIES for t in TARGETS]
  return report.line_plot(r.finals, series, f"{out_dir}/accuracy_vs_dropout.png",
                          "head dropout: test accuracy vs dropout rate",
                          xlabel="dropout rate on the pooled features")


def _helps(strategy):
  return lambda r: findings.combine(findings.better(
      r, _w(strategy, 0.5, t), _w(strategy, 0.0, t), f"{strategy} dropout 0.5 ({t})",
      "no dropout") for t in TARGETS)


FINDINGS = findings.Findings(
    paper="Srivastava, Hinton, Krizhevsky, Sutskever, Salakhutdinov. Dropout: A Simple Way to "
          "Prevent Neural Networks from Overfitting. JMLR 2014.",
    setup="Dropout on the pooled features before the new linear head of a pretrained ResNet-8; "
          "20 examples per class; lr selected per configuration on validation.",
    claims=(
        findings.Claim("Dropout (p = 0.5) improves the test accuracy of full fine-tuning.",
                       _helps("full")),
        findings.Claim("Dropout (p = 0.5) improves the test accuracy of a linear probe.",
                       _helps("linear_probe")),
    ),
    plots=(_plot,),
)

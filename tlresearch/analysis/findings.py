"""Verdicts on a paper's claims, computed from the measured numbers, never written by hand.

An experiment declares `FINDINGS = Findings(paper, claims, plots)`: each `Claim` is the
paper's claim in one sentence plus a `check(results) -> Verdict` rule built from the helpers
below, so `findings.md` says "reproduced" only while the numbers on disk say so, and a rerun
with different numbers rewrites the verdict.

Rules (paired by seed; tlresearch.analysis.stats: the 95% Student-t interval of the mean difference
and the two-sided paired t-test, whose coverage at 5 seeds is measured in tests/test_stats.py):
- `better(a, b)`: a beats b. Reproduced when the difference is significant (p < 0.05, i.e.
  the 95% t interval lies above 0); partly when the mean difference is positive but not
  significant (the direction holds, the evidence is weak); not reproduced otherwise.
- `not_worse(a, b, margin)`: a is at most `margin` below b (non-inferiority): the same test
  against a difference of -margin (reproduced when the interval's lower end is above -margin).
- `combine`: a claim decided by several comparisons adjusts their p-values for multiplicity
  (Holm-Bonferroni over every comparison of the claim) before deciding each; the claim is
  reproduced when all are, not reproduced when none is at least partly, and partly otherwise.
Missing configurations (e.g. a run with fewer targets), or fewer than MIN_SEEDS paired seeds,
give "inconclusive", not a guess.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

from tlresearch.analysis import report, stats
from tlresearch.core import io

REPRODUCED, PARTLY, NOT, INCONCLUSIVE = ("reproduced", "partly reproduced", "not reproduced",
                                         "inconclusive")
MIN_SEEDS = 5  # paired seeds a comparison needs before it gets a verdict
ALPHA = 0.05   # family-wise error rate of a claim's comparisons (Holm-adjusted)


@dataclasses.dataclass(frozen=True)
class Comparison:
  """One paired comparison of a claim: its text, and what decides it. `mean` is the
  difference minus the claim's bound (0, or -margin), so > 0 supports the claim; `p` tests
  it against 0."""
  text: str
  n: int = 0
  mean: float = float("nan")
  p: float = float("nan")

  @property
  def decidable(self) -> bool:
    return self.n >= MIN_SEEDS and math.isfinite(self.mean) and math.isfinite(self.p)


@dataclasses.dataclass(frozen=True)
class Verdict:
  status: str
  evidence: tuple[str, ...]
  comparisons: tuple[Comparison, ...] = ()


def decide(comparisons, note: str = "") -> Verdict:
  """The verdict of a claim made of `comparisons`, Holm-adjusted over the decidable ones."""
  comparisons = tuple(comparisons)
  decidable = [c for c in comparisons if c.decidable]
  adjusted = dict(zip(map(id, decidable), stats.holm([c.p for c in decidable])))
  m = len(decidable)
  statuses, evidence = [], []
  for c in comparisons:
    if not c.decidable:
      statuses.append(INCONCLUSIVE)
      evidence.append(c.text + (f" (fewer than {MIN_SEEDS} seeds)" if 0 < c.n < MIN_SEEDS
                                else ""))
      continue
    p = adjusted[id(c)]
    statuses.append(REPRODUCED if c.mean > 0 and p < ALPHA else PARTLY if c.mean > 0 else NOT)
    evidence.append(c.text + (f", p = {p:.2g}" if m == 1 else
                              f", Holm-adjusted p = {p:.2g} ({m} comparisons)"))
  return Verdict(aggregate(statuses), tuple(evidence) + ((note,) if note else ()), comparisons)


def aggregate(statuses) -> str:
  """One status from several (a claim's comparisons, an experiment's claims)."""
  known = [s for s in statuses if s != INCONCLUSIVE]
  if not known:
    return INCONCLUSIVE
  if len(known) < len(statuses):
    return PARTLY if any(s != NOT for s in known) else INCONCLUSIVE
  if all(s == REPRODUCED for s in known):
    return REPRODUCED
  if all(s == NOT for s in known):
    return NOT
  return PARTLY


@dataclasses.dataclass(frozen=True)
class Claim:
  text: str                                  # the paper's claim, one sentence
  check: Callable[["Results"], Verdict]      # the rule that tests it on the measured numbers
  # Why we think the claim does not hold on this benchmark: shown only while the verdict is
  # not "reproduced", so it never stands beside numbers that reproduce the claim.
  reading: str = ""


@dataclasses.dataclass(frozen=True)
class Findings:
  paper: str                                 # citation
  claims: tuple[Claim, ...]
  # plot(results, out_dir) -> path of a PNG written there
  plots: tuple[Callable[["Results", str], str], ...] = ()
  setup: str = ""                            # how our setting differs from the paper's
  method: str = ""                           # how the verdicts are decided, when not by the
  #                                            paired tests below (replaces that paragraph)


class Results:
  """The finished cells of a grid, addressed by axis values."""

  def __init__(self, finals: list[dict]):
    self.finals = [f for f in finals if f.get("status", "ok") == "ok"]

  def values(self, where: dict, metric: str = "test_accuracy") -> dict:
    """{seed: value} of the one configuration matching `where` (axis -> value); {} if none.
    Raises ValueError when `where` matches several configurations (an ambiguous rule)."""
    match = [f for f in self.finals if all(f["axes"].get(k) == v for k, v in where.items())]
    configs = {tuple(sorted((k, str(v)) for k, v in f["axes"].items() if k != "seed"))
               for f in match}
    if len(configs) > 1:
      raise ValueError(f"{where} matches {len(configs)} configurations; add axes to the filter")
    return {f["axes"]["seed"]: f.get(metric) for f in match if f.get(metric) is not None}

  def summary(self, where: dict, metric: str = "test_accuracy") -> stats.Summary:
    return stats.summary(list(self.values(where, metric).values()))

  def paired(self, a: dict, b: dict, metric: str = "test_accuracy") -> stats.Paired | None:
    va, vb = self.values(a, metric), self.values(b, metric)
    seeds = sorted(set(va) & set(vb))
    if not seeds:
      return None
    return stats.paired([va[s] for s in seeds], [vb[s] for s in seeds])


def describe(r: Results, where: dict, label: str, metric: str = "test_accuracy") -> str:
  s = r.summary(where, metric)
  if s.n == 0:
    return f"{label}: no data"
  m = report.metric_of(metric)
  return f"{label}: {m.fmt(s.mean)} {m.interval(s.lo, s.hi)} (n={s.n})"


def _paired_text(p: stats.Paired, a_label, b_label, metric) -> str:
  m = report.metric_of(metric)
  return (f"{a_label} - {b_label}: {m.difference(p, m.diff_unit)}, "
          f"P(improvement) = {p.p_improvement:.2f}, n = {p.n}")


def difference(va: dict, vb: dict) -> dict:
  """{seed: va - vb} over common seeds: e.g. a gap between two strategies, per seed."""
  return {s: va[s] - vb[s] for s in sorted(set(va) & set(vb))}


def compare(va: dict, vb: dict, a_label: str, b_label: str, metric: str = "test_accuracy",
            margin: float = 0.0) -> Comparison:
  """The paired comparison "a >= b - margin" of per-seed values ({seed: value})."""
  seeds = sorted(set(va) & set(vb))
  p = stats.paired([va[s] for s in seeds], [vb[s] for s in seeds], null=-margin) if seeds else None
  if p is None or math.isnan(p.mean):
    return Comparison(f"{a_label} vs {b_label}: no paired seeds")
  text = _paired_text(p, a_label, b_label, metric)
  if margin:
    m = report.metric_of(metric)
    text += f" (margin {m.fmt(margin)}{m.diff_unit})"
  return Comparison(text, p.n, p.mean + margin, p.p_value)


def better(r: Results, a: dict, b: dict, a_label: str, b_label: str,
           metric: str = "test_accuracy") -> Verdict:
  """a > b, paired by seed (see the module docstring)."""
  return better_values(r.values(a, metric), r.values(b, metric), a_label, b_label, metric)


def better_values(va: dict, vb: dict, a_label: str, b_label: str,
                  metric: str = "test_accuracy") -> Verdict:
  """`better` on per-seed values ({seed: value}), e.g. gaps made by `difference`."""
  return decide([compare(va, vb, a_label, b_label, metric)])


def not_worse(r: Results, a: dict, b: dict, a_label: str, b_label: str, margin: float,
              metric: str = "test_accuracy") -> Verdict:
  """a >= b - margin, paired by seed (non-inferiority)."""
  return decide([compare(r.values(a, metric), r.values(b, metric), a_label, b_label, metric,
                         margin)])


def combine(verdicts, note: str = "") -> Verdict:
  """One claim from several verdicts: every comparison in them, decided together (Holm)."""
  return decide([c for v in verdicts for c in v.comparisons], note)


def overall(verdicts) -> str:
  """The experiment's verdict from its claims' (each claim adjusted on its own)."""
  return aggregate([v.status for v in verdicts])


def markdown(name: str, spec: Findings, r: Results, command: str, plots: list[str]) -> str:
  verdicts = []
  for claim in spec.claims:
    try:
      verdicts.append(claim.check(r))
    except ValueError as e:  # an ambiguous rule is a bug in the experiment: say so
      verdicts.append(Verdict(INCONCLUSIVE, (f"rule error: {e}",)))
  seeds = sorted({f["axes"]["seed"] for f in r.finals})
  out = [f"# {name}: findings", "", f"Paper: {spec.paper}", "",
         f"Overall verdict: **{overall(verdicts)}** ({len(r.finals)} finished cells, "
         f"{len(seeds)} seeds: {', '.join(map(str, seeds))}).", ""]
  if spec.setup:
    out += ["Our setting: " + spec.setup, ""]
  for i, (claim, v) in enumerate(zip(spec.claims, verdicts), 1):
    out += [f"## Claim {i}: {claim.text}", "", f"Verdict: **{v.status}**", ""]
    out += [f"- {e}" for e in v.evidence] + [""]
    if claim.reading and v.status != REPRODUCED:
      out += [f"Our reading: {claim.reading}", ""]
  default = ("Numbers are test-split means over seeds with 95% Student-t intervals; differences "
          "are paired by seed (same data subset, head init and data order), with the two-sided "
          "paired t-test; when a claim rests on several comparisons, their p-values are "
          "Holm-Bonferroni adjusted (family-wise error 5% per claim) and the adjusted value is "
          f"shown. A comparison needs {MIN_SEEDS} paired seeds. Verdict rules: "
          "`tlresearch/analysis/findings.py`; the table with every configuration is `table.md`.")
  out += [spec.method or default, ""]
  if plots:
    out += ["Plots: " + ", ".join(f"`{p}`" for p in plots), ""]
  out += ["Made by:", "", "```", command, "```", ""]
  return "\n".join(out)


def write(out_dir: str, name: str, spec: Findings, finals: list[dict], command: str) -> list[str]:
  """findings.md and the experiment's plots under `out_dir`; returns their paths."""
  import os
  r = Results(finals)
  plots = [p(r, out_dir) for p in spec.plots]
  path = os.path.join(out_dir, "findings.md")
  io.write_text(path, markdown(name, spec, r, command, [os.path.basename(p) for p in plots]))
  return plots + [path]

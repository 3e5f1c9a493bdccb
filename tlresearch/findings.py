"""Verdicts on a paper's claims, computed from the measured numbers, never written by hand.

An experiment declares `FINDINGS = Findings(paper, claims, plots)`: each `Claim` is the
paper's claim in one sentence plus a `check(results) -> Verdict` rule built from the helpers
below, so `findings.md` says "reproduced" only while the numbers on disk say so, and a rerun
with different numbers rewrites the verdict.

Rules (paired by seed, 95% percentile-bootstrap CI of the mean difference):
- `better(a, b)`: a beats b. Reproduced when the CI lies above 0; partly when the mean
  difference is positive but the CI reaches 0 (the direction holds, the evidence is weak);
  not reproduced otherwise.
- `not_worse(a, b, margin)`: a is at most `margin` below b (non-inferiority). Reproduced when
  the CI's lower end is above -margin; partly when the mean is; not reproduced otherwise.
- `combine`: a claim made of several comparisons is reproduced when all are, not reproduced
  when none is at least partly, and partly otherwise.
Missing configurations (e.g. a run with fewer targets), or fewer than MIN_SEEDS paired seeds,
give "inconclusive", not a guess: with 1-4 seeds a bootstrap interval is far too narrow
(tlresearch.stats.bootstrap_ci) to call anything reproduced.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

from tlresearch import io, report, stats

REPRODUCED, PARTLY, NOT, INCONCLUSIVE = ("reproduced", "partly reproduced", "not reproduced",
                                         "inconclusive")
MIN_SEEDS = 5  # paired seeds a comparison needs before it gets a verdict


@dataclasses.dataclass(frozen=True)
class Verdict:
  status: str
  evidence: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Claim:
  text: str                                  # the paper's claim, one sentence
  check: Callable[["Results"], Verdict]      # the rule that tests it on the measured numbers


@dataclasses.dataclass(frozen=True)
class Findings:
  paper: str                                 # citation
  claims: tuple[Claim, ...]
  # plot(results, out_dir) -> path of a PNG written there
  plots: tuple[Callable[["Results", str], str], ...] = ()
  setup: str = ""                            # how our setting differs from the paper's


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


def better(r: Results, a: dict, b: dict, a_label: str, b_label: str,
           metric: str = "test_accuracy") -> Verdict:
  """a > b, paired by seed (see the module docstring)."""
  return better_values(r.values(a, metric), r.values(b, metric), a_label, b_label, metric)


def difference(va: dict, vb: dict) -> dict:
  """{seed: va - vb} over common seeds: e.g. a gap between two strategies, per seed."""
  return {s: va[s] - vb[s] for s in sorted(set(va) & set(vb))}


def better_values(va: dict, vb: dict, a_label: str, b_label: str,
                  metric: str = "test_accuracy") -> Verdict:
  """`better` on per-seed values ({seed: value}), e.g. gaps made by `difference`."""
  seeds = sorted(set(va) & set(vb))
  p = stats.paired([va[s] for s in seeds], [vb[s] for s in seeds]) if seeds else None
  if p is None or math.isnan(p.mean):
    return Verdict(INCONCLUSIVE, (f"{a_label} vs {b_label}: no paired seeds",))
  text = _paired_text(p, a_label, b_label, metric)
  if p.n < MIN_SEEDS:
    return Verdict(INCONCLUSIVE, (text + f" (fewer than {MIN_SEEDS} seeds)",))
  if p.lo > 0:
    return Verdict(REPRODUCED, (text,))
  return Verdict(PARTLY if p.mean > 0 else NOT, (text,))


def not_worse(r: Results, a: dict, b: dict, a_label: str, b_label: str, margin: float,
              metric: str = "test_accuracy") -> Verdict:
  """a >= b - margin, paired by seed (non-inferiority)."""
  p = r.paired(a, b, metric)
  if p is None or math.isnan(p.mean):
    return Verdict(INCONCLUSIVE, (f"{a_label} vs {b_label}: no paired seeds",))
  m = report.metric_of(metric)
  text = _paired_text(p, a_label, b_label, metric) + f" (margin {m.fmt(margin)}{m.diff_unit})"
  if p.n < MIN_SEEDS:
    return Verdict(INCONCLUSIVE, (text + f" (fewer than {MIN_SEEDS} seeds)",))
  if p.lo > -margin:
    return Verdict(REPRODUCED, (text,))
  return Verdict(PARTLY if p.mean > -margin else NOT, (text,))


def combine(verdicts, note: str = "") -> Verdict:
  verdicts = list(verdicts)
  evidence = tuple(e for v in verdicts for e in v.evidence) + ((note,) if note else ())
  known = [v.status for v in verdicts if v.status != INCONCLUSIVE]
  if not known:
    return Verdict(INCONCLUSIVE, evidence)
  if len(known) < len(verdicts):
    return Verdict(PARTLY if any(s != NOT for s in known) else INCONCLUSIVE, evidence)
  if all(s == REPRODUCED for s in known):
    return Verdict(REPRODUCED, evidence)
  if all(s == NOT for s in known):
    return Verdict(NOT, evidence)
  return Verdict(PARTLY, evidence)


def overall(verdicts) -> str:
  return combine(verdicts).status


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
  out += ["Numbers are test-split means over seeds with 95% percentile-bootstrap intervals; "
          "differences are paired by seed (same data subset, head init and data order). "
          "Verdict rules: `tlresearch/findings.py`; the table with every configuration is "
          "`table.md`.", ""]
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

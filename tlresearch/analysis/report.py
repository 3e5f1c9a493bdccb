"""Tables and plots from cell results (`final.json` records only, never from training state).

Layout of a table: one row per configuration (every axis except the column axis and the
seed), one column per value of the column axis (the target task), cells "mean ± CI" over
seeds in percent, plus the trainable parameter count.
"""
from __future__ import annotations

import csv
import dataclasses
import io as _io
import math
import os

from tlresearch.analysis import stats
from tlresearch.core import configs, io, layout


@dataclasses.dataclass(frozen=True)
class Metric:
  """How a final.json field is named and written in every table, plot and findings line."""
  name: str                   # in headings, axis labels and findings
  scale: float = 100.0        # shown as scale * value: fractions in percent
  spec: str = ".1f"           # format of a shown value ("+" is added for differences)
  unit: str = " (%)"          # after the name in headings and axis labels
  diff_unit: str = " points"  # after a difference (or a margin) in findings

  def fmt(self, v: float) -> str:
    return f"{self.scale * v:{self.spec}}"

  def signed(self, v: float) -> str:
    return f"{self.scale * v:+{self.spec}}"

  def interval(self, lo: float, hi: float) -> str:
    return f"[{self.fmt(lo)}, {self.fmt(hi)}]"

  def difference(self, p: stats.Paired, unit: str = "") -> str:
    """'mean [lo, hi]' of a paired difference, `unit` after the mean."""
    return f"{self.signed(p.mean)}{unit} [{self.signed(p.lo)}, {self.signed(p.hi)}]"


_AS_IS = dict(scale=1.0, spec=".3g", unit="", diff_unit="")  # not a fraction: no percent
# Metrics an experiment may put in its tables (config.report.metrics), plots and findings.
METRICS = {"test_accuracy": Metric("test accuracy"),
           "test_macro_f1": Metric("test macro-F1"),
           "val_accuracy": Metric("validation accuracy"),
           "ood_test_accuracy": Metric("OOD (corrupted test) accuracy"),
           "feature_change": Metric("feature change (relative L2)", **_AS_IS),
           "epochs_run": Metric("epochs run", **_AS_IS),
           **{f"transferability_{k}": Metric(name, **_AS_IS) for k, name in (
               ("logme", "LogME"), ("leep", "LEEP"), ("nce", "NCE"), ("h_score", "H-score"))}}
DEFAULT_METRICS = ("test_accuracy", "test_macro_f1")  # tables without config.report.metrics


def metric_of(key: str) -> Metric:
  """The definition of final.json field `key`; one not in METRICS is a fraction named `key`."""
  return METRICS.get(key) or Metric(key)


# runs.csv holds only what the seeds determine, so a rerun (or a killed and resumed run)
# reproduces it byte for byte; wall-clock numbers go to timing.csv.
RUN_COLUMNS = ("status", "test_accuracy", "test_macro_f1", "val_accuracy", "ood_test_accuracy",
               "feature_change", "lr", "weight_decay", "probe_l2", "best_epoch", "epochs_run",
               "budget_limited", "trainable_params")
TIMING_COLUMNS = ("wall_seconds", "compile_seconds", "layout")


def _run_value(f: dict, column: str):
  if column in ("lr", "weight_decay"):
    return f.get("hparams", {}).get(f"train.{column}")
  if column == "probe_l2":
    return (f.get("probe") or {}).get("l2")
  if column == "budget_limited":
    return int(f[column]) if column in f else None
  if column == "layout":
    return layout.describe(f.get("layout"))
  return f.get(column)


def _fmt_value(v) -> str:
  if isinstance(v, bool):
    return "on" if v else "off"
  if isinstance(v, float):
    return f"{v:g}"
  return str(v)


def runs_csv(finals: list[dict], axes: list[str], columns=RUN_COLUMNS) -> str:
  buf = _io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(["cell_id", *axes, *columns])
  for f in finals:
    w.writerow([f["cell_id"], *(f["axes"][a] for a in axes),
                *(_csv_value(_run_value(f, c)) for c in columns)])
  return buf.getvalue()


def _csv_value(v):
  if isinstance(v, float):
    return f"{v:.6g}"
  return "" if v is None else v


def summarise(finals, axes, col_axis="target", seed_axis="seed", metric="test_accuracy"):
  """{row key: {column value: [values over seeds]}}, rows/columns in first-seen order."""
  row_axes = [a for a in axes if a not in (col_axis, seed_axis)]
  rows, cols = {}, []
  for f in finals:
    key = tuple(f["axes"][a] for a in row_axes)
    col = f["axes"][col_axis]
    if col not in cols:
      cols.append(col)
    value = f.get(metric) if f.get("status", "ok") == "ok" else None
    rows.setdefault(key, {}).setdefault(col, []).append(value)
  return row_axes, rows, cols


def _cell_text(values, m: Metric) -> str:
  failed = sum(v is None for v in values)
  mean, half = stats.mean_ci([v for v in values if v is not None])
  if math.isnan(mean):
    return "diverged"
  text = m.fmt(mean) + ("" if math.isnan(half) else f" ± {m.fmt(half)}")
  return text + (f" ({failed} diverged)" if failed else "")


def _params(finals, row_axes, key, col) -> str:
  counts = {f["trainable_params"] for f in _row_finals(finals, row_axes, key, col)}
  return "/".join(f"{c:,}" for c in sorted(counts))


def _by_seed(finals, row_axes, col_axis="target", metric="test_accuracy"):
  """{(row key, column): {seed: value}} over finished (status ok) cells that have `metric`
  (a cell may lack one, e.g. LEEP for a backbone without a source head)."""
  out = {}
  for f in finals:
    if f.get("status", "ok") == "ok" and f.get(metric) is not None:
      key = (tuple(f["axes"][a] for a in row_axes), f["axes"][col_axis])
      out.setdefault(key, {})[f["axes"]["seed"]] = f[metric]
  return out


def paired_section(finals, axes, labels: dict, reference: tuple,
                   metric: str = "test_accuracy") -> list[str]:
  """Markdown lines: each row minus the reference row, paired by seed: mean, 95% t interval,
  and the probability of improvement (share of seeds where the row wins)."""
  row_axes, rows, cols = summarise(finals, axes, metric=metric)
  if reference not in rows:
    return []
  values = _by_seed(finals, row_axes, metric=metric)
  met = metric_of(metric)
  ref_name = ", ".join(f"{labels.get(a, a)}={_fmt_value(v)}" for a, v in zip(row_axes, reference))
  out = [f"## paired difference to the reference ({ref_name}), {met.name}"
         f"{met.diff_unit}: mean [95% t CI] over seeds, "
         "P = probability of improvement", "",
         "| " + " | ".join([labels.get(a, a) for a in row_axes] + [str(c) for c in cols]) + " |",
         "|" + "---|" * (len(row_axes) + len(cols))]
  for key in rows:
    if key == reference:
      continue
    cells = []
    for c in cols:
      mine, ref = values.get((key, c), {}), values.get((reference, c), {})
      seeds = sorted(set(mine) & set(ref))
      if not seeds:
        cells.append("n/a")
        continue
      p = stats.paired([mine[s] for s in seeds], [ref[s] for s in seeds])
      cells.append(f"{met.difference(p)} P={p.p_improvement:.2f}")
    out.append("| " + " | ".join([_fmt_value(v) for v in key] + cells) + " |")
  return out + [""]


EDGE_MARK = "†"     # the selected lr is at an edge of its (widened) grid
BUDGET_MARK = "‡"   # most seeds' best validation epoch is the last one trained
PROBE_TEXT = "L-BFGS"  # a converged probe: no lr; its L2 is chosen per seed on validation


def _row_finals(finals, row_axes, key, col) -> list[dict]:
  return [f for f in finals
          if tuple(f["axes"][a] for a in row_axes) == key and f["axes"]["target"] == col]


def _hparams(finals, row_axes, key, col, at_edge=frozenset()) -> str:
  """What the cells of a row were trained with on one target: the lr and weight decay
  (selected per row and target when the experiment selects them; † at an edge of the grid),
  or the converged probe's L2 range over seeds."""
  mine = _row_finals(finals, row_axes, key, col)
  if mine and all(f.get("probe") and f.get("epochs_run") == 1 for f in mine):
    l2 = sorted(f["probe"]["l2"] for f in mine)
    return f"{PROBE_TEXT}, l2 {l2[0]:.2g}" + (f"-{l2[-1]:.2g}" if l2[-1] != l2[0] else "")
  seen = sorted({(f.get("hparams", {}).get("train.lr"), f.get("hparams", {}).get("train.weight_decay"))
                 for f in mine}, key=str)
  edge = any(configs.configuration(f["axes"]) in at_edge for f in mine)
  return "/".join(f"{lr:g}, {wd:g}" for lr, wd in seen if lr is not None) + (EDGE_MARK if edge
                                                                            else "")


def _budget_limited(values_finals) -> bool:
  flags = [bool(f.get("budget_limited")) for f in values_finals if f.get("status", "ok") == "ok"]
  return bool(flags) and 2 * sum(flags) > len(flags)


def stats_section(finals, axes, labels: dict, metric: str = "test_accuracy") -> list[str]:
  """Markdown lines: per row and target, n, mean, std and the 95% t interval."""
  row_axes, rows, cols = summarise(finals, axes, metric=metric)
  met = metric_of(metric)
  out = [f"## {met.name}{met.unit} per configuration: seeds, mean, std, 95% t CI", "",
         "| " + " | ".join([labels.get(a, a) for a in row_axes]
                           + ["target", "n", "mean", "std", "t CI"]) + " |",
         "|" + "---|" * (len(row_axes) + 5)]
  for key, by_col in rows.items():
    for c in cols:
      s = stats.summary([v for v in by_col.get(c, []) if v is not None])
      if s.n == 0:
        continue
      t_ci = "n/a" if math.isnan(s.lo) else met.interval(s.lo, s.hi)
      std = "n/a" if math.isnan(s.std) else met.fmt(s.std)
      out.append("| " + " | ".join([_fmt_value(v) for v in key] + [
          str(c), str(s.n), met.fmt(s.mean), std, t_ci]) + " |")
  return out + [""]


def table_markdown(finals, axes, labels: dict, title: str, reference: tuple | None = None,
                   metrics=None, show_hparams: bool = False, at_edge=frozenset()) -> str:
  out = [f"# {title}", ""]
  diverged = sum(f.get("status", "ok") != "ok" for f in finals)
  if diverged:
    out += [f"{diverged} cell(s) diverged (non-finite training loss): they are marked, left out "
            "of every mean and difference, and listed in runs.csv.", ""]
  seeds = sorted({f["axes"]["seed"] for f in finals})
  metrics = tuple(metrics or DEFAULT_METRICS)
  for metric in metrics:
    met = metric_of(metric)
    row_axes, rows, cols = summarise(finals, axes, metric=metric)
    head = [labels.get(a, a) for a in row_axes] + [str(c) for c in cols]
    extra = ["trainable params"] + (["lr, wd selected on validation (per target)"]
                                    if show_hparams else [])
    out += [f"## {met.name}{met.unit}, mean ± 95% CI over {len(seeds)} "
            "seeds (t interval)", "",
            "| " + " | ".join(head + extra) + " |",
            "|" + "---|" * (len(head) + len(extra))]
    for key, by_col in rows.items():
      params = " / ".join(_params(finals, row_axes, key, c) for c in cols)
      hp = ([" / ".join(_hparams(finals, row_axes, key, c, at_edge) for c in cols)]
            if show_hparams else [])
      texts = [_cell_text(by_col.get(c, []), met)
               + (BUDGET_MARK if _budget_limited(_row_finals(finals, row_axes, key, c)) else "")
               for c in cols]
      out.append("| " + " | ".join([_fmt_value(v) for v in key] + texts + [params] + hp) + " |")
    out.append("")
  out += _legend(finals, show_hparams, at_edge) + layout_note(finals)
  for metric in metrics:
    out += stats_section(finals, axes, labels, metric)
  if reference is not None:
    for metric in metrics:
      out += paired_section(finals, axes, labels, reference, metric)
  return "\n".join(out)


def layouts(finals) -> list[str]:
  """The execution layouts the cells ran in (tlresearch.core.layout), most frequent first."""
  import collections
  counts = collections.Counter(layout.describe(f.get("layout")) for f in finals)
  return [name for name, _ in counts.most_common()]


def layout_note(finals) -> list[str]:
  """Where the numbers reproduce bitwise: the one execution layout, or the mix."""
  found = layouts(finals)
  if len(found) == 1:
    return [f"Execution layout: {found[0]} (the numbers reproduce bitwise in it).", ""]
  return [f"The cells ran in {len(found)} execution layouts ({'; '.join(found)}): each "
          "reproduces bitwise only in its own (timing.csv, column layout).", ""]


def _legend(finals, show_hparams: bool, at_edge) -> list[str]:
  lines = []
  if any(f.get("budget_limited") for f in finals):
    lines.append(f"{BUDGET_MARK} most seeds' best validation epoch was the last one trained: "
                 "the epoch budget, not the strategy, may have stopped them.")
  if show_hparams and at_edge:
    lines.append(f"{EDGE_MARK} the selected lr is at an edge of its grid even after widening "
                 "it (tlresearch.experiment.selection): the optimum may lie beyond.")
  if any(f.get("probe") for f in finals):
    lines.append(f"{PROBE_TEXT}: the head solved to convergence on the frozen features, its L2 "
                 "strength chosen per seed on validation (tlresearch.methods.probe).")
  return [" ".join(lines), ""] if lines else []


def table_latex(finals, axes, labels: dict, metric: str = "test_accuracy") -> str:
  """booktabs table of `metric`, mean ± 95% t CI over seeds."""
  row_axes, rows, cols = summarise(finals, axes, metric=metric)
  esc = lambda s: str(s).replace("_", r"\_").replace("%", r"\%")
  spec = "l" * len(row_axes) + "r" * len(cols)
  lines = [r"\begin{tabular}{" + spec + "}", r"\toprule",
           " & ".join(esc(labels.get(a, a)) for a in row_axes + []) + " & "
           + " & ".join(esc(c) for c in cols) + r" \\", r"\midrule"]
  for key, by_col in rows.items():
    cells = [_cell_text(by_col.get(c, []), metric_of(metric)).replace("±", r"$\pm$") for c in cols]
    lines.append(" & ".join(esc(_fmt_value(v)) for v in key) + " & " + " & ".join(cells)
                 + r" \\")
  lines += [r"\bottomrule", r"\end{tabular}", ""]
  return "\n".join(lines)


def plot(finals, axes, labels: dict, path: str, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  met = METRICS["test_accuracy"]  # what summarise gives by default
  row_axes, rows, cols = summarise(finals, axes)
  # Label each bar group by its first axis plus only the axes that differ from the first
  # row (the base configuration), e.g. "full + dropout=0.5".
  first = next(iter(rows))
  names = [" + ".join([_fmt_value(key[0])] + [f"{labels.get(a, a)}={_fmt_value(v)}"
                                              for a, v, b in zip(row_axes[1:], key[1:], first[1:])
                                              if v != b]) for key in rows]
  fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(rows) * len(cols) + 2), 4.5))
  width = 0.8 / max(len(cols), 1)
  for j, col in enumerate(cols):
    ms = [stats.mean_ci([v for v in by.get(col, []) if v is not None]) for by in rows.values()]
    ax.bar([i + j * width for i in range(len(rows))], [met.scale * m for m, _ in ms], width,
           yerr=[0 if math.isnan(h) else met.scale * h for _, h in ms], capsize=2, label=str(col))
  ax.set_xticks([i + width * (len(cols) - 1) / 2 for i in range(len(rows))])
  ax.set_xticklabels(names, rotation=30, ha="right", fontsize=7)
  ax.set_ylabel(met.name + met.unit)
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  io.save_figure(fig, path)


def line_plot(finals, series: list, path: str, title: str, metric: str = "test_accuracy",
              xlabel: str = "", log_x: bool = False, xticklabels=None) -> str:
  """Mean ± 95% t CI of `metric` per point; `series` is [(label, [(x, axes filter), ...])]
  or [(label, points, metric)], each point the cells whose axes match its filter."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  met = metric_of(metric)
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  for label, points, *own in series:
    m_key = own[0] if own else metric
    xs, ms, hs = [], [], []
    for x, filt in points:
      vals = [f.get(m_key) for f in finals
              if f.get("status", "ok") == "ok" and f.get(m_key) is not None
              and all(f["axes"].get(k) == v for k, v in filt.items())]
      if vals:
        m, h = stats.mean_ci(vals)
        xs.append(x)
        ms.append(met.scale * m)
        hs.append(0 if math.isnan(h) else met.scale * h)
    if xs:
      ax.errorbar(xs, ms, yerr=hs, marker="o", capsize=3, label=label)
  if log_x:
    ax.set_xscale("log")
    ax.minorticks_off()
  if not xticklabels:  # ticks at the measured x values, written plainly (1, 5, 10, not 10^0)
    xs_all = sorted({x for _, points, *_ in series for x, _ in points})
    ax.set_xticks(xs_all)
    ax.set_xticklabels([f"{x:g}" for x in xs_all])
  else:  # categorical x: point i is labelled xticklabels[i]
    ax.set_xticks(range(len(xticklabels)))
    ax.set_xticklabels(xticklabels, fontsize=8)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(met.name + met.unit)
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  io.save_figure(fig, path)
  return path


def check(config) -> None:
  """UserError for metrics the tables do not know; a warning when the reference strategy
  is no row of the grid (the tables then have no paired differences)."""
  from tlresearch.core.errors import UserError, choices
  r = config.report
  for m in r.get("metrics", DEFAULT_METRICS):
    if m not in METRICS:
      raise UserError(f"unknown report.metrics entry '{m}'; valid: {choices(METRICS)}")
  strategies = {v for block in config.grid for v in block.get("strategy", [])}
  if any("strategy" not in block for block in config.grid):
    strategies.add(config.strategy)
  if r.reference not in strategies:
    import logging
    logging.getLogger(__name__).warning(
        "report.reference '%s' is not a strategy of the grid (%s): the tables have no paired "
        "differences", r.reference, choices(strategies))


# Files of a results folder this project wrote (tables, or the pretrain summary), and the
# list of every file it wrote there (MANIFEST), which says what a replacement may delete.
OWN_FILES = {"runs.csv", "timing.csv", "table.md", "table.tex", "summary.json"}
MANIFEST = ".tlresearch-files"
_OWN_SUFFIXES = (".csv", ".md", ".tex", ".png", ".json")


def check_replaceable(out_dir: str) -> None:
  """UserError unless `out_dir` is absent, empty, or this project's earlier output (it
  holds one of OWN_FILES): writing the tables replaces the folder whole, and must
  never delete someone else's files or follow a link out of it."""
  from tlresearch.core.errors import UserError
  if os.path.islink(out_dir):
    raise UserError(f"the results folder {out_dir} is a symbolic link; give the folder it "
                    "points to as --results_dir, or remove the link")
  if not os.path.exists(out_dir):
    return
  if not os.path.isdir(out_dir):
    raise UserError(f"the results folder {out_dir} exists and is not a folder")
  entries = set(os.listdir(out_dir))
  if entries and not (OWN_FILES | {MANIFEST}) & entries:
    raise UserError(f"{out_dir} exists and is not an earlier output of this project (none of "
                    f"{', '.join(sorted(OWN_FILES))}); it would be replaced whole: move it or "
                    "choose another --results_dir")
  try:
    with open(os.path.join(out_dir, MANIFEST)) as f:
      ours = set(f.read().split("\n")) | {MANIFEST}
    foreign = sorted(entries - ours)
  except OSError:  # written before the manifest existed: only files of the project's kinds
    foreign = sorted(e for e in entries if not e.endswith(_OWN_SUFFIXES)
                     or not os.path.isfile(os.path.join(out_dir, e)))
  if foreign:
    raise UserError(f"{os.path.join(out_dir, foreign[0])} was not written by this project, and "
                    f"{out_dir} is replaced whole when the tables are written: move it out first")


def write(finals: list[dict], axes: list[str], out_dir: str, name: str,
          labels: dict | None = None, reference: tuple | None = None, metrics=None,
          show_hparams: bool = False, at_edge=frozenset(), extra=None) -> list[str]:
  """runs.csv, timing.csv, table.md, table.tex and accuracy.png as the folder `out_dir`.

  `extra(folder)` may add files (findings, more plots) and returns their names. Everything
  is written into a temporary sibling folder that then replaces `out_dir`, so a crash at
  any point leaves the previous complete set of files, never a mix.
  """
  labels = labels or {}
  title = f"{name}: test metrics per strategy configuration and target"
  names = ["runs.csv", "timing.csv", "table.md", "table.tex", "accuracy.png"]
  check_replaceable(out_dir)
  with io.atomic_dir(out_dir) as tmp:
    io.write_text(os.path.join(tmp, "runs.csv"), runs_csv(finals, axes))
    io.write_text(os.path.join(tmp, "timing.csv"), runs_csv(finals, axes, TIMING_COLUMNS))
    io.write_text(os.path.join(tmp, "table.md"), table_markdown(
        finals, axes, labels, title, reference, metrics, show_hparams, at_edge))
    io.write_text(os.path.join(tmp, "table.tex"), table_latex(finals, axes, labels))
    plot(finals, axes, labels, os.path.join(tmp, "accuracy.png"), title)
    if extra is not None:
      names += list(extra(tmp))
    io.write_text(os.path.join(tmp, MANIFEST), "\n".join(sorted(os.listdir(tmp))) + "\n")
  return [os.path.join(out_dir, n) for n in names]


def classification_report_text(report: dict, digits: int = 3) -> str:
  """scikit-learn's text layout of a `classification_report(..., output_dict=True)` dict (as
  final.json stores it): precision, recall, F1 and support per class, then the averages."""
  averages = [k for k in ("macro avg", "weighted avg") if k in report]
  classes = [k for k in report if k not in ("accuracy", *averages)]
  width = max([len(k) for k in classes + averages] + [len("weighted avg")])
  head = f"{'':>{width}} " + "".join(f" {h:>9}" for h in ("precision", "recall", "f1-score",
                                                          "support"))
  row = lambda name, r: (f"{name:>{width}} " + "".join(
      f" {r[k]:>9.{digits}f}" for k in ("precision", "recall", "f1-score"))
                         + f" {int(r['support']):>9}")
  lines = [head, ""] + [row(c, report[c]) for c in classes] + [""]
  if "accuracy" in report:
    support = int(report[averages[0]]["support"]) if averages else 0
    lines.append(f"{'accuracy':>{width}} " + " " * 20 + f" {report['accuracy']:>9.{digits}f}"
                 + f" {support:>9}")
  lines += [row(a, report[a]) for a in averages]
  return "\n".join(lines) + "\n"

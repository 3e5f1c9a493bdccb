"""Tables and plots from cell results (`final.json` records only, never from training state).

Layout of a table: one row per configuration (every axis except the column axis and the
seed), one column per value of the column axis (the target task), cells "mean ± CI" over
seeds in percent, plus the trainable parameter count.
"""
from __future__ import annotations

import csv
import io as _io
import math
import os
import shutil
import tempfile

from tlresearch import io, stats

METRICS = (("test_accuracy", "test accuracy"), ("test_macro_f1", "test macro-F1"))
# runs.csv holds only what the seeds determine, so a rerun (or a killed and resumed run)
# reproduces it byte for byte; wall-clock numbers go to timing.csv.
RUN_COLUMNS = ("status", "test_accuracy", "test_macro_f1", "best_epoch", "epochs_run",
               "trainable_params")
TIMING_COLUMNS = ("wall_seconds", "compile_seconds")


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
                *(_csv_value(f.get(c)) for c in columns)])
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


def _cell_text(values, scale=100.0) -> str:
  failed = sum(v is None for v in values)
  mean, half = stats.mean_ci([v for v in values if v is not None])
  if math.isnan(mean):
    return "diverged"
  text = f"{scale * mean:.1f}" + ("" if math.isnan(half) else f" ± {scale * half:.1f}")
  return text + (f" ({failed} diverged)" if failed else "")


def _params(finals, row_axes, key, col) -> str:
  counts = {f["trainable_params"] for f in finals
            if tuple(f["axes"][a] for a in row_axes) == key and f["axes"]["target"] == col}
  return "/".join(f"{c:,}" for c in sorted(counts))


def _by_seed(finals, row_axes, col_axis="target", metric="test_accuracy"):
  """{(row key, column): {seed: value}} over finished (status ok) cells."""
  out = {}
  for f in finals:
    if f.get("status", "ok") == "ok":
      key = (tuple(f["axes"][a] for a in row_axes), f["axes"][col_axis])
      out.setdefault(key, {})[f["axes"]["seed"]] = f[metric]
  return out


def paired_section(finals, axes, labels: dict, reference: tuple) -> list[str]:
  """Markdown lines: each row minus the reference row, paired by seed, mean ± 95% CI."""
  row_axes, rows, cols = summarise(finals, axes)
  if reference not in rows:
    return []
  values = _by_seed(finals, row_axes)
  ref_name = ", ".join(f"{labels.get(a, a)}={_fmt_value(v)}" for a, v in zip(row_axes, reference))
  out = [f"## paired difference to the reference ({ref_name}), test accuracy points, "
         "mean ± 95% CI over seeds", "",
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
      d, h = stats.paired_difference([mine[s] for s in seeds], [ref[s] for s in seeds])
      cells.append(f"{100 * d:+.1f}" + ("" if math.isnan(h) else f" ± {100 * h:.1f}"))
    out.append("| " + " | ".join([_fmt_value(v) for v in key] + cells) + " |")
  return out + [""]


def table_markdown(finals, axes, labels: dict, title: str, reference: tuple | None = None) -> str:
  out = [f"# {title}", ""]
  diverged = sum(f.get("status", "ok") != "ok" for f in finals)
  if diverged:
    out += [f"{diverged} cell(s) diverged (non-finite training loss): they are marked, left out "
            "of every mean and difference, and listed in runs.csv.", ""]
  seeds = sorted({f["axes"]["seed"] for f in finals})
  for metric, name in METRICS:
    row_axes, rows, cols = summarise(finals, axes, metric=metric)
    head = [labels.get(a, a) for a in row_axes] + [str(c) for c in cols]
    out += [f"## {name} (%), mean ± 95% CI over {len(seeds)} seeds (t interval)", "",
            "| " + " | ".join(head + ["trainable params"]) + " |",
            "|" + "---|" * (len(head) + 1)]
    for key, by_col in rows.items():
      params = " / ".join(_params(finals, row_axes, key, c) for c in cols)
      out.append("| " + " | ".join([_fmt_value(v) for v in key]
                                   + [_cell_text(by_col.get(c, [])) for c in cols]
                                   + [params]) + " |")
    out.append("")
  if reference is not None:
    out += paired_section(finals, axes, labels, reference)
  return "\n".join(out)


def table_latex(finals, axes, labels: dict) -> str:
  row_axes, rows, cols = summarise(finals, axes)
  esc = lambda s: str(s).replace("_", r"\_").replace("%", r"\%")
  spec = "l" * len(row_axes) + "r" * len(cols)
  lines = [r"\begin{tabular}{" + spec + "}", r"\toprule",
           " & ".join(esc(labels.get(a, a)) for a in row_axes + []) + " & "
           + " & ".join(esc(c) for c in cols) + r" \\", r"\midrule"]
  for key, by_col in rows.items():
    cells = [_cell_text(by_col.get(c, [])).replace("±", r"$\pm$") for c in cols]
    lines.append(" & ".join(esc(_fmt_value(v)) for v in key) + " & " + " & ".join(cells)
                 + r" \\")
  lines += [r"\bottomrule", r"\end{tabular}", ""]
  return "\n".join(lines)


def plot(finals, axes, labels: dict, path: str, title: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
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
    ax.bar([i + j * width for i in range(len(rows))], [100 * m for m, _ in ms], width,
           yerr=[0 if math.isnan(h) else 100 * h for _, h in ms], capsize=2, label=str(col))
  ax.set_xticks([i + width * (len(cols) - 1) / 2 for i in range(len(rows))])
  ax.set_xticklabels(names, rotation=30, ha="right", fontsize=7)
  ax.set_ylabel("test accuracy (%)")
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=7)
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  os.replace(tmp, path)


def write(finals: list[dict], axes: list[str], out_dir: str, name: str,
          labels: dict | None = None, reference: tuple | None = None) -> list[str]:
  """runs.csv, timing.csv, table.md, table.tex and accuracy.png as the folder `out_dir`.

  Everything is written into a temporary sibling folder that then replaces `out_dir`, so a
  crash at any point leaves the previous complete set of files, never a mix.
  """
  labels = labels or {}
  title = f"{name}: test metrics per strategy configuration and target"
  names = ("runs.csv", "timing.csv", "table.md", "table.tex", "accuracy.png")
  parent = os.path.dirname(os.path.abspath(out_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix=f".tmp-{os.path.basename(out_dir)}-")
  try:
    io.write_text(os.path.join(tmp, "runs.csv"), runs_csv(finals, axes))
    io.write_text(os.path.join(tmp, "timing.csv"), runs_csv(finals, axes, TIMING_COLUMNS))
    io.write_text(os.path.join(tmp, "table.md"),
                  table_markdown(finals, axes, labels, title, reference))
    io.write_text(os.path.join(tmp, "table.tex"), table_latex(finals, axes, labels))
    plot(finals, axes, labels, os.path.join(tmp, "accuracy.png"), title)
    io.replace_dir(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return [os.path.join(out_dir, n) for n in names]

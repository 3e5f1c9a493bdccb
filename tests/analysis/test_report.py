import csv
import io

from tlresearch.analysis import report


def _finals():
  out = []
  for target in ("a", "b"):
    for strategy, acc in (("full", 0.8), ("linear_probe", 0.6)):
      for seed in range(3):
        out.append({"cell_id": f"{strategy}-{target}-{seed}",
                    "axes": {"strategy": strategy, "target": target, "seed": seed},
                    "status": "ok", "test_accuracy": acc + 0.01 * seed,
                    "test_macro_f1": acc, "best_epoch": 1, "epochs_run": 2,
                    "trainable_params": 10 if strategy == "linear_probe" else 100,
                    "wall_seconds": 1.0, "compile_seconds": 0.5})
  return out


def test_table_has_mean_ci_and_paired_difference():
  axes = ["strategy", "target", "seed"]
  md = report.table_markdown(_finals(), axes, {}, "t", reference=("full",))
  assert "| full | 81.0 ± 2.5 | 81.0 ± 2.5 | 100 / 100 |" in md
  assert "| linear_probe | 61.0 ± 2.5 | 61.0 ± 2.5 | 10 / 10 |" in md
  # Same seed offsets in both rows: the paired difference is exact, with zero width, and
  # the probe loses on every seed.
  assert "| linear_probe | -20.0 [-20.0, -20.0] P=0.00 | -20.0 [-20.0, -20.0] P=0.00 |" in md
  # Per-configuration statistics: n, mean, std, t CI.
  assert "| full | a | 3 | 81.0 | 1.0 | [78.5, 83.5] |" in md


def test_failed_cells_are_marked_not_averaged():
  finals = _finals()
  finals[0]["status"], finals[0]["test_accuracy"] = "diverged", float("nan")
  md = report.table_markdown(finals, ["strategy", "target", "seed"], {}, "t")
  assert "(1 diverged)" in md and "nan" not in md


def test_runs_csv_one_row_per_cell():
  rows = list(csv.DictReader(io.StringIO(report.runs_csv(_finals(), ["strategy", "target", "seed"]))))
  assert len(rows) == 12 and rows[0]["strategy"] == "full" and rows[0]["test_accuracy"] == "0.8"


def test_metric_definitions_set_name_unit_and_digits():
  """report.METRICS drives headings, values and differences; a field not in it is a fraction
  named by its key."""
  finals = _finals()
  for f in finals:
    f["score"] = f["test_accuracy"]
    f["epochs_run"] += 10 * f["axes"]["seed"]
  md = report.table_markdown(finals, ["strategy", "target", "seed"], {}, "t",
                             reference=("full",), metrics=["epochs_run", "score"])
  assert "## epochs run, mean ± 95% CI over 3 seeds" in md  # shown as is: no "(%)"
  assert "| full | 12 ± 24.8 | 12 ± 24.8 | 100 / 100 |" in md  # 3 significant digits
  assert "## score (%), mean ± 95% CI" in md and "| full | 81.0 ± 2.5 |" in md
  assert "(strategy=full), epochs run: mean" in md and "(strategy=full), score points: mean" in md

"""Verdict rules and hyperparameter selection, on synthetic cell results."""
import numpy as np
import pytest

from experiments import _common
from tlresearch import cell as cell_lib
from tlresearch import findings, grid, selection
from tlresearch.errors import UserError


def _finals(gains, strategy="a", ref="b", base=0.7, spread=0.05, metric="test_accuracy"):
  """Cells of strategies `ref` and `strategy` where strategy = ref + gains[seed]."""
  rng = np.random.default_rng(0)
  out = []
  for seed, g in enumerate(gains):
    b = base + spread * rng.standard_normal()
    for name, v in ((ref, b), (strategy, b + g)):
      out.append({"axes": {"strategy": name, "target": "t", "seed": seed}, "status": "ok",
                  metric: v})
  return out


A, B = {"strategy": "a"}, {"strategy": "b"}


@pytest.mark.parametrize("gains, status", [
    ([0.02, 0.03, 0.01, 0.02, 0.04], findings.REPRODUCED),
    ([0.05, -0.04, 0.03, -0.02, 0.01], findings.PARTLY),   # mean +0.006, CI reaches below 0
    ([-0.02, -0.03, -0.01, -0.02, -0.04], findings.NOT),
    ([0.02, 0.03, 0.01], findings.INCONCLUSIVE),            # fewer than 5 seeds
])
def test_better_verdicts_follow_the_paired_interval(gains, status):
  v = findings.better(findings.Results(_finals(gains)), A, B, "a", "b")
  assert v.status == status, v.evidence
  assert "P(improvement)" in v.evidence[0]


def test_not_worse_uses_the_margin():
  r = findings.Results(_finals([-0.004, -0.002, -0.003, -0.001, -0.005]))
  assert findings.not_worse(r, A, B, "a", "b", margin=0.01).status == findings.REPRODUCED
  assert findings.not_worse(r, A, B, "a", "b", margin=0.001).status == findings.NOT
  assert findings.better(r, A, B, "a", "b").status == findings.NOT


def test_missing_configuration_is_inconclusive_and_ambiguous_rule_raises():
  r = findings.Results(_finals([0.01] * 5))
  assert findings.better(r, {"strategy": "zzz"}, B, "z", "b").status == findings.INCONCLUSIVE
  with pytest.raises(ValueError, match="matches 2 configurations"):
    r.values({"target": "t"})


def test_combine():
  v = lambda s: findings.Verdict(s, ("x",))
  R, P, N, I = findings.REPRODUCED, findings.PARTLY, findings.NOT, findings.INCONCLUSIVE
  assert findings.combine([v(R), v(R)]).status == R
  assert findings.combine([v(R), v(N)]).status == P
  assert findings.combine([v(N), v(N)]).status == N
  assert findings.combine([v(P), v(N)]).status == P
  assert findings.combine([v(I), v(I)]).status == I
  assert findings.combine([v(R), v(I)]).status == P  # not all comparisons could be made


def test_markdown_states_claim_numbers_verdict_and_command():
  spec = findings.Findings("Someone 2020.", (
      findings.Claim("a beats b.", lambda r: findings.better(r, A, B, "a", "b")),
      findings.Claim("bad rule.", lambda r: findings.better(r, {"target": "t"}, B, "x", "b"))))
  md = findings.markdown("exp", spec, findings.Results(_finals([0.02, 0.03, 0.01, 0.02, 0.04])),
                         "python -m tlresearch.run --experiment=exp", [])
  assert "## Claim 1: a beats b." in md and "Verdict: **reproduced**" in md
  assert "rule error" in md and "Overall verdict: **partly reproduced**" in md
  assert "python -m tlresearch.run --experiment=exp" in md
  assert "a - b: +2.4 points [" in md


def test_evidence_follows_the_metric_definition():
  r = findings.Results(_finals([0.002] * 5, base=0.01, spread=0.001, metric="feature_change"))
  (text,) = findings.not_worse(r, A, B, "a", "b", 0.001, "feature_change").evidence
  assert text.startswith("a - b: +0.002 [+0.002, +0.002], P(improvement) = 1.00")  # as is
  assert text.endswith("(margin 0.001)")  # no "points": not a percentage


def _sel_config():
  c = _common.sweep(targets=["digits"], seeds=[0, 1])
  c.grid = [{"strategy": ["linear_probe", "full"]}]
  c.selection.lr = [0.01, 0.1]
  c.selection.weight_decay = [0.0, 5e-4]
  c.selection.seeds = [100, 101]
  return c


def test_selection_expands_chooses_on_validation_and_applies():
  config = _sel_config()
  cells = grid.expand(config)
  sel = selection.expand(config, cells)
  assert len(sel) == 2 * 4 * 2  # configurations x (lr, wd) x selection seeds
  assert {c.config.seed for c in sel} == {100, 101}
  assert all(c.config.train.lr == c.axes["train.lr"] for c in sel)

  def val(c):  # probe prefers lr 0.1 + wd 0, full prefers lr 0.01 + wd 5e-4; test says opposite
    good = ((c.axes["strategy"] == "linear_probe")
            == (c.axes["train.lr"] == 0.1 and c.axes["train.weight_decay"] == 0.0))
    if c.axes["strategy"] == "full":
      good = c.axes["train.lr"] == 0.01 and c.axes["train.weight_decay"] == 5e-4
    return {"status": "ok", "val_accuracy": 0.9 if good else 0.5,
            "test_accuracy": 0.1 if good else 0.99}

  chosen = selection.choose(config, sel, [val(c) for c in sel])
  final = selection.apply(cells, chosen)
  by = {(c.axes["strategy"], c.axes["seed"]): c for c in final}
  assert by[("linear_probe", 0)].config.train.lr == 0.1
  assert by[("linear_probe", 1)].config.train.weight_decay == 0.0
  assert by[("full", 0)].config.train.lr == 0.01
  assert by[("full", 0)].config.train.weight_decay == 5e-4
  assert [c.id for c in final] == [c.id for c in cells]  # ids and axes unchanged
  assert selection.expand(_common.sweep(selection=_common.selection(False)), cells) == []
  config.grid = [{"strategy": ["full"], "train.lr": [0.1]}]
  with pytest.raises(UserError, match="remove them from config.grid"):
    selection.expand(config, grid.expand(config))


def test_check_rejects_frozen_fresh_head_and_bad_values():
  config = _sel_config()
  (cell,) = [c for c in grid.expand(config) if c.axes["strategy"] == "full"][:1]
  cfg = cell.config
  cfg.strategy = "surgical:group=stage1"
  with pytest.raises(UserError, match="never trains the head"):
    cell_lib.check(cfg)
  cfg.pretrained_head = True
  cell_lib.check(cfg)
  cfg.train.bn_stats = "sometimes"
  with pytest.raises(UserError, match="train.bn_stats must be one of frozen, update"):
    cell_lib.check(cfg)
  cfg.train.bn_stats = "frozen"
  cfg.probes = ["nope"]
  with pytest.raises(UserError, match="unknown probe"):
    cell_lib.check(cfg)

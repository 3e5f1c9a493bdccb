"""Verdict rules and hyperparameter selection, on synthetic cell results."""
import numpy as np
import pytest

from tlresearch.core import schema
from tlresearch.analysis import findings
from tlresearch.core.errors import UserError
from tlresearch.experiment import cell as cell_lib, grid, selection


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
    ([0.05, -0.04, 0.03, -0.02, 0.01], findings.PARTLY),   # mean +0.006, t CI reaches below 0
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


def _cmp(mean, p, n=5):
  return findings.Comparison(f"mean {mean} p {p}", n, mean, p)


def test_combine_aggregates_the_decided_comparisons():
  R, P, N, I = findings.REPRODUCED, findings.PARTLY, findings.NOT, findings.INCONCLUSIVE
  v = lambda *cs: findings.decide(cs)
  sig, weak, wrong, few = _cmp(0.02, 0.001), _cmp(0.01, 0.3), _cmp(-0.02, 0.001), _cmp(0.02, 0.01, 3)
  assert v(sig).status == R and v(weak).status == P and v(wrong).status == N
  assert v(few).status == I and "fewer than 5 seeds" in v(few).evidence[0]
  assert findings.combine([v(sig), v(sig)]).status == R
  assert findings.combine([v(sig), v(wrong)]).status == P
  assert findings.combine([v(wrong), v(wrong)]).status == N
  assert findings.combine([v(weak), v(wrong)]).status == P
  assert findings.combine([v(few), v(few)]).status == I
  assert findings.combine([v(sig), v(few)]).status == P  # not all comparisons could be made


def test_combine_adjusts_a_claims_comparisons_with_holm():
  # Each p = 0.03 is significant alone; three together, Holm multiplies the smallest by 3
  # (0.09): none survives, so the claim is only partly reproduced.
  alone = [findings.decide([_cmp(0.02, 0.03)]) for _ in range(3)]
  assert all(v.status == findings.REPRODUCED for v in alone)
  together = findings.combine(alone)
  assert together.status == findings.PARTLY
  assert all("Holm-adjusted p = 0.09 (3 comparisons)" in e for e in together.evidence)
  # A strong comparison survives the adjustment, a weak one beside it does not.
  mixed = findings.combine([findings.decide([_cmp(0.05, 0.001)]),
                            findings.decide([_cmp(0.01, 0.04)])])
  assert [e.split("Holm-adjusted p = ")[1].split(" ")[0] for e in mixed.evidence] == ["0.002",
                                                                                      "0.04"]
  assert mixed.status == findings.REPRODUCED
  # ... unless a third comparison joins (0.04 x 2 = 0.08 after 0.001 x 3 and 0.03 x 2).
  three = findings.combine([mixed, findings.decide([_cmp(0.02, 0.03)])])
  assert three.status == findings.PARTLY


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
  assert "(margin 0.001), p = " in text  # no "points": not a percentage


def _sel_config():
  c = schema.sweep(targets=["digits"], seeds=[0, 1])
  c.grid = [{"strategy": ["linear_probe", "full"]}]
  c.selection.lr = [0.01, 0.1]
  c.selection.weight_decay = [0.0, 5e-4]
  c.selection.seeds = [100, 101]
  return c


def _val(c):
  """Fake scores: the SGD probe prefers lr 0.1 + wd 0, full lr 0.01 + wd 5e-4 (anything
  else, widened values included, scores lower); test says the opposite."""
  good = ((c.axes["strategy"] == "linear_probe")
          == (c.axes["train.lr"] == 0.1 and c.axes["train.weight_decay"] == 0.0))
  if c.axes["strategy"] == "full":
    good = c.axes["train.lr"] == 0.01 and c.axes["train.weight_decay"] == 5e-4
  return {"status": "ok", "val_accuracy": 0.9 if good else 0.5,
          "test_accuracy": 0.1 if good else 0.99}


def test_selection_expands_chooses_on_validation_and_applies():
  config = _sel_config()
  config.train.probe_solver = "sgd"  # the SGD probe has an lr to select
  config.selection.widen = 0
  cells = grid.expand(config)
  sel = selection.first_round(config, cells)
  assert len(sel) == 2 * 4 * 2  # configurations x (lr, wd) x selection seeds
  assert {c.config.seed for c in sel} == {100, 101}
  assert all(c.config.train.lr == c.axes["train.lr"] for c in sel)
  rounds = []
  final, outcome = selection.run(config, cells,
                                 lambda cs, i: rounds.append(cs) or [_val(c) for c in cs])
  assert [c.id for c in rounds[0]] == [c.id for c in sel]
  by = {(c.axes["strategy"], c.axes["seed"]): c for c in final}
  assert by[("linear_probe", 0)].config.train.lr == 0.1
  assert by[("linear_probe", 1)].config.train.weight_decay == 0.0
  assert by[("full", 0)].config.train.lr == 0.01
  assert by[("full", 0)].config.train.weight_decay == 5e-4
  assert [c.id for c in final] == [c.id for c in cells]  # ids and axes unchanged
  assert outcome.cells == len(sel) and len(outcome.table.splitlines()) == len(sel) + 1
  off = schema.sweep(selection=schema.selection(False))
  assert selection.first_round(off, cells) == [] and selection.run(off, cells, None)[1] is None
  config.grid = [{"strategy": ["full"], "train.lr": [0.1]}]
  with pytest.raises(UserError, match="remove them from config.grid"):
    selection.first_round(config, grid.expand(config))


def test_selection_widens_a_grid_whose_winner_is_at_its_edge():
  config = _sel_config()
  config.train.probe_solver = "sgd"
  config.selection.widen = 2
  cells = grid.expand(config)

  def select(score):
    rounds = []
    final, outcome = selection.run(config, cells,
                                   lambda cs, i: rounds.append(cs) or [score(c) for c in cs])
    lrs = [sorted({(c.axes["strategy"], c.axes["train.lr"]) for c in r}) for r in rounds]
    chosen = {c.axes["strategy"]: c.config.train.lr for c in final}
    assert outcome.cells == sum(len(r) for r in rounds)
    return lrs, chosen, outcome.at_edge

  # Both winners sit at an edge of [0.01, 0.1] (the probe above, full below): one lr past
  # each edge at the grid's own ratio; both lose, so the winners are inside: not flagged.
  lrs, chosen, at_edge = select(_val)
  assert lrs[1:] == [[("full", 0.001), ("linear_probe", 1.0)]]
  assert chosen == {"full": 0.01, "linear_probe": 0.1} and not at_edge

  def monotone(c):  # the probe always prefers a larger lr, full a smaller one
    lr = c.axes["train.lr"]
    return {"status": "ok", "val_accuracy": 0.5 + (lr if c.axes["strategy"] == "linear_probe"
                                                   else -lr) / 100}

  lrs, chosen, at_edge = select(monotone)
  assert lrs[1:] == [[("full", 0.001), ("linear_probe", 1.0)],
                     [("full", 0.0001), ("linear_probe", 10.0)]]
  assert chosen == {"full": 0.0001, "linear_probe": 10.0} and len(at_edge) == 2  # widen=2 spent

  def better_beyond(c):  # full's score improves below 0.01 down to 0.001, then falls
    v = _val(c)
    if c.axes["strategy"] == "full" and c.axes["train.weight_decay"] == 5e-4:
      v["val_accuracy"] = {0.001: 0.95}.get(c.axes["train.lr"], v["val_accuracy"])
    return v

  lrs, chosen, at_edge = select(better_beyond)
  assert ("full", 0.0001) in lrs[2] and chosen["full"] == 0.001 and not at_edge


def test_selection_skips_the_converged_probe():
  """A converged probe chooses its own L2 on validation and has no lr: no selection cells."""
  config = _sel_config()
  cells = grid.expand(config)
  sel = selection.first_round(config, cells)
  assert sel and {c.axes["strategy"] for c in sel} == {"full"}
  final, outcome = selection.run(config, cells, lambda cs, i: [_val(c) for c in cs])
  probe_cells = [c for c in final if c.axes["strategy"] == "linear_probe"]
  assert probe_cells and all(c.config.train.lr == config.train.lr for c in probe_cells)


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


@pytest.mark.parametrize("gains, shown", [([0.02, 0.03, 0.01, 0.02, 0.04], False),
                                          ([-0.02, -0.03, -0.01, -0.02, -0.04], True)])
def test_a_claims_reading_is_shown_only_while_it_is_not_reproduced(gains, shown):
  claim = findings.Claim("a beats b", lambda r: findings.better(r, A, B, "a", "b"),
                         reading="why it fails here")
  spec = findings.Findings(paper="p", claims=(claim,))
  text = findings.markdown("x", spec, findings.Results(_finals(gains)), "cmd", [])
  assert ("Our reading: why it fails here" in text) is shown

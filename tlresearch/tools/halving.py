"""Would successive halving pick what the exhaustive selection grid picked? One JSON line.

    python -m tlresearch.tools.halving --workdir=W [--seeds=100] [--rungs=0.25,0.5] [--keep=0.5]

Reads the selection cells of a finished sweep's cell store (`W/cells/`: the cells whose seed
is a selection seed) and replays successive halving on their recorded validation curves:
at each rung (a fraction of the epoch budget) only the best `keep` fraction of a
configuration's candidates goes on, ranked by the best validation accuracy so far (what
early stopping would return if the run ended there). Survivors keep the schedule of the
whole budget, so their curves, and their final scores, are exactly the recorded ones: the
replay is exact for them, and halving picks differently only where the exhaustive winner
was cut at a rung. Fields: configurations (with >= 2 candidates), agree, agree_fraction,
epochs (run by the exhaustive grid, and what halving would have run), disagreements (each
configuration where the picks differ: its label, both picks and their final validation).

The candidate set is the one the exhaustive selection ended with, widening included; a
halving selection could widen differently, which this replay does not model.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys

from tlresearch.core import io
from tlresearch.core.errors import UserError, exit_with

USAGE = ("usage: python -m tlresearch.tools.halving --workdir=W [--seeds=100] "
         "[--rungs=0.25,0.5] [--keep=0.5]")
CHOSEN = ("train.lr", "train.weight_decay")


def _parse(argv: list[str]) -> dict:
  opts = {"workdir": None, "seeds": "100", "rungs": "0.25,0.5", "keep": "0.5"}
  for arg in argv:
    key, eq, value = arg.lstrip("-").partition("=")
    if not arg.startswith("--") or not eq or key not in opts:
      raise UserError(f"unexpected argument '{arg}'; {USAGE}")
    opts[key] = value
  if not opts["workdir"] or not os.path.isdir(os.path.join(opts["workdir"], "cells")):
    raise UserError(f"--workdir must be a sweep's workdir (with cells/); {USAGE}")
  try:
    seeds = {int(s) for s in opts["seeds"].split(",")}
    rungs = sorted(float(r) for r in opts["rungs"].split(","))
    keep = float(opts["keep"])
  except ValueError:
    raise UserError(f"--seeds takes integers, --rungs and --keep numbers; {USAGE}") from None
  if not all(0 < r < 1 for r in rungs) or not 0 < keep < 1:
    raise UserError(f"--rungs and --keep must be in (0, 1), got {rungs} and {keep}")
  return {"workdir": opts["workdir"], "seeds": seeds, "rungs": rungs, "keep": keep}


def candidates(workdir: str, seeds: set) -> dict:
  """configuration label -> {(lr, wd): [(epochs_run, val curve, final val) per seed]}, from
  the finished selection cells (folders moved aside, `.stale-N`, are not cells)."""
  out = {}
  cells = os.path.join(workdir, "cells")
  for name in sorted(os.listdir(cells)):
    d = os.path.join(cells, name)
    if ".stale-" in name or not os.path.exists(os.path.join(d, "final.json")):
      continue
    saved, final = io.read_json(os.path.join(d, "config.json")), io.read_json(
        os.path.join(d, "final.json"))
    cfg = saved["config"]
    if cfg["seed"] not in seeds or final.get("status") != "ok":
      continue
    train = dict(cfg["train"])
    chosen = (train.pop("lr"), train.pop("weight_decay"))
    rest = {**cfg, "train": train, "seed": None}
    label = (f"{cfg['target']} {cfg['strategy']} epochs={train['epochs']} "
             f"augment={train.get('augment', {}).get('enabled', False)}")
    # Two configurations may share a label (another head, say): the whole config decides.
    digest = hashlib.sha256(json.dumps(rest, sort_keys=True, default=str).encode()).hexdigest()
    key = f"{label} [{digest[:8]}]"
    curve = [r["val_accuracy"] for r in io.read_jsonl(os.path.join(d, "metrics.jsonl"))
             if r.get("val_accuracy") is not None]
    out.setdefault(key, {}).setdefault(chosen, []).append(
        (final["epochs_run"], curve, final["val_accuracy"], int(train["epochs"])))
  return out


def _mean(xs) -> float:
  return sum(xs) / len(xs)


def replay(cands: dict, rungs: list[float], keep: float) -> tuple[tuple, tuple, int, int]:
  """(exhaustive pick, halving pick, epochs exhaustive, epochs halving) for one
  configuration's candidates. Ties go to the smaller lr (then weight decay) in both."""
  order = sorted(cands)
  final = {c: _mean([s[2] for s in cands[c]]) for c in order}
  exhaustive = max(order, key=lambda c: (final[c], -order.index(c)))
  budget = max(s[3] for c in order for s in cands[c])
  alive, stopped_at = list(order), {}
  for rung in rungs:
    epoch = max(1, round(rung * budget))
    score = {c: _mean([max(s[1][:epoch], default=0.0) for s in cands[c]]) for c in alive}
    n = max(1, math.ceil(len(alive) * keep))
    ranked = sorted(alive, key=lambda c: (-score[c], order.index(c)))
    for c in ranked[n:]:
      stopped_at[c] = epoch
    alive = [c for c in order if c in ranked[:n]]
  halving = max(alive, key=lambda c: (final[c], -order.index(c)))
  spent = sum(s[0] for c in order for s in cands[c])
  saved = sum(min(s[0], stopped_at.get(c, s[0])) for c in order for s in cands[c])
  return exhaustive, halving, spent, saved


def main(argv: list[str]) -> int:
  if "--help" in argv:
    print(__doc__)
    return 0
  opts = _parse(argv)
  found = {k: v for k, v in candidates(opts["workdir"], opts["seeds"]).items() if len(v) > 1}
  if not found:
    raise UserError(f"{opts['workdir']}: no configuration with >= 2 finished selection cells "
                    f"under seeds {sorted(opts['seeds'])}")
  agree, spent, saved, disagreements = 0, 0, 0, []
  for label, cands in sorted(found.items()):
    exhaustive, halving, s, h = replay(cands, opts["rungs"], opts["keep"])
    spent, saved = spent + s, saved + h
    if exhaustive == halving:
      agree += 1
      continue
    disagreements.append({
        "configuration": label, "exhaustive": list(exhaustive), "halving": list(halving),
        "val_exhaustive": round(_mean([x[2] for x in cands[exhaustive]]), 6),
        "val_halving": round(_mean([x[2] for x in cands[halving]]), 6)})
  print(json.dumps({"configurations": len(found), "agree": agree,
                    "agree_fraction": round(agree / len(found), 4), "rungs": opts["rungs"],
                    "keep": opts["keep"], "epochs": {"exhaustive": spent, "halving": saved},
                    "disagreements": disagreements}))
  return 0


if __name__ == "__main__":
  exit_with(main)

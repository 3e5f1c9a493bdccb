"""The compute floor of a finished sweep on this machine, printed as one JSON line.

    python -m tlresearch.tools.floor --workdir=W [--target=glyphs_input_shift]

A lower bound on any implementation's wall time for the same cells on the same hardware:
the images that the cells' full-network train steps and whole-network evaluations had to
process (counted from W's `final.json` files), divided by the best rates this machine
reaches for that step and that forward pass. Everything else (cells that train on cached
features, the converged probe, compiling, start-up, reports) counts as zero, so the true
floor is higher.

Rates: the default ResNet's `full` train step and inference forward pass on `--target`'s
data, measured in new processes in four layouts of the machine's first two cores:
  one_process_all_threads     one process, XLA's thread pool over both cores
  one_process_one_thread      one process held to one core, single-threaded
  two_processes_all_threads   two such processes at once (how `config.workers` runs)
  two_processes_one_thread    two single-threaded processes, one per core (different float
                              bits from the others: see docs/performance.md)
Fields: images (train/eval, full-network and other cells), rates (images/s per layout:
each process's, and their sum), floor_seconds per layout (train + eval images / the
layout's summed rates).
"""
from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys

USAGE = "usage: python -m tlresearch.tools.floor --workdir=W [--target=NAME]"
SINGLE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
LAYOUTS = {"one_process_all_threads": [None], "one_process_one_thread": [0],
           "two_processes_all_threads": [None, None], "two_processes_one_thread": [0, 1]}


def _parse(argv: list[str]) -> dict:
  from tlresearch.core.errors import UserError
  opts = {"workdir": None, "target": "glyphs_input_shift"}
  for arg in argv:
    key, _, value = arg.partition("=")
    if key.lstrip("-") not in opts or not key.startswith("--") or not value:
      raise UserError(f"unknown argument '{arg}'; {USAGE}")
    opts[key[2:]] = value
  if opts["workdir"] is None:
    raise UserError(f"--workdir=W is required; {USAGE}")
  if not glob.glob(os.path.join(opts["workdir"], "**", "final.json"), recursive=True):
    raise UserError(f"no finished cell (final.json) under {opts['workdir']}")
  return opts


def count_images(finals: list[dict], split_sizes: dict[str, tuple[int, int]],
                 batch_size: int) -> dict:
  """Images processed by the cells: train-step images (epochs run x steps x batch) and
  evaluation images (validation after every epoch, final validation, test), split into
  full-network cells (every parameter trainable: the whole network runs forward and
  backward each step) and the others. `split_sizes[target]` = (validation, test) size."""
  out = {k: {"train": 0, "eval": 0, "cells": 0} for k in ("full_network", "other")}
  for f in finals:
    n, epochs = f["train_examples"], f["epochs_run"]
    batch = min(batch_size, n)
    n_val, n_test = split_sizes[f["target"]]
    kind = "full_network" if f["trainable_params"] == f["total_params"] else "other"
    out[kind]["cells"] += 1
    out[kind]["train"] += epochs * math.ceil(n / batch) * batch
    out[kind]["eval"] += (epochs + 1) * n_val + n_test
  return out


def floor_seconds(images: dict, rates: dict) -> dict:
  """Seconds the full-network images take at each layout's summed rates."""
  full = images["full_network"]
  return {layout: full["train"] / r["train_total"] + full["eval"] / r["eval_total"]
          for layout, r in rates.items()}


def _rate_worker(target: str) -> None:
  """Prints {"train", "eval"} images/s of the `full` step and the eval forward pass."""
  import time
  import jax
  import jax.numpy as jnp
  from tlresearch.tools import rates
  from tlresearch.training import programs
  cfg = rates.default_cell("full").config
  with cfg.unlocked():
    cfg.target = target
  ds, model, _, variables = rates.pretrained_model(cfg)
  rates.images_per_s(model, variables, "full", ds, cfg.train, cached=False, epochs=1)
  train = max(rates.images_per_s(model, variables, "full", ds, cfg.train, cached=False,
                                  epochs=10) for _ in range(2))
  x, y = jnp.asarray(ds.val_x), jnp.asarray(ds.val_y)
  spec = programs.EvalSpec(model, None)
  jax.block_until_ready(programs._evaluate_jit(spec, variables, x, y))
  t0 = time.perf_counter()
  for _ in range(40):
    out = programs._evaluate_jit(spec, variables, x, y)
  jax.block_until_ready(out)
  print(json.dumps({"train": train, "eval": 40 * len(x) / (time.perf_counter() - t0)}))


def _rates(target: str, cores: list) -> dict:
  """Each process's rates, the processes started together (i: held to the i-th core this
  process may use, and single-threaded; None: every core, XLA's own pool)."""
  code = f"from tlresearch.tools import floor; floor._rate_worker({target!r})"
  procs = []
  for core in cores:
    env = dict(os.environ)
    if core is not None:
      env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + SINGLE_THREAD).strip()
    pin = None
    if core is not None:
      from tlresearch.core import layout
      cpu = layout.cores()[core]
      pin = lambda c=cpu: os.sched_setaffinity(0, {c})  # noqa: E731 - run in the child
    procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, preexec_fn=pin,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  each = []
  for p in procs:
    out, err = p.communicate()
    if p.returncode != 0:
      raise RuntimeError(f"rate worker failed:\n{err[-2000:]}")
    each.append(json.loads(out.strip().splitlines()[-1]))
  return {"each": each, "train_total": sum(e["train"] for e in each),
          "eval_total": sum(e["eval"] for e in each)}


def _images(workdir: str) -> tuple[int, dict]:
  """(finished cells, `count_images` of them) under `workdir`."""
  from tlresearch.tools import rates
  from tlresearch.core import io
  from tlresearch import data as data_lib
  # A cell folder moved aside (`<cell>.stale-N`, tlresearch.experiment.cell.set_aside) is
  # not one of the workdir's cells.
  finals = [f for f in (io.read_json(p) for p in
                        glob.glob(os.path.join(workdir, "**", "final.json"), recursive=True)
                        if ".stale-" not in os.path.basename(os.path.dirname(p)))
            if f.get("status") == "ok"]
  sizes = {}
  for name in sorted({f["target"] for f in finals}):
    ds = data_lib.load(name)
    sizes[name] = (len(ds.val_y), len(ds.test_y))
  batch = int(rates.default_cell("full").config.train.batch_size)
  return len(finals), count_images(finals, sizes, batch)


def measure(workdir: str, target: str) -> dict:
  from tlresearch.core import layout
  cells, images = _images(workdir)
  rates = {name: _rates(target, cores) for name, cores in LAYOUTS.items()
           if len(cores) <= len(layout.cores())}
  return {"workdir": workdir, "cells": cells, "rate_target": target, "images": images,
          "rates": rates, "floor_seconds": floor_seconds(images, rates)}


def layout_floor(workdir: str, threads: int, workers: int,
                 target: str = "glyphs_input_shift") -> dict:
  """The floor of the cells in `workdir` in one layout: `workers` processes with `threads`
  threads each (1: one per core; 0: XLA's pool over every core)."""
  name = (f"{'one_process' if workers == 1 else 'two_processes'}_"
          f"{'one_thread' if threads == 1 else 'all_threads'}")
  if name not in LAYOUTS:
    raise ValueError(f"no floor layout for {workers} workers x {threads} threads")
  _, images = _images(workdir)
  rates = {name: _rates(target, LAYOUTS[name])}
  return {"layout": name, "seconds": floor_seconds(images, rates)[name]}


def main(argv: list[str]) -> int:
  opts = _parse(argv)
  print(json.dumps(measure(opts["workdir"], opts["target"])))
  return 0


if __name__ == "__main__":
  from tlresearch.core.errors import exit_with
  exit_with(main)

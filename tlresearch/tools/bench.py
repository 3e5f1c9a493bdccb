"""Speed of the default benchmark on this machine, printed as one JSON line.

    python -m tlresearch.tools.bench [--skip_sweep] [--baseline]

Fields (wall-clock seconds; images/s of a compiled, warmed-up train step over the k-shot
training set of the default `finetune_sweep` cell, digits target, seed 0):
  device, device_count, jax
  layout                               the execution layout this process measures in: the
                                       default `config.threads` (tlresearch.core.layout)
  train_images_per_s.full              every group trainable, the whole network each step
  train_images_per_s.partial:k=1       the last group and the head, on the cached outputs of
                                       the frozen groups below
  train_images_per_s.linear_probe      head only by SGD (train.probe_solver=sgd), on features
                                       computed once
  train_images_per_s.linear_probe_uncached  the same, the frozen backbone run every step
  machine_train_images_per_s           the same steps in as many processes as the default
                                       layout trains in at once (one per core), started
                                       together, each the best of 3 x 10 epochs: `each`
                                       process's rates and their `total`, the machine's
  linear_probe_cell                    one warm linear-probe cell (`cell.run`): its seconds,
                                       one forward pass of the backbone over its data
                                       (train + validation + test), the converged probe's
                                       whole L2 path on the cached features
                                       (probe_path_seconds), and the ratios cell / forward
                                       and cell / (forward + path)
  compile_seconds_per_cell.cold/warm   a linear_probe and a full cell in a new process, with an
                                       empty and then a filled persistent compilation cache
  vmap_seeds                           3 seeds in one vmapped program vs a loop (images/s)
  sweep                                the warm default finetune_sweep, every cell retrained
                                       (--overwrite) in a new process with the project cache
                                       (pretrained backbone, compilation cache):
    seconds                              its wall time, from the command to its exit
    workers                              processes that trained cells (config.workers)
    startup                              interpreter start and imports, before the sweep
    cells, epochs                        final and selection cells trained, epochs they ran
    process_seconds                      train, eval, compile, probe, data and other (every
                                         other phase but wait), summed over the processes
    floor_seconds, floor_ratio           the compute floor of those cells in the sweep's own
                                         layout (tlresearch.tools.floor) and seconds / floor
    phases                               seconds per phase (tlresearch.core.timing), summed over
                                         the sweep's process and its workers: check (configs,
                                         datasets), backbone, data, init (model, strategy, start
                                         variables), compile (tracing, lowering, XLA compile or
                                         cache load), prefix (frozen prefixes' outputs), probe
                                         (converged probe), train (steps), eval (validation
                                         each epoch, final validation and test), record
                                         (metrics, reports), files, wait (the sweep's process
                                         waiting for its workers), report (tables and plots)
    cpu_seconds, idle_cpu_share          CPU time of all processes; 1 - cpu / (wall x cores)
  baseline_sweep_seconds (--baseline)  the same sweep without this project's speed-ups:
                                       one process, frozen prefixes run every step, every cell
                                       compiles its own programs (`jax.clear_caches()` before
                                       each), no persistent compilation cache

Nothing is written to results/: the sweeps run in a temporary workdir and results folder.
The pretrained backbone comes from the project cache (built there if missing).
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import tempfile
import time

from tlresearch.tools import rates

USAGE = "usage: python -m tlresearch.tools.bench [--skip_sweep] [--baseline]"
FLAGS = ("--skip_sweep", "--baseline")


def _parse(argv: list[str]) -> set[str]:
  from tlresearch.core.errors import UserError, choices
  for arg in argv:
    if arg not in FLAGS:
      raise UserError(f"unknown argument '{arg}'; valid: {choices(FLAGS)}")
  return set(argv)


def train_rates(model, variables, data, cfg, epochs: int = 3) -> dict:
  rate = lambda name, cached: rates.images_per_s(model, variables, name, data, cfg, cached, epochs)
  return {"full": rate("full", False), "partial:k=1": rate("partial:k=1", True),
          "linear_probe": rate("linear_probe", True),
          "linear_probe_uncached": rate("linear_probe", False)}


def _rate_process(threads: int, slot: int) -> None:
  """One process of `machine_rates`: held to its share of the cores, prints its rates."""
  from tlresearch.core import layout
  layout.pin(threads, slot)
  ds, model, _, variables = rates.pretrained_model(rates.default_cell("full").config)
  cfg = rates.default_cell("full").config.train
  train_rates(model, variables, ds, cfg, epochs=1)  # compiles
  best = {}
  for _ in range(3):
    for k, v in train_rates(model, variables, ds, cfg, epochs=10).items():
      best[k] = max(best.get(k, 0.0), v)
  print(json.dumps(best))


def machine_rates(threads: int) -> dict:
  """The machine's train-step images/s in the layout of `config.threads`: one process per
  share of the cores (each as a sweep's worker is held), started together, each timing the
  same steps; `each` process's rates and their `total`."""
  from tlresearch.core import layout
  machine = layout.cores()
  n = 1 if threads == layout.ALL else max(1, len(machine) // threads)
  env = {**os.environ, layout.CORES_ENV: ",".join(map(str, machine))}
  procs = [subprocess.Popen([sys.executable, "-c", "from tlresearch.tools import bench; "
                             f"bench._rate_process({threads}, {i})"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(n)]
  each = []
  for p in procs:
    out, err = p.communicate()
    if p.returncode != 0:
      raise RuntimeError(f"rate process failed:\n{err[-2000:]}")
    each.append(json.loads(out.strip().splitlines()[-1]))
  return {"processes": n, "each": each,
          "total": {k: sum(e[k] for e in each) for k in each[0]}}


def probe_path_seconds(model, variables, ds) -> float:
  """What a probe cell's training costs once the features exist: the converged probe's
  whole L2 path (tlresearch.methods.probe.solve) on the cached features, warm."""
  import jax.numpy as jnp
  from tlresearch.methods import probe
  from tlresearch.training import programs
  stop = model.groups[-2]
  x, vx = (rates.block(programs.prefix_outputs(model, variables, jnp.asarray(a), stop))
           for a in (ds.train_x, ds.val_x))
  probe.solve(model, variables, x, ds.train_y, vx, ds.val_y)  # compiles
  t0 = time.perf_counter()
  rates.block(probe.solve(model, variables, x, ds.train_y, vx, ds.val_y)[0])
  return time.perf_counter() - t0


def linear_probe_cell(cell, pretrained, ds, model) -> dict:
  """A warm linear-probe cell against one forward pass of the backbone over its data plus
  its head training on the features."""
  import jax.numpy as jnp
  from tlresearch.experiment import cell as cell_lib
  from tlresearch import models
  from tlresearch.training import programs, train
  from tlresearch.methods import strategies
  with tempfile.TemporaryDirectory() as tmp:
    for run in ("compile", "warm"):
      (final,) = cell_lib.run([cell], [os.path.join(tmp, run)], pretrained)
  strategy = strategies.get("linear_probe", model.groups)
  keys = train.CellKeys.from_seed(cell.config.seed)
  fresh = programs.init_variables(model, keys.init, ds.train_x.shape[1:])
  variables = models.merge_pretrained(fresh, pretrained,
                                      cell_lib.not_loaded(cell.config, strategy, model.groups))
  splits = [jnp.asarray(a) for a in (ds.train_x, ds.val_x, ds.test_x)]
  stop = model.groups[-2]
  rates.block([programs.prefix_outputs(model, variables, x, stop) for x in splits])  # compiled
  t0 = time.perf_counter()
  rates.block([programs.prefix_outputs(model, variables, x, stop) for x in splits])
  forward = time.perf_counter() - t0
  head = probe_path_seconds(model, variables, ds)
  seconds = final["wall_seconds"]
  return {"seconds": seconds, "forward_seconds": forward, "probe_path_seconds": head,
          "l2_values": len(final["probe"]["path"]),
          "examples": int(sum(len(x) for x in splits)),
          "ratio_to_forward": seconds / forward,
          "ratio_to_forward_plus_head": seconds / (forward + head)}


def vmap_seeds(model_cfg, train_cfg, n_train: int, seeds: int = 3, num_classes: int = 10,
               image_size: int = 32, strategy: str = "full", repeats: int = 2) -> dict:
  """Training throughput of `seeds` seeds in one vmapped program (`programs.Stacked`) vs
  one after another (`programs.Single`): one epoch of each, best of `repeats` after a first
  epoch that compiles, on random uint8 images. images/s count all seeds' images."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from tlresearch import models
  from tlresearch.training import programs, train
  from tlresearch.methods import strategies
  model = models.build(model_cfg, num_classes)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.integers(0, 256, (seeds, n_train, image_size, image_size, 3), np.uint8))
  y = jnp.asarray(rng.integers(0, num_classes, (seeds, n_train)), jnp.int32)
  keys = [train.CellKeys.from_seed(s) for s in range(seeds)]
  starts = [programs.init_variables(model, k.init, (image_size, image_size, 3)) for k in keys]
  stage = strategies.get(strategy, model.groups).stages[0]
  spec, inputs = train.stage_spec(model, stage, starts[0], train_cfg, n_train, n_epochs=10)
  single = programs.Single()
  stacked = programs.Stacked(seeds)
  loop_states = [single.init_state(spec, v, inputs) for v in starts]
  stacked_inputs = stacked.per_seed_inputs(inputs)
  state = stacked.init_state(spec, stacked.stack(starts), stacked_inputs)
  stacked_keys = {f: stacked.stack([getattr(k, f) for k in keys])
                  for f in ("order", "dropout", "augment")}
  active = np.ones(seeds, bool)

  def loop():
    return [single.train_epoch(spec, st, x[s], y[s], k.order, k.dropout, k.augment, inputs,
                               active[:1])
            for s, (st, k) in enumerate(zip(loop_states, keys))]

  def vmapped():
    return stacked.train_epoch(spec, state, x, y, stacked_keys["order"],
                               stacked_keys["dropout"], stacked_keys["augment"],
                               stacked_inputs, active)

  images = seeds * spec.steps_per_epoch * spec.batch_size
  out = {"seeds": seeds}
  for name, epoch in (("vmap", vmapped), ("loop", loop)):
    jax.block_until_ready(epoch())  # compiles
    times = []
    for _ in range(max(1, repeats)):
      t0 = time.perf_counter()
      jax.block_until_ready(epoch())
      times.append(time.perf_counter() - t0)
    out[f"{name}_images_per_s"] = images / min(times)
  out["vmap_over_loop"] = out["vmap_images_per_s"] / out["loop_images_per_s"]
  return out


# ---------------------------------------------------------------- sweeps in new processes

def _cache_with_pretrained(tmp: str) -> str:
  """A project cache folder with the user's pretrained backbones and an empty compilation
  cache: the sweep measures a cold compile with a warm checkpoint."""
  from tlresearch.training import pretrain
  cache = os.path.join(tmp, "cache")
  os.makedirs(cache)
  os.symlink(os.path.join(pretrain.default_cache_dir(), "pretrained"),
             os.path.join(cache, "pretrained"))
  return cache


def _sweep(tmp: str, name: str, args: list[str], env: dict | None = None) -> float:
  entry = ["-m", "tlresearch.run"]
  if _BASELINE_FLAG in args:
    args = [a for a in args if a != _BASELINE_FLAG]
    entry = ["-c", "import sys; from tlresearch.tools import bench; "
             "bench.baseline_main(sys.argv[1:])"]
  cmd = [sys.executable, *entry, "--experiment=finetune_sweep",
         f"--workdir={os.path.join(tmp, name, 'workdir')}",
         f"--results_dir={os.path.join(tmp, name, 'results')}", "--no_progress", "--overwrite",
         *args]
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, check=False, env={**os.environ, **(env or {})}, capture_output=True, text=True)
  if proc.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
  return time.perf_counter() - t0


def compile_per_cell(tmp: str) -> dict:
  """Compile seconds per cell (from final.json) for two cells in a new process: empty
  persistent cache, then the same cells again in another new process."""
  from tlresearch.core import io
  cache = _cache_with_pretrained(os.path.join(tmp, "compile"))
  small = ["--config.targets=['digits']", "--config.seeds=[0]",
           "--config.grid=[{'strategy': ['linear_probe', 'full']}]"]
  out = {}
  for run in ("cold", "warm"):
    _sweep(tmp, "compile", small, {"TLRESEARCH_CACHE_DIR": cache})
    finals = [io.read_json(p) for p in
              glob.glob(os.path.join(tmp, "compile", "workdir", "cells", "*", "final.json"))]
    out[run] = sum(f["compile_seconds"] for f in finals) / len(finals)
  return out


def sweep_breakdown(tmp: str) -> dict:
  """The warm default sweep in a new process: its seconds and where they went."""
  import resource
  from tlresearch.core import io, timing
  timings = os.path.join(tmp, "timings.json")
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  seconds = _sweep(tmp, "sweep", [], {"TLRESEARCH_TIMINGS": timings})
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  summary = io.read_json(timings)
  phases = summary["phases"]
  cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
  finals = [io.read_json(p) for p in
            glob.glob(os.path.join(tmp, "sweep", "workdir", "cells", "*", "final.json"))]
  return {"seconds": seconds, "workers": summary["workers"],
          "startup": seconds - summary["seconds"], "cells": len(finals),
          "epochs": sum(f["epochs_run"] for f in finals),
          "process_seconds": _grouped(phases),
          "phases": {k: phases[k] for k in timing.PHASES if k in phases},
          "cpu_seconds": cpu, "idle_cpu_share": 1 - cpu / (seconds * _cores())}


# The phases `sweep.process_seconds` names; the others are summed as "other".
MAIN_PHASES = ("train", "eval", "compile", "probe", "data")


def _grouped(phases: dict) -> dict:
  """Process-seconds of the main phases and the rest as "other" (the sweep's process waiting
  for its workers is not work, so "wait" is left out)."""
  out = {k: phases.get(k, 0.0) for k in MAIN_PHASES}
  out["other"] = sum(v for k, v in phases.items() if k not in MAIN_PHASES and k != "wait")
  return out


def _cores() -> int:
  from tlresearch.core import layout
  return len(layout.cores())


def baseline_seconds(tmp: str) -> float:
  cache = _cache_with_pretrained(os.path.join(tmp, "baseline"))
  args = ["--config.train.cache_frozen_prefix=False", "--config.workers=1", _BASELINE_FLAG]
  return _sweep(tmp, "baseline", args, {"TLRESEARCH_CACHE_DIR": cache})


_BASELINE_FLAG = "--bench_baseline"


def baseline_main(argv: list[str]) -> None:
  """`tlresearch.run`'s main with the reuse of compiled programs switched off, as in a
  training loop that jits fresh functions for every run: every cell (or seed group) starts
  with JAX's caches cleared, and there is no persistent compilation cache."""
  import jax
  from tlresearch.experiment import cell as cell_lib
  from tlresearch.experiment import cli as run, sweep
  jax.config.update("jax_enable_compilation_cache", False)
  sweep.enable_compile_cache = lambda _: None
  run_cells = cell_lib.run

  def fresh_run(*args, **kwargs):
    jax.clear_caches()
    return run_cells(*args, **kwargs)

  cell_lib.run = fresh_run
  sys.argv = ["tlresearch.run"] + argv
  run.cli()


def measure(skip_sweep: bool = False, baseline: bool = False) -> dict:
  import jax
  from tlresearch.core import layout
  from tlresearch.experiment import sweep
  from tlresearch.tools import floor as floor_lib
  cell = rates.default_cell("linear_probe")
  cfg = cell.config
  threads = int(cfg.threads)
  layout.pin(threads)  # this process measures as one of the default layout's processes
  sweep.enable_compile_cache(None)
  ds, model, pretrained, variables = rates.pretrained_model(cfg)
  out = {"device": jax.devices()[0].device_kind, "device_count": jax.device_count(),
         "jax": jax.__version__, "layout": layout.describe(layout.current()),
         "train_examples": int(len(ds.train_x)),
         "batch_size": int(min(cfg.train.batch_size, len(ds.train_x)))}
  out["train_images_per_s"] = train_rates(model, variables, ds, cfg.train)
  out["machine_train_images_per_s"] = machine_rates(threads)
  out["linear_probe_cell"] = linear_probe_cell(cell, pretrained, ds, model)
  out["vmap_seeds"] = vmap_seeds(cfg.model, cfg.train, len(ds.train_x))
  with tempfile.TemporaryDirectory() as tmp:
    out["compile_seconds_per_cell"] = compile_per_cell(tmp)
    if not skip_sweep:
      out["sweep"] = sweep_breakdown(tmp)
      floor = floor_lib.layout_floor(os.path.join(tmp, "sweep", "workdir"), threads,
                                     out["sweep"]["workers"])
      out["sweep"]["floor_seconds"] = floor["seconds"]
      out["sweep"]["floor_ratio"] = out["sweep"]["seconds"] / floor["seconds"]
    if baseline:
      out["baseline_sweep_seconds"] = baseline_seconds(tmp)
  return out


def _round(tree):
  if isinstance(tree, dict):
    return {k: _round(v) for k, v in tree.items()}
  return round(tree, 3) if isinstance(tree, float) else tree


def main(argv: list[str]) -> int:
  flags = _parse(argv)
  result = measure(skip_sweep="--skip_sweep" in flags, baseline="--baseline" in flags)
  print(json.dumps(_round(result)))
  return 0


if __name__ == "__main__":
  from tlresearch.core.errors import exit_with
  exit_with(main)

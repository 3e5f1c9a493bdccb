"""The accelerator check: what a GPU (or any JAX device) must get right, how fast it runs,
and the default sweep's wall time, every number in one JSON file.

    python -m tlresearch.tools.device_check --out=FILE.json [--quick] [--skip_sweep]

Checks (each `{"ok": bool, ...numbers}`; the exit status is 1 if any is not ok):
  vmap_vs_loop    3 seeds trained in one vmapped program vs one after another (`full`,
                  2 epochs): largest weight difference, share of equal test predictions
  data_parallel   the same fit split over several devices vs one device; with a single
                  device it runs on the CPU with 4 forced host devices (the field `platform`
                  says which), so the code path is checked even on a one-GPU machine
  determinism     the same fit in two new processes, with `--xla_gpu_deterministic_ops=true`
                  on a GPU: digests of the final weights must be equal
  bfloat16        train.compute_dtype=bfloat16 vs float32 (2 epochs): relative differences
                  of the train and validation losses
Measurements:
  throughput      images/s of the `full` train step (compiled, warmed up), float32 and
                  bfloat16: the default ResNet-8 at batch 64 and 512 (32 px), ResNet50 and
                  VGG16 at 224 px (random weights), each with XLA's flop count per step,
                  achieved TFLOP/s and, for a device in PEAK_TFLOPS, the share of the peak
  vmap_seeds      `tlresearch.tools.bench.vmap_seeds`: 3 vmapped seeds vs a loop, images/s;
                  `seeds_mode_auto` compares what `train.seeds_mode="auto"` picks here with
                  the faster of the two
  sweep_seconds   the default `finetune_sweep` in a new process (bench.sweep_seconds; the
                  pretrained backbone from the project cache, built there if missing)
`--quick` shrinks every model, batch and epoch count (and measures ResNet50 and VGG16 in
float32 only) so the whole check runs in minutes on a CPU (the test suite runs it so); its
numbers are not the benchmark's.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

from tlresearch.core import layout

USAGE = ("usage: python -m tlresearch.tools.device_check --out=FILE.json [--quick] [--skip_sweep]")
# Dense peak TFLOP/s by `device_kind` (vendor data sheets; fp32 without TF32, bf16 tensor
# cores without sparsity), for the share of the peak a step achieves.
PEAK_TFLOPS = {
    "NVIDIA H200": {"float32": 67.0, "bfloat16": 989.0},
    "NVIDIA H100 80GB HBM3": {"float32": 67.0, "bfloat16": 989.0},
    "NVIDIA A100-SXM4-80GB": {"float32": 19.5, "bfloat16": 312.0},
    "NVIDIA A100-SXM4-40GB": {"float32": 19.5, "bfloat16": 312.0},
}
DTYPES = ("float32", "bfloat16")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parse(argv: list[str]) -> dict:
  from tlresearch.core.errors import UserError
  opts = {"out": None, "quick": False, "skip_sweep": False}
  for arg in argv:
    if arg.startswith("--out="):
      opts["out"] = arg[len("--out="):]
    elif arg in ("--quick", "--skip_sweep"):
      opts[arg[2:]] = True
    else:
      raise UserError(f"unknown argument '{arg}'; {USAGE}")
  if not opts["out"]:
    raise UserError(f"--out=FILE.json is required; {USAGE}")
  parent = os.path.dirname(os.path.abspath(opts["out"]))
  if not os.path.isdir(parent):
    raise UserError(f"--out: folder {parent} does not exist")
  return opts


# ---------------------------------------------------------------- small fits

def _dataset(n_train: int, seed: int = 0):
  from tlresearch.data import synthetic
  return synthetic.class_means(n_train, 64, 64, seed=seed, name="check")


def _fit(quick: bool, seeds: int = 1, strategy: str = "full", **train_kw):
  """FitResults of a small ResNet trained `seeds` times (seed s: data, init and order s)."""
  from tlresearch.core import schema
  from tlresearch import models
  from tlresearch.training import programs, train
  from tlresearch.methods import strategies
  n = 128 if quick else 512
  datas = [_dataset(n, seed=s) for s in range(seeds)]
  model = models.build(schema.model(width=4 if quick else 16), datas[0].num_classes)
  keys = [train.CellKeys.from_seed(s) for s in range(seeds)]
  starts = [programs.init_variables(model, k.init, datas[0].train_x.shape[1:]) for k in keys]
  cfg = schema.train(epochs=2, batch_size=32, lr=0.05, warmup_epochs=0.0, **train_kw)
  return train.fit(model, starts, strategies.get(strategy, model.groups), datas, cfg, keys)


def _leaves(result) -> dict:
  import jax
  import numpy as np
  from flax import traverse_util
  return {k: np.asarray(v) for k, v in
          traverse_util.flatten_dict(jax.device_get(result.variables), sep="/").items()}


def _max_abs_diff(a, b) -> float:
  import numpy as np
  out = 0.0
  for ra, rb in zip(a, b):
    la, lb = _leaves(ra), _leaves(rb)
    out = max(out, *(float(np.max(np.abs(la[k] - lb[k]))) for k in la))
  return out


def _equal_predictions(a, b) -> float:
  import numpy as np
  return float(np.mean([np.mean(ra.test_predictions == rb.test_predictions)
                        for ra, rb in zip(a, b)]))


def _digest(results) -> str:
  h = hashlib.sha256()
  for r in results:
    for k, v in sorted(_leaves(r).items()):
      h.update(k.encode())
      h.update(v.tobytes())
  return h.hexdigest()


# Weights of two runs that should agree up to float reduction order.
_TOLERANCE = 1e-3


def vmap_vs_loop(quick: bool) -> dict:
  loop = _fit(quick, seeds=3, seeds_mode="loop")
  vmap = _fit(quick, seeds=3, seeds_mode="vmap")
  diff, same = _max_abs_diff(loop, vmap), _equal_predictions(loop, vmap)
  return {"ok": diff <= _TOLERANCE and same >= 0.99, "max_abs_weight_diff": diff,
          "equal_test_predictions": same}


def _worker(task: str, quick: bool) -> None:
  """Runs in a new process; prints one JSON line."""
  if task == "digest":
    print(json.dumps({"digest": _digest(_fit(quick)), "backend": _backend()}))
  elif task == "data_parallel":
    print(json.dumps(_data_parallel_numbers(quick)))


def _data_parallel_numbers(quick: bool) -> dict:
  import jax
  one = _fit(quick, data_parallel=False)
  many = _fit(quick, data_parallel=True)
  return {"devices": jax.local_device_count(), "platform": _backend(),
          "max_abs_weight_diff": _max_abs_diff(one, many),
          "equal_test_predictions": _equal_predictions(one, many)}


def _backend() -> str:
  import jax
  return jax.default_backend()


def _subprocess(task: str, quick: bool, env: dict) -> dict:
  code = (f"from tlresearch.tools import device_check; "
          f"device_check._worker({task!r}, {quick!r})")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        cwd=_ROOT, env={**os.environ, **env, "PYTHONPATH": os.pathsep.join(
                            p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)},
                        check=False)
  if proc.returncode != 0:
    raise RuntimeError(f"{task} worker failed:\n{proc.stderr[-2000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def data_parallel(quick: bool) -> dict:
  import jax
  if jax.local_device_count() > 1:
    out = _data_parallel_numbers(quick)
  else:
    out = _subprocess("data_parallel", quick, {
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"})
  out["ok"] = out["devices"] > 1 and out["max_abs_weight_diff"] <= _TOLERANCE and \
      out["equal_test_predictions"] >= 0.99
  return out


def determinism(quick: bool) -> dict:
  flags = os.environ.get("XLA_FLAGS", "")
  if _backend() == "gpu":
    flags += " --xla_gpu_deterministic_ops=true"
  runs = [_subprocess("digest", quick, {"XLA_FLAGS": flags}) for _ in range(2)]
  return {"ok": runs[0]["digest"] == runs[1]["digest"], "xla_flags": flags.strip(),
          "backend": runs[0]["backend"], "digests": [r["digest"][:16] for r in runs]}


def bfloat16(quick: bool) -> dict:
  fp32, bf16 = (_fit(quick, compute_dtype=dt)[0] for dt in DTYPES)
  rel = {k: abs(bf16.history[-1][k] - fp32.history[-1][k]) / max(abs(fp32.history[-1][k]), 1e-6)
         for k in ("train_loss", "val_loss")}
  return {"ok": max(rel.values()) < 0.05, **{f"relative_diff_{k}": v for k, v in rel.items()},
          "val_accuracy": {"float32": fp32.val["accuracy"], "bfloat16": bf16.val["accuracy"]}}


# ---------------------------------------------------------------- measurements

def _step_rate(model_cfg, size: int, batch: int, dtype: str, steps: int) -> dict:
  """images/s, flops per step and TFLOP/s of the compiled `full` train step."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from tlresearch.core import schema
  from tlresearch import models
  from tlresearch.training import programs, train
  from tlresearch.methods import strategies
  model = models.build(model_cfg, 10)
  variables = programs.init_variables(model, jax.random.key(0), (size, size, 3))
  cfg = schema.train(batch_size=batch, compute_dtype=dtype)
  stage = strategies.get("full", model.groups).stages[0]
  spec, inputs = train.stage_spec(model, stage, variables, cfg, batch, n_epochs=steps + 1)
  state = programs.init_state(spec, variables, inputs)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.integers(0, 256, (batch, size, size, 3), np.uint8))
  y = jnp.asarray(rng.integers(0, 10, (batch,)), jnp.int32)
  keys = train.CellKeys.from_seed(0)
  idx = jnp.arange(batch)
  args = (spec, state, x, y, idx, keys.dropout, keys.augment, inputs)
  cost = programs.train_step.lower(*args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  state, m = jax.block_until_ready(programs.train_step(*args))  # compiles, warms up
  t0 = time.perf_counter()
  for _ in range(steps):
    state, m = programs.train_step(spec, state, x, y, idx, keys.dropout, keys.augment, inputs)
  jax.block_until_ready((state, m))
  seconds = (time.perf_counter() - t0) / steps
  flops = float(cost.get("flops", 0.0))
  # The batch and size measured: under --quick they are smaller than the case's name says.
  out = {"batch": batch, "image_size": size, "images_per_s": batch / seconds,
         "step_seconds": seconds, "flops_per_step": flops, "tflops_per_s": flops / seconds / 1e12}
  peak = PEAK_TFLOPS.get(jax.devices()[0].device_kind, {}).get(dtype)
  if peak:
    out["share_of_peak"] = out["tflops_per_s"] / peak
  return out


def throughput(quick: bool) -> dict:
  from tlresearch.core import schema
  small = schema.model(width=4) if quick else schema.model()
  cases = {
      "resnet8_32px_batch64": (small, 32, 8 if quick else 64),
      "resnet8_32px_batch512": (small, 32, 16 if quick else 512),
      "resnet50_224px_batch64": (schema.keras_model(family="resnet50", pretrained="",
                                                     width=8 if quick else 64,
                                                     input_size=32 if quick else 224),
                                 32 if quick else 224, 4 if quick else 64),
      "vgg16_224px_batch64": (schema.keras_model(family="vgg16", pretrained="",
                                                  width=8 if quick else 64,
                                                  input_size=32 if quick else 224),
                              32 if quick else 224, 4 if quick else 64),
  }
  steps = 2 if quick else 20
  # --quick: the two large networks in float32 only (their compiles dominate on a CPU).
  return {name: {dt: _step_rate(cfg, size, batch, dt, steps)
                 for dt in (DTYPES if not quick or name.startswith("resnet8") else DTYPES[:1])}
          for name, (cfg, size, batch) in cases.items()}


def vmap_seeds(quick: bool) -> dict:
  from tlresearch.core import schema
  from tlresearch.tools import bench
  from tlresearch.training import train
  cfg = schema.train()
  out = bench.vmap_seeds(schema.model(width=4) if quick else schema.model(), cfg,
                         n_train=64 if quick else 1000, repeats=1 if quick else 3)
  faster = "vmap" if out["vmap_over_loop"] > 1 else "loop"
  out["seeds_mode_auto"] = {"picks": train.seeds_mode(cfg), "faster_here": faster,
                            "agrees": train.seeds_mode(cfg) == faster}
  return out


def sweep_seconds() -> float:
  from tlresearch.tools import bench
  with tempfile.TemporaryDirectory() as tmp:
    return bench.sweep_breakdown(tmp)["seconds"]


def _environment() -> dict:
  import jax
  return {"backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
          "device_count": jax.device_count(), "jax": jax.__version__,
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "tensorflow_imported": "tensorflow" in sys.modules, "layout": layout.current()}


def run(quick: bool = False, skip_sweep: bool = False, log=print) -> dict:
  """Every check and measurement; a part that raises is recorded as {"ok": False, "error"}."""
  parts = [("vmap_vs_loop", lambda: vmap_vs_loop(quick)),
           ("data_parallel", lambda: data_parallel(quick)),
           ("determinism", lambda: determinism(quick)),
           ("bfloat16", lambda: bfloat16(quick)),
           ("throughput", lambda: throughput(quick)),
           ("vmap_seeds", lambda: vmap_seeds(quick))]
  if not skip_sweep:
    parts.append(("sweep_seconds", sweep_seconds))
  out = {"environment": _environment(), "quick": quick}
  for name, fn in parts:
    t0 = time.perf_counter()
    try:
      out[name] = fn()
    except Exception as e:  # noqa: BLE001 - one failing part must not hide the others
      out[name] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                   "traceback": traceback.format_exc()[-2000:]}
    log(f"{name}: {time.perf_counter() - t0:.1f} s"
        + ("" if not isinstance(out[name], dict) or out[name].get("ok", True)
           else "  NOT OK"))
  out["environment"]["tensorflow_imported"] = "tensorflow" in sys.modules
  out["ok"] = all(v.get("ok", True) for v in out.values() if isinstance(v, dict))
  return out


def main(argv: list[str]) -> int:
  opts = _parse(argv)
  # The check measures the machine: on a CPU, every core it was started with, in one XLA pool
  # (a process started by a pinned one, e.g. from the test suite, would inherit one core).
  layout.pin(layout.ALL)
  result = run(opts["quick"], opts["skip_sweep"], log=lambda m: print(m, file=sys.stderr))
  tmp = opts["out"] + ".tmp"
  with open(tmp, "w") as f:
    json.dump(result, f, indent=1)
  os.replace(tmp, opts["out"])
  print(f"{'all checks ok' if result['ok'] else 'SOME CHECKS FAILED'}: {opts['out']}")
  return 0 if result["ok"] else 1


if __name__ == "__main__":
  from tlresearch.core.errors import exit_with
  exit_with(main)

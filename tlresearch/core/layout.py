"""The execution layout a process computes in: backend, device and, on a CPU, its threads
and the CPU itself.

Why a layout is part of a result: XLA:CPU splits a convolution's sums across its thread pool,
sized by the cores the process may run on when its backend starts, so the same program gives
other float bits under another pool size. Results are bit-identical for the same config,
code, package versions and layout, which is what XLA, cuDNN and PyTorch promise too; each
cell records its layout (final.json `layout`, timing.csv) so a table can say when it mixes
layouts. XLA:CPU also compiles for the host's vector instructions, so the CPU model is part
of a CPU layout.

Why one thread per process by default (`config.threads = 1`): XLA's intra-op threads gain
little on these small convolutions, and processes held to one core each, training different
cells, get more train steps per second out of the machine (docs/performance.md). The
command's own process and each worker process (`tlresearch.experiment.workers`) are held to
one core before their backend starts, so a cell's bits do not depend on which process or how
many workers trained it. `threads = 0`: every core the process may use, in XLA's own pool.
"""
from __future__ import annotations

import functools
import os

from tlresearch.core.errors import UserError

ALL = 0
_CORES: list[int] = []    # the cores this process could use before `pin` narrowed them
_PINNED: list[int] = []   # the pool size `pin` started the backend with, once it has


# A process `pin` narrowed passes the cores it was started with to the processes it starts
# (a sweep run from the test suite, a benchmark's rate processes): they inherit its affinity.
CORES_ENV = "TLRESEARCH_CORES"


def cores() -> list[int]:
  """The cores this process may use, as it was started (before `pin`)."""
  if not _CORES:
    if os.environ.get(CORES_ENV):
      _CORES.extend(int(c) for c in os.environ[CORES_ENV].split(","))
    elif hasattr(os, "sched_getaffinity"):
      _CORES.extend(sorted(os.sched_getaffinity(0)))
    else:
      _CORES.extend(range(os.cpu_count() or 1))
  return list(_CORES)


def check(threads) -> None:
  if isinstance(threads, int) and not isinstance(threads, bool) and threads >= 0:
    return
  raise UserError(f"threads must be an integer >= 0 (1: each process on one core, 0: every "
                  f"core in one XLA pool), got {threads!r}")


def pin(threads: int, slot: int = 0, machine: list[int] | None = None) -> None:
  """Starts this process's JAX backend with a CPU pool of `threads` cores (0: all of
  `machine`, the cores of the command's process), the `slot`-th such share of them.

  Only a CPU backend is held (an accelerator's host threads keep every core). A backend
  that started before, with live arrays on it, is restarted: call this before computing."""
  import jax
  import jax.extend.backend
  machine = list(machine) if machine else cores()
  _CORES[:] = machine
  if jax.default_backend() != "cpu":
    return
  n = len(machine) if threads == ALL else min(threads, len(machine))
  share = {machine[(slot * n + i) % len(machine)] for i in range(n)}
  if hasattr(os, "sched_setaffinity") and share != set(os.sched_getaffinity(0)):
    jax.extend.backend.clear_backends()  # the pool is sized when the backend starts
    os.sched_setaffinity(0, share)
    os.environ[CORES_ENV] = ",".join(map(str, machine))
    jax.default_backend()
  _PINNED[:] = [len(share)]


def current() -> dict:
  """This process's layout: {"backend", "device", "devices"} and, on a CPU, "threads" and
  "cpu" (`cpu_model`)."""
  import jax
  backend = jax.default_backend()
  out = {"backend": backend, "device": jax.devices()[0].device_kind,
         "devices": jax.device_count()}
  if backend == "cpu":
    # Without `pin`, the pool is as large as the cores this process may use.
    out["threads"] = _PINNED[0] if _PINNED else len(os.sched_getaffinity(0))
    out["cpu"] = cpu_model()
  return out


@functools.cache
def cpu_model() -> str:
  """The CPU XLA generates code for, e.g. "AMD EPYC, family 25 model 1, no AVX-512": XLA:CPU
  compiles for the host's instruction set, so the same program gives other float bits on a
  CPU with other vector instructions (seen: an EPYC without AVX-512 against one with it)."""
  import platform
  info = {}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        if key.strip() and key.strip() not in info:
          info[key.strip()] = value.strip()
        if not line.strip() and info:
          break  # the first processor's block describes them all
  except OSError:
    return platform.processor() or platform.machine() or "unknown"
  name = info.get("model name") or platform.machine() or "unknown"
  if "cpu family" in info:
    name += f", family {info['cpu family']} model {info.get('model', '?')}"
  if "flags" in info:
    name += ", AVX-512" if "avx512f" in info["flags"].split() else ", no AVX-512"
  return name


def describe(layout: dict | None) -> str:
  """One line for tables and logs, e.g. "cpu (AMD EPYC, family 25 model 1, no AVX-512), 1
  thread per process" (a layout recorded before the CPU was: "cpu, 1 thread per process")."""
  if not layout:
    return "not recorded"
  if layout["backend"] == "cpu":
    n = layout["threads"]
    cpu = f" ({layout['cpu']})" if layout.get("cpu") else ""
    return f"cpu{cpu}, {n} thread{'s' if n != 1 else ''} per process"
  return f"{layout['backend']} ({layout['device']} x{layout['devices']})"

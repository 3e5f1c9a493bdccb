"""The execution layout (tlresearch.core.layout): what a process computes in, and its record."""
import json
import os
import platform
import subprocess
import sys

import pytest

from tlresearch.core import layout
from tlresearch.core.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_PROBE = """
import json, os, sys
from tlresearch.core import layout
layout.pin(int(sys.argv[1]), slot=int(sys.argv[2]))
import jax, jax.numpy as jnp
x = jax.random.normal(jax.random.key(0), (8, 32, 32, 16))
w = jax.random.normal(jax.random.key(1), (3, 3, 16, 16))
y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
g = jax.grad(lambda w: jnp.sum(jax.lax.conv_general_dilated(
    x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) ** 2))(w)
print(json.dumps({"layout": layout.current(), "affinity": sorted(os.sched_getaffinity(0)),
                  "bits": [float(y.sum()), float(g.sum())]}))
"""


def _probes(runs) -> list[dict]:
  """Each (threads, slot) of `runs` in a new process, all at once."""
  env = {**os.environ, "PYTHONPATH": REPO}
  procs = [subprocess.Popen([sys.executable, "-c", _PROBE, str(t), str(s)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for t, s in runs]
  out = []
  for p in procs:
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr[-2000:]
    out.append(json.loads(stdout.strip().splitlines()[-1]))
  return out


def test_a_layout_holds_its_cores_and_gives_the_same_bits_in_every_process():
  machine = layout.cores()
  slots = list(range(min(2, len(machine))))
  *one, pooled, pooled_again = _probes([(1, s) for s in slots] + [(0, 0), (0, 0)])
  for slot, got in zip(slots, one):  # one thread: held to its slot of the cores
    assert got["affinity"] == [machine[slot]]
    assert got["layout"]["backend"] == "cpu" and got["layout"]["threads"] == 1
  assert all(p["bits"] == one[0]["bits"] for p in one)  # which core does not matter
  # 0: XLA's pool over every core, the same bits run after run
  assert pooled["affinity"] == machine and pooled["layout"]["threads"] == len(machine)
  assert pooled_again["bits"] == pooled["bits"]


def test_the_table_says_which_layout_its_numbers_reproduce_in():
  from tlresearch.analysis import report
  one = {"backend": "cpu", "device": "cpu", "devices": 1, "threads": 1}
  two = {**one, "threads": 2}
  assert report.layout_note([{"layout": one}] * 2)[0] == (
      "Execution layout: cpu, 1 thread per process (the numbers reproduce bitwise in it).")
  mixed = report.layout_note([{"layout": one}, {"layout": two}, {"layout": one}])[0]
  assert mixed.startswith("The cells ran in 2 execution layouts (cpu, 1 thread per process; "
                          "cpu, 2 threads per process)")
  assert layout.describe(None) == "not recorded"
  # Since the CPU is recorded, it is part of the line (XLA compiles for its instructions).
  here = {**one, "cpu": "AMD EPYC, family 25 model 1, no AVX-512"}
  assert layout.describe(here) == ("cpu (AMD EPYC, family 25 model 1, no AVX-512), 1 thread "
                                   "per process")
  assert report.layout_note([{"layout": here}, {"layout": one}])[0].startswith(
      "The cells ran in 2 execution layouts")


def test_the_cpu_is_part_of_the_layout():
  got = layout.cpu_model()
  assert got and "\n" not in got
  if platform.machine() == "x86_64" and os.path.exists("/proc/cpuinfo"):
    assert "AVX-512" in got and "family" in got


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1"])
def test_threads_must_be_a_count(bad):
  with pytest.raises(UserError, match="threads must be an integer >= 0"):
    layout.check(bad)

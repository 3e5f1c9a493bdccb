"""Where a run's seconds go: named phases, each second counted once.

`with timing.phase("train"): ...` adds the block's wall time to "train", minus the time of
phases opened inside it, so nested phases never count twice. Compilation (tracing, lowering,
XLA compile or a persistent-cache load) is reported by JAX as events while some phase is
open; `programs` credits them to "compile" and takes them out of that phase.

One ledger per process (the training loop runs on one thread). A sweep's worker processes
send theirs back with each result and the sweep adds them up (`add_all`); `python -m
tlresearch.tools.bench` prints the sum.
"""
from __future__ import annotations

import collections
import contextlib
import time

# The phases the code opens, in the order a cell meets them (bench prints them in this order).
PHASES = ("check", "backbone", "data", "init", "compile", "prefix", "probe", "train", "eval",
          "record", "files", "wait", "report")

_totals: dict[str, float] = collections.defaultdict(float)
_stack: list[list] = []  # [name, seconds of phases nested inside it]


@contextlib.contextmanager
def phase(name: str):
  t0 = time.perf_counter()
  _stack.append([name, 0.0])
  try:
    yield
  finally:
    _, inner = _stack.pop()
    seconds = time.perf_counter() - t0
    credit(name, seconds - inner)
    if _stack:
      _stack[-1][1] += seconds


def nested(name: str, seconds: float) -> None:
  """`seconds` spent on `name` inside the open phase (e.g. a compilation during "train")."""
  _totals[name] += seconds
  if _stack:
    _stack[-1][1] += seconds


def credit(name: str, seconds: float) -> None:
  _totals[name] += seconds


def snapshot() -> dict[str, float]:
  return dict(_totals)


def reset() -> None:
  _totals.clear()


def add_all(ledger: dict[str, float]) -> None:
  """Another process's ledger, added to this one's."""
  for name, seconds in ledger.items():
    _totals[name] += seconds

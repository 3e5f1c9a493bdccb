"""Data parallelism over the local devices, through `jax.sharding`.

One program with single-device semantics: the datasets and the train state are replicated
over a one-axis mesh ("data"), and each gathered batch is constrained to be split along its
batch dimension inside the jitted step. XLA's SPMD partitioner then splits the forward and
backward passes over the devices and inserts the all-reduces the program needs (the
gradient sum, BatchNorm's batch mean and variance), so the results are the single-device
ones up to float reduction order.

Where only one device is used there is no mesh (`None`) and every helper here is the
identity, so single-device programs are exactly what they would be without this module.
"""
from __future__ import annotations

import functools
import os

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXIS = "data"


def width(batch_size: int, n_devices: int) -> int:
  """How many devices a batch is split over: the most, up to n_devices, that divide it."""
  return max(d for d in range(1, max(1, n_devices) + 1) if batch_size % d == 0)


@functools.cache
def mesh(n: int | None = None) -> Mesh | None:
  """A one-axis mesh over the first n local devices (default: all); None for one device.

  Local devices only: under multi-host JAX each process runs its own cells on its own
  devices. Axis type Auto, so XLA propagates shardings from the constraints we give it
  (`jax.make_mesh` would default to Explicit sharding, a different programming model).
  """
  devices = jax.local_devices()
  n = len(devices) if n is None else n
  if n <= 1:
    return None
  return Mesh(np.asarray(devices[:n]), (AXIS,), axis_types=(AxisType.Auto,))


def size(m: Mesh | None) -> int:
  return 1 if m is None else m.size


def replicated(m: Mesh) -> NamedSharding:
  return NamedSharding(m, P())


def batch_sharding(m: Mesh, axis: int = 0) -> NamedSharding:
  """Split along dimension `axis` (the batch dimension) over the mesh."""
  return NamedSharding(m, P(*([None] * axis), AXIS))


def replicate(tree, m: Mesh | None):
  """`tree` with every array copied to all devices of `m` (unchanged without a mesh)."""
  return tree if m is None else jax.device_put(tree, replicated(m))


def unreplicate(tree, m: Mesh | None):
  """`tree` on the mesh's first device: what callers outside training expect."""
  return tree if m is None else jax.device_put(tree, m.devices.flat[0])


def shard_batch(x, m: Mesh | None, axis: int = 0):
  """Inside a jitted program: `x` split over the mesh along its batch dimension `axis`."""
  return x if m is None else jax.lax.with_sharding_constraint(x, batch_sharding(m, axis))


def constrain_replicated(tree, m: Mesh | None):
  """Inside a jitted program: outputs replicated over the mesh (identity without one), so
  that what one program returns is a valid input of the next."""
  return tree if m is None else jax.lax.with_sharding_constraint(tree, replicated(m))


def for_batch(batch_size: int, enabled: bool = True) -> tuple[Mesh | None, str | None]:
  """(mesh, note) for training with `batch_size`: all local devices when the batch divides
  by their number, else the largest count that divides it (the note says so); no mesh when
  `enabled` is False or one device is used."""
  n = len(jax.local_devices()) if enabled else 1
  w = width(batch_size, n)
  note = None
  if w < n:
    note = (f"batch size {batch_size} does not divide over {n} devices: "
            f"data parallel over {w}")
  return mesh(w), note


def initialize_distributed_from_env() -> bool:
  """Calls `jax.distributed.initialize()` when TLRESEARCH_DISTRIBUTED is set (not 0).

  Must run before any JAX computation. JAX takes the coordinator address, process count and
  process id from the cluster (SLURM, Open MPI, Kubernetes, Cloud TPU); elsewhere set
  JAX_COORDINATOR_ADDRESS=host:port, TLRESEARCH_NUM_PROCESSES and TLRESEARCH_PROCESS_ID.
  Each process then trains on its own local devices.
  """
  if os.environ.get("TLRESEARCH_DISTRIBUTED", "0").lower() in ("", "0", "false", "no"):
    return False
  given = {"num_processes": os.environ.get("TLRESEARCH_NUM_PROCESSES"),
           "process_id": os.environ.get("TLRESEARCH_PROCESS_ID")}
  jax.distributed.initialize(**{k: int(v) for k, v in given.items() if v is not None})
  return True

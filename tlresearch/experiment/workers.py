"""Cells trained concurrently by worker processes, one per CPU core (`config.workers`).

Why processes: XLA:CPU gains little from its own intra-op threads on these small
convolutions, so one process leaves part of a 2-core machine idle; two processes training
different cells keep both cores busy (docs/performance.md has the measurements).

Why a cell's result is bitwise the same whichever process trains it: every training process
computes in the same layout (`config.threads`, tlresearch.core.layout). With the default of one
thread, worker i is held to the i-th core before its backend starts, as the sweep's own process
is held to the first; with threads=0 each process has XLA's pool over every core, as the sweep's
own process has.

A worker gets whole seed groups (`cell.run`), writes their cell folders itself and sends
back the final.json records and its timing ledger; its log records go through the parent's
logging (under the progress bar). A worker dies with the parent (Linux `PR_SET_PDEATHSIG`), so
a killed sweep leaves no process writing to its workdir and resumes from the cells' files.
"""
from __future__ import annotations

import ctypes
import logging
import logging.handlers
import multiprocessing
import os
import queue as queue_lib
import signal
import traceback

from tlresearch.core import layout, timing
from tlresearch.core.errors import UserError

log = logging.getLogger(__name__)

# A worker costs ~5 s to start (imports, backbone and data loads) and compiles its own programs
# (~0.2 s each): with fewer seed groups than this per worker to train, auto trains in the
# sweep's own process.
MIN_GROUPS_PER_WORKER = 4
AUTO = 0


def count(setting: int, pending_groups: int, backend: str, mocked: bool) -> int:
  """How many worker processes train `pending_groups` seed groups under `config.workers`:
  0 (auto) is one per core on a CPU backend when there is enough work, else none. Returns 1
  for "train in this process"."""
  if setting == AUTO:
    cores = len(layout.cores())
    if backend != "cpu" or mocked or cores < 2:
      return 1
    return max(1, min(cores, pending_groups // MIN_GROUPS_PER_WORKER))
  if setting > 1 and backend != "cpu":
    raise UserError(f"workers={setting} trains cells in parallel CPU processes; on a {backend} "
                    "backend use workers=0 or 1, and train.seeds_mode / train.data_parallel")
  if setting > 1 and mocked:
    raise UserError("workers > 1 cannot train on mocked datasets (the mock exists only in this "
                    "process); use workers=0 or 1")
  return setting


def check(setting) -> None:
  if isinstance(setting, int) and not isinstance(setting, bool) and setting >= 0:
    return
  raise UserError(f"workers must be an integer >= 0 (0: one per CPU core), got {setting!r}")


class Pool:
  """`n` worker processes; `run` trains seed groups on them, longest first."""

  def __init__(self, n: int, threads: int):
    import jax
    ctx = multiprocessing.get_context("spawn")  # never fork a process that has started JAX
    self._results = ctx.Queue()
    self._logs = ctx.Queue()
    self._listener = logging.handlers.QueueListener(self._logs, _ToParentLogger())
    self._listener.start()
    cache = jax.config.jax_compilation_cache_dir
    level = logging.getLogger("tlresearch").getEffectiveLevel()
    self._inboxes, self._procs = [], []
    for i in range(n):
      inbox = ctx.Queue()
      proc = ctx.Process(target=_serve, daemon=True, name=f"tlresearch-worker-{i}",
                         args=(i, inbox, self._results, self._logs, cache, level,
                                 (threads, layout.cores())))
      proc.start()
      self._inboxes.append(inbox)
      self._procs.append(proc)

  @property
  def size(self) -> int:
    return len(self._procs)

  def run(self, tasks: list, costs: list[float], keys: list[str], on_done) -> None:
    """Trains `tasks` ((cells, cell_dirs, needs_pretrained) each) and calls
    `on_done(index, finals)` as each finishes, in the order they finish.

    A free worker takes the most expensive pending task (so the last to finish are short),
    among equally expensive ones preferably one whose `keys` entry it has trained before (its
    compiled programs are then already in memory)."""
    pending = sorted(range(len(tasks)), key=lambda i: -costs[i])
    seen = [set() for _ in self._procs]
    idle, running = list(range(self.size)), {}
    while pending or running:
      while idle and pending:
        w = idle.pop(0)
        top = costs[pending[0]]
        pick = next((i for i in pending if costs[i] == top and keys[i] in seen[w]), pending[0])
        pending.remove(pick)
        seen[w].add(keys[pick])
        running[w] = pick
        self._inboxes[w].put((pick, *tasks[pick]))
      w, index, finals, ledger, error = self._next_result()
      del running[w]
      idle.append(w)
      timing.add_all(ledger)
      if error is not None:
        kind, message = error
        if kind == "os":  # the sweep reports it as its own OSError: one line, exit 3
          raise OSError(*message)
        raise UserError(message) if kind == "user" else RuntimeError(
            f"a worker process failed:\n{message}")
      on_done(index, finals)

  def _next_result(self):
    while True:
      try:
        return self._results.get(timeout=1.0)
      except queue_lib.Empty:
        dead = [(i, p.exitcode) for i, p in enumerate(self._procs) if not p.is_alive()]
        if dead:
          i, code = dead[0]
          raise RuntimeError(f"worker process {i} exited with code {code} (killed, e.g. out of "
                             "memory?); the cells it finished are kept: rerun the same command "
                             "to resume")

  def close(self, kill: bool = False) -> None:
    """Ends the workers: after their current task, or at once with `kill` (an error or an
    interrupt in the sweep: a half-trained cell is resumed from its files by the next run)."""
    for inbox in self._inboxes:
      inbox.put(None)
    for proc in self._procs:
      if kill:
        proc.kill()
      proc.join()
    self._listener.stop()

  def __enter__(self):
    return self

  def __exit__(self, exc_type, *_):
    self.close(kill=exc_type is not None)


class _ToParentLogger(logging.Handler):
  """A worker's log record, handled by the parent's logger of the same name."""

  def emit(self, record):
    logging.getLogger(record.name).handle(record)


def _die_with_parent() -> None:
  """SIGKILL this process when its parent exits, however it exits (Linux; elsewhere the
  worker ends when its inbox breaks)."""
  try:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    return
  if os.getppid() == 1:  # the parent is already gone
    os._exit(1)


def _serve(index, inbox, results, logs, compile_cache, level, threads_and_cores) -> None:
  _die_with_parent()
  threads, machine = threads_and_cores
  layout.pin(threads, slot=index, machine=machine)  # before anything computes
  # Ctrl-C reaches the whole process group; the sweep's process handles it and stops us.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  logger = logging.getLogger("tlresearch")
  logger.handlers[:] = [logging.handlers.QueueHandler(logs)]
  logger.setLevel(level)
  logger.propagate = False
  from tlresearch.experiment import cell as cell_lib
  from tlresearch.training import programs
  programs.use_compile_cache(compile_cache)
  backbones = cell_lib.Backbones()
  while True:
    task = inbox.get()
    if task is None:
      return
    task_index, cells, cell_dirs, needs_pretrained = task
    timing.reset()
    try:
      with timing.phase("backbone"):
        pretrained = backbones(cells[0].config) if needs_pretrained else None
      finals = cell_lib.run(cells, cell_dirs, pretrained)
      results.put((index, task_index, finals, timing.snapshot(), None))
    except UserError as e:
      results.put((index, task_index, None, timing.snapshot(), ("user", str(e))))
    except OSError as e:
      results.put((index, task_index, None, timing.snapshot(),
                   ("os", (e.errno, e.strerror, e.filename))))
    except Exception:  # pylint: disable=broad-except  (reported by the parent, which stops)
      results.put((index, task_index, None, timing.snapshot(),
                   ("error", traceback.format_exc())))

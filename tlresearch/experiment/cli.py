"""Command line: `python -m tlresearch.run --experiment=NAME [--config.KEY=VALUE ...]`.

Flags:
  --experiment=NAME   an experiment module in experiments/ (see --list); NAME,NAME,... runs
                      several one after another, "all" every reproduction and the main table
  --list              list the experiments and exit
  --workdir=DIR       the cell store, shared by every experiment run on it (default: workdir):
                      DIR/cells/<cell> per cell, so a cell several experiments hold trains once
  --results_dir=DIR   tables and plots go to DIR/NAME (default: results)
  --overwrite         retrain every cell (default: reuse cells finished under the same config)
  --no_progress       no progress bar
  --task_index=I      with --num_tasks=N: run only task I's share of the grid (0 <= I < N;
  --num_tasks=N         whole configurations, dealt round robin), e.g. one task of a SLURM
                        array, all tasks sharing one --workdir; writes no tables
  --merge             build the tables from the cells every task left in --workdir (trains
                      nothing; fails, writing nothing, while a cell is unfinished)
  --config.KEY=VALUE  override a config value; VALUE is a Python literal or a bare string

Bad input (unknown experiment, config key or name, invalid value, missing data, a folder
that cannot be written) prints one line naming the problem and the valid choices and exits
with status 2, before any training and before anything is written to the results folder.
Exit status 3: the operating system refused later (a full disk, a folder made read-only),
one line naming the path; 130: interrupted (Ctrl-C); 143: terminated (SIGTERM, as a
scheduler sends at the end of a job's time). In those three cases finished cells and
checkpoints are kept and the lock is released: the same command resumes.
"""
from __future__ import annotations

import ast
import contextlib
import importlib
import logging
import os
import pkgutil
import sys

from tlresearch.core import io
from tlresearch.core.errors import UserError, choices, shown

USAGE = ("usage: python -m tlresearch.run --experiment=NAME [--workdir=DIR] [--results_dir=DIR] "
         "[--overwrite] [--no_progress] [--task_index=I --num_tasks=N | --merge] "
         "[--config.KEY=VALUE ...] | --list")
FLAGS = {"experiment", "workdir", "results_dir", "overwrite", "no_progress", "list", "help",
         "task_index", "num_tasks", "merge"}
EXPERIMENTS = "experiments"  # the package of experiment modules (experiments/NAME.py)
BOOL_FLAGS = {"overwrite", "no_progress", "list", "help", "merge"}
ALL = "all"  # --experiment=all: every experiment the package lists in ALL


def experiments() -> dict[str, str]:
  """name -> first docstring line, for every experiments/NAME.py with get_config().

  Experiments are found by name at run time (`EXPERIMENTS`): the library never imports them."""
  pkg = importlib.import_module(EXPERIMENTS)
  out = {}
  for info in pkgutil.iter_modules(pkg.__path__):
    if not info.name.startswith("_"):
      doc = (importlib.import_module(f"{EXPERIMENTS}.{info.name}").__doc__ or "").strip()
      out[info.name] = doc.splitlines()[0] if doc else ""
  return out


def parse_args(argv: list[str]) -> tuple[dict, list[tuple[str, str]]]:
  flags, overrides = {}, []
  for arg in argv:
    io.check_utf8(arg, "argument")
    if not arg.startswith("--"):
      raise UserError(f"unexpected argument '{arg}'; {USAGE}")
    key, eq, value = arg[2:].partition("=")
    if key.startswith("config."):
      if not eq:
        raise UserError(f"'{arg}' needs a value: --{key}=VALUE")
      overrides.append((key[len("config."):], value))
    elif key in FLAGS:
      if key in BOOL_FLAGS and not eq:
        value = "true"
      elif not eq:
        raise UserError(f"'{arg}' needs a value: --{key}=VALUE")
      flags[key] = value
    else:
      raise UserError(f"unknown flag '--{key}'; valid: {choices('--' + f for f in FLAGS)}, "
                      "--config.KEY=VALUE")
  return flags, overrides


def _literal(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # a bare string, e.g. --config.target=digits


def apply_override(config, dotted: str, text: str) -> None:
  """Sets config[dotted] from text; the key must exist (ConfigDict keeps the type)."""
  import ml_collections
  node, parts = config, dotted.split(".")
  for i, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      where = ".".join(parts[:i]) or "config"
      valid = choices(node.keys()) if isinstance(node, ml_collections.ConfigDict) else "(none)"
      raise UserError(f"unknown config key '{dotted}': '{part}' is not in {where}; valid: {valid}")
    if i < len(parts) - 1:
      node = node[part]
  value = _literal(text)
  old = node[parts[-1]]
  if isinstance(old, ml_collections.ConfigDict):
    first = next(iter(old.keys()), "KEY")
    raise UserError(f"config.{dotted} is a block of settings, not one value: set its keys one "
                    f"at a time, e.g. --config.{dotted}.{first}=... (keys: {choices(old.keys())})")
  if isinstance(old, bool) and isinstance(value, str):
    value = {"true": True, "false": False}.get(value.lower(), value)
  try:
    node[parts[-1]] = value
  except TypeError:
    raise UserError(f"config.{dotted}: expected {type(old).__name__}, got {text!r}") from None


def _true(flags: dict, key: str) -> bool:
  return flags.get(key, "false").lower() in ("1", "true", "yes")


def _integer(text: str):
  try:
    return int(text)
  except ValueError:
    return text  # grid.check_task names the flag and its valid range


def task_of(flags: dict) -> tuple[int, int]:
  """(task_index, num_tasks) from the flags; (0, 1), the whole grid, when neither is given."""
  given = [k for k in ("task_index", "num_tasks") if k in flags]
  if not given:
    return 0, 1
  if len(given) == 1:
    raise UserError("--task_index and --num_tasks go together: --task_index=I --num_tasks=N "
                    "with 0 <= I < N")
  if _true(flags, "merge"):
    raise UserError("--merge builds the tables from every task's cells: drop --task_index "
                    "and --num_tasks")
  return _integer(flags["task_index"]), _integer(flags["num_tasks"])


def load_config(name: str | None, overrides, names: dict | None = None):
  """(the experiment's config with the overrides applied, locked; its module)."""
  names = experiments() if names is None else names
  if not name:
    raise UserError(f"--experiment is required; valid: {choices(names)}")
  if name not in names:
    raise UserError(f"unknown experiment '{name}'; valid: {choices(names)}, or {ALL} (or "
                    "NAME,NAME,... for several)")
  module = importlib.import_module(f"{EXPERIMENTS}.{name}")
  config = module.get_config()
  for dotted, text in overrides:
    apply_override(config, dotted, text)
  config.lock()  # from here on a misspelt key is an error, never a new key
  check_values(config)
  if config.kind == "sweep":
    check_overrides(config, [d for d, _ in overrides])
  return config, module


def check_values(config, prefix: str = "") -> None:
  """UserError naming the first float that is not finite (1e999, nan) anywhere in config."""
  import math
  import ml_collections
  items = config.items() if isinstance(config, (dict, ml_collections.ConfigDict)) else \
      enumerate(config)
  for key, value in items:
    dotted = f"{prefix}{key}" if isinstance(key, str) else f"{prefix[:-1]}[{key}]"
    if isinstance(value, float) and not math.isfinite(value):
      raise UserError(f"config.{dotted} must be a finite number, got {value}")
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      check_values(value, f"{dotted}.")
    elif isinstance(value, (list, tuple)):
      check_values(value, f"{dotted}.")


def check_overrides(config, dotted_keys) -> None:
  """UserError for an override that no cell would see (the grid sets that key per cell),
  saying how to restrict the grid instead."""
  from tlresearch.experiment import grid
  if not config.grid:
    return
  ignored = grid.set_per_cell(config)
  for dotted in dotted_keys:
    if dotted not in ignored:
      continue
    if dotted in ("target", "seed"):
      advice = f"--config.{dotted}s=[...] chooses them (e.g. --config.{dotted}s=" + \
          ("\"['digits']\"" if dotted == "target" else "[0]") + ")"
    else:
      from tlresearch.core import configs
      value = configs.get_path(config, dotted)
      advice = (f"restrict the grid instead, e.g. --config.grid=\"[{{'{dotted}': "
                f"[{value!r}]}}]\"")
    raise UserError(f"--config.{dotted} has no effect: every cell of the grid sets {dotted} "
                    f"itself; {advice}")



def main(argv: list[str]) -> int:
  flags, overrides = parse_args(argv)
  if "help" in flags:
    print(__doc__)
    return 0
  names = experiments()
  if "list" in flags:
    for name, doc in names.items():
      print(f"{name:28s} {doc}")
    print(f"{ALL:28s} " + ", ".join(importlib.import_module(EXPERIMENTS).ALL) + ", one after "
          "another on one cell store")
    return 0
  chosen = experiment_names(flags.get("experiment"), names)
  loaded = [(n, *load_config(n, overrides, names)) for n in chosen]  # all checked first
  config = loaded[0][1]
  check_flags(flags, loaded)
  # Heavy imports (jax, tensorflow) only once the command line is known to be valid.
  from tlresearch.core import layout
  layout.check(config.threads)
  layout.pin(config.threads)  # this process trains in the layout its workers do
  from tlresearch.training import parallel
  parallel.initialize_distributed_from_env()  # TLRESEARCH_DISTRIBUTED=1: multi-host JAX
  from tlresearch.experiment import sweep
  results_dir = flags.get("results_dir", "results")
  if config.kind == "pretrain":
    sweep.run_pretrain(config, chosen[0], results_dir, _true(flags, "overwrite"))
    return 0
  summaries = run_sweeps(flags, loaded, argv)
  if os.environ.get("TLRESEARCH_TIMINGS"):  # python -m tlresearch.tools.bench reads the breakdown
    io.write_json(os.environ["TLRESEARCH_TIMINGS"], summaries[-1] if len(summaries) == 1
                  else {"experiments": summaries})
  return 0


def experiment_names(text: str | None, names: dict) -> list[str]:
  """--experiment: one name, a comma-separated list, or "all" (the package's `ALL`)."""
  if text == ALL:
    return list(importlib.import_module(EXPERIMENTS).ALL)
  parts = [p.strip() for p in (text or "").split(",")]
  if len(parts) > 1 and not all(parts):
    raise UserError(f"--experiment={text}: an empty name in the list; valid: {choices(names)}, "
                    f"or {ALL}")
  return list(dict.fromkeys(parts))


def check_flags(flags: dict, loaded) -> None:
  """UserError for flags that do not fit the chosen experiments."""
  name, config = loaded[0][0], loaded[0][1]
  for n, c, _ in loaded:
    if c.kind not in ("pretrain", "sweep"):
      raise UserError(f"experiment '{n}' has unknown kind '{c.kind}'; valid: pretrain, sweep")
    if len(loaded) > 1 and c.kind != "sweep":
      raise UserError(f"--experiment lists run sweeps; '{n}' is a {c.kind} experiment: run it "
                      "alone")
    if c.threads != config.threads:
      raise UserError(f"the experiments run in one process, so they need one threads value: "
                      f"'{n}' has {c.threads}, '{name}' {config.threads}")
  for key in ("workdir", "results_dir"):
    if key in flags and not flags[key].strip():
      raise UserError(f"--{key} is empty; give a folder (default: "
                      f"{'workdir' if key == 'workdir' else 'results'})")
  task_index, num_tasks = task_of(flags)
  merge, overwrite = _true(flags, "merge"), _true(flags, "overwrite")
  if len(loaded) > 1 and (merge or num_tasks != 1):
    raise UserError("--task_index, --num_tasks and --merge split one experiment's grid: give "
                    "one --experiment")
  if config.kind == "pretrain" and (merge or num_tasks != 1):
    raise UserError(f"--task_index, --num_tasks and --merge split a sweep; '{name}' is a "
                    "pretrain experiment")
  if merge and overwrite:
    raise UserError("--merge trains nothing, so --overwrite does not apply: drop one of them")


@contextlib.contextmanager
def _shared_pool(loaded):
  """Several experiments train on one pool of worker processes (started once; their loaded
  backbones and compiled programs serve every grid), when `config.workers` asks for one."""
  if len(loaded) == 1:
    yield None
    return
  import jax
  from tlresearch import data as data_lib
  from tlresearch.experiment import sweep, workers
  config = loaded[0][1]
  workers.check(config.workers)
  sweep.enable_compile_cache(config.cache_dir or None)  # the workers take it at their start
  n = workers.count(config.workers, 10**9, jax.default_backend(), data_lib.mocked())
  if n == 1:
    yield None
    return
  logging.getLogger(__name__).info("training on %d worker processes", n)
  with workers.Pool(n, config.threads) as pool:
    yield pool


def run_sweeps(flags: dict, loaded, argv: list[str]) -> list[dict]:
  """Each experiment's grid in turn, on one cell store (--workdir, default workdir/): a cell
  that several experiments hold trains once. Returns their summaries."""
  from tlresearch.experiment import sweep
  workdir, results_dir = flags.get("workdir", "workdir"), flags.get("results_dir", "results")
  task_index, num_tasks = task_of(flags)
  command = " ".join(["python -m tlresearch.run"] + argv)
  progress = flags.get("no_progress", "false").lower() not in ("1", "true")
  summaries, retrained = [], set()
  with _shared_pool(loaded) as pool:
    for name, config, module in loaded:
      findings = getattr(module, "FINDINGS", None)
      if _true(flags, "merge"):
        summaries.append(sweep.merge_grid(config, name, workdir, results_dir,
                                          findings=findings, command=command))
        continue
      summaries.append(sweep.run_grid(config, name, workdir, results_dir,
                                      _true(flags, "overwrite"), progress=progress,
                                      findings=findings, command=command,
                                      task_index=task_index, num_tasks=num_tasks,
                                      retrained=retrained, pool=pool))
  if len(loaded) > 1:
    folders = [f for s in summaries for f in s["folders"]]
    seconds = sum(s["seconds"] for s in summaries)
    print(f"{len(loaded)} experiments: {len(folders)} cells asked for (final and selection), "
          f"{len(set(folders))} distinct, {sum(s['trained'] for s in summaries)} trained, in "
          f"{seconds:.0f}s")
  return summaries


class _Formatter(logging.Formatter):
  """The message alone; warnings and errors say so first."""

  def format(self, record):
    text = super().format(record)
    return text if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {text}"


def setup_logging() -> None:
  """The project's log lines (INFO and up) on stdout, one per message."""
  logger = logging.getLogger("tlresearch")
  if not logger.handlers:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_Formatter("%(message)s"))
    logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  logger.propagate = False


class Terminated(KeyboardInterrupt):
  """SIGTERM (a scheduler ending a job), handled as Ctrl-C is: every `finally` and context
  manager runs (workers stopped, locks released, nothing half-written)."""


def _on_sigterm(signum, frame):
  raise Terminated()


def cli() -> None:
  import signal
  sys.stdout.reconfigure(line_buffering=True)  # progress lines appear as they happen
  setup_logging()
  signal.signal(signal.SIGTERM, _on_sigterm)
  try:
    code = main(sys.argv[1:])
  except UserError as e:
    print(f"error: {shown(e)}", file=sys.stderr)
    code = 2
  except OSError as e:  # a full disk, a folder that became read-only, ...: the machine said no
    print(f"error: {shown(io.os_error_line(e))}", file=sys.stderr)
    code = 3
  except KeyboardInterrupt as e:
    # Finished cells and each cell's latest checkpoint stay: the same command resumes.
    term = isinstance(e, Terminated)
    print(f"{'terminated (SIGTERM)' if term else 'interrupted'}: finished cells and checkpoints "
          "are kept; run the same command again to resume", file=sys.stderr)
    code = 143 if term else 130
  sys.exit(code)


if __name__ == "__main__":
  cli()

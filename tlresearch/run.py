"""Command line: `python -m tlresearch.run --experiment=NAME [--config.KEY=VALUE ...]`.

Flags:
  --experiment=NAME   an experiment module in experiments/ (see --list)
  --list              list the experiments and exit
  --workdir=DIR       per-cell folders (default: workdir/NAME)
  --results_dir=DIR   tables and plots go to DIR/NAME (default: results)
  --overwrite         retrain every cell (default: reuse cells finished under the same config)
  --no_progress       no progress bar
  --config.KEY=VALUE  override a config value; VALUE is a Python literal or a bare string

Bad input (unknown experiment, config key or name, invalid value, missing data) prints one
line naming the problem and the valid choices and exits with status 2, before any training
and before anything is written to the results folder.
"""
from __future__ import annotations

import ast
import importlib
import os
import pkgutil
import sys

from tlresearch.errors import UserError, choices

USAGE = ("usage: python -m tlresearch.run --experiment=NAME [--workdir=DIR] [--results_dir=DIR] "
         "[--overwrite] [--no_progress] [--config.KEY=VALUE ...] | --list")
FLAGS = {"experiment", "workdir", "results_dir", "overwrite", "no_progress", "list", "help"}
BOOL_FLAGS = {"overwrite", "no_progress", "list", "help"}


def experiments() -> dict[str, str]:
  """name -> first docstring line, for every experiments/NAME.py with get_config()."""
  import experiments as pkg
  out = {}
  for info in pkgutil.iter_modules(pkg.__path__):
    if not info.name.startswith("_"):
      doc = (importlib.import_module(f"experiments.{info.name}").__doc__ or "").strip()
      out[info.name] = doc.splitlines()[0] if doc else ""
  return out


def parse_args(argv: list[str]) -> tuple[dict, list[tuple[str, str]]]:
  flags, overrides = {}, []
  for arg in argv:
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
  if isinstance(old, bool) and isinstance(value, str):
    value = {"true": True, "false": False}.get(value.lower(), value)
  try:
    node[parts[-1]] = value
  except TypeError:
    raise UserError(f"config.{dotted}: expected {type(old).__name__}, got {text!r}") from None


def main(argv: list[str]) -> int:
  flags, overrides = parse_args(argv)
  if "help" in flags:
    print(__doc__)
    return 0
  names = experiments()
  if "list" in flags:
    for name, doc in names.items():
      print(f"{name:28s} {doc}")
    return 0
  name = flags.get("experiment")
  if not name:
    raise UserError(f"--experiment is required; valid: {choices(names)}")
  if name not in names:
    raise UserError(f"unknown experiment '{name}'; valid: {choices(names)}")
  module = importlib.import_module(f"experiments.{name}")
  config = module.get_config()
  for dotted, text in overrides:
    apply_override(config, dotted, text)
  # Heavy imports (jax, tensorflow) only once the command line is known to be valid.
  from tlresearch import parallel
  parallel.initialize_distributed_from_env()  # TLRESEARCH_DISTRIBUTED=1: multi-host JAX
  from tlresearch import sweep
  results_dir = flags.get("results_dir", "results")
  overwrite = flags.get("overwrite", "false").lower() in ("1", "true", "yes")
  if config.kind == "pretrain":
    sweep.run_pretrain(config, name, results_dir, overwrite)
  elif config.kind == "sweep":
    sweep.run_grid(config, name, flags.get("workdir", os.path.join("workdir", name)),
                   results_dir, overwrite,
                   progress=flags.get("no_progress", "false").lower() not in ("1", "true"),
                   findings=getattr(module, "FINDINGS", None),
                   command=" ".join(["python -m tlresearch.run"] + argv))
  else:
    raise UserError(f"experiment '{name}' has unknown kind '{config.kind}'; valid: pretrain, sweep")
  return 0


def cli() -> None:
  sys.stdout.reconfigure(line_buffering=True)  # progress lines appear as they happen
  try:
    code = main(sys.argv[1:])
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    code = 2
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    code = 130
  sys.exit(code)


if __name__ == "__main__":
  cli()

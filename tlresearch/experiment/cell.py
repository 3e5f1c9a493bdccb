"""Grid cells: what decides a cell's result, its checks, and its training -> files.

A cell's folder holds `config.json`, `metrics.jsonl` and `final.json`; the tables are built
from `final.json` alone. `run` trains one cell or several that differ only in seed (one
`train.fit`), writing the same files for each.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time

import numpy as np
from flax import traverse_util
from sklearn import metrics as skm

from tlresearch import data as data_lib, models
from tlresearch.analysis import probes
from tlresearch.core import configs, io, layout, schema, timing
from tlresearch.core.errors import UserError
from tlresearch.data import checks as data_checks, preprocess
from tlresearch.deploy import recognizer
from tlresearch.experiment import grid
from tlresearch.methods import optim, penalty, strategies
from tlresearch.training import checkpoint, pretrain, programs, train

log = logging.getLogger(__name__)

# The fields that decide a cell's result; bump the version when their meaning changes.
# Not listed, so never part of a cell's identity: how it runs (checkpoint, train.seeds_mode,
# train.data_parallel), where caches live (cache_dir), the grid and report blocks.
IDENTITY_VERSION = 3
# train.probe_solver decides a fine-tuned cell's result, not a pretrained backbone's (which
# shares train.IDENTITY_FIELDS), so it is listed here only.
IDENTITY_FIELDS = ("target", "seed", "k_shot", "class_subset", "data_dir", "data", "strategy",
                   "pretrained_head", "probes", "model", "train.probe_solver") + tuple(
                       f"train.{k}" for k in train.IDENTITY_FIELDS)


def identity_defaults() -> dict:
  """Keys added after results existed, at the values that leave earlier identities as they
  were (`configs.pick`)."""
  return ({f"train.{k}": v for k, v in train.IDENTITY_DEFAULTS.items()}
          | {f"model.{k}": v for k, v in models.IDENTITY_DEFAULTS.items()}
          | {f"data.{k}": schema.data()[k] for k in ("follow_external_links", "drop_duplicates")})


def identity(config) -> dict:
  """What decides a cell's result (a ConfigDict or a saved config dict): its fields, and
  the identity of the pretrained backbone it starts from."""
  out = configs.pick(config, IDENTITY_FIELDS, IDENTITY_VERSION, identity_defaults())
  try:
    out["pretrain"] = pretrain.identity(configs.get_path(config, "pretrain"),
                                        configs.get_path(config, "model"))
  except UserError:
    out["pretrain"] = configs.MISSING
  return out


def fingerprint(cfg) -> str:
  return configs.digest(identity(cfg))


def folder(cfg) -> str:
  """A cell's folder in the cell store (`<workdir>/cells/`): named by its identity, so every
  experiment whose grid holds the same cell (same backbone, data, strategy,
  hyperparameters, seed, budget) finds it trained already. Target, strategy and seed lead,
  for a reader."""
  slug = "_".join(re.sub(r"[^A-Za-z0-9.]+", "-", str(v)).strip("-")
                  for v in (cfg.target, cfg.strategy, f"seed{cfg.seed}"))
  return f"{slug}-{fingerprint(cfg)[:12]}"


def configuration_key(cfg) -> str:
  """Cells with equal keys differ only in seed: they can train together (`run`)."""
  ident = identity(cfg)
  del ident["seed"]
  return json.dumps(ident, sort_keys=True)


# ---------------------------------------------------------------- checks

def check(cfg) -> None:
  """UserError for any invalid value in a cell's config, before anything trains."""
  data_lib.check_name(cfg.target)
  models.build(cfg.model, 2)  # family and architecture fields
  groups = models.groups_of(cfg.model)
  strategy = strategies.get(cfg.strategy, groups)
  paths = models.param_paths(cfg.model)
  for stage in strategy.stages:
    try:
      strategies.resolve(stage.rules, paths)
    except ValueError as e:
      raise UserError(f"strategy '{cfg.strategy}': {e}") from None
  if not strategies.trains(strategy, paths, groups[-1]) and not (cfg.pretrained_head
                                                                 and strategy.pretrained):
    raise UserError(f"strategy '{cfg.strategy}' never trains the head, so the head must come "
                    "from pretraining: set pretrained_head=True (the target must have the "
                    "source task's classes)")
  if cfg.pretrained_head and models.head_spec(cfg.model) != models.HeadSpec():
    raise UserError("pretrained_head=True loads the source's linear head, so model.head must "
                    "be the default (pooling avg, hidden [])")
  probes.check(tuple(cfg.probes))
  recognizer.check(cfg.save_model)
  lo, hi = grid.SEED_RANGE
  if not lo <= cfg.pretrain.seed <= hi:
    raise UserError(f"pretrain.seed must be an integer in [{lo}, {hi}], got {cfg.pretrain.seed}")
  ck = cfg.checkpoint
  for key, least in (("keep", 1), ("every_epochs", 1), ("min_seconds", 0)):
    if ck[key] < least:
      raise UserError(f"checkpoint.{key} must be >= {least}, got {ck[key]}")
  if strategy.pretrained:
    models.check_pretrained(cfg.model)  # e.g. missing ImageNet weights: fail now, not later
  if any(penalty.needs_source_head(s.penalty) for s in strategy.stages) and (
      models.pretrained_key(cfg.model) is not None):
    raise UserError(f"strategy '{cfg.strategy}' reads the source task's head, which only the "
                    f"project's source pretraining keeps; model.pretrained must be '' (got "
                    f"'{cfg.model.pretrained}')")
  if not 0 <= cfg.model.dropout_rate < 1:
    raise UserError(f"model.dropout_rate must be in [0, 1), got {cfg.model.dropout_rate}")
  if cfg.k_shot is not None and cfg.k_shot < 0:
    raise UserError(f"k_shot must be >= 1 (or 0 / None for all examples), got {cfg.k_shot}")
  train.check(cfg.train)


def check_all(cells) -> list:
  """Every cell's values, every dataset checked as a whole (tlresearch.data.checks: errors
  raise, warnings are logged once), every (target, classes, k_shot, seed, size) subset
  actually loadable, and a pretrained head only where the target has the source task's
  classes. Returns (dataset, DataCheck) pairs, one per dataset, in grid order."""
  for cell in cells:
    check(cell.config)
  loaded, checked = set(), {}
  # tfds.testing.mock_data's random labels may leave a class empty: its data is not checked
  # (an image folder is read for real under it too).
  mocked = data_lib.mocked()
  for c in cells:
    cfg = c.config
    whole = [cfg.target, cfg.data_dir, cfg.class_subset, cfg.model.input_size,
             cfg.data.to_dict()]
    key = json.dumps(whole + [cfg.k_shot or 0, cfg.seed], sort_keys=True)
    if key in loaded:
      continue
    loaded.add(key)
    data_key = json.dumps(whole, sort_keys=True)
    if data_key not in checked and not (mocked and not cfg.target.startswith("folder:")):
      size = cfg.model.input_size
      ds = data_lib.load(cfg.target, data_dir=cfg.data_dir or None,
                         image_size=int(size) if size else None, options=cfg.data,
                         class_subset=cfg.class_subset)
      checked[data_key] = (ds, data_checks.inspect(ds))
      for warning in checked[data_key][1].warnings:
        log.warning("%s", warning)
    data_lib.load_for(cfg)
  for c in cells:
    if c.config.pretrained_head:
      p = c.config.pretrain
      source = data_lib.load(p.dataset, data_dir=p.data_dir or None, class_subset=p.class_subset)
      target = data_lib.load(c.config.target, data_dir=c.config.data_dir or None,
                             class_subset=c.config.class_subset)
      if source.num_classes != target.num_classes:
        raise UserError(f"pretrained_head=True needs the source's {source.num_classes} classes, "
                        f"but {c.config.target} has {target.num_classes}")
  return list(checked.values())


def keeps_model(cfg) -> bool:
  """Whether this cell keeps its trained variables (`save_model`; tlresearch.deploy.recognizer):
  every final cell does under "best" (the best is known only once all have finished) and
  "all"; selection cells never do."""
  return cfg.save_model != "none"


# What the tables, selection and kept models read from a final.json, and its type.
_NUMBER = (int, float)
FINAL_FIELDS = {"cell_id": str, "axes": dict, "status": str, "strategy": str, "target": str,
                "seed": int, "test_accuracy": _NUMBER, "test_loss": _NUMBER,
                "test_macro_f1": _NUMBER, "val_accuracy": _NUMBER, "best_epoch": int,
                "epochs_run": int, "budget_limited": bool, "trainable_params": int,
                "hparams": dict, "classification_report": dict, "wall_seconds": _NUMBER,
                "compile_seconds": _NUMBER}


def final_problem(final, cell) -> str | None:
  """Why a final.json cannot stand for `cell` (a missing or mistyped field, another cell's
  record), or None."""
  if not isinstance(final, dict):
    return "it is not a JSON object"
  if final.get("status") not in ("ok", "diverged"):
    return f"its status is {final.get('status')!r}"
  for key, kind in FINAL_FIELDS.items():
    if key not in final:
      return f"it has no '{key}'"
    if not isinstance(final[key], kind) or (kind is int and isinstance(final[key], bool)):
      return f"its '{key}' is {final[key]!r}"
  return None


def data_digest(cfg) -> str | None:
  """What a `folder:` target holds (data.folder.content_digest; None for other datasets,
  whose content the cell's identity already names)."""
  if not str(cfg.target).startswith("folder:"):
    return None
  from tlresearch.data import folder
  return folder.content_digest(cfg.target[len("folder:"):],
                               bool(cfg.data.follow_external_links))


def _first_difference(a, b, prefix: str = "") -> tuple[str, object, object]:
  """(dotted key, a's value, b's value) at the first key where two identities differ."""
  if isinstance(a, dict) and isinstance(b, dict):
    for key in sorted(set(a) | set(b), key=str):
      x, y = a.get(key, configs.MISSING), b.get(key, configs.MISSING)
      if x != y:
        return _first_difference(x, y, f"{prefix}{key}.")
  return prefix.rstrip("."), a, b


def not_its_own(cell_dir: str, cell) -> str | None:
  """Why the files in `cell_dir` are not `cell`'s own, or None when the folder is missing,
  empty, or holds only this cell's files (finished, or interrupted with a checkpoint to
  resume). Not its own: no readable config.json, another cell's config.json (a folder
  copied in from elsewhere), a `folder:` dataset that changed since it trained, a final.json
  that is damaged or disagrees with its config.json."""
  try:
    names = [n for n in os.listdir(cell_dir) if not n.startswith(".")]
  except FileNotFoundError:
    return None
  except NotADirectoryError:
    return "it is a file, not a cell folder"
  if not names:
    return None
  try:
    saved = io.read_json(os.path.join(cell_dir, "config.json"))
  except (OSError, ValueError):
    return f"it holds {', '.join(sorted(names))} but no readable config.json"
  if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict):
    return "its config.json is not a cell's config"
  theirs, mine = identity(saved["config"]), identity(cell.config)
  if theirs != mine:
    key, was, now = _first_difference(theirs, mine)
    return f"its config.json is another cell's ({key} {was!r}, this cell's {now!r})"
  if saved.get("data_digest") != data_digest(cell.config):
    return f"the files of {cell.config.target} changed since it trained"
  if "final.json" not in names:
    return None
  try:
    final = io.read_json(os.path.join(cell_dir, "final.json"))
  except (OSError, ValueError) as e:
    return f"its final.json is unreadable ({type(e).__name__})"
  problem = final_problem(final, cell)
  if problem is None and (final["cell_id"] != saved.get("cell_id")
                          or final["target"] != cell.config.target
                          or final["seed"] != cell.config.seed):
    problem = "it is another cell's record"
  return None if problem is None else f"its final.json cannot be reused ({problem})"


def finished(cell_dir: str, cell) -> dict | None:
  """The cell's final.json when its folder is its own (`not_its_own`) and it finished;
  else None (`set_aside` moves a folder that is not its own out of the way)."""
  if not_its_own(cell_dir, cell) is not None:
    return None
  try:
    final = io.read_json(os.path.join(cell_dir, "final.json"))
  except (OSError, ValueError):
    return None
  # The store's record, under this grid's name for the cell (another experiment may have
  # trained it, under its own axes).
  return {**final, "cell_id": cell.id, "axes": cell.axes}


def set_aside(cell_dir: str, cell) -> str | None:
  """Before `cell` trains: a folder that is not its own (`not_its_own`) is moved to
  `<cell_dir>.stale-N`, never deleted or mixed with the new run's files, with one warning
  line; the cell then trains from scratch. Returns where it went, or None."""
  why = not_its_own(cell_dir, cell)
  if why is None:
    return None
  n = 1
  while os.path.lexists(f"{cell_dir}.stale-{n}"):
    n += 1
  aside = f"{cell_dir}.stale-{n}"
  os.rename(cell_dir, aside)
  log.warning("%s: %s; moved it to %s: the cell trains from scratch", cell_dir, why,
              os.path.basename(aside))
  return aside


# ---------------------------------------------------------------- training

def trainable_params(variables, strategy) -> int:
  """Largest number of trainable parameters over the strategy's stages."""
  paths = traverse_util.flatten_dict(variables["params"], sep="/").keys()
  return max(optim.count(variables["params"], strategies.resolve(s.rules, paths))
             for s in strategy.stages)


def not_loaded(cfg, strategy, groups) -> tuple[str, ...]:
  """Groups that keep their fresh init: the head (a new task's head is new, unless the cell
  asks for the source head), and the groups above a strategy's `transfer_groups`."""
  head = () if cfg.pretrained_head else (groups[-1],)
  above = () if strategy.transfer_groups is None else tuple(groups[strategy.transfer_groups:-1])
  return above + head


def run(cells, cell_dirs, pretrained: dict | None) -> list[dict]:
  """Trains cells that differ only in seed (one cell is the common case) with one
  `train.fit`, and writes config.json, metrics.jsonl and final.json to each cell's folder.
  Returns the final.json records; compile_seconds and wall_seconds are each cell's equal
  share of the group's, layout the process's execution layout (tlresearch.core.layout)."""
  t0 = time.perf_counter()
  cfgs = [c.config for c in cells]
  with programs.compile_clock() as clock:
    with timing.phase("files"):
      for c, cell_dir in zip(cells, cell_dirs):
        io.write_json(os.path.join(cell_dir, "config.json"),
                      {"cell_id": c.id, "axes": c.axes, "config": c.config.to_dict(),
                       "data_digest": data_digest(c.config)})
    with timing.phase("data"):
      datas = [data_lib.load_for(cfg) for cfg in cfgs]
      data_reports = [data_lib.report(ds) for ds in datas]  # skipped files, carved splits
    with timing.phase("init"):
      model = models.build(cfgs[0].model, datas[0].num_classes)  # one module for every seed
      strategy = strategies.get(cfgs[0].strategy, model.groups)
      keys = [train.CellKeys.from_seed(cfg.seed) for cfg in cfgs]
      starts = [_start_variables(cfg, model, strategy, k, ds, pretrained)
                for cfg, k, ds in zip(cfgs, keys, datas)]
    checkpointer = _checkpointer(cfgs, cell_dirs) if cfgs[0].checkpoint.enabled else None
    results = train.fit(model, starts, strategy, datas, cfgs[0].train, keys,
                        checkpointer=checkpointer)
    with timing.phase("record"):
      source = source_head(cfgs[0], strategy, pretrained)
      finals = [final_record(c, ds, rep, model, strategy, v, r, source)
                for c, ds, rep, v, r in zip(cells, datas, data_reports, starts, results)]
  share = {"compile_seconds": clock.seconds / len(cells),
           "wall_seconds": (time.perf_counter() - t0) / len(cells), "layout": layout.current()}
  with timing.phase("files"):
    for c, ds, cell_dir, result, final in zip(cells, datas, cell_dirs, results, finals):
      final.update(share)
      if keeps_model(c.config):  # before final.json: a finished cell has its model
        recognizer.save(recognizer.model_dir(cell_dir), result.variables,
                        recognizer.card(c.config, final, ds.class_names,
                                        ds.train_x.shape[1:3], preprocess.style_of(model)))
      io.write_jsonl(os.path.join(cell_dir, "metrics.jsonl"), result.history)
      io.write_json(os.path.join(cell_dir, "final.json"), final)
    for cell_dir in cell_dirs:  # final.json is each cell's record from now on
      checkpoint.Rolling(os.path.join(cell_dir, "checkpoints")).clear()
  return finals


class Backbones:
  """cfg -> the pretrained variables it starts from, each backbone loaded (or pretrained and
  cached) once per process."""

  def __init__(self):
    self._loaded = {}

  def __call__(self, cfg) -> dict:
    key = models.pretrained_key(cfg.model)  # e.g. keras:imagenet weights, or None
    if key is not None:
      if key not in self._loaded:
        self._loaded[key] = models.load_pretrained(cfg.model)
      return self._loaded[key]
    pcfg = pretrain.for_model(cfg.pretrain, cfg.model)
    key = pretrain.cache_key(pcfg)
    if key not in self._loaded:
      self._loaded[key] = pretrain.get_or_build(pcfg, cfg.cache_dir or None)[0]
    return self._loaded[key]


def _checkpointer(cfgs, cell_dirs):
  """seed indices -> the FitCheckpointer of the seeds that train together: seeds trained
  together save one checkpoint, in the first one's folder."""
  policy = cfgs[0].checkpoint

  def for_seeds(indices):
    name = "-".join(fingerprint(cfgs[i]) for i in indices)
    return checkpoint.FitCheckpointer(
        os.path.join(cell_dirs[indices[0]], "checkpoints"),
        hashlib.sha256(name.encode()).hexdigest(), every_epochs=policy.every_epochs,
        min_seconds=policy.min_seconds, keep=policy.keep)

  return for_seeds


def _start_variables(cfg, model, strategy, keys, ds, pretrained):
  # The same init key for every strategy: the head starts identical across a comparison.
  fresh = programs.init_variables(model, keys.init, ds.train_x.shape[1:])
  if not strategy.pretrained:
    return fresh
  start = models.merge_pretrained(fresh, pretrained, not_loaded(cfg, strategy, model.groups))
  if any(penalty.needs_source_head(s.penalty) for s in strategy.stages):
    # The pretrained source head (its classifier), read by the lwf penalty.
    start[penalty.SOURCE_HEAD] = dict(source_head(cfg, strategy, pretrained))
  return start


def source_head(cfg, strategy, pretrained) -> dict | None:
  """The source task's classifier ({'kernel', 'bias'}) of the backbone a cell starts from:
  only the project's source pretraining keeps one."""
  if not strategy.pretrained or pretrained is None or models.pretrained_key(cfg.model):
    return None
  return pretrained.get("params", {}).get("head", {}).get("dense")


def final_record(cell, ds, data_report, model, strategy, variables,
                 result: train.FitResult, source=None) -> dict:
  """final.json's fields, except the timings (compile_seconds, wall_seconds) `run` adds.
  `variables` are the cell's starting ones; `source` its backbone's source head, if any."""
  cfg = cell.config
  pred = result.test_predictions
  # Per-class metrics and their macro mean over the classes the test split has: a class
  # with no test example has no recall or F1 to average (the data check warns of it).
  labels = np.unique(ds.test_y).tolist()
  return {
      "cell_id": cell.id, "axes": cell.axes,
      "status": "diverged" if result.diverged else "ok", "diverged_at": result.diverged,
      "strategy": strategy.spec, "target": cfg.target, "seed": cfg.seed,
      "test_accuracy": result.test["accuracy"], "test_loss": result.test["loss"],
      "test_macro_f1": float(skm.f1_score(ds.test_y, pred, labels=labels, average="macro",
                                          zero_division=0)),
      "classification_report": skm.classification_report(
          ds.test_y, pred, labels=labels, target_names=[ds.class_names[c] for c in labels],
          output_dict=True, zero_division=0),
      "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
      "budget_limited": result.budget_limited,
      "trainable_params": trainable_params(variables, strategy),
      "total_params": optim.count(variables["params"]),
      "train_examples": int(len(ds.train_x)), "cached_prefix": result.cached_prefix,
      "notes": result.notes, **data_report,
      # The selection protocol (tlresearch.experiment.selection) reads only this validation score.
      "val_accuracy": result.val["accuracy"],
      "hparams": {"train.lr": cfg.train.lr, "train.weight_decay": cfg.train.weight_decay},
      # The converged probe's solve (chosen l2, gradient norm, the whole path), if any.
      "probe": result.probe,
      # A weight-space method's curve and chosen point (WiSE-FT), if any.
      "weight_space": result.weight_space,
      **probes.measure(tuple(cfg.probes), model, variables, result.variables, ds, source),
  }

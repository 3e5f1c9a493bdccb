"""A kept model: a trained cell's variables beside a model card, and the recognizer that
loads them (what `tlresearch.deploy.export` and `tlresearch.deploy.predict` start from).

`config.save_model` decides which cells keep theirs (operational: never part of a cell's
identity):
- "none": no model is kept (the cell's checkpoints are deleted when it finishes);
- "best": per target, the best configuration by mean validation accuracy over its seeds,
  and within it the seed with the best validation accuracy (the first seed on a tie);
- "all": every final cell (selection cells never keep one).

Layout of a kept model (`<cell>/model/`, written atomically):
  variables/        the trained variables (an Orbax checkpoint with a SHA-256, see checkpoint)
  model_card.json   what the model is and how to feed it (`CARD_FORMAT`): the backbone and
                    head config, the strategy, the class names, the preprocessing style and
                    input size, the cell's metrics and its whole config
"""
from __future__ import annotations

import datetime
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from tlresearch.core import configs, io
from tlresearch.core.errors import choices, UserError
from tlresearch.training import checkpoint

log = logging.getLogger(__name__)

SAVE_MODEL = ("none", "best", "all")
CARD_FORMAT = "tlresearch.model/1"
CARD = "model_card.json"
VARIABLES = "variables"
MODEL_DIR = "model"  # inside a cell's folder
# How predict and export bring an image to the input size; the training pipeline's resize
# (tlresearch.data.images).
RESIZE = "pillow_bilinear_antialiased"
# How the training images were decoded: "draft" (a `folder:` dataset resized to
# model.input_size: JPEGs decoded at a reduced scale when that suffices, data.folder) or
# "full" (every other dataset: decoded at full size, then resized).
DECODES = ("draft", "full")
CHUNK = 64  # images per call in Recognizer.probabilities (one compiled shape)


def check(save_model) -> None:
  if save_model not in SAVE_MODEL:
    raise UserError(f"save_model must be one of {choices(SAVE_MODEL)}, got '{save_model}'")


def model_dir(cell_dir: str) -> str:
  return os.path.join(cell_dir, MODEL_DIR)


def has_model(cell_dir: str) -> bool:
  return os.path.isfile(os.path.join(model_dir(cell_dir), CARD))


def card(cfg, final: dict, class_names, image_shape, style: str) -> dict:
  """The model card of a cell: `cfg` its config, `final` its final.json record, `image_shape`
  (H, W) of the images it trained on, `style` its preprocessing (data.preprocess)."""
  return {
      "format": CARD_FORMAT,
      "cell_id": final["cell_id"], "target": cfg.target, "seed": cfg.seed,
      "strategy": final["strategy"],
      "model": cfg.model.to_dict(),
      "class_names": [str(c) for c in class_names],
      "input": {"height": int(image_shape[0]), "width": int(image_shape[1]), "channels": 3,
                "dtype": "uint8", "color": "RGB", "resize": RESIZE, "preprocessing": style,
                "decode": decode_of(cfg)},
      "metrics": {k: final[k] for k in ("test_accuracy", "test_macro_f1", "val_accuracy",
                                        "best_epoch", "epochs_run", "classification_report")},
      "hparams": final["hparams"],
      "config": cfg.to_dict(),
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }


def decode_of(cfg) -> str:
  """How the cell's training images were decoded (`DECODES`)."""
  return "draft" if str(cfg.target).startswith("folder:") and cfg.model.input_size else "full"


def save(path: str, variables: dict, model_card: dict) -> None:
  """Writes a kept model to folder `path`, atomically (a kill leaves none or all of it)."""
  with io.atomic_dir(path) as tmp:
    checkpoint.save(os.path.join(tmp, VARIABLES), jax.device_get(variables))
    io.write_json(os.path.join(tmp, CARD), model_card)


def read_card(path: str) -> dict:
  """The model card in folder `path`; UserError when it is not a kept model."""
  try:
    c = io.read_json(os.path.join(path, CARD))
  except (OSError, ValueError):
    raise UserError(f"{path} is not a kept model: no readable {CARD} (make one with "
                    "--config.save_model=best or all)") from None
  if not isinstance(c, dict) or c.get("format") != CARD_FORMAT:
    raise UserError(f"{path}/{CARD} has format "
                    f"{c.get('format') if isinstance(c, dict) else None!r}; this version reads "
                    f"'{CARD_FORMAT}'")
  problem = _card_problem(c)
  if problem:
    raise UserError(f"{path}/{CARD} is damaged: {problem}")
  return c


def _card_problem(c: dict) -> str | None:
  """What makes a card unusable (None when nothing does)."""
  from tlresearch.data import preprocess
  names, spec = c.get("class_names"), c.get("input")
  if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
    return "class_names must be a non-empty list of names"
  if not isinstance(c.get("model"), dict) or "family" not in c["model"]:
    return "model must be the model config (with its family)"
  if not isinstance(spec, dict):
    return "input must describe the images"
  for key in ("height", "width"):
    if not isinstance(spec.get(key), int) or spec[key] < 1:
      return f"input.{key} must be an integer >= 1"
  if spec.get("preprocessing") not in preprocess.STYLES:
    return f"input.preprocessing must be one of {choices(preprocess.STYLES)}"
  if spec.get("decode", "full") not in DECODES:
    return f"input.decode must be one of {choices(DECODES)}"
  return None


class Recognizer:
  """A kept model, ready to recognise images: `probabilities(images)` takes uint8 RGB
  [N, H, W, 3] at the card's input size and returns [N, classes]."""

  def __init__(self, module, variables: dict, model_card: dict):
    self.module, self.variables, self.card = module, variables, model_card
    self._apply = jax.jit(self.apply)

  @property
  def class_names(self) -> list[str]:
    return self.card["class_names"]

  @property
  def image_size(self) -> tuple[int, int]:
    return self.card["input"]["height"], self.card["input"]["width"]

  def apply(self, variables, images):
    """uint8 images -> class probabilities (preprocessing, the network, softmax)."""
    from tlresearch.data import preprocess
    x = preprocess.apply(self.card["input"]["preprocessing"], images)
    return jax.nn.softmax(self.module.apply(variables, x).astype(jnp.float32), axis=-1)

  def function(self):
    """`apply` with the variables closed over: a function of the images alone (what
    `tlresearch.deploy.export` serializes)."""
    return lambda images: self.apply(self.variables, images)

  def probabilities(self, images) -> np.ndarray:
    """In chunks of CHUNK images (the last one padded), so any number compiles once."""
    images = np.asarray(images, np.uint8)
    n = len(images)
    size = min(CHUNK, max(n, 1))
    out = []
    for start in range(0, n, size):
      chunk = images[start:start + size]
      padded = np.zeros((size,) + images.shape[1:], np.uint8)
      padded[:len(chunk)] = chunk
      out.append(np.asarray(self._apply(self.variables, padded))[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, len(self.class_names)), np.float32)


def load(path: str) -> Recognizer:
  """The kept model in folder `path` (UserError when it is not one, or is damaged)."""
  import ml_collections
  from tlresearch import models
  c = read_card(path)
  module = models.build(ml_collections.ConfigDict(c["model"]), len(c["class_names"]))
  h, w = c["input"]["height"], c["input"]["width"]
  target = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, h, w, 3)))
  try:
    variables, _ = checkpoint.restore(os.path.join(path, VARIABLES), target)
  except checkpoint.CheckpointError as e:
    raise UserError(f"kept model {path}: {e}") from None
  return Recognizer(module, variables, c)


def choose_best(finals: list[dict], configuration) -> dict[str, dict]:
  """target -> the final record whose model `save_model="best"` keeps: the best configuration
  by mean validation accuracy over its seeds, and within it the best seed. `configuration`
  maps a record's axes to its configuration key (configs.configuration)."""
  by_target: dict[str, dict[str, list[dict]]] = {}
  for f in finals:
    if f is not None and f.get("status") == "ok":
      by_target.setdefault(f["target"], {}).setdefault(configuration(f["axes"]), []).append(f)
  out = {}
  for target, configs in by_target.items():
    # max() keeps the first of equals: grid order for configurations, seed order for seeds.
    best = max(configs.values(), key=lambda fs: np.mean([f["val_accuracy"] for f in fs]))
    out[target] = max(best, key=lambda f: f["val_accuracy"])
  return out


def keep(config, cells, finals, dirs: dict[str, str], record_path: str, retrain=None) -> dict:
  """Applies `save_model` once every final cell has finished (`dirs`: cell id -> its folder):
  under "best", deletes every kept model but each target's best (`choose_best`) and those
  another experiment's record beside `record_path` keeps, retraining a best cell that
  finished before models were kept (`retrain(cell, cell_dir)` -> its final record; None, as
  in --merge: UserError instead). Writes the record to `record_path` and returns it."""
  policy = config.save_model
  if policy == "none":
    if os.path.exists(record_path):  # an earlier run's record would name models not kept now
      os.unlink(record_path)
    return {}
  workdir = os.path.dirname(os.path.dirname(record_path))
  best = choose_best(finals, configs.configuration)
  for target, f in sorted(best.items()):
    cell_dir = dirs[f["cell_id"]]
    if not has_model(cell_dir):
      if retrain is None:
        raise UserError(f"cannot keep the best model for {target}: cell {f['cell_id']} in "
                        f"{workdir} finished without save_model; rerun the task that trained "
                        "it with --config.save_model=best (it retrains that cell only)")
      log.info("retraining %s to keep its model (it finished before save_model was set)",
               f["cell_id"])
      again = retrain(next(c for c in cells if c.id == f["cell_id"]), cell_dir)
      if (again["test_accuracy"], again["val_accuracy"]) != (f["test_accuracy"],
                                                             f["val_accuracy"]):
        log.warning("the retrained %s differs from its first run (test accuracy "
                    "%.4f vs %.4f); the kept model is the retrained one", f["cell_id"],
                    again["test_accuracy"], f["test_accuracy"])
      best[target] = again
  if policy == "best":
    keep = {f["cell_id"] for f in best.values()}
    others = _kept_elsewhere(record_path)
    for c in cells:
      if c.id not in keep and model_dir(dirs[c.id]) not in others:
        shutil.rmtree(model_dir(dirs[c.id]), ignore_errors=True)
  kept = [c.id for c in cells if has_model(dirs[c.id])]
  if policy == "all" and len(kept) < len(cells):
    raise UserError(f"save_model=all: {len(cells) - len(kept)} finished cells in {workdir} have "
                    "no kept model; rerun the task that trained them with the same config")
  record = {"save_model": policy,
            "best": {t: {"cell_id": f["cell_id"], "model": model_dir(dirs[f["cell_id"]]),
                         "strategy": f["strategy"], "axes": f["axes"],
                         "val_accuracy": f["val_accuracy"], "test_accuracy": f["test_accuracy"]}
                     for t, f in sorted(best.items())},
            "models": [model_dir(dirs[i]) for i in kept]}
  io.write_json(record_path, record)
  for t, b in record["best"].items():
    log.info("kept the best model for %s: %s (%s, val acc %.1f%%)", t, b["model"],
             b["strategy"], 100 * b["val_accuracy"])
  return record


def _kept_elsewhere(record_path: str) -> set[str]:
  """The models the other experiments' records in the same folder keep (cells are shared
  between experiments: one's loser may be another's best)."""
  folder, out = os.path.dirname(record_path), set()
  for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else ():
    path = os.path.join(folder, name)
    if name.endswith(".json") and path != record_path:
      try:
        out.update(io.read_json(path).get("models", []))
      except (OSError, ValueError, AttributeError):
        continue
  return out

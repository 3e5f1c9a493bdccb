"""A kept model: a trained cell's variables beside a model card, and the recognizer that
loads them (what `tlresearch.export` and `tlresearch.predict` start from).

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
import os

import jax
import jax.numpy as jnp
import numpy as np

from tlresearch import checkpoint, io
from tlresearch.errors import UserError, choices

SAVE_MODEL = ("none", "best", "all")
CARD_FORMAT = "tlresearch.model/1"
CARD = "model_card.json"
VARIABLES = "variables"
MODEL_DIR = "model"  # inside a cell's folder
# How predict and export bring an image to the input size; the training pipeline's resize
# (tlresearch.data.images).
RESIZE = "pillow_bilinear_antialiased"


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
                "dtype": "uint8", "color": "RGB", "resize": RESIZE, "preprocessing": style},
      "metrics": {k: final[k] for k in ("test_accuracy", "test_macro_f1", "val_accuracy",
                                        "best_epoch", "epochs_run", "classification_report")},
      "hparams": final["hparams"],
      "config": cfg.to_dict(),
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }


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
  if c.get("format") != CARD_FORMAT:
    raise UserError(f"{path}/{CARD} has format {c.get('format')!r}; this version reads "
                    f"'{CARD_FORMAT}'")
  return c


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
    `tlresearch.export` serializes)."""
    return lambda images: self.apply(self.variables, images)

  def probabilities(self, images) -> np.ndarray:
    return np.asarray(self._apply(self.variables, jnp.asarray(images, jnp.uint8)))


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
  maps a record's axes to its configuration key (grid.configuration)."""
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

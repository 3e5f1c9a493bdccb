"""A kept model (tlresearch.deploy.recognizer) exported for serving, in a folder that needs no
tlresearch to run.

    python -m tlresearch.deploy.export --model=DIR --out=DIR [--format=jax[,saved_model,tflite]]
                                [--platforms=cpu[,cuda,...]] [--overwrite]

`--model` is a kept model (`<cell>/model/`, or the cell folder holding it). Each export is a
function of uint8 RGB images [N, H, W, 3] at the card's input size (N free) returning float32
probabilities [N, classes]: preprocessing, network and softmax inside, the variables stored
as constants. The caller resizes images as training did (`export.json` says how).

Formats (`--format`, a comma list; default `jax`):
  jax          OUT/model.jax: `jax.export` of the jitted function with a symbolic batch
               dimension, serialized. Loads with jax alone:
                 exp = jax.export.deserialize(bytearray(open("model.jax", "rb").read()))
                 probabilities = exp.call(images_uint8)
               A serialized export is readable by jax versions within its compatibility
               window (about six months either side of the jax that wrote it,
               `export.json` -> jax_version). `--platforms` chooses what it is lowered for
               (default: this machine's backend; an export runs only on those).
  saved_model  OUT/saved_model/: `jax2tf.convert` (native serialization: one XlaCallModule
               op) in a `tf.Module` whose serving signature takes `images` (uint8
               [None, H, W, 3]) and returns {"probabilities": float32 [None, classes]}.
               Needs TensorFlow (`pip install -e ".[tf]"`).
  tflite       OUT/model.tflite: TFLite's converter run on such a SavedModel, lowered for the
               CPU whatever `--platforms` says (no SELECT_TF_OPS needed: it legalizes the
               StableHLO inside XlaCallModule to builtin ops). With TensorFlow 2.21 it
               converts the project's ResNets, VGG16-style (`caffe`) and MobileNetV2 models
               (tested), and the output equals the kept model's. A slice such as
               `x[..., ::-1]` would lower to a gather that a symbolic batch makes
               `dynamic_gather`, which the converter does not support (the `caffe`
               preprocessing flips channels with `jnp.flip` for this reason). When the
               converter fails, the export stops with exit status 2 and one line
               (`error: tflite: ...` and the converter's first error line).

Every export is checked before it is kept: its probabilities on a few seeded random images
must equal the kept model's (max abs difference <= CHECK_TOLERANCE; not run for a format
lowered only for other platforms than this machine's); each format's line gives the
difference. OUT also gets `export.json` (class names, input spec, source cell,
metrics, how to load each format) and a copy of `model_card.json`. OUT is written whole or
not at all (a temporary folder renamed into place); an existing non-empty OUT is refused
unless `--overwrite`. Bad input (no kept model, unknown format or flag, TensorFlow missing)
exits with status 2 after one `error:` line, before anything is written.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import sys
import tempfile
import time
import warnings

from tlresearch.core.errors import UserError, choices

USAGE = ("usage: python -m tlresearch.deploy.export --model=DIR --out=DIR "
         "[--format=jax[,saved_model,tflite]] [--platforms=cpu[,cuda,...]] [--overwrite]")
FLAGS = {"model", "out", "format", "platforms", "overwrite", "help"}
BOOL_FLAGS = {"overwrite", "help"}
FORMATS = ("jax", "saved_model", "tflite")
TF_FORMATS = ("saved_model", "tflite")
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
EXPORT_FORMAT = "tlresearch.export/1"
EXPORT_CARD = "export.json"
JAX_FILE = "model.jax"
SAVED_MODEL_DIR = "saved_model"
TFLITE_FILE = "model.tflite"
FILES = {"jax": JAX_FILE, "saved_model": SAVED_MODEL_DIR, "tflite": TFLITE_FILE}
SIGNATURE, INPUT_NAME, OUTPUT_NAME = "serving_default", "images", "probabilities"
# Largest |probability difference| between an export and its kept model on the check images.
CHECK_TOLERANCE = 1e-5
_CHECK_IMAGES = 3

HOW_TO_LOAD = {
    "jax": ("import jax; exp = jax.export.deserialize(bytearray(open('model.jax', 'rb')"
            ".read())); probabilities = exp.call(images)  # jax only, no tlresearch"),
    "saved_model": ("import tensorflow as tf; m = tf.saved_model.load('saved_model'); "
                    "probabilities = m.signatures['serving_default'](images=tf.constant("
                    "images))['probabilities']"),
    "tflite": ("import tensorflow as tf; run = tf.lite.Interpreter('model.tflite')"
               ".get_signature_runner(); probabilities = run(images=images)"
               "['probabilities']"),
}
HOW_TO_FEED = ("images: uint8 RGB [N, height, width, 3], resized as training did: "
               "img = PIL.Image.open(f); if input.decode is 'draft': img.draft('RGB', "
               "(width, height)) (JPEG: decode at a reduced scale when that suffices); "
               "img.convert('RGB').resize((width, height), PIL.Image.BILINEAR, "
               "reducing_gap=None); preprocessing is inside the model")


class ExportMismatch(Exception):
  """An export whose probabilities differ from its kept model's."""


def _parse(argv: list[str]) -> dict:
  flags = {}
  for arg in argv:
    if not arg.startswith("--"):
      raise UserError(f"unexpected argument '{arg}'; {USAGE}")
    key, eq, value = arg[2:].partition("=")
    if key not in FLAGS:
      raise UserError(f"unknown flag '--{key}'; valid: {choices('--' + f for f in FLAGS)}")
    if key in BOOL_FLAGS:
      value = value.lower() if eq else "true"
      if value not in ("1", "true", "yes", "0", "false", "no"):
        raise UserError(f"--{key} takes no value (or true/false), got '{value}'")
      value = value in ("1", "true", "yes")
    elif not eq or not value:
      raise UserError(f"'{arg}' needs a value: --{key}=VALUE")
    flags[key] = value
  return flags


def _names(text: str, valid, what: str) -> list[str]:
  names = []
  for name in (n.strip() for n in text.split(",")):
    if name not in valid:
      raise UserError(f"unknown {what} '{name}'; valid: {choices(valid)}")
    if name not in names:
      names.append(name)
  return names


def model_path(path: str) -> str:
  """`path` itself, or the kept model inside it when `path` is a cell folder."""
  from tlresearch.deploy import recognizer
  if not os.path.isfile(os.path.join(path, recognizer.CARD)) and recognizer.has_model(path):
    return recognizer.model_dir(path)
  return path


def check_out(out: str, model: str, overwrite: bool) -> None:
  """UserError when `out` cannot be written: a file, non-empty without `overwrite`, or the
  kept model itself (or a folder holding it)."""
  if os.path.exists(out) and not os.path.isdir(out):
    raise UserError(f"--out {out} exists and is not a folder")
  real_out, real_model = os.path.realpath(out), os.path.realpath(model)
  if real_model == real_out or real_model.startswith(real_out + os.sep):
    raise UserError(f"--out {out} holds the kept model {model}: choose another folder")
  if os.path.isdir(out) and os.listdir(out) and not overwrite:
    raise UserError(f"--out {out} exists and is not empty: pass --overwrite to replace it")


def require_tensorflow() -> None:
  """UserError naming the install command when TensorFlow cannot be imported."""
  with quiet_stderr():
    try:
      _tf()
    except ImportError as e:
      raise UserError(f"the saved_model and tflite formats need TensorFlow ({e}): "
                      'pip install -e ".[tf]"') from None


def _tf():
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  import tensorflow as tf
  return tf


@contextlib.contextmanager
def quiet_stderr():
  """Holds back what TensorFlow's C++ side (and Python warnings) write to file descriptor 2
  inside the block: dropped when it ends normally or with a UserError (the caller's one line
  says what matters), written out after any other exception."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode="w+b") as held:
    os.dup2(held.fileno(), 2)
    failed = False
    try:
      yield
    except UserError:
      raise
    except BaseException:
      failed = True
      raise
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      if failed:
        held.seek(0)
        sys.stderr.write(held.read().decode(errors="replace"))
        sys.stderr.flush()


def _input_shape(rec) -> tuple[int, int, int]:
  h, w = rec.image_size
  return int(h), int(w), 3


def export_jax(rec, platforms=None) -> bytes:
  """The serialized `jax.export` of `rec.function()` for uint8 [b, H, W, 3] (b symbolic)."""
  import jax
  import jax.numpy as jnp
  h, w, c = _input_shape(rec)
  spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape(f"b, {h}, {w}, {c}"), jnp.uint8)
  exported = jax.export.export(jax.jit(rec.function()), platforms=platforms)(spec)
  return bytes(exported.serialize())


def save_saved_model(rec, path: str, platforms=None) -> None:
  """`rec.function()` through jax2tf (native serialization) as a SavedModel whose serving
  signature maps `images` (uint8 [None, H, W, 3]) to {"probabilities": [None, classes]}."""
  from jax.experimental import jax2tf
  tf = _tf()
  h, w, c = _input_shape(rec)
  fn = jax2tf.convert(rec.function(), polymorphic_shapes=[f"(b, {h}, {w}, {c})"],
                      with_gradient=False, native_serialization_platforms=platforms)
  module = tf.Module()
  module.serve = tf.function(
      lambda images: {OUTPUT_NAME: fn(images)}, autograph=False,
      input_signature=[tf.TensorSpec([None, h, w, c], tf.uint8, name=INPUT_NAME)])
  tf.saved_model.save(module, path, signatures={SIGNATURE: module.serve})


def tflite_bytes(saved_model: str) -> bytes:
  """The SavedModel at `saved_model` through TFLite's converter; UserError with the
  converter's first error line when it cannot convert it."""
  tf = _tf()
  try:
    return tf.lite.TFLiteConverter.from_saved_model(saved_model).convert()
  except Exception as e:  # noqa: BLE001 - ConverterError and friends: the message is the point
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    raise UserError("tflite: TFLite's converter cannot convert this model: "
                    f"{lines[0] if lines else type(e).__name__}") from None


def check_images(rec, n: int = _CHECK_IMAGES):
  import numpy as np
  return np.random.default_rng(0).integers(0, 256, (n, *_input_shape(rec)), dtype=np.uint8)


def probabilities(fmt: str, path: str, images):
  """What the export of format `fmt` at `path` returns for `images` (numpy)."""
  import numpy as np
  if fmt == "jax":
    import jax
    with open(path, "rb") as f:
      exported = jax.export.deserialize(bytearray(f.read()))
    return np.asarray(exported.call(images))
  tf = _tf()
  if fmt == "saved_model":
    loaded = tf.saved_model.load(path)
    return loaded.signatures[SIGNATURE](**{INPUT_NAME: tf.constant(images)})[OUTPUT_NAME].numpy()
  with warnings.catch_warnings():  # tf.lite.Interpreter's deprecation notice
    warnings.simplefilter("ignore")
    run = tf.lite.Interpreter(model_path=path).get_signature_runner(SIGNATURE)
  return run(**{INPUT_NAME: images})[OUTPUT_NAME]


def _size(path: str) -> int:
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def human_size(n: int) -> str:
  for unit in ("B", "KiB", "MiB"):
    if n < 1024 or unit == "MiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return f"{n:.1f} GiB"


def export_card(rec, formats, platforms) -> dict:
  """export.json: what the export is, how to feed it and how to load each format
  (`platforms`: what the jax and saved_model formats are lowered for)."""
  import jax
  c = rec.card
  return {
      "format": EXPORT_FORMAT,
      "formats": {f: FILES[f] for f in formats},
      "class_names": list(rec.class_names),
      "input": {k: c["input"][k] for k in ("height", "width", "channels", "dtype", "color",
                                           "resize", "preprocessing", "decode")
                if k in c["input"]},
      "output": {"name": OUTPUT_NAME, "dtype": "float32",
                 "shape": ["N", len(rec.class_names)]},
      "how_to_feed": HOW_TO_FEED,
      "how_to_load": {f: HOW_TO_LOAD[f] for f in formats},
      "source": {k: c.get(k) for k in ("cell_id", "target", "seed", "strategy")},
      "metrics": c.get("metrics", {}),
      "jax_version": jax.__version__,
      "platforms": list(platforms),
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }


def export(model: str, out: str, formats=("jax",), platforms=None, overwrite=False,
           log=print) -> list[dict]:
  """Exports the kept model in folder `model` to folder `out` in `formats`.

  Args:
    model: a kept model folder (or a cell folder holding one).
    out: the folder to write (whole or not at all).
    formats: names from FORMATS.
    platforms: what the jax and saved_model exports are lowered for (None: this backend);
      one that excludes this backend is not checked here.
    overwrite: replace a non-empty `out`.
    log: called with one line per format once `out` is in place.
  Returns:
    one {"format", "path", "bytes", "seconds", "max_abs_diff"} per format.
  Raises:
    UserError: bad input, TensorFlow missing, or TFLite's converter refusing the model
      (nothing written).
    ExportMismatch: an export whose probabilities differ from the kept model's (nothing
      written).
  """
  import jax
  from tlresearch.core import io
  from tlresearch.deploy import recognizer
  formats = list(formats)
  model = _check_request(model, out, formats, overwrite)
  rec = recognizer.load(model)
  images = check_images(rec)
  expected = rec.probabilities(images)
  here = jax.export.default_export_platform()
  with io.atomic_dir(out) as tmp:
    done = [_write_checked(fmt, rec, tmp, out, platforms, images, expected, here)
            for fmt in formats]
    shutil.copyfile(os.path.join(model, recognizer.CARD), os.path.join(tmp, recognizer.CARD))
    io.write_json(os.path.join(tmp, EXPORT_CARD),
                  export_card(rec, formats, platforms or [here]))
  for d in done:
    check = (f"max abs difference from the kept model {d['max_abs_diff']:.1g}"
             if d["max_abs_diff"] is not None else
             f"not run here: lowered for {','.join(platforms)}, this is {here}")
    log(f"{d['format']}: {d['path']} ({human_size(d['bytes'])}, {d['seconds']:.1f} s, {check})")
  return done


def _check_request(model: str, out: str, formats: list, overwrite: bool) -> str:
  """The kept model's folder; UserError for bad formats, an export given as the model, an
  `out` that may not be written, or TensorFlow missing for a format that needs it."""
  bad = [f for f in formats if f not in FORMATS]
  if bad or not formats:
    raise UserError(f"unknown format '{bad[0] if bad else ''}'; valid: {choices(FORMATS)}")
  model = model_path(model)
  if os.path.isfile(os.path.join(model, EXPORT_CARD)):
    raise UserError(f"{model} is an export ({EXPORT_CARD}), not a kept model: export from the "
                    "kept model it came from")
  check_out(out, model, overwrite)
  if any(f in TF_FORMATS for f in formats):
    require_tensorflow()
  return model


def _write_checked(fmt, rec, tmp, out, platforms, images, expected, here) -> dict:
  """Writes one format into `tmp` and checks its probabilities against the kept model's
  (where it runs here); ExportMismatch beyond CHECK_TOLERANCE."""
  import numpy as np
  path = os.path.join(tmp, FILES[fmt])
  with quiet_stderr():
    t0 = time.perf_counter()
    write(fmt, rec, path, platforms)
    seconds = time.perf_counter() - t0
    runs_here = fmt == "tflite" or platforms is None or here in platforms
    diff = float(np.max(np.abs(probabilities(fmt, path, images) - expected))) \
        if runs_here else None
  if diff is not None and not diff <= CHECK_TOLERANCE:
    raise ExportMismatch(f"{fmt}: probabilities differ from the kept model's by {diff:.3g} "
                         f"(tolerance {CHECK_TOLERANCE:g})")
  return {"format": fmt, "path": os.path.join(out, FILES[fmt]), "bytes": _size(path),
          "seconds": seconds, "max_abs_diff": diff}


def write(fmt: str, rec, path: str, platforms=None) -> None:
  """Writes `rec` in format `fmt` to `path` (a file, or a folder for saved_model). The
  tflite model comes from a SavedModel lowered for the CPU, where TFLite runs."""
  if fmt == "jax":
    with open(path, "wb") as f:
      f.write(export_jax(rec, platforms))
  elif fmt == "saved_model":
    save_saved_model(rec, path, platforms)
  else:
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path), prefix=".saved_model-") as sm:
      save_saved_model(rec, sm, ["cpu"])
      blob = tflite_bytes(sm)
    with open(path, "wb") as f:
      f.write(blob)


def main(argv: list[str]) -> int:
  flags = _parse(argv)
  if flags.get("help"):
    print(__doc__)
    return 0
  for key in ("model", "out"):
    if key not in flags:
      raise UserError(f"--{key}=DIR is required; {USAGE}")
  formats = _names(flags.get("format", "jax"), FORMATS, "format")
  platforms = _names(flags["platforms"], PLATFORMS, "platform") if "platforms" in flags \
      else None
  try:
    export(flags["model"], flags["out"], formats, platforms, flags.get("overwrite", False))
  except ExportMismatch as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  from tlresearch.core.errors import exit_with
  exit_with(main)

"""Glyphs: an offline source task and four target tasks with one kind of shift each.

Characters are drawn from the TrueType fonts that ship inside matplotlib, so nothing is
downloaded and the same package versions give the same bytes. Each (font, character) is
rasterised once by FreeType to a 64x64 grey mask; every example is then made with numpy in
batches: a random pose (rotation +-20 deg, scale 0.7-1.1, shear +-0.15, shift +-2.5 px)
applied by bilinear sampling of the mask, a random glyph colour, and a random background
texture (smooth noise, a two-colour gradient or stripes). The glyph and the background sit
on opposite sides of mid-grey in every channel (light on dark or dark on light, 50/50), so
the contrast is at least 0.2 per channel and the task stays learnable for any colours.

Font partition (files in `matplotlib/mpl-data/fonts/ttf/`):
  source fonts    the upright designs: DejaVu Sans, Serif and Sans Mono, STIXGeneral, each
                  regular and bold (8 fonts).
  held-out fonts  never seen by `source`: Computer Modern (cmr10, cmss10, cmtt10, cmb10,
                  cmti10), a different design family with high stroke contrast and other
                  digit shapes; and the slanted variants of the source families (DejaVu
                  Oblique/Italic, regular and bold, STIXGeneral Italic and Bold Italic) --
                  13 fonts. Computer Modern has no Greek, which only matters to configs
                  that draw Greek (none draws it in held-out fonts).

Configs (`CONFIGS`), all with train / validation / test splits, balanced per class:
  source         36 classes (0-9, A-Z) in the source fonts; 400 / 50 / 50 per class.
                 Pretraining task.
  new_classes    12 Greek lowercase letters (alpha beta gamma delta epsilon theta lambda
                 mu pi sigma phi omega) in the source fonts: the label set shifts.
  input_shift    the source task with every image corrupted by one of `CORRUPTIONS`, at high
                 severity: the pixels shift, the concepts do not.
  feature_shift  the source classes drawn only in the held-out fonts: the shapes that
                 define a class change.
  output_shift   source-like images whose labels are permuted by `OUTPUT_SHIFT_PERMUTATION`,
                 a seeded derangement (no class keeps its label): the same features now
                 mean different labels. `class_names[j]` is the character drawn in the
                 images labelled j.
  The four targets have 100 / 25 / 50 examples per class.

Every (config, split) has its own seed, so target images are never copies of source images
and the test split shares no image with train. `generate` is the pure function behind the
builder; it is deterministic given (config, split, examples_per_class).
"""
from __future__ import annotations

import dataclasses
import functools
import os

import matplotlib
from matplotlib import ft2font
import numpy as np
import tensorflow_datasets as tfds

from tlresearch.core.errors import choices, UserError
from tlresearch.data.builders import FORMAT_VERSION, RELEASE_NOTES
from tlresearch.data.corruptions import blur_matrix, corrupt_images, CORRUPTIONS, separable

IMAGE_SIZE = 32
SPLITS = ("train", "validation", "test")

SOURCE_CHARS = tuple("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ")
GREEK_CHARS = tuple("\u03b1\u03b2\u03b3\u03b4\u03b5\u03b8\u03bb\u03bc\u03c0\u03c3\u03c6\u03c9")
GREEK_NAMES = ("alpha", "beta", "gamma", "delta", "epsilon", "theta", "lambda", "mu", "pi",
               "sigma", "phi", "omega")

SOURCE_FONTS = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf",
)
HELDOUT_FONTS = (
    "cmr10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmb10.ttf", "cmti10.ttf",
    "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf",
    "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
)


_ROOT_SEED = 20_417
_SOURCE_SIZES = {"train": 400, "validation": 50, "test": 50}
_TARGET_SIZES = {"train": 100, "validation": 25, "test": 50}

# Masks are rendered at twice the image resolution so that poses are sampled from a finer
# grid than the output; the ink's longer side fills this fraction of the image before the
# pose scale, which keeps rotated, enlarged glyphs (nearly) inside the frame.
_MASK_SIZE = 64
_GLYPH_BOX = 0.75
_CHUNK = 2048  # examples per vectorised batch: bounds memory, fixed so draws are stable


def _derangement(n: int, seed: int) -> tuple[int, ...]:
  rng = np.random.default_rng(seed)
  while True:
    perm = rng.permutation(n)
    if not np.any(perm == np.arange(n)):
      return tuple(int(p) for p in perm)


# Image of character SOURCE_CHARS[i] gets label OUTPUT_SHIFT_PERMUTATION[i].
OUTPUT_SHIFT_PERMUTATION = _derangement(len(SOURCE_CHARS), seed=_ROOT_SEED)


def _permuted_names() -> tuple[str, ...]:
  names = [""] * len(SOURCE_CHARS)
  for char, label in zip(SOURCE_CHARS, OUTPUT_SHIFT_PERMUTATION):
    names[label] = char
  return tuple(names)


@dataclasses.dataclass(frozen=True)
class GlyphConfig:
  description: str
  chars: tuple[str, ...]
  class_names: tuple[str, ...]
  fonts: tuple[str, ...]
  sizes: dict
  seed: int  # one stream per config; never reuse a number, or two configs share images
  corrupt: bool = False
  permute: bool = False


CONFIGS = {
    "source": GlyphConfig(
        "36 classes (0-9, A-Z) in 8 upright fonts; the pretraining task.",
        SOURCE_CHARS, SOURCE_CHARS, SOURCE_FONTS, _SOURCE_SIZES, seed=0),
    "new_classes": GlyphConfig(
        "12 Greek lowercase letters in the source fonts (new label set).",
        GREEK_CHARS, GREEK_NAMES, SOURCE_FONTS, _TARGET_SIZES, seed=1),
    "input_shift": GlyphConfig(
        "The source classes and fonts, each image corrupted by noise, blur, low contrast, "
        "pixelation or salt-and-pepper.",
        SOURCE_CHARS, SOURCE_CHARS, SOURCE_FONTS, _TARGET_SIZES, seed=2, corrupt=True),
    "feature_shift": GlyphConfig(
        "The source classes in 13 held-out fonts (Computer Modern, italics, obliques).",
        SOURCE_CHARS, SOURCE_CHARS, HELDOUT_FONTS, _TARGET_SIZES, seed=3),
    "output_shift": GlyphConfig(
        "Source-like images with labels permuted by a fixed derangement.",
        SOURCE_CHARS, _permuted_names(), SOURCE_FONTS, _TARGET_SIZES, seed=4, permute=True),
}


# --- Rendering: once per (font, character) ------------------------------------------------

def _font_path(font: str) -> str:
  return os.path.join(matplotlib.get_data_path(), "fonts", "ttf", font)


@functools.lru_cache(maxsize=None)
def _face(font: str) -> ft2font.FT2Font:
  return ft2font.FT2Font(_font_path(font))


@functools.lru_cache(maxsize=None)
def _charmap(font: str) -> frozenset[int]:
  return frozenset(_face(font).get_charmap())


def has_glyph(font: str, char: str) -> bool:
  return ord(char) in _charmap(font)


def _ink(font: str, char: str, pixels: float) -> np.ndarray:
  """FreeType's anti-aliased coverage of `char`, cropped to its ink, in [0, 1]."""
  face = _face(font)
  face.set_size(pixels, 72)  # at 72 dpi one point is one pixel
  face.set_text(char, 0.0)
  face.draw_glyphs_to_bitmap(antialiased=True)
  image = np.asarray(face.get_image(), np.float32) / 255.0
  rows, cols = np.flatnonzero(image.max(1) > 0), np.flatnonzero(image.max(0) > 0)
  if rows.size == 0:
    raise ValueError(f"{font} renders no ink for {char!r}")
  return image[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


@functools.lru_cache(maxsize=None)
def _mask(font: str, char: str) -> np.ndarray:
  """The glyph's coverage, longer side = _GLYPH_BOX of the frame, centred on its ink."""
  target = _GLYPH_BOX * _MASK_SIZE
  # Render twice: once to measure, once at the size that makes the ink fit the box, so the
  # mask needs no resampling (FreeType anti-aliases better than a resize would).
  first = _ink(font, char, 64.0)
  ink = _ink(font, char, 64.0 * target / max(first.shape))
  h, w = (min(s, _MASK_SIZE) for s in ink.shape)
  mask = np.zeros((_MASK_SIZE, _MASK_SIZE), np.float32)
  top, left = (_MASK_SIZE - h) // 2, (_MASK_SIZE - w) // 2
  mask[top:top + h, left:left + w] = ink[:h, :w]
  # The mask is sampled at half its resolution: prefilter so thin strokes do not alias.
  blur = blur_matrix(_MASK_SIZE, 0.8)
  return blur @ mask @ blur.T


@functools.lru_cache(maxsize=None)
def _glyph_bank(chars: tuple[str, ...], fonts: tuple[str, ...]):
  """Masks [G, M+2, M+2] (zero border, so clipped reads are background); class c owns
  masks first[c] .. first[c] + count[c] - 1, one per font that has its glyph."""
  masks, first, count = [], [], []
  for char in chars:
    available = [f for f in fonts if has_glyph(f, char)]
    if not available:  # a class without a font would silently have no examples
      raise ValueError(f"no font among {fonts} has {char!r}")
    first.append(len(masks))
    count.append(len(available))
    masks.extend(_mask(f, char) for f in available)
  bank = np.pad(np.stack(masks), ((0, 0), (1, 1), (1, 1)))
  return bank, np.array(first), np.array(count)


# --- Examples: vectorised over a batch ----------------------------------------------------

def _sample_masks(bank: np.ndarray, glyph: np.ndarray, rng) -> np.ndarray:
  """Bilinear samples of bank[glyph] under random poses -> coverage [B, S, S]."""
  b = glyph.shape[0]
  angle = np.deg2rad(rng.uniform(-20.0, 20.0, b))
  scale = rng.uniform(0.7, 1.1, b)
  shear = rng.uniform(-0.15, 0.15, b)
  shift = rng.uniform(-2.5, 2.5, (b, 2))
  cos, sin = np.cos(angle), np.sin(angle)
  # Forward map (glyph -> image, in image pixels about the centre) = rotate @ shear @ scale.
  forward = np.empty((b, 2, 2))
  forward[:, 0, 0] = scale * cos
  forward[:, 0, 1] = scale * (cos * shear - sin)
  forward[:, 1, 0] = scale * sin
  forward[:, 1, 1] = scale * (sin * shear + cos)
  inverse = np.linalg.inv(forward).astype(np.float32)[:, :, :, None, None]

  # Output pixel centres relative to the image centre and the glyph's shifted centre, then
  # mapped back into mask pixels (+1 for the zero border).
  pix = np.arange(IMAGE_SIZE, dtype=np.float32) + 0.5 - IMAGE_SIZE / 2
  dx = pix[None, None, :] - shift[:, 0, None, None].astype(np.float32)
  dy = pix[None, :, None] - shift[:, 1, None, None].astype(np.float32)
  ratio, offset = _MASK_SIZE / IMAGE_SIZE, _MASK_SIZE / 2 - 0.5 + 1
  sx = (inverse[:, 0, 0] * dx + inverse[:, 0, 1] * dy) * ratio + offset
  sy = (inverse[:, 1, 0] * dx + inverse[:, 1, 1] * dy) * ratio + offset

  # Points outside the mask are clamped onto its zero border, so they read background.
  side = bank.shape[-1]
  sx, sy = np.clip(sx, 0, side - 1), np.clip(sy, 0, side - 1)
  x0 = np.minimum(sx.astype(np.int64), side - 2)
  y0 = np.minimum(sy.astype(np.int64), side - 2)
  fx, fy = sx - x0, sy - y0
  flat = bank.reshape(-1)
  base = glyph[:, None, None] * side * side + y0 * side + x0
  tl, tr = flat[base], flat[base + 1]
  bl, br = flat[base + side], flat[base + side + 1]
  top = tl + (tr - tl) * fx
  bottom = bl + (br - bl) * fx
  return top + (bottom - top) * fy


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
  """[n_out, n_in] bilinear upsampling operator (pixel centres aligned, edges clamped)."""
  pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
  lo = np.floor(pos).astype(int)
  hi = np.minimum(lo + 1, n_in - 1)
  w = np.zeros((n_out, n_in), np.float32)
  w[np.arange(n_out), lo] += 1 - (pos - lo)
  w[np.arange(n_out), hi] += pos - lo
  return w


def _colours_and_background(b: int, rng):
  """Glyph colours [B, 3] and background textures [B, S, S, 3], on opposite sides of
  mid-grey in every channel."""
  s = IMAGE_SIZE
  light_glyph = rng.random(b) < 0.5
  flip = lambda u: np.where(light_glyph[:, None], 1.0 - u, u)  # noqa: E731
  glyph_colour = flip(rng.uniform(0.0, 0.4, (b, 3)).astype(np.float32))

  def backdrop_colours(*shape):  # in [0.6, 1] behind dark glyphs, [0, 0.4] behind light
    u = rng.uniform(0.6, 1.0, (b,) + shape + (3,)).astype(np.float32)
    return np.where(light_glyph.reshape((b,) + (1,) * (len(shape) + 1)), 1.0 - u, u)

  kind = rng.integers(0, 3, b)  # 0 smooth noise, 1 gradient, 2 stripes
  grid = backdrop_colours(4, 4)
  up = _interp_matrix(s, 4)
  noise = separable(grid, up, up)

  ends = backdrop_colours(2)
  direction = rng.uniform(0, 2 * np.pi, b)
  period = rng.uniform(6.0, 12.0, b)
  phase = rng.uniform(0, 2 * np.pi, b)
  pix = np.arange(s, dtype=np.float32) + 0.5 - s / 2
  cos, sin = np.cos(direction).astype(np.float32), np.sin(direction).astype(np.float32)
  proj = cos[:, None, None] * pix[None, None, :] + sin[:, None, None] * pix[None, :, None]
  ramp = np.clip(0.5 + proj / (s * np.sqrt(2)), 0, 1)
  stripes = 0.5 + 0.5 * np.sin(
      (2 * np.pi / period[:, None, None] * proj + phase[:, None, None]).astype(np.float32))
  t = np.where((kind == 1)[:, None, None], ramp, stripes)[..., None]
  two_colour = ends[:, None, None, 0] + (ends[:, None, None, 1] - ends[:, None, None, 0]) * t
  background = np.where((kind == 0)[:, None, None, None], noise, two_colour)
  return glyph_colour, background


def _render(bank, glyph: np.ndarray, corrupt: bool, rng) -> np.ndarray:
  coverage = _sample_masks(bank, glyph, rng)[..., None]
  colour, background = _colours_and_background(glyph.shape[0], rng)
  images = background + (colour[:, None, None, :] - background) * coverage
  if corrupt:
    images = corrupt_images(images, rng)
  return np.round(np.clip(images, 0, 1) * 255).astype(np.uint8)


def generate(config_name: str, split: str,
             examples_per_class: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """All examples of one split: images uint8 [N, 32, 32, 3], labels int64 [N].

  Classes are balanced (`examples_per_class` each, the config's size by default) and the
  order is shuffled. Same arguments, same bytes.
  """
  if config_name not in CONFIGS:
    raise UserError(f"unknown glyph config {config_name!r}; valid: {choices(CONFIGS)}")
  if split not in SPLITS:
    raise UserError(f"unknown split {split!r}; valid: {choices(SPLITS)}")
  cfg = CONFIGS[config_name]
  per_class = cfg.sizes[split] if examples_per_class is None else int(examples_per_class)
  if per_class <= 0:
    raise UserError(f"examples_per_class must be positive, got {per_class}")
  rng = np.random.default_rng((_ROOT_SEED, cfg.seed, SPLITS.index(split)))
  bank, first, count = _glyph_bank(cfg.chars, cfg.fonts)

  chars = rng.permutation(np.repeat(np.arange(len(cfg.chars)), per_class))
  # Each example's font: uniform over the fonts that have its glyph.
  glyph = first[chars] + rng.integers(0, count[chars])
  images = np.concatenate([
      _render(bank, glyph[i:i + _CHUNK], cfg.corrupt, rng)
      for i in range(0, glyph.size, _CHUNK)])
  labels = np.asarray(OUTPUT_SHIFT_PERMUTATION)[chars] if cfg.permute else chars
  return images, labels.astype(np.int64)


# --- TFDS ----------------------------------------------------------------------------------

class Glyphs(tfds.core.GeneratorBasedBuilder):
  """Rendered glyphs: a source task and four shifted targets (see the module docstring)."""

  name = "tlr_glyphs"
  VERSION = tfds.core.Version(FORMAT_VERSION)
  RELEASE_NOTES = RELEASE_NOTES
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=name, description=cfg.description)
                     for name, cfg in CONFIGS.items()]

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = CONFIGS[self.builder_config.name]
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.split("\n")[0],
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=list(cfg.class_names)),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is rendered locally
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split):
    images, labels = generate(self.builder_config.name, split)
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {"image": image, "label": int(label)}

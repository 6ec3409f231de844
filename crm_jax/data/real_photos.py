"""Composites cut from scikit-image's sample photographs (docs/data.md, "Real photographs"): a
silhouette (the gt), photo foreground and background, distractors, a random camera. ``HELD_OUT``
photographs only make ``benchmarks/real_photos.py``'s sets. Rngs: ``default_rng([seed, ...])``."""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import cv2
import numpy as np

from crm_jax.data import source_index, synthesis, synthetic

# name -> (file in skimage/data, licence as scikit-image states it, 'photo' or 'texture').
PHOTOS = {
    'astronaut': ('astronaut.png', 'public domain (NASA; "no known copyright restrictions")',
                  'photo'),
    'chelsea': ('chelsea.png', 'CC0 (Stefan van der Walt)', 'photo'),
    'camera': ('camera.png', 'CC0 (Lav Varshney)', 'photo'),
    'coffee': ('coffee.png', 'CC0 (Rachel Michetti)', 'photo'),
    'rocket': ('rocket.jpg', 'public domain (SpaceX)', 'photo'),
    'coins': ('coins.png', 'no known copyright restrictions (Brooklyn Museum)', 'photo'),
    'clock_motion': ('clock_motion.png', 'public domain (Stefan van der Walt)', 'photo'),
    'retina': ('retina.jpg', 'CC0 1.0 (Wikimedia Commons)', 'photo'),
    'hubble_deep_field': ('hubble_deep_field.jpg', 'public domain (NASA)', 'photo'),
    'immunohistochemistry': ('ihc.png', 'no known copyright restrictions (CMMI)', 'photo'),
    'brick': ('brick.png', 'CC0 (CC0Textures)', 'texture'),
    'grass': ('grass.png', 'CC0 (DeviantArt, linolafett)', 'texture'),
    'gravel': ('gravel.png', 'CC0 (CC0Textures)', 'texture'),
}
HORSE = ('horse.png', 'CC0 (Andreas Preuss, openclipart)')  # the silhouette scikit-image ships
HELD_OUT = ('astronaut', 'chelsea')
TRAIN_PHOTOS = tuple(n for n in PHOTOS if n not in HELD_OUT)

SMOOTH, THIN_AND_HOLES, HORSE_SHAPE = 'smooth', 'thin_and_holes', 'horse'
SILHOUETTE_WEIGHTS = {SMOOTH: 0.4, THIN_AND_HOLES: 0.4, HORSE_SHAPE: 0.2}
AREA_RANGE = (0.08, 0.45)  # share of the canvas the silhouette covers
SHAPE_OCTAVES = ((2.5, 1.0), (6.0, 0.3), (16.0, 0.08))  # (cells across, amplitude)
SHAPE_FALLOFF = 2.5
PHOTO_SCALE_RANGE = (0.5, 2.0)
MATCH_LIGHTING_PROB = 0.4  # else independent jitter of the foreground
SAME_PHOTO_PROB = 0.15  # foreground and background from the same photograph
ALPHA_BLUR_PROB, ALPHA_BLUR_SIGMA = 0.5, (0.3, 2.0)  # sigma in pixels at S
CAMERA_BLUR_PROB, CAMERA_BLUR_SIGMA = 0.3, (0.3, 1.5)
DOWNUP_PROB, DOWNUP_FACTOR = 0.3, (1.5, 4.0)
NOISE_PROB, NOISE_SIGMA = 0.3, (1.0, 6.0)
JPEG_PROB, JPEG_QUALITY = 0.6, (30, 95)
DISTRACTOR_COUNT = (1, 4)  # per side, [low, high)
DISTRACTOR_SIDE = (0.1, 0.4)  # of the canvas side


class PhotoError(RuntimeError):
  """scikit-image (which ships the photographs) is not installed, or a file is missing."""


def data_dir() -> str:
  """The folder of the installed ``skimage/data`` files (``skimage`` is not imported)."""
  spec = importlib.util.find_spec('skimage')
  if spec is None or not spec.submodule_search_locations:
    raise PhotoError('the real_photos source needs scikit-image, which ships the photographs: '
                     'pip install scikit-image (a training-only dependency)')
  return os.path.join(list(spec.submodule_search_locations)[0], 'data')


def _read(file: str, flags: int) -> np.ndarray:
  path = os.path.join(data_dir(), file)
  image = cv2.imread(path, flags)
  if image is None:
    raise PhotoError(f'{path}: missing or unreadable')
  return image


def _binary(fg: np.ndarray) -> np.ndarray:  # bool -> uint8 in {0, 255}
  return np.where(fg, 255, 0).astype(np.uint8)


@functools.lru_cache(maxsize=None)
def load_photo(name: str) -> np.ndarray:
  """Photograph ``name`` of ``PHOTOS`` as uint8 ``[H, W, 3]`` RGB (grey ones replicated)."""
  if name not in PHOTOS:
    raise KeyError(f'unknown photograph {name!r}; known: {", ".join(PHOTOS)}')
  return np.ascontiguousarray(_read(PHOTOS[name][0], cv2.IMREAD_COLOR)[..., ::-1])


@functools.lru_cache(maxsize=None)
def is_grey(name: str) -> bool:
  """Whether photograph ``name`` is grey (its three channels equal)."""
  return bool((load_photo(name) == load_photo(name)[..., :1]).all())


@functools.lru_cache(maxsize=1)
def load_horse() -> np.ndarray:
  """scikit-image's horse silhouette, uint8 ``[H, W]`` in {0, 255} (the horse is 255)."""
  return _binary(_read(HORSE[0], cv2.IMREAD_GRAYSCALE) < 128)


def smooth_shape(n: int, rng: np.random.Generator) -> np.ndarray:
  """uint8 ``[n, n]`` in {0, 255}: the largest blob of smooth noise with a radial falloff."""
  field = np.zeros((n, n), np.float32)
  for cells, amplitude in SHAPE_OCTAVES:  # bicubically upsampled Gaussian grids
    grid = rng.standard_normal((max(2, math.ceil(cells) + 1),) * 2).astype(np.float32)
    field += amplitude * cv2.resize(grid, (n, n), interpolation=cv2.INTER_CUBIC)
  cy, cx = rng.uniform(0.35, 0.65, 2)
  ax = (np.arange(n, dtype=np.float32) + 0.5) / n
  field -= SHAPE_FALLOFF * ((ax[:, None] - cy) ** 2 + (ax[None, :] - cx) ** 2)
  step = max(1, n // 128)
  mask = _binary(field > np.quantile(field[::step, ::step], 1.0 - rng.uniform(*AREA_RANGE)))
  count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
  return mask if count <= 2 else _binary(labels == 1 + np.argmax(stats[1:, cv2.CC_STAT_AREA]))


def thin_and_holes_shape(n: int, rng: np.random.Generator) -> np.ndarray:
  """A ``smooth_shape`` with thin limbs (curved strokes) and elliptic holes, uint8 ``[n, n]``."""
  mask = smooth_shape(n, rng)
  ys, xs = np.nonzero(mask[::8, ::8])
  if ys.size == 0:
    return mask
  for _ in range(int(rng.integers(2, 8))):  # limbs and strokes leaving the body
    k = int(rng.integers(ys.size))
    x, y = float(xs[k] * 8), float(ys[k] * 8)
    angle, length = rng.uniform(0, 2 * np.pi), rng.uniform(0.1, 0.45) * n
    width = rng.uniform(1, 4) if rng.random() < 0.5 else rng.uniform(6, 25)
    thickness, bend = max(1, int(round(n / 512.0 * width))), rng.uniform(-0.03, 0.03) * 11
    pts = []
    for _ in range(12):  # a curved polyline
      pts.append((x, y))
      x, y = x + math.cos(angle) * length / 11, y + math.sin(angle) * length / 11
      angle += bend
    cv2.polylines(mask, [np.round(np.array(pts)).astype(np.int32)], False, 255, thickness)
  for _ in range(int(rng.integers(1, 4))):  # holes inside the body
    k = int(rng.integers(ys.size))
    axes = (max(1, int(rng.uniform(0.02, 0.08) * n)), max(1, int(rng.uniform(0.02, 0.08) * n)))
    cv2.ellipse(mask, (int(xs[k] * 8), int(ys[k] * 8)), axes, rng.uniform(0, 180), 0, 360, 0, -1)
  return mask if mask.any() else smooth_shape(n, rng)


def horse_shape(n: int, rng: np.random.Generator) -> np.ndarray:
  """scikit-image's horse randomly scaled, rotated, sheared, flipped, placed: uint8 ``[n, n]``."""
  horse = load_horse()
  h, w = horse.shape
  scale = rng.uniform(0.45, 0.95) * n / max(h, w)
  m = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(-25, 25), scale)
  m[0, 1] += rng.uniform(-0.2, 0.2) * scale  # shear
  if rng.random() < 0.5:
    m[0, :2] *= -1
  centre = np.array([n / 2, n / 2]) + rng.uniform(-0.15, 0.15, 2) * n
  m[:, 2] += centre - m[:, :2] @ np.array([w / 2, h / 2])
  return _binary(cv2.warpAffine(horse, m, (n, n), flags=cv2.INTER_LINEAR, borderValue=0) > 127)

SHAPES = {SMOOTH: smooth_shape, THIN_AND_HOLES: thin_and_holes_shape, HORSE_SHAPE: horse_shape}


def silhouette(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
  """A ``SHAPES[kind]`` silhouette, uint8 ``[n, n]`` in {0, 255}, never empty nor full."""
  mask = SHAPES[kind](n, rng)
  if not mask.any():
    cv2.circle(mask, (n // 2, n // 2), max(1, n // 6), 255, -1)
  if mask.all():
    mask[: max(1, n // 8)] = 0
  return mask


def photo_region(name: str, h: int, w: int, rng: np.random.Generator,
                 scale_range: Tuple[float, float] = PHOTO_SCALE_RANGE) -> np.ndarray:
  """float32 ``[h, w, 3]``: a random region of ``name``, turned, flipped, scaled (grey: duotone)."""
  image = np.rot90(load_photo(name), int(rng.integers(4)))
  if rng.random() < 0.5:
    image = image[:, ::-1]
  ph, pw = image.shape[:2]
  zoom = math.exp(rng.uniform(*np.log(scale_range))) * max(h, w) / min(ph, pw)
  sh, sw = min(ph, max(1, math.ceil(h / zoom))), min(pw, max(1, math.ceil(w / zoom)))
  y0, x0 = int(rng.integers(ph - sh + 1)), int(rng.integers(pw - sw + 1))
  cut = np.ascontiguousarray(image[y0:y0 + sh, x0:x0 + sw])
  interp = cv2.INTER_AREA if zoom < 1 else cv2.INTER_CUBIC
  region = cv2.resize(cut, (w, h), interpolation=interp).astype(np.float32)
  if is_grey(name):
    dark, light = rng.uniform(0, 120, 3), rng.uniform(135, 255, 3)
    region = (dark + region[..., :1] / 255.0 * (light - dark)).astype(np.float32)
  return region


def match_lighting(fg: np.ndarray, bg: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """``fg`` with its per-channel mean and spread moved (weight in [0.6, 1]) to ``bg``'s."""
  w = rng.uniform(0.6, 1.0)  # weight of the match
  f_mean, f_std = fg.mean(axis=(0, 1)), fg.std(axis=(0, 1)) + 1e-3
  b_mean, b_std = bg.mean(axis=(0, 1)), bg.std(axis=(0, 1)) + 1e-3
  return (w * ((fg - f_mean) * (b_std / f_std) + b_mean) + (1 - w) * fg).astype(np.float32)


def jitter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Brightness, contrast and saturation factors in [0.6, 1.4], a colour cast up to +-20."""
  image = image * rng.uniform(0.6, 1.4)
  mean = image.mean()
  image = (image - mean) * rng.uniform(0.6, 1.4) + mean
  grey = image.mean(axis=-1, keepdims=True)
  image = (image - grey) * rng.uniform(0.6, 1.4) + grey
  return (image + rng.uniform(-20, 20, 3)).astype(np.float32)


def camera(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """float32 RGB -> uint8 RGB through a random camera: blur, lower resolution, noise, JPEG."""
  h, w = image.shape[:2]
  if rng.random() < CAMERA_BLUR_PROB:
    image = cv2.GaussianBlur(image, (0, 0), rng.uniform(*CAMERA_BLUR_SIGMA))
  if rng.random() < DOWNUP_PROB:
    f = rng.uniform(*DOWNUP_FACTOR)
    small = cv2.resize(image, (max(1, round(w / f)), max(1, round(h / f))),
                       interpolation=cv2.INTER_AREA)
    image = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
  if rng.random() < NOISE_PROB:
    image = image + rng.normal(0, rng.uniform(*NOISE_SIGMA), image.shape).astype(np.float32)
  out = np.clip(np.rint(image), 0, 255).astype(np.uint8)
  if rng.random() < JPEG_PROB:
    quality = [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1))]
    ok, buf = cv2.imencode('.jpg', out[..., ::-1], quality)
    if ok:
      out = np.ascontiguousarray(cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1])
  return out


def alpha_from_silhouette(mask_2x: np.ndarray, size: int) -> np.ndarray:
  """A larger uint8 silhouette area-downsampled to alpha, float32 ``[size, size]`` in [0, 1]."""
  return cv2.resize(mask_2x.astype(np.float32) / 255.0, (size, size), interpolation=cv2.INTER_AREA)


def composite(fg: np.ndarray, bg: np.ndarray, alpha: np.ndarray) -> np.ndarray:
  """``alpha * fg + (1 - alpha) * bg``: ``[H, W, 3]`` layers, ``[H, W]`` alpha -> float32."""
  return (alpha[..., None] * fg + (1.0 - alpha[..., None]) * bg).astype(np.float32)


def paste_distractors(layer: np.ndarray, centres: np.ndarray, rng: np.random.Generator,
                      photos: Sequence[str]) -> np.ndarray:
  """float32 ``[S, S, 3]`` ``layer`` plus jittered photo blobs centred on ``centres`` (bool)."""
  ys, xs = np.nonzero(centres)
  if ys.size == 0:
    return layer
  size, layer = layer.shape[0], layer.copy()
  for _ in range(int(rng.integers(*DISTRACTOR_COUNT))):
    side = max(4, int(rng.uniform(*DISTRACTOR_SIDE) * size))
    patch = jitter(photo_region(photos[int(rng.integers(len(photos)))], side, side, rng), rng)
    alpha = alpha_from_silhouette(smooth_shape(2 * side, rng), side)
    k = int(rng.integers(ys.size))
    y0, x0 = int(ys[k]) - side // 2, int(xs[k]) - side // 2
    dst = np.s_[max(0, y0):min(size, y0 + side), max(0, x0):min(size, x0 + side)]
    src = np.s_[max(0, -y0):min(side, size - y0), max(0, -x0):min(side, size - x0)]
    layer[dst] = composite(patch[src], layer[dst], alpha[src])
  return layer


def make_composite(size: int, rng: np.random.Generator, photos: Sequence[str] = TRAIN_PHOTOS,
                   kind: Optional[str] = None,
                   distractor_prob: float = 0.0) -> Tuple[np.ndarray, np.ndarray]:
  """(image uint8 ``[S, S, 3]``, gt uint8 ``[S, S]`` in {0, 255}) from ``photos``; distractors in
  the foreground and far background each with ``distractor_prob`` (0 draws nothing for them)."""
  p = np.array(list(SILHOUETTE_WEIGHTS.values()))
  kind = kind or str(rng.choice(list(SILHOUETTE_WEIGHTS), p=p / p.sum()))
  alpha = alpha_from_silhouette(silhouette(kind, 2 * size, rng), size)
  gt = _binary(alpha > 0.5)
  if not gt.any() or gt.all():  # a shape too thin to survive the downsampling
    cv2.circle(gt, (size // 2, size // 2), max(1, size // 6), 255, -1)
    alpha = gt.astype(np.float32) / 255.0
  fg_name = bg_name = photos[int(rng.integers(len(photos)))]
  if len(photos) > 1 and rng.random() >= SAME_PHOTO_PROB:
    bg_name = photos[int(rng.integers(len(photos) - 1))]
    bg_name = photos[-1] if bg_name == fg_name else bg_name
  fg, bg = photo_region(fg_name, size, size, rng), photo_region(bg_name, size, size, rng)
  fg = match_lighting(fg, bg, rng) if rng.random() < MATCH_LIGHTING_PROB else jitter(fg, rng)
  if distractor_prob > 0 and rng.random() < distractor_prob:
    fg = paste_distractors(fg, gt > 0, rng, photos)
  if distractor_prob > 0 and rng.random() < distractor_prob:
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * (size // 10) + 1,) * 2)
    bg = paste_distractors(bg, cv2.dilate(gt, disc) == 0, rng, photos)
  if rng.random() < ALPHA_BLUR_PROB:
    alpha = cv2.GaussianBlur(alpha, (0, 0), rng.uniform(*ALPHA_BLUR_SIGMA))
  return camera(composite(fg, bg, alpha), rng), gt


class RealPhotoSource:
  """``source[i]``: ``{'image': uint8 [S, S, 3], 'mask': uint8 [S, S]}`` from rng [seed, i]."""

  def __init__(self, num_examples: int, size: int, seed: int = 0,
               photos: Sequence[str] = TRAIN_PHOTOS, distractor_prob: float = 0.0):
    if num_examples < 0 or seed < 0 or size < 8:
      raise ValueError(f'num_examples and seed must be >= 0 and size >= 8, got {num_examples}, '
                       f'{seed} and {size}')
    unknown = [p for p in photos if p not in PHOTOS]
    if unknown or not photos:
      raise ValueError(f'unknown or no photographs: {unknown or photos}')
    if not 0.0 <= distractor_prob <= 1.0:
      raise ValueError(f'distractor_prob must be in [0, 1], got {distractor_prob}')
    self.num_examples, self.size, self.seed = int(num_examples), int(size), int(seed)
    self.photos, self.distractor_prob = tuple(photos), float(distractor_prob)
    data_dir()  # fails now, with the install command, when scikit-image is missing

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, source_index(index, self.num_examples)])
    image, mask = make_composite(self.size, rng, self.photos, distractor_prob=self.distractor_prob)
    return {'image': image, 'mask': mask}

  def __repr__(self) -> str:
    return (f'RealPhotoSource(num_examples={self.num_examples}, size={self.size}, '
            f'seed={self.seed}, photos={self.photos}, distractor_prob={self.distractor_prob})')

# The held-out evaluation sets (benchmarks/real_photos.py).
HELDOUT_STREAM = 7_919  # a seed stream training never draws
HELDOUT_KINDS = (SMOOTH, THIN_AND_HOLES, HORSE_SHAPE, SMOOTH, THIN_AND_HOLES, HORSE_SHAPE)
HELDOUT_BASE = 512  # side at which the held-out composites and their coarse masks are made
HELDOUT_LOWRES_FACTOR = 4
HELDOUT_SHAPE_SIDE = 2048  # side at which the held-out silhouettes are drawn


class EvalPair(NamedTuple):
  name: str
  image: np.ndarray  # uint8 [H, W, 3]
  coarse: np.ndarray  # uint8 [H, W] in {0, 255}
  gt: Optional[np.ndarray]  # uint8 [H, W] in {0, 255}; None for plain photographs


def _resize_long_side(image: np.ndarray, long_side: int) -> np.ndarray:
  """uint8 ``[H, W, 3]`` -> uint8 ``[h, w, 3]`` with ``max(h, w) == long_side``."""
  h, w = image.shape[:2]
  f = long_side / max(h, w)
  size = (max(1, round(w * f)), max(1, round(h * f)))
  return cv2.resize(image, size, interpolation=cv2.INTER_AREA if f < 1 else cv2.INTER_CUBIC)


def heldout_composites(long_side: int, count: int = len(HELDOUT_KINDS),
                       seed: int = 0) -> List[EvalPair]:
  """``count`` composites of the ``HELD_OUT`` photographs, the same scenes at every ``long_side``;
  coarse masks: the published perturbation (even k) or the low-resolution segmenter (odd k)."""
  pairs, base = [], HELDOUT_BASE
  for k in range(count):
    rng = np.random.default_rng([seed, HELDOUT_STREAM, k])
    kind = HELDOUT_KINDS[k % len(HELDOUT_KINDS)]
    fg_name, bg_name = HELD_OUT if k % 2 == 0 else HELD_OUT[::-1]
    mask_big = silhouette(kind, max(long_side, HELDOUT_SHAPE_SIDE),
                          np.random.default_rng([seed, HELDOUT_STREAM, k, 1]))
    alpha = alpha_from_silhouette(mask_big, base)
    fg, bg = (photo_region(name, base, base, rng, (0.8, 1.25)) for name in (fg_name, bg_name))
    fg = match_lighting(fg, bg, rng) if k % 3 == 0 else jitter(fg, rng)
    image = np.clip(np.rint(composite(fg, bg, alpha)), 0, 255).astype(np.uint8)
    gt_base = _binary(alpha > 0.5)
    coarse = (synthesis.synthesize_coarse_mask(gt_base, rng) if k % 2 == 0 else
              synthesis.lowres_segmenter_mask(gt_base, rng, HELDOUT_LOWRES_FACTOR))
    image, side = _resize_long_side(image, long_side), (long_side, long_side)
    coarse = _binary(cv2.resize(coarse.astype(np.float32), side, interpolation=cv2.INTER_LINEAR)
                     > 127.5)
    gt = _binary(cv2.resize(mask_big, side, interpolation=cv2.INTER_AREA) > 127)
    pairs.append(EvalPair(f'{fg_name}_on_{bg_name}_{kind}_{k}', image, coarse, gt))
  return pairs


class LabelPair(NamedTuple):
  name: str
  image: np.ndarray  # uint8 [H, W, 3]
  coarse: np.ndarray  # uint8 [H, W] class ids
  gt: np.ndarray  # uint8 [H, W] class ids


def heldout_label_composites(long_side: int, count: int = 4, seed: int = 0) -> List[LabelPair]:
  """``count`` scenes of 2-4 objects cut from one ``HELD_OUT`` photograph and pasted over the
  other, object j of class j (0: the background; a later object covers an earlier one), the same
  scenes at every ``long_side``; coarse: ``synthesis.lowres_segmenter_labels`` of the base gt."""
  pairs, base, big = [], HELDOUT_BASE, max(long_side, HELDOUT_SHAPE_SIDE)
  for k in range(count):
    rng = np.random.default_rng([seed, HELDOUT_STREAM + 1, k])
    fg_name, bg_name = HELD_OUT if k % 2 == 0 else HELD_OUT[::-1]
    image = photo_region(bg_name, base, base, rng, (0.8, 1.25))
    gt_base, gt = np.zeros((base, base), np.uint8), np.zeros((long_side, long_side), np.uint8)
    for j in range(1, 3 + k % 3):
      side = int(rng.uniform(0.4, 0.7) * big)
      y, x = (rng.uniform(0, 1, 2) * (big - side)).astype(int)
      mask_big = np.zeros((big, big), np.uint8)
      mask_big[y:y + side, x:x + side] = silhouette(
          HELDOUT_KINDS[(k + j) % len(HELDOUT_KINDS)], side,
          np.random.default_rng([seed, HELDOUT_STREAM + 1, k, j]))
      alpha, fg = alpha_from_silhouette(mask_big, base), photo_region(fg_name, base, base, rng)
      fg = match_lighting(fg, image, rng) if (k + j) % 3 == 0 else jitter(fg, rng)
      image, gt_base[alpha > 0.5] = composite(fg, image, alpha), j
      gt[cv2.resize(mask_big, (long_side,) * 2, interpolation=cv2.INTER_AREA) > 127] = j
    coarse = synthesis.lowres_segmenter_labels(gt_base, rng, HELDOUT_LOWRES_FACTOR,
                                               (long_side,) * 2)
    image = _resize_long_side(np.clip(np.rint(image), 0, 255).astype(np.uint8), long_side)
    pairs.append(LabelPair(f'{fg_name}_on_{bg_name}_{j}_objects_{k}', image, coarse, gt))
  return pairs


# Outlines around each held-out subject (fractions of width, height): polygon; ellipse, degrees.
OUTLINES = {
    'astronaut': {'polygon': ((0.28, 0.05), (0.45, 0.02), (0.60, 0.06), (0.62, 0.30), (0.70, 0.45),
                              (0.74, 0.66), (0.95, 0.68), (1.0, 0.85), (1.0, 1.0), (0.04, 1.0),
                              (0.05, 0.65), (0.10, 0.50), (0.22, 0.42), (0.25, 0.30)),
                  'ellipse': ((0.50, 0.62), (0.46, 0.50), 0.0)},
    'chelsea': {'polygon': ((0.0, 0.0), (0.20, 0.0), (0.50, 0.04), (0.88, 0.0), (0.86, 0.30),
                            (0.80, 0.55), (0.78, 1.0), (0.0, 1.0)),
                'ellipse': ((0.42, 0.52), (0.46, 0.62), 0.0)},
}


def outline_mask(name: str, shape: str, height: int, width: int) -> np.ndarray:
  """The coarse mask of a drawn outline (``OUTLINES[name][shape]``), uint8 ``[H, W]``."""
  spec = OUTLINES[name][shape]
  mask = np.zeros((height, width), np.uint8)
  if shape == 'polygon':
    cv2.fillPoly(mask, [np.round(np.array(spec) * (width - 1, height - 1)).astype(np.int32)], 255)
  else:
    (cx, cy), (ax, ay), angle = spec
    cv2.ellipse(mask, (round(cx * width), round(cy * height)),
                (round(ax * width), round(ay * height)), angle, 0, 360, 255, -1)
  return mask


def heldout_photographs(long_side: int) -> List[EvalPair]:
  """Each ``HELD_OUT`` photograph resized to ``long_side``, once per ``OUTLINES`` shape; no gt."""
  pairs = []
  for name in HELD_OUT:
    image = _resize_long_side(load_photo(name), long_side)
    pairs += [EvalPair(f'{name}_{shape}', image, outline_mask(name, shape, *image.shape[:2]),
                       None) for shape in OUTLINES[name]]
  return pairs

# Measures.
FAR_FRACTION = 0.03  # of the image diagonal
GREY_THRESHOLD = 128  # grey masks are foreground above this (crm_jax.metrics.binarize)


def distance_to_boundary(mask: np.ndarray) -> np.ndarray:
  """Grey ``[H, W]`` mask -> float32 ``[H, W]`` distance to the other label (inf if none)."""
  fg = np.asarray(mask) > GREY_THRESHOLD
  if fg.all() or not fg.any():
    return np.full(fg.shape, np.inf, np.float32)
  inside, outside = (cv2.distanceTransform(m.astype(np.uint8), cv2.DIST_L2, 5) for m in (fg, ~fg))
  return np.where(fg, inside, outside).astype(np.float32)


class FarFlips(NamedTuple):
  """Shares in [0, 1] (NaN where no pixel counts) of the far pixels whose label flipped."""
  share: float  # of all far pixels
  inside: float  # of the far pixels inside the coarse mask (foreground turned background)
  outside: float  # of the far pixels outside it (background turned foreground)
  num_far: int


def far_flip_share(coarse: np.ndarray, refined: np.ndarray,
                   fraction: float = FAR_FRACTION) -> FarFlips:
  """Flipped shares of the pixels of grey ``[H, W]`` ``coarse`` farther than ``fraction`` of the
  diagonal from its boundary; ``refined``: grey ``[H, W]`` or float probabilities ``[H, W]``."""
  coarse, refined = np.asarray(coarse), np.asarray(refined)
  if coarse.shape != refined.shape:
    raise ValueError(f'coarse {coarse.shape} and refined {refined.shape} differ')
  h, w = coarse.shape
  far = distance_to_boundary(coarse) > fraction * math.hypot(h, w)
  coarse_fg = coarse > GREY_THRESHOLD
  refined_fg = refined > (0.5 if np.issubdtype(refined.dtype, np.floating) else GREY_THRESHOLD)
  flipped = far & (coarse_fg != refined_fg)
  counts = [(int(np.count_nonzero(flipped & r)), int(np.count_nonzero(r)))
            for r in (far, far & coarse_fg, far & ~coarse_fg)]
  return FarFlips(*(f / n if n else math.nan for f, n in counts), counts[0][1])


def label_far_flip_share(coarse: np.ndarray, refined: np.ndarray,
                         fraction: float = FAR_FRACTION) -> float:
  """The share (NaN: none) of the pixels of ``[H, W]`` class ids ``coarse`` farther than
  ``fraction`` of the diagonal from every coarse label change (a pixel unlike a 4-neighbour)
  whose label differs in ``refined``."""
  coarse, cross = np.asarray(coarse), cv2.getStructuringElement(cv2.MORPH_CROSS, (3, 3))
  edge = (cv2.dilate(coarse, cross) != coarse) | (cv2.erode(coarse, cross) != coarse)
  far = (cv2.distanceTransform(np.uint8(~edge), cv2.DIST_L2, 5) > fraction * math.hypot(
      *coarse.shape)) if edge.any() else np.ones(coarse.shape, bool)
  return float(np.count_nonzero(far & (coarse != refined)) / far.sum()) if far.any() else math.nan


def make_source(config):
  """The source of ``config.dataset = 'real_photos'`` (with synthetic pairs mixed in)."""
  from crm_jax.data.tfds_builders import MixtureSource  # imports TFDS (seconds): only here
  get = lambda name: config[name] if name in config else 0  # noqa: E731
  n, size = int(get('real_photos_num_examples')), int(get('real_photos_size'))
  fraction = float(get('real_photos_synthetic_fraction'))
  if n <= 0 or size <= 0 or not 0.0 <= fraction < 1.0:
    raise ValueError(f'real_photos_num_examples ({n}) and real_photos_size ({size}) must be '
                     f'positive and real_photos_synthetic_fraction ({fraction}) in [0, 1)')
  seed, n_synthetic = int(get('seed')), int(round(n * fraction))
  sources = {'real_photos': RealPhotoSource(
      n - n_synthetic, size, seed, distractor_prob=float(get('real_photos_distractor_prob')))}
  if n_synthetic:
    side = int(get('synthetic_size'))
    if side <= 0:
      raise ValueError(f'real_photos_synthetic_fraction > 0 needs synthetic_size > 0, got {side}')
    sources['synthetic'] = synthetic.SyntheticSource(n_synthetic, side, side, seed)
  return MixtureSource(sources)

"""Synthetic (image, mask) pairs with exactly known masks (tests, demos, CPU runs): a textured
object (noise blob, star polygons, ellipses, maybe a hole or thin lines) on a textured background,
composited with a lightly blurred alpha; the mask stays hard {0, 255}. Any size from 1x1."""

from __future__ import annotations

import math
from typing import Dict, Tuple

import cv2
import numpy as np

from crm_jax.data import source_index

BLOB_AREA_RANGE = (0.08, 0.4)  # share of the image the noise blob covers
BLOB_OCTAVES = ((3.0, 1.0), (10.0, 0.35), (40.0, 0.12), (120.0, 0.05))  # (cells, amplitude)
BLOB_FALLOFF = 2.0  # radial falloff weight of the blob field
COLOUR_OFFSET_RANGE = (35.0, 90.0)  # object colour's distance from the background's
TEXTURE_AMPLITUDE = 28.0  # low-frequency colour noise, grey levels.
GRAIN_SIGMA = 5.0  # per-pixel noise, grey levels.
GRAIN_TILE = 509  # the grain repeats with this period (prime, so it does not align with stripes).
ALPHA_BLUR_SIGMA = 0.6  # pixels; the composite's edge softness.
_QUANTILE_SAMPLES = 65_536  # quantiles are estimated on a strided subsample of this size


def _grid_shape(h: int, w: int, cells: float) -> Tuple[int, int]:
  """The noise grid of ``cells`` across the longer side, at least 2 x 2."""
  longer = max(h, w)
  return (max(2, int(math.ceil(cells * h / longer)) + 1),
          max(2, int(math.ceil(cells * w / longer)) + 1))


def _value_noise(h: int, w: int, cells: float, rng: np.random.Generator) -> np.ndarray:
  """Smooth noise, float32 [h, w]: a grid of ``cells`` across, cubic upsampling."""
  grid = rng.standard_normal(_grid_shape(h, w, cells) + (1,), dtype=np.float32)
  return cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC).reshape(h, w)


def _quantile(x: np.ndarray, q: float) -> float:
  step = max(1, int(math.sqrt(x.size / _QUANTILE_SAMPLES)))
  return float(np.quantile(x[::step, ::step], q))


def _star_polygon(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
  """A random star-shaped polygon [N, 2] (x, y), int32."""
  n = int(rng.integers(4, 13))
  cx, cy = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
  radius, angles = rng.uniform(0.08, 0.3) * min(h, w), np.sort(rng.uniform(0, 2 * np.pi, n))
  radii = radius * rng.uniform(0.4, 1.0, n)
  pts = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)
  return np.round(pts).astype(np.int32)


def _random_ellipse(mask: np.ndarray, rng: np.random.Generator, value: int) -> None:
  h, w = mask.shape
  centre = (int(rng.uniform(0.15, 0.85) * w), int(rng.uniform(0.15, 0.85) * h))
  axes = (max(1, int(rng.uniform(0.04, 0.22) * w)), max(1, int(rng.uniform(0.04, 0.22) * h)))
  cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, value, thickness=-1)


def _make_mask(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
  """uint8 [h, w] in {0, 255}."""
  mask = np.zeros((h, w), np.uint8)
  if rng.random() < 0.85:
    field = np.zeros((h, w), np.float32)
    for cells, amplitude in BLOB_OCTAVES:
      field += amplitude * _value_noise(h, w, cells, rng)
    cy, cx = rng.uniform(0.3, 0.7, 2)
    ys = (np.arange(h, dtype=np.float32) + 0.5) / h - cy
    xs = (np.arange(w, dtype=np.float32) + 0.5) / w - cx
    field -= BLOB_FALLOFF * (ys[:, None] ** 2 + xs[None, :] ** 2)
    mask[field > _quantile(field, 1.0 - rng.uniform(*BLOB_AREA_RANGE))] = 255
  for _ in range(int(rng.integers(0, 4))):
    if rng.random() < 0.5:
      cv2.fillPoly(mask, [_star_polygon(h, w, rng)], 255)
    else:
      _random_ellipse(mask, rng, 255)
  if rng.random() < 0.2:  # a hole
    _random_ellipse(mask, rng, 0)
  if rng.random() < 0.4:  # thin structures leaving the object
    ys, xs = np.nonzero(mask[::4, ::4])
    if ys.size:
      for _ in range(int(rng.integers(1, 6))):
        k = int(rng.integers(ys.size))
        start = (int(xs[k]) * 4, int(ys[k]) * 4)
        angle, length = rng.uniform(0, 2 * np.pi), rng.uniform(0.1, 0.4) * max(h, w)
        end = (int(start[0] + length * math.cos(angle)), int(start[1] + length * math.sin(angle)))
        cv2.line(mask, start, end, 255, thickness=int(rng.integers(1, 4)))
  # Never empty nor full where the image has room for both.
  if h * w >= 2:
    if not mask.any():
      mask[h // 2, w // 2] = 255
      _random_ellipse(mask, rng, 255)
    if mask.all():
      mask[: max(1, h // 8), : max(1, w // 8)] = 0
  return mask


def _offset_colour(base: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  direction = rng.standard_normal(3).astype(np.float32)
  direction /= np.linalg.norm(direction) + 1e-6
  return np.clip(base + direction * rng.uniform(*COLOUR_OFFSET_RANGE), 0, 255).astype(np.float32)


def _texture(h: int, w: int, colour: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """float32 [h, w, 3]: a colour with low-frequency colour noise, a gradient, maybe stripes."""
  # Noise and a linear gradient on the grid, upsampled together (cubic keeps a ramp linear).
  gh, gw = _grid_shape(h, w, rng.uniform(2.0, 30.0))
  grid = TEXTURE_AMPLITUDE * rng.uniform(0.3, 1.0) * rng.standard_normal((gh, gw, 3),
                                                                         dtype=np.float32)
  theta = rng.uniform(0, 2 * np.pi)
  ramp = (math.sin(theta) * np.linspace(-0.5, 0.5, gh, dtype=np.float32)[:, None]
          + math.cos(theta) * np.linspace(-0.5, 0.5, gw, dtype=np.float32)[None, :])
  grid += ramp[..., None] * rng.uniform(-50, 50, 3).astype(np.float32)
  grid += colour
  tex = cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC).reshape(h, w, 3)
  if rng.random() < 0.4:
    # Stripes sin(a y + b x) = sin(a y) cos(b x) + cos(a y) sin(b x): outer products, cheap.
    period, phi = rng.uniform(4.0, 40.0), rng.uniform(0, np.pi)
    a, b = 2 * np.pi * math.sin(phi) / period, 2 * np.pi * math.cos(phi) / period
    yy = np.arange(h, dtype=np.float32) * np.float32(a)
    xx = np.arange(w, dtype=np.float32) * np.float32(b)
    stripes = np.sin(yy)[:, None] * np.cos(xx)[None, :] + np.cos(yy)[:, None] * np.sin(xx)[None, :]
    amplitude = rng.uniform(-20, 20, (3, 1)).astype(np.float32)
    tex += cv2.transform(stripes[..., None], amplitude).reshape(h, w, 3)
  return tex


def _grain(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
  """float32 [h, w, 3] per-pixel noise: a random tile, repeated (cheaper than h * w draws)."""
  th, tw = min(h, GRAIN_TILE), min(w, GRAIN_TILE)
  tile = GRAIN_SIGMA * rng.standard_normal((th, tw, 3), dtype=np.float32)
  return np.tile(tile, (-(-h // th), -(-w // tw), 1))[:h, :w]


def make_synthetic_pair(height: int, width: int,
                        rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
  """(image uint8 [H, W, 3] RGB, mask uint8 [H, W] in {0, 255}), H, W >= 1; the mask is never
  empty nor full when H * W >= 2."""
  h, w = int(height), int(width)
  if h < 1 or w < 1:
    raise ValueError(f"size must be at least 1x1, got {h}x{w}")
  mask = _make_mask(h, w, rng)
  bg_colour = rng.uniform(40, 215, 3).astype(np.float32)
  fg_colour = _offset_colour(bg_colour, rng)
  background = _texture(h, w, bg_colour, rng)
  # Distractor blobs in the background, in colours near the object's (blended in their box only).
  for _ in range(int(rng.integers(0, 3))):
    blob = np.zeros((h, w), np.uint8)
    _random_ellipse(blob, rng, 255)
    colour, strength = _offset_colour(fg_colour, rng), np.float32(rng.uniform(0.3, 0.7) / 255.0)
    x, y, bw, bh = cv2.boundingRect(blob)
    if bw and bh:
      weight = blob[y:y + bh, x:x + bw, None].astype(np.float32) * strength
      roi = background[y:y + bh, x:x + bw]
      roi += weight * (colour - roi)
  foreground = _texture(h, w, fg_colour, rng)
  alpha = mask.astype(np.float32) * np.float32(1 / 255)
  if min(h, w) >= 3:
    alpha = cv2.GaussianBlur(alpha, (0, 0), ALPHA_BLUR_SIGMA).reshape(h, w)
  image = cv2.blendLinear(foreground, background, alpha, 1.0 - alpha).reshape(h, w, 3)
  # Adding the grain, rounding and saturating to uint8 in one OpenCV pass.
  image = cv2.add(image, _grain(h, w, rng), dtype=cv2.CV_8U).reshape(h, w, 3)
  return image, mask


def make_synthetic_scene(height: int, width: int, rng: np.random.Generator,
                         num_classes: int = 4) -> Tuple[np.ndarray, np.ndarray]:
  """(image uint8 [H, W, 3] RGB, gt uint8 [H, W] class ids < ``num_classes``): a synthetic pair
  (its object class 1), then the object of one more pair per class pasted over it (a later
  object covers an earlier one); 0 the first pair's background."""
  image, mask = make_synthetic_pair(height, width, rng)
  gt = (mask > 0).astype(np.uint8)
  for c in range(2, num_classes):
    other, mask = make_synthetic_pair(height, width, rng)
    alpha = cv2.GaussianBlur(mask.astype(np.float32) / 255, (0, 0), ALPHA_BLUR_SIGMA)[..., None]
    image = np.rint(alpha * other + (1 - alpha) * image).astype(np.uint8)
    gt[mask > 0] = c
  return image, gt


class SyntheticSource:
  """``source[i]``: ``{"image": uint8 [H, W, 3], "mask": uint8 [H, W]}`` from rng [seed, i]."""

  def __init__(self, num_examples: int, height: int, width: int, seed: int = 0):
    if num_examples < 0 or seed < 0:
      raise ValueError(f"num_examples and seed must be >= 0, got {num_examples} and {seed}")
    self.num_examples, self.height, self.width = int(num_examples), int(height), int(width)
    self.seed = int(seed)

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, source_index(index, self.num_examples)])
    image, mask = make_synthetic_pair(self.height, self.width, rng)
    return {"image": image, "mask": mask}

  def __repr__(self) -> str:
    return (f"SyntheticSource(num_examples={self.num_examples}, height={self.height}, "
            f"width={self.width}, seed={self.seed})")

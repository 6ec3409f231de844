"""Coarse-mask synthesis for training (docs/data.md, "Coarse-mask synthesis"): upstream's steps a
and b, and a low-resolution segmenter's mask; all randomness from a ``np.random.Generator``."""

from __future__ import annotations

import cv2
import numpy as np

# Step a: boundary simplification.
MIN_CONTOUR_POINTS = 10  # contours with fewer points are dropped.
REGIONAL_SAMPLE_RATE = 0.1  # fraction of a contour removed as one consecutive run.
REMOVE_START_FRACTION = 0.1  # the run starts among this fraction of starts, closest ends first.
SAMPLE_RATE = 0.1  # fraction of the remaining points kept.

# Step b: random morphology.
BINARY_THRESHOLD = 127  # cv2.threshold(seg, 127, 255, THRESH_BINARY): > 127 -> 255.
MORPH_ROUNDS = 250
RECTS_PER_ROUND = 4
CENTRE_PIXEL_PROB = 0.25  # per rectangle: set its centre pixel to 0 or 255 with this probability.
DILATE_PROB = 0.5  # per rectangle: dilate with this probability, else erode.
KERNEL_SIZE_RANGE = (3, 10)  # structuring-element size, an integer in [3, 10).
MIN_MORPH_SIDE = 3  # images with a side below this are returned unchanged (upstream: h, w <= 2).
IOU_EPS = 1e-6  # (|A & B| + eps) / (|A | B| + eps): two empty masks have IoU 1.
IOU_TARGET_RANGE = (0.8, 1.0)  # step b's IoU target, uniform in [lo, hi)
GT_THRESHOLD = 0.5  # gt / 255 > 0.5

# The low-resolution segmenter stand-in.
LOWRES_FACTOR = 16
LOWRES_BLUR_SIGMA = 0.7  # Gaussian sigma at the low resolution, in low-res pixels.
LOWRES_THRESHOLD = 0.5


def as_mask_2d(mask: np.ndarray) -> np.ndarray:
  """Accepts [H, W] or [H, W, 1]; returns [H, W]."""
  mask = np.asarray(mask)
  if mask.ndim == 3 and mask.shape[-1] == 1:
    mask = mask[..., 0]
  if mask.ndim != 2:
    raise ValueError(f"expected a [H, W] or [H, W, 1] mask, got shape {mask.shape}")
  return mask


def binarize_gt(gt: np.ndarray) -> np.ndarray:
  """[H, W] (or [H, W, 1]) gt, integer in [0, 255] or floating in [0, 1] -> [H, W] uint8 in
  {0, 255}: ``gt / 255 > 0.5``."""
  gt = as_mask_2d(gt)
  prob = gt.astype(np.float32) if np.issubdtype(gt.dtype, np.floating) else gt / np.float32(255)
  return np.where(prob > GT_THRESHOLD, 255, 0).astype(np.uint8)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
  """IoU of the nonzero pixels of two masks, with ``IOU_EPS`` so that empty vs empty is 1."""
  a, b = np.asarray(a) != 0, np.asarray(b) != 0
  return float((np.count_nonzero(a & b) + IOU_EPS) / (np.count_nonzero(a | b) + IOU_EPS))


def _simplify_contour(contour: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Step a on one contour [N, 1, 2], N >= MIN_CONTOUR_POINTS; returns the kept points [M, 1, 2]."""
  n = contour.shape[0]
  num_remove = int(n * REGIONAL_SAMPLE_RATE)
  # Candidate starts (no wrap-around, as upstream), by the squared distance of the run's ends.
  num_starts = n - num_remove
  pts = contour[:, 0, :].astype(np.int64)
  dist = np.sum((pts[:num_starts] - pts[num_remove:num_remove + num_starts]) ** 2, axis=1)
  # At least one candidate (upstream's int(0.1 * num_starts) is none, a crash, for 10 points).
  num_candidates = max(1, int(num_starts * REMOVE_START_FRACTION))
  start = int(np.argsort(dist, kind="stable")[rng.integers(num_candidates)])
  kept = np.concatenate([contour[:start], contour[start + num_remove:]], axis=0)
  m = kept.shape[0]
  return kept[np.sort(rng.choice(m, size=int(m * SAMPLE_RATE), replace=False))]


def simplify_boundary(gt_uint8: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Step a on a [H, W] uint8 mask in {0, 255}: every contour simplified, the kept polygons
  filled; a copy of the input when no polygon is left."""
  gt_uint8 = np.ascontiguousarray(as_mask_2d(gt_uint8), dtype=np.uint8)
  contours, _ = cv2.findContours(gt_uint8, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
  polygons = [_simplify_contour(c, rng) for c in contours if c.shape[0] >= MIN_CONTOUR_POINTS]
  polygons = [np.ascontiguousarray(p, dtype=np.int32) for p in polygons if p.shape[0] > 0]
  if not polygons:
    return gt_uint8.copy()
  out = np.zeros_like(gt_uint8)
  # One filled draw of all polygons: a hole's contour inside its outer contour stays a hole.
  cv2.drawContours(out, polygons, -1, 255, thickness=cv2.FILLED)
  return out


def _random_structuring_element(rng: np.random.Generator) -> np.ndarray:
  """A rectangle, an ellipse, or a half-height or half-width ellipse (ksize is (width, height))."""
  size = int(rng.integers(*KERNEL_SIZE_RANGE))
  shapes = [(cv2.MORPH_RECT, (size, size)), (cv2.MORPH_ELLIPSE, (size, size)),
            (cv2.MORPH_ELLIPSE, (size, size // 2)), (cv2.MORPH_ELLIPSE, (size // 2, size))]
  return cv2.getStructuringElement(*shapes[int(rng.integers(4))])


def random_morphology(seg_uint8: np.ndarray, reference_uint8: np.ndarray, iou_target: float,
                      rng: np.random.Generator) -> np.ndarray:
  """Step b: random local dilations and erosions of ``seg_uint8`` [H, W] (thresholded at 127)
  until IoU(seg, reference) < iou_target, at most ``MORPH_ROUNDS`` rounds; uint8 in {0, 255}."""
  seg = np.where(as_mask_2d(seg_uint8) > BINARY_THRESHOLD, 255, 0).astype(np.uint8)
  reference = as_mask_2d(reference_uint8) != 0
  h, w = seg.shape
  if h < MIN_MORPH_SIDE or w < MIN_MORPH_SIDE:
    return seg
  for _ in range(MORPH_ROUNDS):
    for _ in range(RECTS_PER_ROUND):
      # A random non-empty rectangle [y0, y1) x [x0, x1).
      x0, y0 = int(rng.integers(w)), int(rng.integers(h))
      x1, y1 = int(rng.integers(x0 + 1, w + 1)), int(rng.integers(y0 + 1, h + 1))
      # A lone pixel that the dilation/erosion below grows into a blob or a hole.
      if rng.random() < CENTRE_PIXEL_PROB:
        seg[(y0 + y1) // 2, (x0 + x1) // 2] = 255 * int(rng.integers(2))
      op = cv2.dilate if rng.random() < DILATE_PROB else cv2.erode
      kernel = _random_structuring_element(rng)
      # The region is morphed on its own: OpenCV's default border leaves the edges unaffected.
      seg[y0:y1, x0:x1] = op(np.ascontiguousarray(seg[y0:y1, x0:x1]), kernel, iterations=1)
    if mask_iou(seg, reference) < iou_target:
      break
  return seg


def sample_iou_target(rng: np.random.Generator,
                      iou_range: tuple[float, float] = IOU_TARGET_RANGE) -> float:
  """An IoU target uniform in [lo, hi)."""
  lo, hi = iou_range
  return float(lo + rng.random() * (hi - lo))


def synthesize_coarse_mask(gt: np.ndarray, rng: np.random.Generator,
                           iou_range: tuple[float, float] = IOU_TARGET_RANGE) -> np.ndarray:
  """The training coarse mask, [H, W] uint8 in {0, 255}: steps a and b on the binarised gt."""
  gt_bin = binarize_gt(gt)
  iou_target = sample_iou_target(rng, iou_range)
  simplified = simplify_boundary(gt_bin, rng)
  return random_morphology(simplified, simplified, iou_target, rng)


def _lowres_score(fg: np.ndarray, rng: np.random.Generator | None, factor: int,
                  size: tuple[int, int]) -> np.ndarray:
  """float32 ``[H, W]`` indicator -> a low-resolution segmenter's score at ``size`` (W, H):
  area-downsampled by ``factor``, blurred, a random error field when ``rng`` is given, upsampled."""
  h, w = fg.shape
  lh, lw = max(1, int(round(h / factor))), max(1, int(round(w / factor)))
  small = cv2.resize(fg, (lw, lh), interpolation=cv2.INTER_AREA).reshape(lh, lw)
  small = cv2.GaussianBlur(small, (0, 0), LOWRES_BLUR_SIGMA,
                           borderType=cv2.BORDER_REPLICATE).reshape(lh, lw)
  if rng is not None:
    small = small + rng.uniform(-0.1, 0.1, size=small.shape).astype(np.float32)
  return cv2.resize(small, size, interpolation=cv2.INTER_LINEAR).reshape(size[1], size[0])


def lowres_segmenter_mask(gt: np.ndarray, rng: np.random.Generator | None = None,
                          factor: int = LOWRES_FACTOR) -> np.ndarray:
  """A low-resolution segmenter's mask of the binarised gt (``_lowres_score``) thresholded at
  0.5; [H, W] uint8 in {0, 255}."""
  gt_bin = binarize_gt(gt)
  up = _lowres_score(gt_bin.astype(np.float32) / 255.0, rng, factor, gt_bin.shape[::-1])
  return np.where(up > LOWRES_THRESHOLD, 255, 0).astype(np.uint8)


def lowres_segmenter_labels(labels: np.ndarray, rng: np.random.Generator | None = None,
                            factor: int = LOWRES_FACTOR,
                            size: tuple[int, int] | None = None) -> np.ndarray:
  """A low-resolution segmenter's label map of ``[H, W]`` class ids: each class's
  ``_lowres_score`` (its own error field) at ``size`` (W, H; default the input's), the highest
  one's class per pixel; the input's dtype."""
  labels = np.asarray(labels)
  classes, size = np.unique(labels), size or labels.shape[::-1]
  scores = [_lowres_score((labels == c).astype(np.float32), rng, factor, size) for c in classes]
  return classes[np.argmax(scores, axis=0)].astype(labels.dtype)

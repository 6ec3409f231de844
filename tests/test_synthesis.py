"""Tests of the coarse-mask synthesis (docs/data.md, steps a and b)."""

import cv2
import numpy as np
import pytest

from crm_jax.data import synthesis

SIZE = 224


def _disk(size=SIZE, radius=None):
  gt = np.zeros((size, size), np.uint8)
  cv2.circle(gt, (size // 2, size // 2), radius or size // 3, 255, -1)
  return gt


def _large_shapes():
  """Objects of a few tens of pixels across or more, the training regime."""
  shapes = {"disk": _disk()}
  rect = np.zeros((SIZE, SIZE), np.uint8)
  rect[40:180, 60:150] = 255
  shapes["rect"] = rect
  poly = np.zeros((SIZE, SIZE), np.uint8)
  cv2.fillPoly(poly, [np.array([[20, 30], [200, 50], [120, 210], [90, 100]], np.int32)], 255)
  shapes["poly"] = poly
  ring = _disk()
  cv2.circle(ring, (SIZE // 2, SIZE // 2), SIZE // 6, 0, -1)
  shapes["ring"] = ring
  half = np.zeros((SIZE, SIZE), np.uint8)
  half[:, :150] = 255
  shapes["half"] = half
  wide = np.zeros((120, 300), np.uint8)
  cv2.ellipse(wide, (150, 60), (120, 40), 10, 0, 360, 255, -1)
  shapes["wide_ellipse"] = wide
  return shapes


def _small_shapes():
  """Several small objects: step a's 10 % point sampling leaves few polygon vertices each."""
  blobs = np.zeros((SIZE, SIZE), np.uint8)
  for i in range(5):
    cv2.circle(blobs, (30 + 40 * i, 60 + 20 * i), 15, 255, -1)
  return {"blobs": blobs, "small_disk": _disk(radius=20)}


def _degenerate_masks():
  masks = {
      "empty": np.zeros((64, 64), np.uint8),
      "full": np.full((64, 64), 255, np.uint8),
      "1x1_off": np.zeros((1, 1), np.uint8),
      "1x1_on": np.full((1, 1), 255, np.uint8),
      "1x50": np.full((1, 50), 255, np.uint8),
      "50x1": np.full((50, 1), 255, np.uint8),
      "2x2_on": np.full((2, 2), 255, np.uint8),
      "3x3_on": np.full((3, 3), 255, np.uint8),
  }
  for n in (1, 2, 3):
    tiny = np.zeros((40, 40), np.uint8)
    tiny[20, 20:20 + n] = 255
    masks[f"tiny_{n}px"] = tiny
  corner = np.zeros((40, 40), np.uint8)
  corner[0, 0] = 255
  masks["corner_px"] = corner
  hline = np.zeros((64, 64), np.uint8)
  hline[30, 5:60] = 255
  masks["hline"] = hline
  dline = np.zeros((64, 64), np.uint8)
  cv2.line(dline, (0, 0), (63, 63), 255, 1)
  masks["diagonal"] = dline
  checker = (np.indices((32, 32)).sum(0) % 2 * 255).astype(np.uint8)
  masks["checkerboard"] = checker
  border = np.full((64, 64), 255, np.uint8)
  border[1:-1, 1:-1] = 0
  masks["frame"] = border
  return masks


def _is_binary(x):
  return x.dtype == np.uint8 and np.isin(x, (0, 255)).all()


def test_binarize_gt():
  gt = np.array([[0, 127, 128, 255]], np.uint8)
  np.testing.assert_array_equal(synthesis.binarize_gt(gt), [[0, 0, 255, 255]])
  soft = np.array([[0.0, 0.5, 0.51, 1.0]], np.float32)  # floats are already in [0, 1].
  np.testing.assert_array_equal(synthesis.binarize_gt(soft), [[0, 0, 255, 255]])
  assert synthesis.binarize_gt(gt[..., None]).shape == (1, 4)


def test_mask_iou():
  a = np.zeros((4, 4), np.uint8)
  assert synthesis.mask_iou(a, a) == pytest.approx(1.0)
  b = a.copy()
  a[:2] = 255
  b[1:3] = 255
  assert synthesis.mask_iou(a, b) == pytest.approx(4 / 12)


@pytest.mark.parametrize("name", sorted(_large_shapes()))
def test_coarse_mask_binary_same_size_and_iou_band(name):
  gt = _large_shapes()[name]
  ious = []
  for seed in range(12):
    coarse = synthesis.synthesize_coarse_mask(gt, np.random.default_rng(seed))
    assert coarse.shape == gt.shape
    assert _is_binary(coarse)
    ious.append(synthesis.mask_iou(coarse, gt))
  # Measured over 200 seeds x 6 shapes: IoU vs the original gt has 5th-95th percentiles
  # 0.77-0.95 (extremes 0.53-0.98), mean 0.86 (0.84-0.89 per shape). The stop rule compares
  # against step a's output (itself 0.82-0.985 IoU vs gt), and the last round of 4 rectangles
  # may overshoot the target, so the band is wider and lower than the target's [0.8, 1.0).
  assert min(ious) > 0.55, ious
  assert max(ious) < 0.995, ious
  assert 0.75 < np.mean(ious) < 0.95, ious


@pytest.mark.parametrize("name", sorted(_small_shapes()))
def test_coarse_mask_small_objects_lower_band(name):
  gt = _small_shapes()[name]
  ious = [synthesis.mask_iou(synthesis.synthesize_coarse_mask(gt, np.random.default_rng(s)), gt)
          for s in range(12)]
  # Small objects keep few polygon vertices in step a (randomly placed, so sometimes all on one
  # side): measured over 200 seeds IoU vs gt 0.10-0.91, mean 0.58 (blobs) and 0.67 (disk).
  assert min(ious) > 0.2, ious
  assert 0.45 < np.mean(ious) < 0.85, ious


def test_stop_rule_against_step_a_output():
  gt = _disk()
  for seed in range(10):
    rng = np.random.default_rng(seed)
    target = synthesis.sample_iou_target(rng)
    assert 0.8 <= target < 1.0
    simplified = synthesis.simplify_boundary(gt, rng)
    coarse = synthesis.random_morphology(simplified, simplified, target, rng)
    iou = synthesis.mask_iou(coarse, simplified)
    # Stops after the first round below the target; one round (4 rectangles) overshoots by
    # at most ~0.12 on this shape (measured over 200 seeds).
    assert target - 0.2 < iou < target


def test_synthesize_matches_its_steps():
  gt = _large_shapes()["poly"]
  rng = np.random.default_rng(3)
  target = synthesis.sample_iou_target(rng)
  simplified = synthesis.simplify_boundary(gt, rng)
  expected = synthesis.random_morphology(simplified, simplified, target, rng)
  np.testing.assert_array_equal(synthesis.synthesize_coarse_mask(gt, np.random.default_rng(3)),
                                expected)


def test_random_morphology_unreachable_target_runs_all_rounds():
  gt = _disk(64)
  seg = synthesis.random_morphology(gt, gt, 0.0, np.random.default_rng(0))
  assert seg.shape == gt.shape and _is_binary(seg)


def test_random_morphology_thresholds_at_127():
  seg = np.array([[127, 128]], np.uint8)  # too small to morph: only thresholded.
  np.testing.assert_array_equal(
      synthesis.random_morphology(seg, seg, 0.9, np.random.default_rng(0)), [[0, 255]])


def test_simplify_boundary():
  gt = _disk()
  rng = np.random.default_rng(0)
  out = synthesis.simplify_boundary(gt, rng)
  assert _is_binary(out) and out.shape == gt.shape
  assert 0.9 < synthesis.mask_iou(out, gt) < 1.0  # a polygon of ~10 % of the points.
  # Holes survive the fill.
  ring = _large_shapes()["ring"]
  out = synthesis.simplify_boundary(ring, rng)
  assert out[SIZE // 2, SIZE // 2] == 0 and synthesis.mask_iou(out, ring) > 0.8
  # Contours under 10 points are dropped; with nothing left, gt comes back.
  tiny = np.zeros((20, 20), np.uint8)
  tiny[5:7, 5:7] = 255
  np.testing.assert_array_equal(synthesis.simplify_boundary(tiny, rng), tiny)


@pytest.mark.parametrize("name", sorted(_degenerate_masks()))
def test_degenerate_masks_do_not_crash(name):
  gt = _degenerate_masks()[name]
  for seed in range(3):
    coarse = synthesis.synthesize_coarse_mask(gt, np.random.default_rng(seed))
    assert coarse.shape == gt.shape
    assert _is_binary(coarse)
    low = synthesis.lowres_segmenter_mask(gt, np.random.default_rng(seed))
    assert low.shape == gt.shape and _is_binary(low)


def test_degenerate_expected_values():
  rng = np.random.default_rng(0)
  for value in (0, 255):
    one = np.full((1, 1), value, np.uint8)
    np.testing.assert_array_equal(synthesis.synthesize_coarse_mask(one, rng), one)
  empty = np.zeros((64, 64), np.uint8)
  # Nothing to dilate and no contour; only a centre pixel set to 255 can add foreground.
  assert synthesis.simplify_boundary(empty, rng).sum() == 0


def test_accepts_channel_axis_and_float_gt():
  gt = _disk(96)
  a = synthesis.synthesize_coarse_mask(gt[..., None], np.random.default_rng(5))
  b = synthesis.synthesize_coarse_mask(gt.astype(np.float32) / 255, np.random.default_rng(5))
  c = synthesis.synthesize_coarse_mask(gt, np.random.default_rng(5))
  assert a.shape == gt.shape
  np.testing.assert_array_equal(a, c)
  np.testing.assert_array_equal(b, c)


def test_determinism():
  gt = _large_shapes()["poly"]
  a = synthesis.synthesize_coarse_mask(gt, np.random.default_rng(42))
  b = synthesis.synthesize_coarse_mask(gt, np.random.default_rng(42))
  c = synthesis.synthesize_coarse_mask(gt, np.random.default_rng(43))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_iou_range_argument():
  gt = _disk()
  # A target range near 1 stops after the first round that changes anything.
  ious = [synthesis.mask_iou(
      synthesis.synthesize_coarse_mask(gt, np.random.default_rng(s), iou_range=(0.99, 0.995)), gt)
          for s in range(5)]
  assert np.mean(ious) > 0.9


def test_lowres_segmenter_mask():
  gt = _disk(512)
  low = synthesis.lowres_segmenter_mask(gt)
  assert low.shape == gt.shape and _is_binary(low)
  assert synthesis.mask_iou(low, gt) > 0.97
  np.testing.assert_array_equal(low, synthesis.lowres_segmenter_mask(gt))
  # Fine structure is lost: a 1-pixel line disappears, as for a segmenter at 1/16 resolution.
  thin = gt.copy()
  thin[20, :] = 255
  assert synthesis.lowres_segmenter_mask(thin)[20, :100].max() == 0
  # With an rng: random but seeded.
  a = synthesis.lowres_segmenter_mask(gt, np.random.default_rng(1))
  b = synthesis.lowres_segmenter_mask(gt, np.random.default_rng(1))
  np.testing.assert_array_equal(a, b)
  assert synthesis.mask_iou(a, gt) > 0.95
  # Small images: the low-resolution side is at least 1.
  assert synthesis.lowres_segmenter_mask(np.full((5, 7), 255, np.uint8)).min() == 255

"""Tests of crm_jax.metrics (docs/metrics.md): hand-computed cases and an independent restatement."""

import math
import os

import cv2
import numpy as np
import pytest

from crm_jax import metrics

H, W = 80, 100  # W + H < 600: every radius is 1 (the 3x3 ellipse, a cross).


def _square(h=H, w=W, top=30, left=40, size=20, value=255):
  m = np.zeros((h, w), np.uint8)
  m[top:top + size, left:left + size] = value
  return m


def _write(path, img):
  assert cv2.imwrite(str(path), img)


def _write_object(folder, name, gt, seg, masks):
  """masks: {scale: grey mask}."""
  _write(folder / f"{name}_gt.png", gt)
  _write(folder / f"{name}_seg.png", seg)
  for s, m in masks.items():
    _write(folder / f"{metrics.scale_key(s)}_{name}_mask.png", m)


# ---------------------------------------------------------------------------------------------
# Hand-computed cases.


def test_radii():
  assert metrics.mba_radii(80, 100) == [1] * 5  # r_max = 0.6: int truncates, floor would give 0
  assert metrics.mba_radii(400, 400) == [1, 1, 1, 2, 2]  # r_max = 8/3
  assert metrics.mba_radii(1600, 2048) == [1, 3, 5, 7, 9]  # r_max = 12.16
  assert metrics.mba_radii(3600, 5000) == [1, 6, 12, 17, 23]  # r_max = 28.67


def test_square_band_and_accuracy():
  gt = _square() > 128
  band = metrics.boundary_band(gt, 1)
  # Inner ring of the 20x20 square (400 - 18*18 = 76) plus the four outer sides (the cross
  # dilation does not reach the diagonal corners): 4 * 20 = 80.
  assert band.sum() == 76 + 80
  assert metrics.boundary_accuracy(gt, gt) == 1.0
  assert metrics.boundary_accuracy(gt, np.zeros_like(gt)) == pytest.approx(80 / 156, abs=1e-15)
  assert metrics.boundary_accuracy(gt, np.ones_like(gt)) == pytest.approx(76 / 156, abs=1e-15)
  # Shifted one pixel right: wrong on the square's left column (20 pixels of the inner ring)
  # and on the right outer side (20 pixels of the band).
  shifted = np.roll(gt, 1, axis=1)
  assert metrics.boundary_accuracy(gt, shifted) == pytest.approx(116 / 156, abs=1e-15)


def test_gt_as_01_or_0255_gives_the_same_band():
  rng = np.random.default_rng(0)
  gt = rng.random((60, 70)) > 0.6
  for radius in (1, 2, 3):
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1,) * 2)
    g01 = cv2.morphologyEx(gt.astype(np.uint8), cv2.MORPH_GRADIENT, kernel) > 0
    g255 = cv2.morphologyEx(gt.astype(np.uint8) * 255, cv2.MORPH_GRADIENT, kernel) > 0
    assert np.array_equal(g01, g255)
    assert np.array_equal(metrics.boundary_band(gt, radius), g01)


def test_thin_line():
  gt = np.zeros((H, W), bool)
  gt[40, 30:70] = True  # 40 pixels, one pixel thick
  band = metrics.boundary_band(gt, 1)
  # Erosion removes the whole line; the cross dilation adds the rows above and below and one
  # pixel at each end: 3 * 40 + 2.
  assert band.sum() == 122
  assert metrics.boundary_accuracy(gt, np.zeros_like(gt)) == pytest.approx(82 / 122, abs=1e-15)
  assert metrics.boundary_accuracy(gt, gt) == 1.0
  s = metrics.per_image(gt.astype(np.uint8) * 255, np.zeros((H, W), np.uint8) + 200,
                        gt.astype(np.uint8) * 255)
  assert (s.new_intersection, s.new_union) == (40, 40)
  assert (s.old_intersection, s.old_union) == (40, H * W)


def test_empty_mask_and_empty_gt():
  gt = _square()
  s = metrics.per_image(gt, gt, np.zeros_like(gt))
  assert (s.new_intersection, s.new_union) == (0, 400)
  assert s.new_mba == pytest.approx(80 / 156, abs=1e-15)
  assert s.old_mba == 1.0
  # gt without a boundary: NaN per image (the published code divides 0 by 0) ...
  empty = np.zeros_like(gt)
  assert math.isnan(metrics.boundary_accuracy(empty, gt))
  assert math.isnan(metrics.boundary_accuracy(np.full_like(gt, 255), gt))
  s2 = metrics.per_image(empty, gt, empty)
  assert math.isnan(s2.new_mba) and math.isnan(s2.old_mba)
  # ... left out of the mBA mean but counted in IoU.
  acc = metrics.Accumulator()
  acc.add(s, "a")
  acc.add(s2, "b")
  r = acc.result()
  assert r["num_images"] == 2 and r["num_mba_images"] == 1
  assert acc.no_boundary == ["b"]
  assert r["mba"] == pytest.approx(80 / 156, abs=1e-15)
  assert r["old_mba"] == 1.0
  assert r["iou"] == 0.0  # 0 / (400 + 400)
  assert r["old_iou"] == 400 / (400 + 400)
  # Nothing with a boundary, nothing in any union: undefined scores are None.
  acc = metrics.Accumulator()
  acc.add(metrics.per_image(empty, empty, empty), "c")
  assert acc.result()["mba"] is None and acc.result()["iou"] is None


def test_small_input_rule():
  gt = _square()
  refined = _square(left=45)
  seg4 = np.zeros_like(gt)
  seg4[35, 45:49] = 255  # grey sum 1020 < 1024: the refined mask is replaced by the seg
  s = metrics.per_image(gt, seg4, refined)
  assert s.small_seg
  assert (s.new_intersection, s.new_union) == (s.old_intersection, s.old_union) == (4, 400)
  assert s.new_mba == s.old_mba
  seg5 = seg4.copy()
  seg5[35, 49] = 255  # 1275: no replacement
  s = metrics.per_image(gt, seg5, refined)
  assert not s.small_seg
  assert (s.new_intersection, s.new_union) == (300, 500)
  # The rule looks at grey values, not the binarised seg: 100 pixels of grey 20 (all background
  # after > 128) sum to 2000, so the refined mask stays.
  faint = np.zeros_like(gt)
  faint[:10, :10] = 20
  s = metrics.per_image(gt, faint, refined)
  assert not s.small_seg and (s.old_intersection, s.new_intersection) == (0, 300)
  # Binarisation is > 128: 128 is background, 129 foreground.
  s = metrics.per_image(np.full_like(gt, 129), np.full_like(gt, 128), np.full_like(gt, 129))
  assert (s.old_intersection, s.new_intersection) == (0, H * W)


def test_size_mismatch_raises():
  with pytest.raises(ValueError, match="differ"):
    metrics.per_image(_square(), _square(), np.zeros((10, 10), np.uint8))


def test_aggregated_iou_differs_from_mean_iou(tmp_path):
  # A: a large object, IoU 900/1000. B: a small one, missed entirely (IoU 0/10).
  gt_a = np.zeros((H, W), np.uint8)
  gt_a[:10, :100] = 255  # 1000 pixels
  mask_a = gt_a.copy()
  mask_a[9, :] = 0  # 900 pixels inside
  gt_b = np.zeros((60, 90), np.uint8)
  gt_b[20, 20:30] = 255  # 10 pixels
  mask_b = np.zeros_like(gt_b)
  _write_object(tmp_path, "a", gt_a, gt_a, {1.0: mask_a})
  _write_object(tmp_path, "b", gt_b, gt_b, {1.0: mask_b})
  r = metrics.evaluate_folder(str(tmp_path), [1.0])
  iou = r["scales"]["1.0"]["iou"]
  assert iou == 900 / 1010
  assert abs(iou - (0.9 + 0.0) / 2) > 0.4
  assert r["scales"]["1.0"]["old_iou"] == 1.0
  assert r["num_images"] == 2


def test_images_of_different_sizes(tmp_path):
  # Two sizes, so two sets of radii: 80x100 (radius 1) and 600x560 (r_max = 3.87).
  assert metrics.mba_radii(600, 560) == [1, 1, 2, 2, 3]
  small_gt = _square()
  big_gt = np.zeros((600, 560), np.uint8)
  cv2.circle(big_gt, (280, 300), 200, 255, -1)
  big_mask = np.zeros_like(big_gt)
  cv2.circle(big_mask, (284, 300), 197, 255, -1)
  _write_object(tmp_path, "small", small_gt, small_gt, {0.5: np.zeros_like(small_gt)})
  _write_object(tmp_path, "big", big_gt, big_mask, {0.5: big_mask})
  r = metrics.evaluate_folder(str(tmp_path), [0.5], log=lambda m: None)
  m = r["scales"]["0.5"]
  gt_b, mask_b = big_gt > 128, big_mask > 128
  big_mba = metrics.boundary_accuracy(gt_b, mask_b)
  assert m["mba"] == pytest.approx((80 / 156 + big_mba) / 2, abs=1e-12)
  assert m["old_mba"] == pytest.approx((1.0 + big_mba) / 2, abs=1e-12)
  i_b, u_b = int((gt_b & mask_b).sum()), int((gt_b | mask_b).sum())
  assert m["iou"] == i_b / (400 + u_b)
  assert m["old_iou"] == (400 + i_b) / (400 + u_b)


def test_missing_and_bad_files(tmp_path):
  gt = _square()
  for name in ("a", "b", "c"):
    _write_object(tmp_path, name, gt, gt, {0.5: gt, 1.0: gt})
  os.remove(tmp_path / "1.0_b_mask.png")  # b: left out of scale 1.0 only
  (tmp_path / "0.5_c_mask.png").write_bytes(b"not a png")  # c: left out of 0.5 only
  _write(tmp_path / "d_gt.png", gt)  # d: no seg at all
  _write(tmp_path / "e_gt.png", gt)
  _write(tmp_path / "e_seg.png", np.zeros((10, 10), np.uint8))  # e: seg of another size
  logged = []
  r = metrics.evaluate_folder(str(tmp_path), [0.5, 1.0], log=logged.append)
  assert r["scales"]["1.0"]["missing"] == ["b"]
  assert r["scales"]["0.5"]["missing"] == ["c"]
  assert r["scales"]["1.0"]["num_images"] == 2 and r["scales"]["0.5"]["num_images"] == 2
  assert r["num_images"] == 3
  assert [s.split(":")[0] for s in r["skipped"]] == ["d", "e"]
  assert "no such file" in r["skipped"][0] and "10x10" in r["skipped"][1]
  assert any("1.0_b_mask.png" in m and "no such file" in m for m in logged)
  assert any("0.5_c_mask.png" in m and "unreadable" in m for m in logged)
  table = metrics.format_table(r)
  assert "without a mask" in table and "left out" in table


def test_ground_truth_encodings_and_faint_refined_masks(tmp_path):
  """A 0/1 gt and a 16-bit seg count as the binary masks they are (the input rules), while a
  refined mask is read as the 8-bit grey it is: one of only 0s and 1s stays empty."""
  gt = _square()
  faint = (gt > 0).astype(np.uint8)  # values {0, 1}
  _write(tmp_path / "a_gt.png", faint)
  _write(tmp_path / "a_seg.png", gt.astype(np.uint16) * 257)
  _write(tmp_path / f"{metrics.scale_key(1.0)}_a_mask.png", faint)
  _write(tmp_path / f"{metrics.scale_key(0.5)}_a_mask.png", gt)
  res = metrics.evaluate_folder(str(tmp_path), (0.5, 1.0))
  assert res["skipped"] == [] and res["num_images"] == 1
  assert res["scales"]["0.5"]["old_iou"] == 1.0 and res["scales"]["0.5"]["iou"] == 1.0
  assert res["scales"]["1.0"]["iou"] == 0.0


def test_output_layout():
  names = [os.path.basename(p) for p in metrics.output_files("out", "a", (0.5, 1.0))]
  assert names == ["0.5_a_mask.png", "1.0_a_mask.png", "a_im.png", "a_seg.png", "a_gt.png"]
  assert all(metrics.is_output_file(n) for n in names)
  assert not any(metrics.is_output_file(n) for n in ("compare_a.png", "metrics.json",
                                                     "manifest.json", ".tmp-1-x_gt.png"))


def test_format_table():
  result = {"scales": {"0.125": {"iou": 0.9, "mba": 0.7, "old_iou": 0.8, "old_mba": 0.75,
                                 "num_images": 3},
                       "1.0": {"iou": None, "mba": None, "old_iou": None, "old_mba": None,
                               "num_images": 0}},
            "num_images": 3}
  lines = metrics.format_table(result).splitlines()
  assert lines[0].split() == ["scale", "old", "IoU", "new", "IoU", "delta", "old", "mBA", "new",
                              "mBA", "delta", "images"]
  assert lines[1].split() == ["0.125", "0.8000", "0.9000", "+0.1000", "0.7500", "0.7000",
                              "-0.0500", "3"]
  assert lines[2].split()[:3] == ["1.0", "n/a", "n/a"]


# ---------------------------------------------------------------------------------------------
# An independent restatement of docs/metrics.md, on random masks.


def _ref_gradient(gt01, radius):
  """Dilation minus erosion with the elliptical element, by shifting; outside pixels ignored."""
  k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
  h, w = gt01.shape
  dil = np.zeros((h, w), np.int64)
  ero = np.ones((h, w), np.int64)
  for dy in range(-radius, radius + 1):
    for dx in range(-radius, radius + 1):
      if not k[dy + radius, dx + radius]:
        continue
      shifted_max = np.zeros((h, w), np.int64)  # outside: never wins the max
      shifted_min = np.ones((h, w), np.int64)  # outside: never wins the min
      ys, yd = slice(max(dy, 0), h + min(dy, 0)), slice(max(-dy, 0), h + min(-dy, 0))
      xs, xd = slice(max(dx, 0), w + min(dx, 0)), slice(max(-dx, 0), w + min(-dx, 0))
      shifted_max[yd, xd] = gt01[ys, xs]
      shifted_min[yd, xd] = gt01[ys, xs]
      dil = np.maximum(dil, shifted_max)
      ero = np.minimum(ero, shifted_min)
  return dil - ero


def _reference(objects):
  """objects: list of (gt, seg, mask) grey arrays. Returns (iou, mba, old_iou, old_mba)."""
  ti = tu = oi = ou = 0
  mba_new, mba_old = [], []
  for gt, seg, mask in objects:
    if float(seg.astype(np.float64).sum()) < 32 * 32:
      mask = seg
    g = (gt > 128).astype(np.int64)
    s = (seg > 128).astype(np.int64)
    m = (mask > 128).astype(np.int64)
    ti += int((g * m).sum())
    tu += int(np.maximum(g, m).sum())
    oi += int((g * s).sum())
    ou += int(np.maximum(g, s).sum())
    h, w = g.shape
    r_max = (w + h) / 300
    acc_new, acc_old = [], []
    for i in range(5):
      r = 1 + int((r_max - 1) / 5 * i)
      band = _ref_gradient(g, r) > 0
      n = band.sum()
      acc_new.append(((g * m + (1 - g) * (1 - m)) * band).sum() / n)
      acc_old.append(((g * s + (1 - g) * (1 - s)) * band).sum() / n)
    mba_new.append(sum(acc_new) / 5)
    mba_old.append(sum(acc_old) / 5)
  return ti / tu, sum(mba_new) / len(mba_new), oi / ou, sum(mba_old) / len(mba_old)


def _blobby(rng, h, w):
  """A soft random grey mask: blurred random blobs, values across 0..255 (not just 0/255)."""
  noise = rng.random((max(2, h // 8), max(2, w // 8))).astype(np.float32)
  up = cv2.resize(noise, (w, h), interpolation=cv2.INTER_CUBIC)
  return np.clip((up - 0.5) * 600 + 128, 0, 255).astype(np.uint8)


def test_matches_independent_restatement(tmp_path):
  rng = np.random.default_rng(1)
  sizes = [(80, 100), (130, 170), (333, 290), (400, 520), (61, 47)]
  per_scale = {0.25: [], 1.0: []}
  for k, (h, w) in enumerate(sizes):
    gt = _blobby(rng, h, w)
    seg = _blobby(rng, h, w)
    if k == 4:
      seg = np.zeros((h, w), np.uint8)
      seg[5, 5:8] = 255  # small-input rule
    masks = {}
    for s in per_scale:
      # A perturbed gt: mostly right, wrong near the boundary and in random spots.
      m = np.where(rng.random((h, w)) < 0.08, 255 - gt, gt)
      m = cv2.GaussianBlur(m, (0, 0), 1.5) if s == 1.0 else m
      masks[s] = m
      per_scale[s].append((gt, seg, m))
    _write_object(tmp_path, f"obj{k}", gt, seg, masks)
  r = metrics.evaluate_folder(str(tmp_path), list(per_scale))
  assert r["num_images"] == len(sizes)
  assert r["small_seg"] == ["obj4"]
  for s, objects in per_scale.items():
    iou, mba, old_iou, old_mba = _reference(objects)
    got = r["scales"][metrics.scale_key(s)]
    assert got["iou"] == pytest.approx(iou, abs=1e-9)
    assert got["mba"] == pytest.approx(mba, abs=1e-9)
    assert got["old_iou"] == pytest.approx(old_iou, abs=1e-9)
    assert got["old_mba"] == pytest.approx(old_mba, abs=1e-9)
    assert 0.3 < got["mba"] < 0.999  # a non-trivial case


def test_reference_gradient_matches_opencv():
  """The reference's shifting gradient is OpenCV's morphologyEx (border included)."""
  rng = np.random.default_rng(2)
  g = (rng.random((50, 64)) > 0.7).astype(np.int64)
  for r in (1, 2, 4):
    assert np.array_equal(_ref_gradient(g, r) > 0, metrics.boundary_band(g.astype(bool), r))

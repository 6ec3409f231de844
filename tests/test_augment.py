"""Tests of the per-sample training augmentation (docs/model.md inputs, docs/data.md)."""

import cv2
import numpy as np
import pytest

from crm_jax.constants import IMAGE_MEAN, IMAGE_STD
from crm_jax.data import augment


def _coord_pair(h, w):
  """An image whose pixels name their coordinates (1-based, so that padding's zeros differ) and
  a gt that repeats them, to check that both get the same crop and flip."""
  ys, xs = np.indices((h, w))
  image = np.stack([ys % 255 + 1, xs % 255 + 1, (ys + xs) % 255 + 1], -1).astype(np.uint8)
  gt = image[..., 0].copy()
  return image, gt


def _random_image(h, w, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_random_crop_larger_image():
  image, gt = _coord_pair(300, 400)
  for seed in range(5):
    crop_im, crop_gt = augment.random_crop(image, gt, np.random.default_rng(seed), size=224)
    assert crop_im.shape == (224, 224, 3) and crop_gt.shape == (224, 224)
    assert crop_im.dtype == np.uint8 and crop_gt.dtype == np.uint8
    y0, x0 = int(crop_im[0, 0, 0]) - 1, int(crop_im[0, 0, 1]) - 1
    np.testing.assert_array_equal(crop_im, image[y0:y0 + 224, x0:x0 + 224])
    np.testing.assert_array_equal(crop_gt, gt[y0:y0 + 224, x0:x0 + 224])


def test_random_crop_pads_smaller_image():
  image, gt = _coord_pair(100, 150)
  offsets = set()
  for seed in range(10):
    crop_im, crop_gt = augment.random_crop(image, gt, np.random.default_rng(seed), size=224)
    assert crop_im.shape == (224, 224, 3) and crop_gt.shape == (224, 224)
    ys, xs = np.nonzero(crop_gt)
    y0, x0 = ys.min(), xs.min()
    # The whole image, at a random offset, zeros elsewhere, same place for image and gt.
    np.testing.assert_array_equal(crop_im[y0:y0 + 100, x0:x0 + 150], image)
    np.testing.assert_array_equal(crop_gt[y0:y0 + 100, x0:x0 + 150], gt)
    assert np.count_nonzero(crop_gt) == gt.size
    assert crop_im.sum() == image.astype(np.int64).sum()
    offsets.add((y0, x0))
  assert len(offsets) > 1


def test_random_crop_mixed_and_channel_gt():
  image, gt = _coord_pair(50, 500)
  crop_im, crop_gt = augment.random_crop(image, gt[..., None], np.random.default_rng(0), size=64)
  assert crop_im.shape == (64, 64, 3) and crop_gt.shape == (64, 64, 1)
  rows = np.nonzero(crop_gt[:, 0, 0])[0]
  assert rows.size == 50  # every row kept, padded to 64
  np.testing.assert_array_equal(crop_im[rows, :, 0], crop_gt[rows, :, 0])
  with pytest.raises(ValueError):
    augment.random_crop(image, gt[:10], np.random.default_rng(0))


def test_random_hflip():
  image, gt = _coord_pair(20, 30)
  im, g = augment.random_hflip(image, gt, np.random.default_rng(0), p=1.0)
  np.testing.assert_array_equal(im, image[:, ::-1])
  np.testing.assert_array_equal(g, gt[:, ::-1])
  im, g = augment.random_hflip(image, gt, np.random.default_rng(0), p=0.0)
  np.testing.assert_array_equal(im, image)
  np.testing.assert_array_equal(g, gt)
  flips = [augment.random_hflip(image, gt, np.random.default_rng(s))[0][0, 0, 1] != image[0, 0, 1]
           for s in range(200)]
  assert 0.35 < np.mean(flips) < 0.65


def test_adjustments():
  image = _random_image(16, 16)
  np.testing.assert_array_equal(augment.adjust_brightness(image, 1.0), image)
  np.testing.assert_array_equal(augment.adjust_contrast(image, 1.0), image)
  np.testing.assert_array_equal(augment.adjust_saturation(image, 1.0), image)
  np.testing.assert_array_equal(augment.adjust_brightness(image, 0.0), 0)
  dark = augment.adjust_contrast(image, 0.0)  # the greyscale mean everywhere
  assert np.unique(dark).size == 1
  assert dark[0, 0, 0] == np.rint(augment.rgb_to_gray(image).mean())
  grey = augment.adjust_saturation(image, 0.0)
  np.testing.assert_array_equal(grey[..., 0], grey[..., 2])
  np.testing.assert_array_equal(grey[..., 0], np.rint(augment.rgb_to_gray(image)))
  # Clipping to the uint8 range.
  bright = augment.adjust_brightness(np.full((2, 2, 3), 250, np.uint8), 1.2)
  assert bright.dtype == np.uint8 and (bright == 255).all()


def test_color_jitter_range_and_determinism():
  image = _random_image(64, 48)
  image[:8] = 255
  image[8:16] = 0
  a = augment.color_jitter(image, np.random.default_rng(1))
  b = augment.color_jitter(image, np.random.default_rng(1))
  assert a.dtype == np.uint8 and a.shape == image.shape
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, image)
  # Brightness in [0.8, 1.2] (contrast and saturation +-5 %) bounds the change of the mean.
  for seed in range(20):
    out = augment.color_jitter(image, np.random.default_rng(seed)).astype(np.float64)
    ratio = out.mean() / image.mean()
    assert 0.7 < ratio < 1.3
  np.testing.assert_array_equal(
      augment.color_jitter(image, np.random.default_rng(0), 0.0, 0.0, 0.0), image)


def test_color_jitter_brightness_only_matches_a_factor():
  image = np.full((4, 4, 3), 100, np.uint8)
  out = augment.color_jitter(image, np.random.default_rng(7), brightness=0.2, contrast=0.0,
                             saturation=0.0)
  factor = np.random.default_rng(7).uniform(0.8, 1.2)
  np.testing.assert_array_equal(out, np.rint(100 * factor))


def test_random_grayscale():
  image = _random_image(8, 8)
  grey = augment.random_grayscale(image, np.random.default_rng(0), p=1.0)
  assert grey.dtype == np.uint8 and grey.shape == image.shape
  expected = np.rint(image.astype(np.float64) @ np.array([0.299, 0.587, 0.114]))
  np.testing.assert_allclose(grey[..., 0], expected, atol=1)
  np.testing.assert_array_equal(grey[..., 0], grey[..., 1])
  np.testing.assert_array_equal(grey[..., 1], grey[..., 2])
  np.testing.assert_array_equal(augment.random_grayscale(image, np.random.default_rng(0), p=0.0),
                                image)
  hits = [augment.random_grayscale(image, np.random.default_rng(s)) is not image
          for s in range(500)]
  assert abs(np.mean(hits) - augment.GRAYSCALE_PROB) < 0.05


def test_normalize():
  image = np.array([[[0, 0, 0], [255, 255, 255]]], np.uint8)
  out = augment.normalize_image(image)
  assert out.dtype == np.float32 and out.shape == image.shape
  mean, std = np.array(IMAGE_MEAN), np.array(IMAGE_STD)
  np.testing.assert_allclose(out[0, 0], -mean / std, rtol=1e-6)
  np.testing.assert_allclose(out[0, 1], (1 - mean) / std, rtol=1e-6)
  seg = augment.normalize_seg(np.array([[0, 255, 51]], np.uint8))
  assert seg.dtype == np.float32
  np.testing.assert_allclose(seg, [[-1.0, 1.0, -0.6]], atol=1e-6)


def _object_pair(h, w, seed=0):
  image = _random_image(h, w, seed)
  gt = np.zeros((h, w), np.uint8)
  cv2.circle(gt, (w // 2, h // 2), min(h, w) // 3, 255, -1)
  gt = cv2.GaussianBlur(gt, (5, 5), 0)  # soft edges, kept soft in the example's gt
  return image, gt


@pytest.mark.parametrize("shape", [(300, 260), (100, 150), (224, 224), (1, 1)])
def test_make_training_example(shape):
  image, gt = _object_pair(*shape)
  ex = augment.make_training_example(image, gt, np.random.default_rng(0), crop_size=224)
  assert set(ex) == {"image", "seg", "gt"}
  assert ex["image"].shape == (224, 224, 3) and ex["image"].dtype == np.float32
  assert ex["seg"].shape == (224, 224, 1) and ex["seg"].dtype == np.float32
  assert ex["gt"].shape == (224, 224, 1) and ex["gt"].dtype == np.float32
  assert np.isin(ex["seg"], (-1.0, 1.0)).all()
  assert 0.0 <= ex["gt"].min() and ex["gt"].max() <= 1.0
  lo = (0 - np.array(IMAGE_MEAN)) / np.array(IMAGE_STD)
  hi = (1 - np.array(IMAGE_MEAN)) / np.array(IMAGE_STD)
  assert (ex["image"] >= lo - 1e-5).all() and (ex["image"] <= hi + 1e-5).all()


def test_make_training_example_consistency():
  image, gt = _object_pair(300, 400)
  ex = augment.make_training_example(image, gt, np.random.default_rng(3))
  soft = ex["gt"][..., 0]
  # Soft gt values survive (the gt is divided by 255, not binarised).
  assert ((soft > 0.05) & (soft < 0.95)).any()
  # The seg is synthesised from this very crop of the gt.
  seg_fg = ex["seg"][..., 0] > 0
  gt_fg = soft > 0.5
  inter, union = (seg_fg & gt_fg).sum(), (seg_fg | gt_fg).sum()
  assert inter / union > 0.5


def test_make_training_example_determinism_and_grey_input():
  image, gt = _object_pair(240, 260)
  a = augment.make_training_example(image, gt, np.random.default_rng(11))
  b = augment.make_training_example(image, gt, np.random.default_rng(11))
  c = augment.make_training_example(image, gt, np.random.default_rng(12))
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  assert any(not np.array_equal(a[k], c[k]) for k in a)
  grey = augment.make_training_example(image[..., 0], gt[..., None], np.random.default_rng(0),
                                       crop_size=64)
  assert grey["image"].shape == (64, 64, 3) and grey["gt"].shape == (64, 64, 1)
  # A floating gt is taken to be in [0, 1] already.
  f = augment.make_training_example(image, gt.astype(np.float32) / 255, np.random.default_rng(11))
  for key in a:
    np.testing.assert_allclose(f[key], a[key], atol=1e-6)
  with pytest.raises(ValueError):
    augment.make_training_example(image, gt.astype(np.int32), np.random.default_rng(0))


def test_lowres_fraction_option():
  """lowres_fraction=0 is the published synthesis (same draws); 1 always gives the
  low-resolution segmenter's mask, cropped and flipped with the gt."""
  from crm_jax.data.synthetic import make_synthetic_pair
  image, gt = make_synthetic_pair(256, 256, np.random.default_rng(5))
  plain = augment.make_training_example(image, gt, np.random.default_rng(1), 96)
  zero = augment.make_training_example(image, gt, np.random.default_rng(1), 96,
                                     augment.Options(lowres_fraction=0.0))
  for k in plain:
    np.testing.assert_array_equal(plain[k], zero[k])
  lowres = augment.make_training_example(image, gt, np.random.default_rng(1), 96,
                                       augment.Options(lowres_fraction=1.0))
  seg, g = lowres["seg"][..., 0], lowres["gt"][..., 0]
  assert set(np.unique(seg)) <= {-1.0, 1.0}
  assert not np.array_equal(seg, plain["seg"][..., 0])
  inter = ((seg > 0) & (g > 0.5)).sum()
  union = ((seg > 0) | (g > 0.5)).sum()
  if union:  # the crop may hold no object
    assert inter / union > 0.5  # the mask is aligned with the crop of gt, not another place


def test_soft_seg_fraction_option():
  """soft_seg_fraction=0 draws nothing (the published stream); 1 blurs the very seg that the
  same draws would give into a continuous mask with the same 0.5 level set, near enough."""
  from crm_jax.data.synthetic import make_synthetic_pair
  image, gt = make_synthetic_pair(256, 256, np.random.default_rng(5))
  plain = augment.make_training_example(image, gt, np.random.default_rng(3), 96)
  zero = augment.make_training_example(image, gt, np.random.default_rng(3), 96,
                                     augment.Options(0.0, 0.0))
  for k in plain:
    np.testing.assert_array_equal(plain[k], zero[k])
  soft = augment.make_training_example(image, gt, np.random.default_rng(3), 96,
                                     augment.Options(soft_seg_fraction=1.0))
  np.testing.assert_array_equal(soft["image"], plain["image"])
  np.testing.assert_array_equal(soft["gt"], plain["gt"])
  binary, blurred = plain["seg"][..., 0], soft["seg"][..., 0]
  assert set(np.unique(binary)) <= {-1.0, 1.0}
  assert blurred.min() >= -1.0 and blurred.max() <= 1.0
  edge = (binary[1:, :] != binary[:-1, :]).any()
  if edge:  # a crop that crosses a boundary gets values strictly between -1 and 1
    assert ((blurred > -0.99) & (blurred < 0.99)).any()
  # Far from any boundary (more than 4 sigma), the blurred seg keeps the binary value.
  dist = cv2.distanceTransform((binary > 0).astype(np.uint8), cv2.DIST_L2, 5)
  dist_out = cv2.distanceTransform((binary <= 0).astype(np.uint8), cv2.DIST_L2, 5)
  far = np.maximum(dist, dist_out) > 4 * augment.SOFT_SEG_SIGMA_RANGE[1] + 1
  np.testing.assert_allclose(blurred[far], binary[far], atol=1e-3)


def test_fine_seg_fraction_option():
  """fine_seg_fraction=0 draws nothing (the published stream); 1 gives a seg that is the crop's
  own gt away from the boundary (a later pass's seg), soft at it, with image and gt unchanged."""
  from crm_jax.data.synthetic import make_synthetic_pair
  image, gt = make_synthetic_pair(256, 256, np.random.default_rng(5))
  for seed in range(4):
    plain = augment.make_training_example(image, gt, np.random.default_rng(seed), 96)
    zero = augment.make_training_example(image, gt, np.random.default_rng(seed), 96,
                                         augment.Options(fine_seg_fraction=0.0))
    for k in plain:
      np.testing.assert_array_equal(plain[k], zero[k])
    fine = augment.make_training_example(image, gt, np.random.default_rng(seed), 96,
                                         augment.Options(fine_seg_fraction=1.0))
    np.testing.assert_array_equal(fine["image"], plain["image"])
    np.testing.assert_array_equal(fine["gt"], plain["gt"])
    seg, g = fine["seg"][..., 0], fine["gt"][..., 0] > 0.5
    assert seg.min() >= -1.0 and seg.max() <= 1.0
    # Farther from the gt's boundary than the largest factor and blur reach, seg is the gt.
    inside = cv2.distanceTransform(g.astype(np.uint8), cv2.DIST_L2, 5)
    outside = cv2.distanceTransform((~g).astype(np.uint8), cv2.DIST_L2, 5)
    reach = 2 * max(augment.FINE_SEG_FACTORS) + 4 * augment.SOFT_SEG_SIGMA_RANGE[1]
    far = np.where(g, inside, outside) > reach
    np.testing.assert_array_equal(seg[far] > 0, g[far])
    # ... while the published seg of the same draws is wrong somewhere (it perturbs the gt).
    assert ((plain["seg"][..., 0] > 0) != g).any()
  with pytest.raises(ValueError, match="fine_seg_fraction"):
    augment.Options(fine_seg_fraction=2.0)


def test_random_rescale_draws_one_factor_for_every_array():
  """Every array is resized to the same size, log-uniformly in the range (both ends reached
  over many draws), dtypes and ranks kept; a binary mask comes back soft only at its edge."""
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
  gt = np.zeros((60, 80), np.uint8)
  gt[10:50, 20:60] = 255
  factors = []
  for _ in range(400):
    im2, gt2, seg2 = augment.random_rescale(rng, (0.25, 2.0), image, gt, gt[..., None])
    assert im2.shape[:2] == gt2.shape == seg2.shape[:2] and seg2.ndim == 3 and im2.ndim == 3
    assert im2.dtype == gt2.dtype == np.uint8
    factors.append(gt2.shape[1] / 80)
  factors = np.array(factors)
  assert factors.min() >= 0.25 - 1 / 80 and factors.max() <= 2.0 + 1 / 80
  assert factors.min() < 0.3 and factors.max() > 1.8
  # log-uniform: about as many draws below the geometric mean (0.707) as above
  assert 0.4 < (factors < 2 ** -0.5).mean() < 0.6
  small, = augment.random_rescale(np.random.default_rng(1), (0.5, 0.5), gt)
  assert small.shape == (30, 40) and small[15, 20] == 255 and small[0, 0] == 0


def test_rescale_option():
  """rescale_range None draws nothing (the published stream); a range below crop_size / size
  leaves the whole pair inside the crop with zero padding around it, and the lowres and soft
  options combine with it (the lowres seg made at full size, resized with the pair and kept
  binary)."""
  from crm_jax.data.synthetic import make_synthetic_pair
  image, gt = make_synthetic_pair(256, 256, np.random.default_rng(5))
  plain = augment.make_training_example(image, gt, np.random.default_rng(3), 96)
  none = augment.make_training_example(image, gt, np.random.default_rng(3), 96,
                                       augment.Options(rescale_range=None))
  for k in plain:
    np.testing.assert_array_equal(plain[k], none[k])
  small = augment.make_training_example(image, gt, np.random.default_rng(3), 96,
                                        augment.Options(rescale_range=(0.25, 0.25)))
  g = small["gt"][..., 0]
  rows, cols = np.nonzero((small["image"] != small["image"][0, 0]).any(-1))
  assert rows.max() - rows.min() + 1 == 64 and cols.max() - cols.min() + 1 == 64
  assert g.sum() > 0 and np.isclose(g.sum() * 16, (gt / 255.0).sum(), rtol=0.02)
  assert set(np.unique(g)) <= {0.0, 1.0}  # a binary gt stays binary after the resize
  soft_gt = cv2.GaussianBlur(gt.astype(np.float32) / 255, (0, 0), 3.0)
  soft = augment.make_training_example(image, soft_gt, np.random.default_rng(3), 96,
                                       augment.Options(rescale_range=(0.5, 0.5)))
  assert ((soft["gt"] > 0.05) & (soft["gt"] < 0.95)).any()  # a soft gt stays soft
  lowres = augment.make_training_example(
      image, gt, np.random.default_rng(4), 96,
      augment.Options(lowres_fraction=1.0, rescale_range=(0.25, 0.25)))
  seg = lowres["seg"][..., 0]
  assert set(np.unique(seg)) <= {-1.0, 1.0}
  inter = ((seg > 0) & (lowres["gt"][..., 0] > 0.5)).sum()
  union = ((seg > 0) | (lowres["gt"][..., 0] > 0.5)).sum()
  assert inter / union > 0.5
  with pytest.raises(ValueError, match="rescale_range"):
    augment.Options(rescale_range=(0.0, 1.0))
  with pytest.raises(ValueError, match="rescale_range"):
    augment.Options(rescale_range=(2.0, 1.0))



def test_loop_resize_is_the_loops_resize():
  """loop_resize equals PyTorch's bilinear align_corners=True interpolation (the resize of the
  multi-scale loop) on odd and even sizes, down and up."""
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(0).normal(size=(2, 96, 70, 4)).astype(np.float32)
  for size in [(12, 9), (24, 18), (48, 35), (7, 31), (96, 70), (130, 100)]:
    want = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=size,
                                           mode="bilinear", align_corners=True)
    got = augment.loop_resize(x, size)
    assert got.shape == (2,) + size + (4,) and got.dtype == np.float32
    np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), rtol=0, atol=2e-6)


def test_pass_scales_option():
  """pass_inputs shrinks image and seg to round(S * s) and keeps gt; the option is validated
  with the scales rule of refinement and is off by default."""
  rng = np.random.default_rng(1)
  batch = {"image": rng.normal(size=(3, 96, 96, 3)).astype(np.float32),
           "seg": rng.uniform(-1, 1, (3, 96, 96, 1)).astype(np.float32),
           "gt": rng.uniform(0, 1, (3, 96, 96, 1)).astype(np.float32)}
  for s, side in [(0.125, 12), (0.25, 24), (0.3, 29), (1.0, 96)]:
    out = augment.pass_inputs(batch, s)
    assert out["image"].shape == (3, side, side, 3) and out["seg"].shape == (3, side, side, 1)
    assert out["gt"] is batch["gt"]
    np.testing.assert_array_equal(out["seg"], augment.loop_resize(batch["seg"], (side, side)))
  assert augment.Options().pass_scales is None
  assert augment.Options(pass_scales=[0.5, 1]).pass_scales == (0.5, 1.0)
  for bad in [(), (0.5, 0.25), (0.0, 1.0), (0.5, 1.5), (float("nan"),)]:
    with pytest.raises(ValueError, match="pass_scales"):
      augment.Options(pass_scales=bad)
  draws = [augment.pass_scale(np.random.default_rng(k), (0.125, 0.5, 1.0)) for k in range(300)]
  assert set(draws) == {0.125, 0.5, 1.0}

"""Per-sample training augmentation (docs/data.md), in NumPy/OpenCV, NHWC.

Per sample, in this order:
0. optionally (``Options.rescale_range``, off in the published recipe), image and gt resized
   together by a random factor;
1. the same random ``crop_size`` crop (zero padding when the image is smaller) and the same
   horizontal flip (p 0.5) for image and gt;
2. image only: colour jitter (brightness 0.2, contrast 0.05, saturation 0.05, hue 0) and random
   greyscale (p 0.1);
3. the coarse seg, synthesised from the cropped gt (``synthesis.synthesize_coarse_mask``);
4. normalisation: image ``(x / 255 - mean) / std``, seg ``(x / 255 - 0.5) / 0.5``, gt ``x / 255``
   (kept soft).

All randomness comes from a ``np.random.Generator`` argument. Upstream applied torchvision
transforms to PIL images; the semantics are reproduced, the random streams are not.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Optional, Tuple

import cv2
import numpy as np

from crm_jax.geometry import align_corners_table, scaled_size
from crm_jax.io import InputError
from crm_jax.preprocess import normalize_image, normalize_seg  # re-exported
from crm_jax.data import synthesis
from crm_jax.scales import check_scales

CROP_SIZE = 224
HFLIP_PROB = 0.5
JITTER_BRIGHTNESS = 0.2
JITTER_CONTRAST = 0.05
JITTER_SATURATION = 0.05  # hue jitter is 0 upstream, so it is not implemented.
GRAYSCALE_PROB = 0.1
# Downsampling factors of the optional low-resolution-segmenter coarse masks (lowres_fraction).
LOWRES_TRAIN_FACTORS = (8, 16)
# Gaussian sigma range, in pixels, of the optional soft coarse masks (soft_seg_fraction).
SOFT_SEG_SIGMA_RANGE = (0.5, 4.0)
# Downsampling factors of the optional later-pass coarse masks (fine_seg_fraction); they are
# blurred with a sigma in SOFT_SEG_SIGMA_RANGE.
FINE_SEG_FACTORS = (2, 3, 4)
LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601, as PIL's convert("L").


@dataclasses.dataclass(frozen=True)
class Options:
  """What the training examples add to the published recipe; the defaults are the recipe itself
  (each option off draws nothing from the example's random stream).

  Attributes:
    lowres_fraction: share of examples whose coarse seg is ``synthesis.lowres_segmenter_mask`` of
      the whole pair's gt (factor drawn from ``LOWRES_TRAIN_FACTORS``, with its random error
      field), made before the rescale and the crop and resized and cropped with the pair: the
      errors of a low-resolution segmenter rather than the training perturbation.
    soft_seg_fraction: share of examples whose coarse seg is blurred (Gaussian, sigma uniform in
      ``SOFT_SEG_SIGMA_RANGE`` pixels) into a continuous mask, like the ``(prob - 0.5) * 2`` seg
      that every scale after the first receives in the multi-scale loop (upstream trains on
      binary segs only).
    rescale_range: ``(low, high)`` or None. Every pair is first resized by a factor drawn
      log-uniformly in [low, high] (``random_rescale``), so the network sees objects and
      boundaries at the pixel sizes that the multi-scale loop shows it on small and large images
      (a factor below ``crop_size / size`` leaves zero padding around the whole pair). A
      binary gt (and the lowres seg) is thresholded at half its range after the resize, so it
      stays binary with sharp boundaries, as BIG's ground truths are at every size; a soft gt
      stays soft.
    fine_seg_fraction: share of examples whose coarse seg is the crop's own gt through a
      low-resolution segmenter of a small factor (``FINE_SEG_FACTORS``) and blurred (sigma in
      ``SOFT_SEG_SIGMA_RANGE``): right away from the boundary, soft and slightly off at it, like
      the seg that the later passes of the multi-scale loop receive from the pass before
      (instead of the published perturbation, whose blobs and holes lie anywhere; upstream
      trains on those only).
    pass_scales: increasing scales in (0, 1] or None. Each step draws one of them, ``s``, for
      its whole batch (``pass_scale``), and the batch's image and seg are resized to
      ``round(S * s)`` as the multi-scale loop resizes its inputs (``loop_resize``), while the gt
      and the queries stay at S: the geometry of the loop's pass at scale s, whose encoder
      reads a ``1/s`` times smaller input than the grid it is queried on (upstream trains on
      ``s = 1`` only, and the loop's first pass on a small image reads a few features).
  """
  lowres_fraction: float = 0.0
  soft_seg_fraction: float = 0.0
  rescale_range: Optional[Tuple[float, float]] = None
  pass_scales: Optional[Tuple[float, ...]] = None
  fine_seg_fraction: float = 0.0

  def __post_init__(self):
    for name in ("lowres_fraction", "soft_seg_fraction", "fine_seg_fraction"):
      value = getattr(self, name)
      if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    if self.rescale_range is not None:
      r = tuple(float(x) for x in self.rescale_range)
      if len(r) != 2 or not (math.isfinite(r[0]) and math.isfinite(r[1]) and 0 < r[0] <= r[1]):
        raise ValueError(f"rescale_range must be (low, high) with 0 < low <= high, got "
                         f"{self.rescale_range!r}")
      object.__setattr__(self, "rescale_range", r)
    if self.pass_scales is not None:
      try:
        scales = check_scales(self.pass_scales)
      except InputError as e:
        raise ValueError(f"pass_scales: {e}") from None
      object.__setattr__(self, "pass_scales", scales)

  @classmethod
  def from_config(cls, config: Any) -> "Options":
    """From a training config's ``lowres_mask_fraction``, ``soft_seg_fraction``,
    ``rescale_range``, ``pass_scales`` and ``fine_seg_fraction`` (each optional)."""
    get = lambda name, default: config[name] if name in config else default  # noqa: E731
    r, p = get("rescale_range", None), get("pass_scales", None)
    return cls(float(get("lowres_mask_fraction", 0.0)), float(get("soft_seg_fraction", 0.0)),
               None if r is None else tuple(r), None if p is None else tuple(p),
               float(get("fine_seg_fraction", 0.0) or 0.0))



def _to_uint8(x: np.ndarray) -> np.ndarray:
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _as_rgb(image: np.ndarray) -> np.ndarray:
  """[H, W], [H, W, 1] or [H, W, 3] -> [H, W, 3] (grey images are replicated, as PIL's RGB)."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(f"expected an [H, W, 3] image, got shape {image.shape}")
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  return image


def _crop_or_pad_1d(n: int, size: int, rng: np.random.Generator) -> Tuple[slice, slice]:
  """Source and destination slices along one axis.

  ``n >= size``: a crop starting uniformly in [0, n - size]. ``n < size``: the whole extent,
  placed uniformly in [0, size - n] of a zero canvas; this is the distribution of torchvision's
  ``RandomCrop(pad_if_needed=True)``, which pads ``size - n`` on both sides and then crops.
  """
  offset = int(rng.integers(abs(n - size) + 1))
  if n >= size:
    return slice(offset, offset + size), slice(0, size)
  return slice(0, n), slice(offset, offset + n)


def random_rescale(rng: np.random.Generator, scale_range: Tuple[float, float],
                   *arrays: np.ndarray) -> Tuple[np.ndarray, ...]:
  """``arrays`` ([H, W] or [H, W, C], all of one size) resized by one factor drawn
  log-uniformly in ``scale_range`` (the new side is ``max(1, round(side * factor))``): area
  interpolation down, bilinear up. Dtypes and ranks are kept (a soft gt stays soft).
  """
  low, high = scale_range
  factor = math.exp(rng.uniform(math.log(low), math.log(high)))
  h, w = arrays[0].shape[:2]
  size = (max(1, round(w * factor)), max(1, round(h * factor)))
  interpolation = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
  out = []
  for a in arrays:
    resized = cv2.resize(a, size, interpolation=interpolation)
    out.append(resized.reshape(resized.shape[:2] + a.shape[2:]))
  return tuple(out)


def pass_scale(rng: np.random.Generator, scales: Tuple[float, ...]) -> float:
  """One of ``scales``, uniformly (``Options.pass_scales``)."""
  return float(scales[int(rng.integers(len(scales)))])


def loop_resize(x: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
  """``x`` float32 ``[B, H, W, C]`` resized to ``[B, h, w, C]`` as the multi-scale loop resizes
  its inputs (bilinear, ``align_corners=True``, the tables of ``geometry.align_corners_table``;
  ``crm_jax.ops.resize_bilinear_align_corners`` is the same resize in JAX)."""
  x = np.asarray(x, np.float32)
  (in_h, in_w), (out_h, out_w) = x.shape[1:3], size
  if (in_h, in_w) == (out_h, out_w):
    return x
  i0, i1, lam = align_corners_table(in_h, out_h)
  lam = lam[None, :, None, None]
  x = (1 - lam) * x[:, i0] + lam * x[:, i1]
  i0, i1, lam = align_corners_table(in_w, out_w)
  lam = lam[None, None, :, None]
  return ((1 - lam) * x[:, :, i0] + lam * x[:, :, i1]).astype(np.float32)


def pass_inputs(batch: Dict[str, np.ndarray], scale: float) -> Dict[str, np.ndarray]:
  """A batch (``image``, ``seg``, ``gt`` at S x S) with image and seg resized to the scale
  ``scale`` of S (``loop_resize``); gt unchanged (``Options.pass_scales``)."""
  s = batch["gt"].shape[1]
  size = scaled_size((s, s), scale)
  return dict(batch, image=loop_resize(batch["image"], size), seg=loop_resize(batch["seg"], size))


def _is_binary(mask: np.ndarray) -> bool:
  """Whether a uint8 (0/255) or floating (0/1) mask holds only its two extreme values."""
  top = 255 if mask.dtype == np.uint8 else 1.0
  return not np.any((mask != 0) & (mask != top))


def random_crop(image: np.ndarray, gt: np.ndarray, rng: np.random.Generator,
                size: int = CROP_SIZE) -> Tuple[np.ndarray, np.ndarray]:
  """The same random ``size`` x ``size`` crop of image [H, W, C] and gt [H, W] (or [H, W, 1]).

  Where the image is smaller than ``size`` it is zero-padded (both image and gt), at a random
  offset. Dtypes are kept.
  """
  image = np.asarray(image)
  gt = np.asarray(gt)
  h, w = image.shape[:2]
  if gt.shape[:2] != (h, w):
    raise ValueError(f"image {image.shape} and gt {gt.shape} differ in size")
  src_y, dst_y = _crop_or_pad_1d(h, size, rng)
  src_x, dst_x = _crop_or_pad_1d(w, size, rng)
  out_image = np.zeros((size, size) + image.shape[2:], image.dtype)
  out_gt = np.zeros((size, size) + gt.shape[2:], gt.dtype)
  out_image[dst_y, dst_x] = image[src_y, src_x]
  out_gt[dst_y, dst_x] = gt[src_y, src_x]
  return out_image, out_gt


def random_hflip(image: np.ndarray, gt: np.ndarray, rng: np.random.Generator,
                 p: float = HFLIP_PROB) -> Tuple[np.ndarray, np.ndarray]:
  """Flips image and gt left-right together, with probability ``p``."""
  if rng.random() < p:
    return np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(gt[:, ::-1])
  return image, gt


def rgb_to_gray(image: np.ndarray) -> np.ndarray:
  """ITU-R 601 luma of an [H, W, 3] RGB image, float32 [H, W]."""
  image = np.asarray(image, np.float32)
  r, g, b = LUMA_WEIGHTS
  return r * image[..., 0] + g * image[..., 1] + b * image[..., 2]


def _blend(image: np.ndarray, other, factor: float) -> np.ndarray:
  """``factor * image + (1 - factor) * other``, clipped to uint8 (torchvision's ``_blend``)."""
  return _to_uint8(factor * image.astype(np.float32) + (1.0 - factor) * np.asarray(other))


def adjust_brightness(image: np.ndarray, factor: float) -> np.ndarray:
  return _blend(image, 0.0, factor)


def adjust_contrast(image: np.ndarray, factor: float) -> np.ndarray:
  """Blends with the mean of the greyscale image."""
  return _blend(image, float(rgb_to_gray(image).mean()), factor)


def adjust_saturation(image: np.ndarray, factor: float) -> np.ndarray:
  """Blends with the greyscale image."""
  return _blend(image, rgb_to_gray(image)[..., None], factor)


def _jitter_factor(amount: float, rng: np.random.Generator) -> float:
  return float(rng.uniform(max(0.0, 1.0 - amount), 1.0 + amount))


def color_jitter(image: np.ndarray, rng: np.random.Generator,
                 brightness: float = JITTER_BRIGHTNESS, contrast: float = JITTER_CONTRAST,
                 saturation: float = JITTER_SATURATION) -> np.ndarray:
  """torchvision ``ColorJitter(brightness, contrast, saturation, hue=0)`` on a uint8 RGB image.

  Each factor is uniform in [max(0, 1 - x), 1 + x]; the adjustments run in a random order, each
  rounding and clipping to uint8 as PIL does. An amount of 0 leaves that adjustment out.
  """
  image = np.asarray(image)
  ops = []
  if brightness > 0:
    ops.append((adjust_brightness, _jitter_factor(brightness, rng)))
  if contrast > 0:
    ops.append((adjust_contrast, _jitter_factor(contrast, rng)))
  if saturation > 0:
    ops.append((adjust_saturation, _jitter_factor(saturation, rng)))
  out = image.astype(np.uint8, copy=True)
  for k in rng.permutation(len(ops)):
    fn, factor = ops[k]
    out = fn(out, factor)
  return out


def random_grayscale(image: np.ndarray, rng: np.random.Generator,
                     p: float = GRAYSCALE_PROB) -> np.ndarray:
  """With probability ``p``, the luma replicated to 3 channels (uint8); else the image."""
  if rng.random() < p:
    gray = _to_uint8(rgb_to_gray(image))
    return np.repeat(gray[..., None], 3, axis=-1)
  return image


def _gt_to_unit(gt: np.ndarray) -> np.ndarray:
  if gt.dtype == np.uint8:
    return gt.astype(np.float32) / np.float32(255)
  return gt.astype(np.float32)


def make_training_example(image: np.ndarray, gt: np.ndarray, rng: np.random.Generator,
                          crop_size: int = CROP_SIZE,
                          options: Options = Options()) -> Dict[str, np.ndarray]:
  """One training example from an (image, gt) pair, as docs/data.md describes it.

  Args:
    image: uint8 RGB [H, W, 3] (grey [H, W] or [H, W, 1] is replicated to RGB).
    gt: grey mask [H, W] (or [H, W, 1]), uint8 in [0, 255] or floating in [0, 1]; may be soft.
    rng: the source of randomness.
    crop_size: S.
    options: what is added to the published recipe (``Options``; the default adds nothing).

  Returns:
    dict with ``image`` float32 [S, S, 3] normalised, ``seg`` float32 [S, S, 1] in [-1, 1] (the
    synthesised coarse mask) and ``gt`` float32 [S, S, 1] in [0, 1] (``gt / 255``, soft).
  """
  image = _as_rgb(image).astype(np.uint8, copy=False)
  gt = synthesis.as_mask_2d(gt)
  if gt.dtype != np.uint8 and not np.issubdtype(gt.dtype, np.floating):
    raise ValueError(f"gt must be uint8 in [0, 255] or floating in [0, 1], got {gt.dtype}")
  lowres_seg = None
  if options.lowres_fraction > 0 and rng.random() < options.lowres_fraction:
    factor = int(rng.choice(LOWRES_TRAIN_FACTORS))
    lowres_seg = synthesis.lowres_segmenter_mask(gt, rng, factor)
  if options.rescale_range is not None:
    binary_gt = _is_binary(gt)
    if lowres_seg is None:
      image, gt = random_rescale(rng, options.rescale_range, image, gt)
    else:
      image, gt, lowres_seg = random_rescale(rng, options.rescale_range, image, gt, lowres_seg)
      lowres_seg = synthesis.binarize_gt(lowres_seg)  # binary, as made
    if binary_gt:  # a binary gt stays binary at every size, as BIG's are; a soft one stays soft
      gt = synthesis.binarize_gt(gt)
  if lowres_seg is not None:
    both = np.stack([gt.astype(np.float32), lowres_seg.astype(np.float32)], axis=-1)
    image, both = random_crop(image, both, rng, crop_size)
    image, both = random_hflip(image, both, rng)
    gt, lowres_seg = both[..., 0].astype(gt.dtype), both[..., 1].astype(np.uint8)
  else:
    image, gt = random_crop(image, gt, rng, crop_size)
    image, gt = random_hflip(image, gt, rng)
  image = color_jitter(image, rng)
  image = random_grayscale(image, rng)
  if options.fine_seg_fraction > 0 and rng.random() < options.fine_seg_fraction:
    seg = synthesis.lowres_segmenter_mask(gt, rng, int(rng.choice(FINE_SEG_FACTORS)))
    seg = _blur_seg(seg, float(rng.uniform(*SOFT_SEG_SIGMA_RANGE)))
  else:
    seg = synthesis.synthesize_coarse_mask(gt, rng) if lowres_seg is None else lowres_seg
    if options.soft_seg_fraction > 0 and rng.random() < options.soft_seg_fraction:
      seg = _blur_seg(seg, float(rng.uniform(*SOFT_SEG_SIGMA_RANGE)))
  return {
      "image": normalize_image(image),
      "seg": normalize_seg(seg)[..., None],
      "gt": _gt_to_unit(gt)[..., None],
  }


def _blur_seg(seg: np.ndarray, sigma: float) -> np.ndarray:
  """A binary uint8 seg blurred into a continuous float32 one in [0, 255]."""
  seg = cv2.GaussianBlur(seg.astype(np.float32), (0, 0), sigma,
                         borderType=cv2.BORDER_REPLICATE).reshape(seg.shape)
  return np.clip(seg, 0.0, 255.0)  # the blur's rounding may step just outside


"""Per-sample training augmentation in NumPy/OpenCV, NHWC (docs/data.md, "Per sample").

Upstream's torchvision transforms reproduced (not their random streams); all randomness comes
from a ``np.random.Generator`` argument.
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
LOWRES_TRAIN_FACTORS = (8, 16)  # lowres_fraction's segmenter factors
SOFT_SEG_SIGMA_RANGE = (0.5, 4.0)  # pixels: soft_seg_fraction's and fine_seg_fraction's blur
FINE_SEG_FACTORS = (2, 3, 4)  # fine_seg_fraction's segmenter factors
LUMA_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601, as PIL's convert("L").


@dataclasses.dataclass(frozen=True)
class Options:
  """What the training examples add to the published recipe (docs/data.md, "Options that are
  off in the published recipe"); the defaults are the recipe, and an option left off draws
  nothing from the example's random stream. ``lowres_fraction``, ``soft_seg_fraction``,
  ``fine_seg_fraction``: shares in [0, 1]; ``rescale_range``: ``(low, high)`` or None;
  ``pass_scales``: increasing scales in (0, 1] or None.
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
    """From a training config (each field optional; ``lowres_mask_fraction``: lowres)."""
    get = lambda name, default: config[name] if name in config else default  # noqa: E731
    r, p = get("rescale_range", None), get("pass_scales", None)
    return cls(float(get("lowres_mask_fraction", 0.0)), float(get("soft_seg_fraction", 0.0)),
               None if r is None else tuple(r), None if p is None else tuple(p),
               float(get("fine_seg_fraction", 0.0) or 0.0))


def _to_uint8(x: np.ndarray) -> np.ndarray:
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _as_rgb(image: np.ndarray) -> np.ndarray:
  """[H, W], [H, W, 1] or [H, W, 3] -> [H, W, 3] (grey replicated, as PIL's RGB)."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(f"expected an [H, W, 3] image, got shape {image.shape}")
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  return image


def _crop_or_pad_1d(n: int, size: int, rng: np.random.Generator) -> Tuple[slice, slice]:
  """Source and destination slices along one axis, as ``RandomCrop(pad_if_needed=True)``."""
  offset = int(rng.integers(abs(n - size) + 1))
  if n >= size:
    return slice(offset, offset + size), slice(0, size)
  return slice(0, n), slice(offset, offset + n)


def random_rescale(rng: np.random.Generator, scale_range: Tuple[float, float],
                   *arrays: np.ndarray) -> Tuple[np.ndarray, ...]:
  """``arrays`` ([H, W] or [H, W, C], one size) resized by one factor log-uniform in
  ``scale_range``: area interpolation down, bilinear up; dtypes and ranks kept."""
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
  """float32 ``[B, H, W, C]`` -> ``[B, h, w, C]`` as the loop resizes (``align_corners=True``)."""
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
  """The batch with image and seg resized to ``scale`` of S (``loop_resize``); gt unchanged."""
  s = batch["gt"].shape[1]
  size = scaled_size((s, s), scale)
  return dict(batch, image=loop_resize(batch["image"], size), seg=loop_resize(batch["seg"], size))


def _is_binary(mask: np.ndarray) -> bool:
  """Whether a uint8 (0/255) or floating (0/1) mask holds only its two extreme values."""
  top = 255 if mask.dtype == np.uint8 else 1.0
  return not np.any((mask != 0) & (mask != top))


def random_crop(image: np.ndarray, gt: np.ndarray, rng: np.random.Generator,
                size: int = CROP_SIZE) -> Tuple[np.ndarray, np.ndarray]:
  """The same random ``size`` x ``size`` crop of image [H, W, C] and gt [H, W] (or [H, W, 1]),
  zero-padded at a random offset where smaller; dtypes kept."""
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
  """torchvision ``ColorJitter(brightness, contrast, saturation, hue=0)`` on uint8 RGB: factors
  uniform in [max(0, 1 - x), 1 + x], applied in a random order, each rounding to uint8 as PIL."""
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
  """One training example (docs/data.md) from uint8 RGB ``image`` [H, W, 3] (grey replicated)
  and ``gt`` [H, W] (uint8 in [0, 255] or floating in [0, 1], may be soft): ``image`` float32
  [S, S, 3] normalised, ``seg`` float32 [S, S, 1] in [-1, 1] (the synthesised coarse mask),
  ``gt`` float32 [S, S, 1] in [0, 1]; S = ``crop_size``."""
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


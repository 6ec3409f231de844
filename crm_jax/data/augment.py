"""Per-sample training augmentation in NumPy/OpenCV, NHWC (docs/data.md, "Per sample"): upstream's
torchvision transforms (not their random streams); all randomness from a ``np.random.Generator``."""

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
  """Training options beyond the published recipe (docs/data.md); the defaults (0 or None) are the
  recipe and draw nothing: fractions in [0, 1], ``rescale_range`` (low, high) with 0 < low <= high,
  ``pass_scales`` increasing in (0, 1]."""
  lowres_fraction: float = 0.0
  soft_seg_fraction: float = 0.0
  rescale_range: Optional[Tuple[float, float]] = None
  pass_scales: Optional[Tuple[float, ...]] = None
  fine_seg_fraction: float = 0.0

  def __post_init__(self):
    for name in ("lowres_fraction", "soft_seg_fraction", "fine_seg_fraction"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
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
  return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


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
  return tuple(cv2.resize(a, size, interpolation=interpolation).reshape(size[::-1] + a.shape[2:])
               for a in arrays)


def pass_scale(rng: np.random.Generator, scales: Tuple[float, ...]) -> float:
  """One of ``scales``, uniformly (``Options.pass_scales``)."""
  return float(scales[int(rng.integers(len(scales)))])


def loop_resize(x: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
  """float32 ``[B, H, W, C]`` -> ``[B, h, w, C]`` as the loop resizes (``align_corners=True``)."""
  x = np.asarray(x, np.float32)
  if x.shape[1:3] == tuple(size):
    return x
  for axis in (1, 2):
    i0, i1, lam = align_corners_table(x.shape[axis], size[axis - 1])
    lam = lam.reshape((-1,) + (1,) * (3 - axis))
    x = (1 - lam) * x.take(i0, axis) + lam * x.take(i1, axis)
  return x.astype(np.float32)


def pass_inputs(batch: Dict[str, np.ndarray], scale: float) -> Dict[str, np.ndarray]:
  """The batch with image and seg resized to ``scale`` of S (``loop_resize``); gt unchanged."""
  size = scaled_size((batch["gt"].shape[1],) * 2, scale)
  return dict(batch, image=loop_resize(batch["image"], size), seg=loop_resize(batch["seg"], size))


def random_crop(image: np.ndarray, gt: np.ndarray, rng: np.random.Generator,
                size: int = CROP_SIZE) -> Tuple[np.ndarray, np.ndarray]:
  """The same random ``size`` x ``size`` crop of image [H, W, C] and gt [H, W] (or [H, W, 1]),
  zero-padded at a random offset where smaller; dtypes kept."""
  image, gt = np.asarray(image), np.asarray(gt)
  h, w = image.shape[:2]
  if gt.shape[:2] != (h, w):
    raise ValueError(f"image {image.shape} and gt {gt.shape} differ in size")
  (src_y, dst_y), (src_x, dst_x) = _crop_or_pad_1d(h, size, rng), _crop_or_pad_1d(w, size, rng)

  def crop(a):
    out = np.zeros((size, size) + a.shape[2:], a.dtype)
    out[dst_y, dst_x] = a[src_y, src_x]
    return out
  return crop(image), crop(gt)


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


def color_jitter(image: np.ndarray, rng: np.random.Generator,
                 brightness: float = JITTER_BRIGHTNESS, contrast: float = JITTER_CONTRAST,
                 saturation: float = JITTER_SATURATION) -> np.ndarray:
  """torchvision ``ColorJitter(brightness, contrast, saturation, hue=0)`` on uint8 RGB: factors
  uniform in [max(0, 1 - x), 1 + x], applied in a random order, each rounding to uint8 as PIL."""
  ops = [(fn, float(rng.uniform(max(0.0, 1.0 - x), 1.0 + x)))
         for fn, x in ((adjust_brightness, brightness), (adjust_contrast, contrast),
                       (adjust_saturation, saturation)) if x > 0]
  out = np.asarray(image).astype(np.uint8, copy=True)
  for k in rng.permutation(len(ops)):
    out = ops[k][0](out, ops[k][1])
  return out


def random_grayscale(image: np.ndarray, rng: np.random.Generator,
                     p: float = GRAYSCALE_PROB) -> np.ndarray:
  """With probability ``p``, the luma replicated to 3 channels (uint8); else the image."""
  if rng.random() < p:
    return np.repeat(_to_uint8(rgb_to_gray(image))[..., None], 3, axis=-1)
  return image


def _blur_seg(seg: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """A binary uint8 seg blurred (sigma from ``SOFT_SEG_SIGMA_RANGE``) into float32 in [0, 255]."""
  seg = cv2.GaussianBlur(seg.astype(np.float32), (0, 0), float(rng.uniform(*SOFT_SEG_SIGMA_RANGE)),
                         borderType=cv2.BORDER_REPLICATE).reshape(seg.shape)
  return np.clip(seg, 0.0, 255.0)  # the blur's rounding may step just outside


def make_training_example(image: np.ndarray, gt: np.ndarray, rng: np.random.Generator,
                          crop_size: int = CROP_SIZE,
                          options: Options = Options()) -> Dict[str, np.ndarray]:
  """One example (docs/data.md) of uint8 RGB ``image`` [H, W, 3] (or grey) and ``gt`` [H, W] (uint8
  or floating in [0, 1], may be soft): float32 ``image`` [S, S, 3] normalised, ``seg`` [S, S, 1] in
  [-1, 1] (the coarse mask), ``gt`` [S, S, 1] in [0, 1]; S = ``crop_size``."""
  image = _as_rgb(image).astype(np.uint8, copy=False)
  gt = synthesis.as_mask_2d(gt)
  if gt.dtype != np.uint8 and not np.issubdtype(gt.dtype, np.floating):
    raise ValueError(f"gt must be uint8 in [0, 255] or floating in [0, 1], got {gt.dtype}")
  lowres_seg = None
  if options.lowres_fraction > 0 and rng.random() < options.lowres_fraction:
    lowres_seg = synthesis.lowres_segmenter_mask(gt, rng, int(rng.choice(LOWRES_TRAIN_FACTORS)))
  if options.rescale_range is not None:
    binary_gt = not np.any((gt != 0) & (gt != (255 if gt.dtype == np.uint8 else 1.0)))
    extra = () if lowres_seg is None else (lowres_seg,)
    image, gt, *extra = random_rescale(rng, options.rescale_range, image, gt, *extra)
    if extra:
      lowres_seg = synthesis.binarize_gt(extra[0])  # binary, as made
    if binary_gt:  # a binary gt stays binary at every size, as BIG's are; a soft one stays soft
      gt = synthesis.binarize_gt(gt)
  if lowres_seg is not None:
    both = np.stack([gt.astype(np.float32), lowres_seg.astype(np.float32)], axis=-1)
    image, both = random_hflip(*random_crop(image, both, rng, crop_size), rng)
    gt, lowres_seg = both[..., 0].astype(gt.dtype), both[..., 1].astype(np.uint8)
  else:
    image, gt = random_hflip(*random_crop(image, gt, rng, crop_size), rng)
  image = random_grayscale(color_jitter(image, rng), rng)
  if options.fine_seg_fraction > 0 and rng.random() < options.fine_seg_fraction:
    seg = _blur_seg(synthesis.lowres_segmenter_mask(gt, rng, int(rng.choice(FINE_SEG_FACTORS))),
                    rng)
  else:
    seg = synthesis.synthesize_coarse_mask(gt, rng) if lowres_seg is None else lowres_seg
    if options.soft_seg_fraction > 0 and rng.random() < options.soft_seg_fraction:
      seg = _blur_seg(seg, rng)
  gt = gt.astype(np.float32) / np.float32(255) if gt.dtype == np.uint8 else gt.astype(np.float32)
  return {"image": normalize_image(image), "seg": normalize_seg(seg)[..., None],
          "gt": gt[..., None]}

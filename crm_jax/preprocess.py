"""Input normalisation (docs/model.md, inputs). Works on numpy and jax arrays."""

import numpy as np

from crm_jax.constants import IMAGE_MEAN, IMAGE_STD, SEG_MEAN, SEG_STD

_MEAN = np.asarray(IMAGE_MEAN, np.float32)
_STD = np.asarray(IMAGE_STD, np.float32)


def normalize_image(image):
  """RGB uint8 ``[..., 3]`` -> float32 ``(x/255 - mean) / std``."""
  x = image.astype(np.float32) / np.float32(255)
  return (x - _MEAN) / _STD


def mask_to_prob(mask):
  """Grey uint8 ``[...]`` -> float32 ``x/255`` in [0, 1]: a coarse mask as a probability."""
  return mask.astype(np.float32) / np.float32(255)


def normalize_seg(seg):
  """Grey uint8 ``[...]`` -> float32 ``(x/255 - 0.5) / 0.5`` in [-1, 1]."""
  x = mask_to_prob(seg)
  return (x - np.float32(SEG_MEAN)) / np.float32(SEG_STD)


def prob_to_seg(prob):
  """A probability map as the next scale's seg: ``(p - 0.5) * 2``."""
  return (prob - np.float32(SEG_MEAN)) / np.float32(SEG_STD)


def prob_to_uint8(prob):
  """``uint8(prob * 255)``, truncating, as the published scripts save masks."""
  return (np.asarray(prob, np.float32) * np.float32(255)).astype(np.uint8)

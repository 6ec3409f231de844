"""BIG-style test objects made from the synthetic source (for test_evaluate and test_multidevice)."""

import numpy as np

from crm_jax.data.synthesis import lowres_segmenter_mask
from crm_jax.data.synthetic import make_synthetic_pair


def object_triple(h: int, w: int, rng: np.random.Generator):
  """``(image, seg, gt)`` of ``[h, w]`` whose seg is not small (the small-input rule stays off)
  and whose gt has a boundary (so it has an mBA)."""
  while True:
    image, gt = make_synthetic_pair(h, w, rng)
    seg = lowres_segmenter_mask(gt, rng)
    if seg.sum() >= 50 * 255 and 0 < (gt > 128).mean() < 1:
      return image, seg, gt

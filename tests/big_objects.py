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


def make_world(root, sizes, seed: int):
  """A BIG-layout folder ``root/data`` (``<name>_im.jpg``, ``_seg.png``, ``_gt.png`` for each
  ``name: (h, w)`` of ``sizes``) and a TINY checkpoint ``root/ckpt``: ``(data, ckpt)`` paths."""
  import os

  import cv2
  import jax

  from crm_jax.checkpoint import save_model
  from crm_jax.models.crm import CRM, TINY, init_variables

  data = os.path.join(str(root), "data")
  os.makedirs(data)
  rng = np.random.default_rng(seed)
  for name, (h, w) in sizes.items():
    image, seg, gt = object_triple(h, w, rng)
    assert cv2.imwrite(os.path.join(data, f"{name}_im.jpg"), image[:, :, ::-1])
    assert cv2.imwrite(os.path.join(data, f"{name}_seg.png"), seg)
    assert cv2.imwrite(os.path.join(data, f"{name}_gt.png"), gt)
  ckpt = save_model(os.path.join(str(root), "ckpt"),
                    init_variables(CRM(TINY), jax.random.key(0)), TINY)
  return data, ckpt

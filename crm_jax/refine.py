"""The multi-scale refinement loop (spec section 5) and ``crm_jax.Refiner``.

Command line, one image::

    python -m crm_jax.refine --image IMG --mask MASK --output OUT.png \
        [--checkpoint DIR] [--scales 0.125 0.25 0.5 1.0]

Per scale ``s``: the reflect-padded image and the current seg are resized
(bilinear, align_corners=True) to ``(round(H*s), round(W*s))``, the encoder
and fusion give F once, and the implicit decoder is queried at every pixel
centre of the padded full-resolution grid ``(H, W)``, in chunks of whole
rows. The probability becomes the next scale's seg, ``(p - 0.5) * 2``.

Compilation: the feature computation is compiled once per distinct resized
input shape and the query loop once per (feature shape, padded image shape);
so a folder of N distinctly sized images costs at most 2 x len(scales) x N
compilations, and images of one size share them.
"""

import argparse
import functools
import os
import sys
from typing import Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from crm_jax import checkpoint as ckpt
from crm_jax.constants import EMPTY_SEG_SUM, QUERY_CHUNK, REFLECT_PAD, SCALES
from crm_jax.io import InputError, as_mask, as_rgb, read_image, read_mask, write_image
from crm_jax.models.crm import CRM, ModelConfig
from crm_jax.ops import resize_bilinear_align_corners
from crm_jax.preprocess import normalize_image, normalize_seg, prob_to_seg, prob_to_uint8


def scaled_size(size: Tuple[int, int], scale: float) -> Tuple[int, int]:
  """``(round(H*s), round(W*s))`` with Python's round (halves to even)."""
  return (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))


@functools.partial(jax.jit, static_argnames=("model", "size"))
def _scale_features(model: CRM, variables, image, seg, size):
  """Projected F of one scale and whether the resized seg is empty.

  Args:
    image: padded normalised image ``[H, W, 3]``; seg: current seg ``[H, W]``.
    size: the scale's input size ``(h_s, w_s)``.
  Returns:
    ``(project(F)[0] [h, w, D], empty: bool[])``.
  """
  img = resize_bilinear_align_corners(image[None], size)
  s = resize_bilinear_align_corners(seg[None, :, :, None], size)
  x = jnp.concatenate([img, s], axis=-1)
  feature_map = model.apply(variables, x, method=CRM.features)
  projected = model.apply(variables, feature_map, method=CRM.project)
  return projected[0], jnp.sum(s + 1) < EMPTY_SEG_SUM


@functools.partial(jax.jit, static_argnames=("model", "target_size", "rows_per_chunk"))
def _query_all(model: CRM, variables, projected, target_size, rows_per_chunk):
  """Probabilities at every pixel centre of ``target_size``: ``[H, W]``."""
  big_h, big_w = target_size
  n_chunks = -(-big_h // rows_per_chunk)
  rows = jnp.minimum(jnp.arange(n_chunks * rows_per_chunk, dtype=jnp.int32),
                     big_h - 1).reshape(n_chunks, rows_per_chunk)
  decode = lambda r: model.apply(variables, projected, r, target_size,
                                 method=CRM.decode_grid)
  logits = jax.lax.map(decode, rows).reshape(-1, big_w)[:big_h]
  return jax.nn.sigmoid(logits.astype(jnp.float32))


class Refiner:
  """Refines a coarse mask with CRM, following the published test loop.

  Example::

      refiner = Refiner.from_checkpoint("checkpoints/crm_small")
      prob = refiner.refine(image, mask)   # [H, W] float32 in [0, 1]
  """

  def __init__(self, config: ModelConfig, variables, *,
               query_chunk: int = QUERY_CHUNK, pad: int = REFLECT_PAD):
    self.config = config
    self.model = CRM(config)
    self.variables = jax.device_put(variables)
    self.query_chunk = query_chunk
    self.pad = pad

  @classmethod
  def from_checkpoint(cls, path: str, **kwargs) -> "Refiner":
    """Loads a model checkpoint directory (``crm_jax.checkpoint``)."""
    config, variables = ckpt.load_model(path)
    return cls(config, variables, **kwargs)

  def _check(self, image, mask) -> Tuple[np.ndarray, np.ndarray]:
    image = as_rgb(image, "image")
    mask = as_mask(mask, "mask")
    if image.shape[:2] != mask.shape:
      raise InputError(f"image is {image.shape[1]}x{image.shape[0]} but mask is "
                       f"{mask.shape[1]}x{mask.shape[0]} (width x height)")
    if min(mask.shape) <= self.pad:
      raise InputError(f"image is {mask.shape[1]}x{mask.shape[0]}; both sides must "
                       f"exceed {self.pad} pixels (the reflect padding)")
    return image, mask

  def refine_all_scales(self, image: np.ndarray, mask: np.ndarray,
                        scales: Sequence[float] = SCALES) -> Dict[float, np.ndarray]:
    """The probability map after each scale, ``{s: [H, W] float32}``.

    Args:
      image: RGB uint8 ``[H, W, 3]`` (grey is replicated, RGBA loses alpha).
      mask: the coarse mask, grey uint8 ``[H, W]`` (0-255, soft values allowed).
        An empty mask gives all-zero predictions, as published.
      scales: the input scales, coarse to fine.
    """
    image, mask = self._check(image, mask)
    p = self.pad
    image_p = np.pad(normalize_image(image), ((p, p), (p, p), (0, 0)), mode="reflect")
    seg = jnp.asarray(np.pad(normalize_seg(mask), ((p, p), (p, p)), mode="reflect"))
    image_p = jnp.asarray(image_p)
    target = image_p.shape[:2]
    rows_per_chunk = max(1, min(target[0], self.query_chunk // target[1]))
    out = {}
    for s in scales:
      projected, empty = _scale_features(self.model, self.variables, image_p, seg,
                                         scaled_size(target, s))
      if bool(empty):
        prob = jnp.zeros(target, jnp.float32)
      else:
        prob = _query_all(self.model, self.variables, projected, target, rows_per_chunk)
      out[s] = np.asarray(prob[p:-p, p:-p])
      seg = prob_to_seg(prob)
    return out

  def refine(self, image: np.ndarray, mask: np.ndarray,
             scales: Sequence[float] = SCALES) -> np.ndarray:
    """The refined probability ``[H, W]`` float32 after the last scale."""
    return self.refine_all_scales(image, mask, scales)[scales[-1]]


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m crm_jax.refine",
                                   description="Refine one coarse mask with CRM.")
  parser.add_argument("--image", required=True)
  parser.add_argument("--mask", required=True)
  parser.add_argument("--output", required=True, help="PNG of the refined mask (0-255)")
  parser.add_argument("--checkpoint", default=None,
                      help="model checkpoint directory (default: the bundled one)")
  parser.add_argument("--scales", type=float, nargs="+", default=list(SCALES))
  args = parser.parse_args(argv)
  from crm_jax.bundled import default_checkpoint
  path = args.checkpoint or default_checkpoint()
  try:
    refiner = Refiner.from_checkpoint(path)
    image = read_image(args.image)
    mask = read_mask(args.mask)
    if image.shape[:2] != mask.shape:
      raise InputError(f"{args.mask}: mask is {mask.shape[1]}x{mask.shape[0]} but "
                       f"{args.image} is {image.shape[1]}x{image.shape[0]}")
    prob = refiner.refine(image, mask, args.scales)
    write_image(args.output, prob_to_uint8(prob))
  except (InputError, ckpt.CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

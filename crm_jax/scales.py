"""The one rule for refinement scales, shared by the API, the CLIs and the configs.

Scales are the input scales of the multi-scale loop (docs/refinement.md), coarse to fine: a
non-empty sequence of finite numbers in (0, 1], strictly increasing. For a given image, every
scale must also leave the reflect-padded image at least ``MIN_SCALED_SIDE`` pixels on each side
(one feature at the encoder's output stride); a smaller input makes the loop's empty-seg rule
zero the whole prediction.
"""

import math
from typing import Optional, Sequence, Tuple

from crm_jax.constants import REFLECT_PAD
from crm_jax.geometry import scaled_size
from crm_jax.io import InputError

MIN_SCALED_SIDE = 8  # pixels: the encoder's output stride (one feature).


def check_scales(scales: Sequence[float], size: Optional[Tuple[int, int]] = None,
                 pad: int = REFLECT_PAD) -> Tuple[float, ...]:
  """The scales as a tuple of floats, or ``InputError`` saying which rule a scale breaks.

  Args:
    scales: the refinement scales, coarse to fine.
    size: ``(H, W)`` of an image to refine (unpadded): then every scale must also leave its
      padded size at least ``MIN_SCALED_SIDE`` on each side.
    pad: the reflect padding added on every side.
  """
  try:
    out = tuple(float(s) for s in scales)
  except (TypeError, ValueError):
    raise InputError(f"scales {scales!r}: expected numbers") from None
  if not out:
    raise InputError("no scales given (expected e.g. 0.125 0.25 0.5 1.0)")
  for s in out:
    if not (math.isfinite(s) and 0 < s <= 1):
      raise InputError(f"scale {s}: every scale must be a finite number in (0, 1]")
  for a, b in zip(out, out[1:]):
    if not a < b:
      raise InputError(f"scales {list(out)}: must be strictly increasing, coarse to fine "
                       f"({a} then {b})")
  if size is not None:
    padded = (size[0] + 2 * pad, size[1] + 2 * pad)
    small = scaled_size(padded, out[0])
    if min(small) < MIN_SCALED_SIDE:
      raise InputError(
          f"scale {out[0]}: too small for a {size[1]}x{size[0]} image (its padded input "
          f"would be {small[1]}x{small[0]}; each side needs at least {MIN_SCALED_SIDE} pixels: "
          f"use a scale of at least {MIN_SCALED_SIDE / min(padded):.3g})")
  return out

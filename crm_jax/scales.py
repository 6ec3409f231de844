"""The one rule for refinement scales, shared by the API, the CLIs and the configs.

Scales are the input scales of the multi-scale loop (docs/refinement.md), coarse to fine: a
non-empty sequence of finite numbers in (0, 1], strictly increasing. For a given image, every
scale must also leave the reflect-padded image at least ``MIN_SCALED_SIDE`` pixels on each side
(one feature at the encoder's output stride); a smaller input makes the loop's empty-seg rule
zero the whole prediction.

``min_side`` (off by default) leaves out the leading scales at which an image is too small to
show the encoder anything useful (``scales_to_run``); ``small_image_note`` and the lines built on
it warn when the default loop would show an image that small.
"""

import math
import numbers
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


# ---------------------------------------------------------------------------------------------
# Small images: the optional ``min_side`` (docs/refinement.md, "Small images and min_side").

SMALL_SIDE = 64  # pixels: a coarsest pass that shows the shorter side below this is warned about


class SmallImageWarning(UserWarning):
  """The coarsest scale shows an image with its shorter side below ``SMALL_SIDE`` pixels."""


def check_min_side(min_side) -> int:
  """``min_side`` as an int, or ``InputError`` (a ``ValueError``) unless it is a whole number of
  pixels >= 0."""
  if isinstance(min_side, bool) or not isinstance(min_side, numbers.Integral) or min_side < 0:
    raise InputError(f"min side {min_side!r} (--min-side, min_side=): must be a whole number of "
                     "pixels, 0 or more (0: every scale, the published loop)")
  return int(min_side)


def scales_to_run(scales: Sequence[float], size: Tuple[int, int],
                  min_side: int) -> Tuple[float, ...]:
  """The scales that refine an image of ``size`` ``(H, W)`` (unpadded): the checked ``scales``
  without the leading ones at which its shorter side, ``min(H, W) * s``, is below ``min_side``
  pixels. The last scale always stays; ``min_side=0`` keeps every scale (the published loop).
  """
  scales = check_scales(scales)
  min_side = check_min_side(min_side)
  short = min(size)
  return tuple(s for s in scales[:-1] if short * s >= min_side) + scales[-1:]


def small_image_note(scales: Sequence[float], size: Tuple[int, int]) -> Optional[str]:
  """What the coarsest of ``scales`` shows of an image of ``size`` ``(H, W)`` when
  ``min_side=SMALL_SIDE`` would leave a scale out (``"256x192: the coarsest scale 0.125 shows it
  at 32x24 pixels"``, width x height), else None."""
  scales = check_scales(scales)
  if scales_to_run(scales, size, SMALL_SIDE) == scales:
    return None
  h, w = scaled_size(size, scales[0])
  return f"{size[1]}x{size[0]}: the coarsest scale {scales[0]} shows it at {w}x{h} pixels"


def small_image_advice(scales: Sequence[float], size: Optional[Tuple[int, int]] = None) -> str:
  """The command lines' advice; for one image of ``size`` ``(H, W)`` also the scales that
  ``min_side=SMALL_SIDE`` would run."""
  advice = f"small images refine better with --min-side {SMALL_SIDE}"
  if size is None:
    return advice
  return f"{advice} (or --scales {' '.join(map(str, scales_to_run(scales, size, SMALL_SIDE)))})"


def small_images_line(named_sizes: Sequence[Tuple[str, Optional[Tuple[int, int]]]],
                      scales: Sequence[float]) -> Optional[str]:
  """One ``warning:`` line for a dataset run: how many of the ``(name, (H, W) or None)`` objects
  ``small_image_note`` finds small, with the first as the example; None when none is."""
  small = [(name, size) for name, size in named_sizes
           if size is not None and small_image_note(scales, size)]
  if not small:
    return None
  name, size = small[0]
  return (f"warning: {len(small)} of {len(named_sizes)} object(s) are small images, e.g. "
          f"{name} is {small_image_note(scales, size)}; {small_image_advice(scales)}")

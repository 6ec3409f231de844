"""The one rule for refinement scales (docs/refining.md), shared by the API, CLIs and configs;
``min_side``, the leading scales a small image skips, and its warnings (docs/refinement.md)."""

import math
import numbers
from typing import Optional, Sequence, Tuple

from crm_jax.constants import REFLECT_PAD
from crm_jax.geometry import scaled_size
from crm_jax.io import InputError

MIN_SCALED_SIDE = 8  # pixels: the encoder's output stride (one feature).


def check_scales(scales: Sequence[float], size: Optional[Tuple[int, int]] = None,
                 pad: int = REFLECT_PAD) -> Tuple[float, ...]:
  """The scales (coarse to fine) as a tuple of floats, or ``InputError`` naming the rule broken;
  with ``size`` ``(H, W)``, the image padded by ``pad`` keeps ``MIN_SCALED_SIDE`` px a side."""
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


SMALL_SIDE = 64  # pixels: a coarsest pass that shows the shorter side below this is warned about


class SmallImageWarning(UserWarning):
  """The coarsest scale shows an image with its shorter side below ``SMALL_SIDE`` pixels."""


def check_min_side(min_side) -> int:
  """``min_side`` as an int; ``InputError`` (a ``ValueError``) unless a whole number >= 0."""
  if isinstance(min_side, bool) or not isinstance(min_side, numbers.Integral) or min_side < 0:
    raise InputError(f"min side {min_side!r} (--min-side, min_side=): must be a whole number of "
                     "pixels, 0 or more (0: every scale, the published loop)")
  return int(min_side)


def scales_to_run(scales: Sequence[float], size: Tuple[int, int],
                  min_side: int) -> Tuple[float, ...]:
  """``scales`` less the leading ones where ``min(size) * s < min_side`` (never the last)."""
  scales, min_side = check_scales(scales), check_min_side(min_side)
  return tuple(s for s in scales[:-1] if min(size) * s >= min_side) + scales[-1:]


def small_image_note(scales: Sequence[float], size: Tuple[int, int]) -> Optional[str]:
  """When ``min_side=SMALL_SIDE`` would leave a scale out for ``size`` ``(H, W)``: e.g. ``"256x192:
  the coarsest scale 0.125 shows it at 32x24 pixels"`` (width x height); else None."""
  scales = check_scales(scales)
  if scales_to_run(scales, size, SMALL_SIDE) == scales:
    return None
  h, w = scaled_size(size, scales[0])
  return f"{size[1]}x{size[0]}: the coarsest scale {scales[0]} shows it at {w}x{h} pixels"


def small_image_advice(scales: Sequence[float], size: Optional[Tuple[int, int]] = None) -> str:
  """The command lines' advice; with ``size`` ``(H, W)``, the scales ``SMALL_SIDE`` would run."""
  advice = f"small images refine better with --min-side {SMALL_SIDE}"
  return advice if size is None else (
      f"{advice} (or --scales {' '.join(map(str, scales_to_run(scales, size, SMALL_SIDE)))})")


def small_images_line(named_sizes: Sequence[Tuple[str, Optional[Tuple[int, int]]]],
                      scales: Sequence[float]) -> Optional[str]:
  """One ``warning:`` line counting the small ``(name, (H, W) or None)`` objects, or None."""
  small = [(name, size) for name, size in named_sizes
           if size is not None and small_image_note(scales, size)]
  if not small:
    return None
  name, size = small[0]
  return (f"warning: {len(small)} of {len(named_sizes)} object(s) are small images, e.g. "
          f"{name} is {small_image_note(scales, size)}; {small_image_advice(scales)}")

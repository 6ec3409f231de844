"""The one rule for refinement scales, shared by the API, the CLIs and the configs."""

import math
from typing import Sequence, Tuple

from crm_jax.io import InputError
from crm_jax.metrics import scale_key


def check_scales(scales: Sequence[float]) -> Tuple[float, ...]:
  """The scales as floats; ``InputError`` for none, a non-positive or repeated one."""
  out = tuple(float(s) for s in scales)
  if not out:
    raise InputError("no scales given")
  for s in out:
    if not (math.isfinite(s) and s > 0):
      raise InputError(f"scale {s}: scales must be positive")
  if len({scale_key(s) for s in out}) != len(out):
    raise InputError(f"scales {list(out)}: a scale is repeated")
  return out

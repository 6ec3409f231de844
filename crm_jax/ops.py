"""Array operations with PyTorch semantics that JAX does not provide directly.

Layouts are NHWC. ``jax.image.resize`` uses half-pixel centres; CRM resizes
with ``align_corners=True`` everywhere, implemented here.
"""

from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np


def _align_corners_axis(in_size: int, out_size: int):
  """Source indices and weights along one axis (PyTorch's float32 rule).

  Returns ``(i0, i1, lam)`` with ``out[j] = (1 - lam[j]) * in[i0[j]] +
  lam[j] * in[i1[j]]``.
  """
  if out_size > 1:
    scale = np.float32((in_size - 1) / (out_size - 1))
  else:
    scale = np.float32(0.0)
  src = scale * np.arange(out_size, dtype=np.float32)
  i0 = np.minimum(np.floor(src).astype(np.int32), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  lam = (src - i0.astype(np.float32)).astype(np.float32)
  return i0, i1, lam


def resize_bilinear_align_corners(x: jax.Array, size: Tuple[int, int]) -> jax.Array:
  """Bilinear resize of ``x`` ``[B, H, W, C]`` to ``[B, h, w, C]``.

  Equals ``torch.nn.functional.interpolate(mode='bilinear',
  align_corners=True)`` up to float rounding. Shapes are static.
  """
  out_h, out_w = size
  _, in_h, in_w, _ = x.shape
  if (in_h, in_w) == (out_h, out_w):
    return x
  y0, y1, ly = _align_corners_axis(in_h, out_h)
  x0, x1, lx = _align_corners_axis(in_w, out_w)
  ly = jnp.asarray(ly, x.dtype)[None, :, None, None]
  lx = jnp.asarray(lx, x.dtype)[None, None, :, None]
  rows = x[:, y0] * (1 - ly) + x[:, y1] * ly
  return rows[:, :, x0] * (1 - lx) + rows[:, :, x1] * lx


def make_coord_axis(n: int) -> jax.Array:
  """Pixel-centre coordinates of ``n`` cells in [-1, 1], float32 ``[n]``.

  ``-1 + 1/n + (2/n) * i``, rounded as the published ``make_coord`` rounds.
  """
  start = np.float32(-1.0 + 1.0 / n)
  step = np.float32(2.0 / n)
  return start + step * jnp.arange(n, dtype=jnp.float32)


def make_coord(shape: Tuple[int, int]) -> jax.Array:
  """Grid of (y, x) pixel-centre coordinates, ``[n0, n1, 2]`` float32."""
  ys = make_coord_axis(shape[0])
  xs = make_coord_axis(shape[1])
  yy, xx = jnp.meshgrid(ys, xs, indexing="ij")
  return jnp.stack([yy, xx], axis=-1)

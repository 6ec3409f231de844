"""Array operations with PyTorch semantics that JAX does not provide directly.

Layouts are NHWC. ``jax.image.resize`` uses half-pixel centres; CRM resizes
with ``align_corners=True`` everywhere, implemented here.
"""

from typing import Tuple

import jax
import jax.numpy as jnp

from crm_jax.geometry import align_corners_table, coord_axis


def resize_bilinear_align_corners(x: jax.Array, size: Tuple[int, int]) -> jax.Array:
  """Bilinear resize of ``x`` ``[B, H, W, C]`` to ``[B, h, w, C]``.

  Equals ``torch.nn.functional.interpolate(mode='bilinear',
  align_corners=True)`` up to float rounding. Shapes are static.
  """
  out_h, out_w = size
  _, in_h, in_w, _ = x.shape
  if (in_h, in_w) == (out_h, out_w):
    return x
  return resize_cols(resize_rows(x, align_corners_table(in_h, out_h)),
                     align_corners_table(in_w, out_w))


def make_coord_axis(n: int) -> jax.Array:
  """Pixel-centre coordinates of ``n`` cells in [-1, 1], float32 ``[n]``.

  ``-1 + 1/n + (2/n) * i``, rounded as the published ``make_coord`` rounds
  (a float32 multiply, then an add). Computed on the host and returned as a
  constant: traced under ``jit``, XLA may fuse the multiply-add into an FMA,
  whose single rounding moves some coordinates by one ulp, and the local
  ensemble is discontinuous where a query sits on a border feature centre
  (all four areas ~0): there one ulp changes the logit by whole units.
  """
  return jnp.asarray(coord_axis(n))


def make_coord(shape: Tuple[int, int]) -> jax.Array:
  """Grid of (y, x) pixel-centre coordinates, ``[n0, n1, 2]`` float32."""
  ys = make_coord_axis(shape[0])
  xs = make_coord_axis(shape[1])
  yy, xx = jnp.meshgrid(ys, xs, indexing="ij")
  return jnp.stack([yy, xx], axis=-1)


# ----------------------------------------------------------------------------
# Masked ("bucketed") variants: a static array shape holding a smaller valid
# region at its top-left, whose true size is a traced value. Used by
# ``crm_jax.refine`` so that one compilation serves many image sizes.
# ----------------------------------------------------------------------------

def mask_valid(x: jax.Array, valid: jax.Array) -> jax.Array:
  """Zeroes everything of ``x`` ``[B, H, W, C]`` outside its valid region.

  ``valid`` is int32 ``[3]``: ``(row0, h, w)``; row ``i`` of ``x`` is row
  ``row0 + i`` of a grid whose valid part is ``[0, h) x [0, w)`` (``row0`` is
  non-zero for a band of rows cut out of a larger map).
  """
  rows = valid[0] + jnp.arange(x.shape[1], dtype=jnp.int32)
  cols = jnp.arange(x.shape[2], dtype=jnp.int32)
  keep = ((rows >= 0) & (rows < valid[1]))[:, None] & (cols < valid[2])[None, :]
  return jnp.where(keep[None, :, :, None], x, jnp.zeros((), x.dtype))


def resize_rows(x: jax.Array, table) -> jax.Array:
  """Rows of an align_corners resize: ``x`` ``[B, H, W, C]`` -> ``[B, R, W, C]``.

  ``table`` is ``(i0, i1, lam)`` for the R output rows wanted.
  """
  i0, i1, lam = table
  lam = jnp.asarray(lam).astype(x.dtype)[None, :, None, None]
  return x[:, i0] * (1 - lam) + x[:, i1] * lam


def resize_cols(x: jax.Array, table) -> jax.Array:
  """Columns of an align_corners resize: ``[B, R, W, C]`` -> ``[B, R, Q, C]``."""
  i0, i1, lam = table
  lam = jnp.asarray(lam).astype(x.dtype)[None, None, :, None]
  return x[:, :, i0] * (1 - lam) + x[:, :, i1] * lam

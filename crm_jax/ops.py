"""Array operations with PyTorch semantics that JAX lacks (NHWC): the ``align_corners=True``
resize, pixel-centre coordinates, and masks of a bucketed array's valid region."""

from typing import Tuple

import jax
import jax.numpy as jnp

from crm_jax.geometry import align_corners_table, coord_axis


def resize_bilinear_align_corners(x: jax.Array, size: Tuple[int, int]) -> jax.Array:
  """``x`` ``[B, H, W, C]`` -> ``[B, h, w, C]``, bilinear with ``align_corners=True`` (static)."""
  out_h, out_w = size
  _, in_h, in_w, _ = x.shape
  if (in_h, in_w) == (out_h, out_w):
    return x
  return resize_cols(resize_rows(x, align_corners_table(in_h, out_h)),
                     align_corners_table(in_w, out_w))


def make_coord_axis(n: int) -> jax.Array:
  """Pixel centres of ``n`` cells in [-1, 1], float32 ``[n]``, made on the host as a constant:
  an FMA under ``jit`` would move some by one ulp, and the ensemble is discontinuous there."""
  return jnp.asarray(coord_axis(n))


def make_coord(shape: Tuple[int, int]) -> jax.Array:
  """Grid of (y, x) pixel-centre coordinates, ``[n0, n1, 2]`` float32."""
  yy, xx = jnp.meshgrid(make_coord_axis(shape[0]), make_coord_axis(shape[1]), indexing="ij")
  return jnp.stack([yy, xx], axis=-1)


# Bucketed variants: a static shape holding a valid region (a traced size) at its top-left.

def mask_valid(x: jax.Array, valid: jax.Array) -> jax.Array:
  """Zeroes ``x`` ``[B, H, W, C]`` outside ``valid`` int32 ``(row0, h, w)``: row ``i`` of ``x``
  is row ``row0 + i`` of a grid whose valid part is ``[0, h) x [0, w)``."""
  rows = valid[0] + jnp.arange(x.shape[1], dtype=jnp.int32)
  cols = jnp.arange(x.shape[2], dtype=jnp.int32)
  keep = ((rows >= 0) & (rows < valid[1]))[:, None] & (cols < valid[2])[None, :]
  return jnp.where(keep[None, :, :, None], x, jnp.zeros((), x.dtype))


def resize_rows(x: jax.Array, table) -> jax.Array:
  """Rows ``table`` ``(i0, i1, lam)`` of an align_corners resize: ``[B, R, W, C]``."""
  i0, i1, lam = table
  lam = jnp.asarray(lam).astype(x.dtype)[None, :, None, None]
  return x[:, i0] * (1 - lam) + x[:, i1] * lam


def resize_cols(x: jax.Array, table) -> jax.Array:
  """Columns of an align_corners resize: ``[B, R, W, C]`` -> ``[B, R, Q, C]``."""
  i0, i1, lam = table
  lam = jnp.asarray(lam).astype(x.dtype)[None, None, :, None]
  return x[:, :, i0] * (1 - lam) + x[:, :, i1] * lam

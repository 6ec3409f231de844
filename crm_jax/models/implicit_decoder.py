"""Continuous alignment (CAM) and the implicit decoder with its local ensemble.

Spec section 4. A query is a pixel centre ``q = (qy, qx)`` in [-1, 1] of the
target grid ``(H, W)`` with cell size ``(2/H, 2/W)``; the feature map F is
``[B, h, w, C]`` (NHWC). For each of the four shifts the alignment picks the
nearest feature sample (PyTorch ``grid_sample(mode='nearest',
align_corners=False)`` semantics) and the relative coordinate to it; the MLP
turns ``[f (C), rel (2), q (2), rel_cell (2)]`` into a logit, and the local
ensemble mixes the four logits with the areas of the opposite shifts.

Two equivalent evaluation orders are offered:
* ``ImplicitDecoder.__call__`` on arbitrary queries ``[B, Q, 2]`` (the
  published order: gather C channels, then the first linear layer);
* ``ImplicitDecoder.decode_grid`` on a block of full rows of the target grid,
  which applies the first layer's feature part on the feature grid once
  (``project``), so only ``hidden[0]`` channels are gathered, and evaluates the
  four shifts as one batch. Exact up to float rounding.
"""

from typing import Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from crm_jax.constants import AREA_EPS, DECODER_SHIFTS, SHIFT_EPS
from crm_jax.ops import make_coord_axis

NUM_GEOMETRY_INPUTS = 6  # rel (2), q (2), rel_cell (2).


# ----------------------------------------------------------------------------
# Alignment (the paper's Continuous Alignment Module), one axis at a time.
# ----------------------------------------------------------------------------

def shift_queries(q: jax.Array, v: int, n: int) -> jax.Array:
  """``clamp(q + v/n + 1e-6, -1+1e-6, 1-1e-6)`` in float32 (one axis)."""
  offset = np.float32(v * (2 / n / 2) + SHIFT_EPS)
  lo, hi = np.float32(-1 + SHIFT_EPS), np.float32(1 - SHIFT_EPS)
  return jnp.clip(q + offset, lo, hi)


def nearest_index(q_shifted: jax.Array, n: int) -> jax.Array:
  """Index of the nearest of ``n`` cells: ``nearbyint(((q+1)*n - 1)/2)``.

  Rounds half to even in float32, as ``grid_sample(mode='nearest',
  align_corners=False)`` does. Returns int32 in ``[0, n-1]``.
  """
  src = ((q_shifted + np.float32(1)) * np.float32(n) - np.float32(1)) / np.float32(2)
  return jnp.clip(jnp.round(src).astype(jnp.int32), 0, n - 1)


def align_axis(q: jax.Array, v: int, n: int) -> Tuple[jax.Array, jax.Array]:
  """Nearest feature index and relative coordinate along one axis.

  Args:
    q: query coordinates (any shape), float32 in [-1, 1].
    v: the shift sign, -1 or +1.
    n: the feature map's size along this axis.
  Returns:
    ``(index, rel)``: int32 indices into the feature axis and
    ``rel = (q - p) * n``, with ``p`` the feature cell's centre coordinate.
  """
  index = nearest_index(shift_queries(q, v, n), n)
  p = make_coord_axis(n)[index]
  return index, (q - p) * np.float32(n)


def local_ensemble(logits: jax.Array, rel_y: jax.Array,
                   rel_x: jax.Array) -> jax.Array:
  """Area-weighted mix of the four shifted predictions.

  Args:
    logits, rel_y, rel_x: ``[4, ...]`` in ``DECODER_SHIFTS`` order.
  Returns:
    ``sum_k logits[k] * area[3-k] / sum_k area[k]``, shape ``[...]``.
  """
  areas = jnp.abs(rel_y * rel_x) + np.float32(AREA_EPS)
  total = areas[0] + areas[1] + areas[2] + areas[3]
  out = 0.0
  for k in range(4):
    out = out + logits[k] * (areas[3 - k] / total)
  return out


# ----------------------------------------------------------------------------
# The MLP.
# ----------------------------------------------------------------------------

def torch_linear_init(fan_in: int):
  """PyTorch's default ``nn.Linear`` init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / np.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class Linear(nn.Module):
  """A dense layer whose parameters exist from ``setup`` (for ``project``)."""

  in_features: int
  out_features: int

  def setup(self):
    init = torch_linear_init(self.in_features)
    self.kernel = self.param("kernel", init, (self.in_features, self.out_features))
    self.bias = self.param("bias", init, (self.out_features,))

  def __call__(self, x: jax.Array) -> jax.Array:
    return x @ self.kernel.astype(x.dtype) + self.bias.astype(x.dtype)


class ImplicitDecoder(nn.Module):
  """MLP ``feature_dim + 6 -> hidden... -> 1`` with the local ensemble."""

  feature_dim: int = 256
  hidden: Sequence[int] = (32, 32, 32, 32)

  def setup(self):
    dims = (self.feature_dim + NUM_GEOMETRY_INPUTS, *self.hidden, 1)
    self.layers = [Linear(dims[i], dims[i + 1]) for i in range(len(dims) - 1)]

  def _tail(self, h: jax.Array) -> jax.Array:
    """ReLU, then the layers after the first; returns the logit ``[..., ]``."""
    for layer in self.layers[1:]:
      h = layer(nn.relu(h))
    return h[..., 0]

  def __call__(self, feature_map: jax.Array, coord: jax.Array,
               cell: jax.Array, return_indices: bool = False):
    """Logits at arbitrary queries (the published evaluation order).

    Args:
      feature_map: F, ``[B, h, w, C]``.
      coord: queries ``[B, Q, 2]`` as (y, x) in [-1, 1].
      cell: cell sizes ``[B, Q, 2]``.
      return_indices: also return the nearest indices ``[B, Q, 4, 2]``.
    Returns:
      logits ``[B, Q]`` (and the indices).
    """
    b, h, w, c = feature_map.shape
    flat = feature_map.reshape(b, h * w, c)
    rel_cell = cell * jnp.asarray([h, w], jnp.float32)
    logits, rel_ys, rel_xs, indices = [], [], [], []
    for vy, vx in DECODER_SHIFTS:
      iy, rel_y = align_axis(coord[..., 0], vy, h)
      ix, rel_x = align_axis(coord[..., 1], vx, w)
      f = jnp.take_along_axis(flat, (iy * w + ix)[..., None], axis=1)
      inp = jnp.concatenate(
          [f, rel_y[..., None], rel_x[..., None], coord, rel_cell], axis=-1)
      logits.append(self._tail(self.layers[0](inp)))
      rel_ys.append(rel_y)
      rel_xs.append(rel_x)
      indices.append(jnp.stack([iy, ix], axis=-1))
    out = local_ensemble(jnp.stack(logits), jnp.stack(rel_ys), jnp.stack(rel_xs))
    if return_indices:
      return out, jnp.stack(indices, axis=2)
    return out

  def project(self, feature_map: jax.Array) -> jax.Array:
    """First layer's feature part on the feature grid: ``[B, h, w, hidden[0]]``."""
    kernel = self.layers[0].kernel[: self.feature_dim]
    return feature_map @ kernel.astype(feature_map.dtype)

  def decode_grid(self, projected: jax.Array, rows: jax.Array,
                  target_size: Tuple[int, int]) -> jax.Array:
    """Logits for whole rows of the target grid (all four shifts fused).

    Args:
      projected: ``project(F)`` for ONE image, ``[h, w, D]``.
      rows: int32 row indices ``[R]`` of the target grid ``(H, W)``.
      target_size: ``(H, W)``; queries are its pixel centres, cell (2/H, 2/W).
    Returns:
      logits ``[R, W]``.
    """
    h, w, _ = projected.shape
    big_h, big_w = target_size
    qy = make_coord_axis(big_h)[rows]  # [R]
    qx = make_coord_axis(big_w)  # [W]
    geo = self.layers[0].kernel[self.feature_dim:].astype(projected.dtype)
    bias = self.layers[0].bias.astype(projected.dtype)
    cell_term = (np.float32(2 / big_h) * np.float32(h)) * geo[4] + (
        np.float32(2 / big_w) * np.float32(w)) * geo[5] + bias
    hs, rel_ys, rel_xs = [], [], []
    for vy, vx in DECODER_SHIFTS:
      iy, rel_y = align_axis(qy, vy, h)
      ix, rel_x = align_axis(qx, vx, w)
      row_term = rel_y[:, None] * geo[0] + qy[:, None] * geo[2]  # [R, D]
      col_term = rel_x[:, None] * geo[1] + qx[:, None] * geo[3] + cell_term
      gathered = projected[iy][:, ix]  # [R, W, D]
      hs.append(gathered + row_term[:, None, :] + col_term[None, :, :])
      rel_ys.append(jnp.broadcast_to(rel_y[:, None], (rows.shape[0], big_w)))
      rel_xs.append(jnp.broadcast_to(rel_x[None, :], (rows.shape[0], big_w)))
    logits = self._tail(jnp.stack(hs))  # [4, R, W]
    return local_ensemble(logits, jnp.stack(rel_ys), jnp.stack(rel_xs))

  def decode_axes(self, projected: jax.Array, y_axis, x_axis,
                  rel_cell: Tuple[jax.Array, jax.Array]) -> jax.Array:
    """``decode_grid`` from precomputed per-axis alignment tables.

    The same arithmetic as ``decode_grid``; the tables may come from traced
    sizes (``crm_jax.refine`` builds them for bucketed shapes), so one
    compilation serves many target and feature sizes.

    Args:
      projected: ``project(F)`` for ONE image, ``[h, w, D]``; only indices in
        the tables are read. Its dtype is the MLP's compute dtype.
      y_axis: ``(qy [R], iy [2, R], rel_y [2, R])``: query coordinates of the
        R rows and, for the shifts -1 and +1, ``align_axis``'s outputs.
      x_axis: the same for the W columns.
      rel_cell: float32 scalars ``(2/H * h, 2/W * w)``.
    Returns:
      float32 logits ``[R, W]``.
    """
    qy, iys, rel_ys = y_axis
    qx, ixs, rel_xs = x_axis
    num_rows, num_cols = qy.shape[0], qx.shape[0]
    geo = self.layers[0].kernel[self.feature_dim:].astype(jnp.float32)
    bias = self.layers[0].bias.astype(jnp.float32)
    cell_term = rel_cell[0] * geo[4] + rel_cell[1] * geo[5] + bias
    hs, ry, rx = [], [], []
    for vy, vx in DECODER_SHIFTS:
      a, b = (vy + 1) // 2, (vx + 1) // 2
      row_term = rel_ys[a][:, None] * geo[0] + qy[:, None] * geo[2]  # [R, D]
      col_term = rel_xs[b][:, None] * geo[1] + qx[:, None] * geo[3] + cell_term
      gathered = projected[iys[a]][:, ixs[b]].astype(jnp.float32)  # [R, W, D]
      h = gathered + row_term[:, None, :] + col_term[None, :, :]
      hs.append(h.astype(projected.dtype))
      ry.append(jnp.broadcast_to(rel_ys[a][:, None], (num_rows, num_cols)))
      rx.append(jnp.broadcast_to(rel_xs[b][None, :], (num_rows, num_cols)))
    logits = self._tail(jnp.stack(hs)).astype(jnp.float32)  # [4, R, W]
    return local_ensemble(logits, jnp.stack(ry), jnp.stack(rx))

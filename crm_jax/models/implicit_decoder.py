"""The implicit decoder and its local ensemble (docs/decoder.md; the alignment: ``geometry``).

Queries ``(y, x)`` in [-1, 1] on F ``[B, h, w, C]`` (NHWC); the MLP reads ``[f, rel, q, cell]``."""

from typing import Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from crm_jax import geometry
from crm_jax.constants import AREA_EPS, DECODER_SHIFTS
from crm_jax.ops import make_coord_axis

NUM_GEOMETRY_INPUTS = 6  # rel (2), q (2), rel_cell (2).


def align_axis(q: jax.Array, v: int, n: int) -> Tuple[jax.Array, jax.Array]:
  """``(index, rel)`` of queries ``q`` for the shift ``v`` on ``n`` cells, traced (``geometry``)."""
  return geometry.align_axis(q, v, n, jnp)


def local_ensemble(logits: jax.Array, rel_y: jax.Array,
                   rel_x: jax.Array) -> jax.Array:
  """``sum_k logits[k] * area[3-k] / sum_k area[k]`` of ``[4, ...]`` in ``DECODER_SHIFTS`` order."""
  areas = jnp.abs(rel_y * rel_x) + np.float32(AREA_EPS)
  total = areas[0] + areas[1] + areas[2] + areas[3]
  out = 0.0
  for k in range(4):
    out = out + logits[k] * (areas[3 - k] / total)
  return out


# The MLP.

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
    """Logits ``[B, Q]`` of F ``[B, h, w, C]`` at ``coord`` and ``cell`` ``[B, Q, 2]`` (and
    with ``return_indices`` the nearest indices ``[B, Q, 4, 2]``)."""
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
    """Logits ``[R, W]`` at the pixel centres of rows ``rows`` ``[R]`` of ``target_size``, from
    ONE image's ``project(F)`` ``[h, w, D]`` (the four shifts as one batch)."""
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
    """``decode_grid`` from host-made tables: ``y_axis`` ``(qy [R], iy [2, R], rel_y [2, R])``
    (``geometry.query_axis``), ``x_axis`` for the W columns; float32 ``[R, W]``."""
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

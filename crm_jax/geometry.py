"""Sizes, buckets and index tables of the multi-scale loop: pure NumPy, no JAX.

See docs/refinement.md. Everything here is a discrete choice made on the host
from the true sizes, in NumPy float32 one IEEE operation at a time, exactly as
the published code defines it (the device only gathers with the results):

* ``scaled_size``: a scale's input size, ``(round(H*s), round(W*s))``;
* ``down``: the length after a stride-2 step (PyTorch's rule);
* the bucket ladder (``bucket_side``): each padded side rounded up to
  ``16 * ceil(64 * 2**(k/4) / 16)``, k = 0, 1, ... (64, 80, 96, 112, 128,
  160, 192, ..., 2048, 2448, 2912, 3456, 4096, 4880, 5808, 6896, ...; four
  rungs per octave, so a side grows by at most ~19% + 16 px);
* ``align_corners_table``: the rows/columns an ``align_corners=True``
  bilinear resize reads, and their weights;
* ``query_axis``: the query coordinates of a target axis and, for both
  shifts, the nearest feature index and relative coordinate;
* ``bands``: how a map is cut into bands of rows with a halo.

``ScaleGeometry`` gathers all of them for one image, one bucket and one
scale; the plans of ``crm_jax.plans`` consume it.
"""

import dataclasses
import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from crm_jax.constants import SHIFT_EPS

# Bucket ladder: 16 * ceil(BUCKET_BASE * 2**(k / steps) / 16).
BUCKET_BASE = 64
BUCKET_STEPS = 4
BUCKET_ALIGN = 16
# Spatial levels, in the order of ``ScaleGeometry.sizes``: the padded target
# grid, the scale's network input, x1 (stride 2), x2 (stride 4), x3 (stride 8).
NUM_LEVELS = 5

Size = Tuple[int, int]


def scaled_size(size: Size, scale: float) -> Size:
  """``(round(H*s), round(W*s))`` with Python's round (halves to even), at least 1."""
  return (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))


def down(n: int) -> int:
  """Output length of a stride-2 step (PyTorch rule): ``floor((n - 1) / 2) + 1``."""
  return (n - 1) // 2 + 1


def bucket_side(n: int, steps: int = BUCKET_STEPS) -> int:
  """The smallest ladder rung ``>= n``."""
  k = 0
  while True:
    rung = -(-math.ceil(BUCKET_BASE * 2 ** (k / steps)) // BUCKET_ALIGN) * BUCKET_ALIGN
    if rung >= n:
      return rung
    k += 1


def bucket_shape(size: Size, steps: int = BUCKET_STEPS) -> Size:
  """The bucket ``(Hb, Wb)`` holding a padded grid ``(H, W)``."""
  return (bucket_side(size[0], steps), bucket_side(size[1], steps))


def level_sizes(target: Size, scale: float) -> List[Size]:
  """The sizes of the ``NUM_LEVELS`` levels for a target grid and a scale."""
  sizes = [tuple(target), scaled_size(target, scale)]
  for _ in range(NUM_LEVELS - 2):
    sizes.append((down(sizes[-1][0]), down(sizes[-1][1])))
  return sizes


def align_corners_table(in_size: int, out_size: int, length: Optional[int] = None):
  """Source indices and weights of an align_corners resize along one axis.

  PyTorch's float32 rule: ``src = f32((in - 1) / (out - 1)) * j``,
  ``i0 = floor(src)``, ``i1 = min(i0 + 1, in - 1)``, ``lam = src - i0``, so
  ``out[j] = (1 - lam[j]) * in[i0[j]] + lam[j] * in[i1[j]]``. Padded to
  ``length`` entries (index 0, weight 0) when given.
  Returns ``(i0 int32, i1 int32, lam float32)``.
  """
  scale = np.float32((in_size - 1) / (out_size - 1)) if out_size > 1 else np.float32(0.0)
  src = scale * np.arange(out_size, dtype=np.float32)
  i0 = np.minimum(np.floor(src).astype(np.int32), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  lam = (src - i0.astype(np.float32)).astype(np.float32)
  if length is not None:
    pad = length - out_size
    i0, i1, lam = np.pad(i0, (0, pad)), np.pad(i1, (0, pad)), np.pad(lam, (0, pad))
  return i0, i1, lam


def coord_axis(n: int, length: Optional[int] = None) -> np.ndarray:
  """Pixel-centre coordinates ``-1 + 1/n + (2/n) * i`` in float32 (``make_coord``).

  ``length`` entries (default ``n``; the ones past ``n`` continue the line).
  """
  f32 = np.float32
  return f32(-1.0 + 1.0 / n) + f32(2.0 / n) * np.arange(n if length is None else length,
                                                        dtype=f32)


def query_axis(n: int, m: int, length: Optional[int] = None):
  """A query axis of ``n`` cells aligned to a feature axis of ``m`` cells.

  The continuous alignment (docs/decoder.md) along one axis, for the shifts
  -1 and +1: the shifted query ``clamp(q + v/m + 1e-6, -1+1e-6, 1-1e-6)``, its
  nearest feature index (``grid_sample(mode='nearest', align_corners=False)``,
  halves to even) and the relative coordinate ``(q - p) * m``. On the device,
  XLA may contract a multiply-add into an FMA, which moves coordinates by an
  ulp and can flip a nearest index at a near-tie; here every operation
  rounds as PyTorch's does.
  Returns ``(q [L], index int32 [2, L], rel [2, L])``, ``L = length or n``
  (entries past ``n`` are clamped, meaningless queries).
  """
  f32 = np.float32
  q = coord_axis(n, length)
  p_axis = coord_axis(m)
  lo, hi = f32(-1 + SHIFT_EPS), f32(1 - SHIFT_EPS)
  indices, rels = [], []
  for v in (-1, 1):
    shifted = np.clip(q + f32(v * (2 / m / 2) + SHIFT_EPS), lo, hi)
    src = ((shifted + f32(1)) * f32(m) - f32(1)) / f32(2)
    index = np.clip(np.rint(src).astype(np.int32), 0, m - 1)  # half to even
    indices.append(index)
    rels.append((q - p_axis[index]) * f32(m))
  return q, np.stack(indices), np.stack(rels)


def bands(rows: int, valid_rows: int, halo: int, band: int):
  """Static ``(slab, band)`` and the ``(start, r0)`` of each band of rows.

  Output rows ``[r0, r0 + band)`` are computed from input rows
  ``[start, start + slab)``, which hold ``halo`` rows on either side of them
  except at the edges of the array, where the conv's own zero padding stands
  for the rows beyond (exactly as on the whole array). Only bands holding
  valid rows (``< valid_rows``) are listed; the last one may overlap the one
  before (it is moved up to fit), which rewrites equal values.
  """
  if band + 2 * halo >= rows:
    return rows, rows, [(0, 0)]
  slab = band + 2 * halo
  spans = []
  for i in range(-(-valid_rows // band)):
    r0 = min(i * band, rows - band)
    spans.append((min(max(r0 - halo, 0), rows - slab), r0))
  return slab, band, spans


@dataclasses.dataclass
class ScaleGeometry:
  """Everything the bucketed plans need for one image at one scale.

  Attributes:
    target: the padded target grid ``(H, W)`` (reflect padding included).
    bucket: ``(Hb, Wb)``, the bucket holding it.
    in_shape: static ``(hb_s, wb_s)``, the bucket's network input at this
      scale (holds the true ``(h_s, w_s)``).
    x1_shape: static shape of x1 for ``in_shape``; F has this size.
    query_shape: static ``(hq, wq)`` of the projected F buffer (x1's shape at
      the largest scale of the run, so one buffer serves every scale).
    sizes: int32 ``[NUM_LEVELS, 2]``, the true size of every level.
    input_tables: align_corners tables of the input resize (rows, cols),
      padded to ``in_shape``.
    fusion_tables: ``((rows, cols), (rows, cols))``: x2's and x3's branch
      resized to x1's true size, padded to ``x1_shape``.
    y_axis, x_axis: ``query_axis`` of the target rows/columns against F's
      true size, padded to the bucket.
    rel_cell: float32 ``[2]``, ``(f32(2/H) * f32(h1), f32(2/W) * f32(w1))``.
  """

  target: Size
  bucket: Size
  in_shape: Size
  x1_shape: Size
  query_shape: Size
  sizes: np.ndarray
  input_tables: tuple
  fusion_tables: tuple
  y_axis: tuple
  x_axis: tuple
  rel_cell: np.ndarray

  def static_key(self) -> tuple:
    """What fixes the compiled shapes (the rest are traced values)."""
    return (self.bucket, self.in_shape, self.query_shape)

  def arrays(self) -> Dict[str, object]:
    """The traced inputs of a bucketed program, as a pytree of NumPy arrays."""
    return {"sizes": self.sizes, "input_tables": self.input_tables,
            "fusion_tables": self.fusion_tables, "y_axis": self.y_axis,
            "x_axis": self.x_axis, "rel_cell": self.rel_cell}

  def query_arrays(self) -> Dict[str, object]:
    """The part of ``arrays()`` the decoder's queries read (shapes fixed by the bucket alone)."""
    return {k: v for k, v in self.arrays().items()
            if k in ("sizes", "y_axis", "x_axis", "rel_cell")}


def scale_geometry(target: Size, scale: float, max_scale: float,
                   steps: int = BUCKET_STEPS, bucket: Optional[Size] = None) -> ScaleGeometry:
  """``ScaleGeometry`` of a padded grid ``target`` at ``scale``.

  ``max_scale``: the largest scale of the run (fixes ``query_shape``);
  ``bucket``: the bucket (default ``bucket_shape(target, steps)``).
  """
  bucket = tuple(bucket or bucket_shape(target, steps))
  sizes = level_sizes(target, scale)
  in_shape = scaled_size(bucket, scale)
  x1_shape = (down(in_shape[0]), down(in_shape[1]))
  in_max = scaled_size(bucket, max_scale)
  query_shape = (down(in_max[0]), down(in_max[1]))
  (big_h, big_w), (h_s, w_s), (h1, w1) = sizes[0], sizes[1], sizes[2]
  fusion_tables = tuple(
      (align_corners_table(sizes[level][0], h1, x1_shape[0]),
       align_corners_table(sizes[level][1], w1, x1_shape[1])) for level in (3, 4))
  return ScaleGeometry(
      target=tuple(target), bucket=bucket, in_shape=in_shape, x1_shape=x1_shape,
      query_shape=query_shape, sizes=np.asarray(sizes, np.int32),
      input_tables=(align_corners_table(big_h, h_s, in_shape[0]),
                    align_corners_table(big_w, w_s, in_shape[1])),
      fusion_tables=fusion_tables,
      y_axis=query_axis(big_h, h1, bucket[0]), x_axis=query_axis(big_w, w1, bucket[1]),
      rel_cell=np.asarray([np.float32(2 / big_h) * np.float32(h1),
                           np.float32(2 / big_w) * np.float32(w1)], np.float32))


def batch_size_rung(n: int, ladder: Sequence[int]) -> int:
  """The smallest batch size of ``ladder`` holding ``n`` pairs (the largest if none)."""
  for rung in sorted(ladder):
    if rung >= n:
      return rung
  return max(ladder)

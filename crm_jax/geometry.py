"""Sizes, buckets and index tables of the multi-scale loop, made on the host in NumPy float32 one
IEEE operation at a time, as PyTorch makes them (docs/refinement.md). No JAX."""

import dataclasses
import itertools
import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from crm_jax.constants import SHIFT_EPS

# Bucket ladder: 16 * ceil(BUCKET_BASE * 2**(k / steps) / 16).
BUCKET_BASE = 64
BUCKET_STEPS = 4
BUCKET_ALIGN = 16
# Levels of ``ScaleGeometry.sizes``: the padded target, the scale's input, x1, x2, x3.
NUM_LEVELS = 5

Size = Tuple[int, int]


def scaled_size(size: Size, scale: float) -> Size:
  """``(round(H*s), round(W*s))`` with Python's round (halves to even), at least 1."""
  return (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))


def down(n: int) -> int:
  """Output length of a stride-2 step (PyTorch rule): ``floor((n - 1) / 2) + 1``."""
  return (n - 1) // 2 + 1


def bucket_side(n: int, steps: int = BUCKET_STEPS) -> int:
  """The smallest ladder rung ``>= n`` (four per octave: ..., 2048, 2448, 2912, 3456, 4096)."""
  rungs = (-(-math.ceil(BUCKET_BASE * 2 ** (k / steps)) // BUCKET_ALIGN) * BUCKET_ALIGN
           for k in itertools.count())
  return next(rung for rung in rungs if rung >= n)


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
  """``(i0, i1, lam)`` of an align_corners resize along one axis, PyTorch's float32 rule:
  ``out[j] = (1 - lam[j]) * in[i0[j]] + lam[j] * in[i1[j]]``; zero-padded to ``length``."""
  scale = np.float32((in_size - 1) / (out_size - 1)) if out_size > 1 else np.float32(0.0)
  src = scale * np.arange(out_size, dtype=np.float32)
  i0 = np.minimum(np.floor(src).astype(np.int32), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  lam = (src - i0.astype(np.float32)).astype(np.float32)
  if length is None:
    return i0, i1, lam
  return tuple(np.pad(a, (0, length - out_size)) for a in (i0, i1, lam))


def coord_axis(n: int, length: Optional[int] = None) -> np.ndarray:
  """Pixel centres ``-1 + 1/n + (2/n) * i`` in float32, ``length`` entries (default ``n``)."""
  f32 = np.float32
  return f32(-1.0 + 1.0 / n) + f32(2.0 / n) * np.arange(n if length is None else length, dtype=f32)


def align_axis(q, v: int, m: int, xp=np):
  """``(index int32, rel = (q - p) * m)`` of float32 queries ``q`` shifted by ``v`` (-1 or +1) on
  ``m`` cells, ``p`` the nearest cell's centre (docs/decoder.md); ``xp``: ``numpy`` or ``jnp``."""
  f32 = np.float32
  shifted = xp.clip(q + f32(v * (2 / m / 2) + SHIFT_EPS), f32(-1 + SHIFT_EPS), f32(1 - SHIFT_EPS))
  src = ((shifted + f32(1)) * f32(m) - f32(1)) / f32(2)
  index = xp.clip(xp.rint(src).astype(np.int32), 0, m - 1)
  return index, (q - xp.asarray(coord_axis(m))[index]) * f32(m)


def query_axis(n: int, m: int, length: Optional[int] = None):
  """``align_axis`` of a query axis of ``n`` cells for -1 and +1, on the host (no FMA can flip a
  near-tie): ``(q [L], index [2, L], rel [2, L])``, ``L = length or n`` (past ``n`` meaningless)."""
  q = coord_axis(n, length)
  indices, rels = zip(*(align_axis(q, v, m) for v in (-1, 1)))
  return q, np.stack(indices), np.stack(rels)


def bands(rows: int, valid_rows: int, halo: int, band: int):
  """Static ``(slab, band)`` and the ``(start, r0)`` of each band holding valid rows: output rows
  ``[r0, r0 + band)`` from input rows ``[start, start + slab)``, with a ``halo``."""
  slab = band + 2 * halo
  if slab >= rows:
    return rows, rows, [(0, 0)]
  starts = [min(i * band, rows - band) for i in range(-(-valid_rows // band))]
  return slab, band, [(min(max(r0 - halo, 0), rows - slab), r0) for r0 in starts]


@dataclasses.dataclass
class ScaleGeometry:
  """What the bucketed plans need for one image at one scale: static shapes, then padded tables."""

  target: Size  # The padded target grid (H, W), in ``bucket`` (Hb, Wb).
  bucket: Size
  in_shape: Size  # The bucket's network input at this scale; x1 (and F) of it:
  x1_shape: Size
  query_shape: Size  # The projected F buffer: x1's shape at the run's largest scale.
  sizes: np.ndarray  # int32 [NUM_LEVELS, 2]: the true sizes.
  input_tables: tuple  # align_corners (rows, cols) of the input resize,
  fusion_tables: tuple  # ... of x2's and x3's branches to x1's true size.
  y_axis: tuple  # ``query_axis`` of the target rows / columns against F's true size.
  x_axis: tuple
  rel_cell: np.ndarray  # float32 (2/H * h1, 2/W * w1).

  def arrays(self) -> Dict[str, object]:
    """The traced inputs of a bucketed program, as a pytree of NumPy arrays."""
    return {k: getattr(self, k) for k in ("sizes", "input_tables", "fusion_tables", "y_axis",
                                          "x_axis", "rel_cell")}

  def query_arrays(self) -> Dict[str, object]:
    """The part of ``arrays()`` the decoder's queries read (shapes fixed by the bucket alone)."""
    return {k: getattr(self, k) for k in ("sizes", "y_axis", "x_axis", "rel_cell")}


def scale_geometry(target: Size, scale: float, max_scale: float,
                   steps: int = BUCKET_STEPS, bucket: Optional[Size] = None) -> ScaleGeometry:
  """``ScaleGeometry`` of a padded grid ``target`` at ``scale`` of a run up to ``max_scale``."""
  bucket = tuple(bucket or bucket_shape(target, steps))
  sizes = level_sizes(target, scale)
  in_shape, x1_shape = level_sizes(bucket, scale)[1:3]
  query_shape = level_sizes(bucket, max_scale)[2]
  (big_h, big_w), (h_s, w_s), (h1, w1) = sizes[0], sizes[1], sizes[2]
  return ScaleGeometry(
      target=tuple(target), bucket=bucket, in_shape=in_shape, x1_shape=x1_shape,
      query_shape=query_shape, sizes=np.asarray(sizes, np.int32),
      input_tables=(align_corners_table(big_h, h_s, in_shape[0]),
                    align_corners_table(big_w, w_s, in_shape[1])),
      fusion_tables=tuple((align_corners_table(sizes[level][0], h1, x1_shape[0]),
                           align_corners_table(sizes[level][1], w1, x1_shape[1]))
                          for level in (3, 4)),
      y_axis=query_axis(big_h, h1, bucket[0]), x_axis=query_axis(big_w, w1, bucket[1]),
      rel_cell=np.asarray([np.float32(2 / big_h) * np.float32(h1),
                           np.float32(2 / big_w) * np.float32(w1)], np.float32))


def batch_size_rung(n: int, ladder: Sequence[int]) -> int:
  """The smallest batch size of ``ladder`` holding ``n`` pairs (the largest if none)."""
  return next((rung for rung in sorted(ladder) if rung >= n), max(ladder))

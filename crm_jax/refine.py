"""The multi-scale refinement loop (spec section 5) and ``crm_jax.Refiner``.

Command line, one image::

    python -m crm_jax.refine --image IMG --mask MASK --output OUT.png \
        [--checkpoint DIR] [--scales 0.125 0.25 0.5 1.0] [--dtype bfloat16]

Per scale ``s``: the reflect-padded image and the current seg are resized
(bilinear, align_corners=True) to ``(round(H*s), round(W*s))``, the encoder
and fusion give F once, and the implicit decoder is queried at every pixel
centre of the padded full-resolution grid ``(H, W)``, in chunks of whole
rows. The probability becomes the next scale's seg, ``(p - 0.5) * 2``.

Compilations (``buckets=True``, the default). The padded grid ``(H, W)`` is
placed at the top-left of a zero "bucket" ``(Hb, Wb)``: each side rounded up
to the next rung of the ladder ``16 * ceil(64 * 2**(k/4) / 16)``, k = 0, 1,
... (64, 80, 96, 112, 128, 160, 192, ..., 2048, 2448, 2912, 3456, 4096, 4880,
5808, 6896, ...; four rungs per octave, so a side grows by at most ~19% + 16
px). All arrays keep the bucket's static shapes; the true sizes are traced
values: resizes index with them, every spatial op (the 7x7 and 3x3 convs, the
max-pool) sees its input zeroed outside the valid region, the query grid is
built from them and only the valid rows are queried. A bucket costs at most
``compilations_per_bucket(config, len(scales))`` compilations (10 per scale
+ 1 = 41 for RESNET50 at four scales: the stem, the bottleneck kinds, the
branches and the banded fusion head per scale, one query function), whatever
the image sizes inside it; images of another size in the same bucket cost
none. A folder whose padded sides lie in ``[L, U]`` touches at most
``(ceil(4 log2(U/L)) + 1)**2`` buckets: BIG-like sizes (2048x1600 up to
6000x4000, padded heights 1664-4064 in the 6 rungs 1728-4096, widths
2112-6064 in the 7 rungs 2448-6896) at most 42 buckets, so at most 42 x 41
compilations however many images; the images of one camera (one size) cost
41. The persistent cache (below) makes them a one-time cost per machine.
``buckets=False`` runs the plain per-shape loop (2 x len(scales) compilations
per distinct size, no masking, no bands): the exactness reference.

Exactness: the bucketed results equal the plain loop's up to float rounding
(``tests/test_refine_buckets.py``). The discrete choices are made on the host
from the true sizes, in numpy float32 one IEEE operation at a time, exactly as
the plain path defines them: the align_corners resize tables and the query
coordinates with their nearest-feature indices (bit-identical to the plain
path's); the device only gathers with them.

Memory (bucketed path): the features are computed by small compiled pieces
driven from Python (stem; each bottleneck kind; the x2/x3 branches; the
fusion head), waiting for each to finish before the next allocates. The
stride-1 bottlenecks and the full-resolution fusion head (3x3 ``last_conv``
over 256 channels, BN, ReLU, the decoder's first-layer projection to 32
channels) run in bands of rows with a halo of the conv's dilation (exact),
written in place into preallocated (donated) outputs; the 256-channel F is
never materialised, and the peak is about three x1-sized maps (x1 kept for
the fusion, a block's input and output). Peak resident memory refining at
four scales with the published network, random weights, CPU, a fresh
process (``benchmarks/memory.py``): 2048x1600 2.2 GiB, 4096x3000 5.1 GiB,
6000x4000 8.1 GiB.

Persistent compilation cache: ``Refiner`` (and ``main``) enable JAX's
persistent cache in ``$CRM_JAX_CACHE_DIR`` (default ``~/.cache/crm_jax/xla``;
set it to the empty string to disable), caching every compilation that takes
over 0.1 s, so a second run skips compiling (``enable_compilation_cache``).

``dtype="bfloat16"`` computes the network (encoder, fusion, MLP) in bfloat16
from float32 parameters cast once; coordinates, the local ensemble and the
sigmoid stay float32 (accuracy: ``benchmarks/bf16_accuracy.py``).
"""

import argparse
import functools
import math
import os
import sys
import warnings
from typing import Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from crm_jax import checkpoint as ckpt
from crm_jax.constants import (EMPTY_SEG_SUM, QUERY_CHUNK, REFLECT_PAD, SCALES,
                               SHIFT_EPS)
from crm_jax.io import InputError, as_mask, as_rgb, read_image, read_mask, write_image
from crm_jax.models.crm import CRM, ModelConfig
from crm_jax.models.encoder import STAGE_LAYOUT, Bottleneck, batch_norm, conv, max_pool_3x3_s2
from crm_jax.models.fusion import FUSION_INPUTS, Branch
from crm_jax.models.implicit_decoder import ImplicitDecoder
from crm_jax.ops import (_align_corners_axis, mask_valid, resize_bilinear_align_corners,
                         resize_cols, resize_rows)
from crm_jax.preprocess import normalize_image, normalize_seg, prob_to_seg, prob_to_uint8

# Bucket ladder: 16 * ceil(BUCKET_BASE * 2**(k / steps) / 16).
BUCKET_BASE = 64
BUCKET_STEPS = 4
BUCKET_ALIGN = 16
# Elements of the widest tensor of one band (bottlenecks, fusion head).
BAND_ELEMENTS = 1 << 25
# Persistent compilation cache.
CACHE_DIR_ENV = "CRM_JAX_CACHE_DIR"
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "crm_jax", "xla")
CACHE_MIN_COMPILE_SECS = 0.1
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def scaled_size(size: Tuple[int, int], scale: float) -> Tuple[int, int]:
  """``(round(H*s), round(W*s))`` with Python's round (halves to even)."""
  return (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))


def _down(n: int) -> int:
  """Output length of a stride-2 step (PyTorch rule)."""
  return (n - 1) // 2 + 1


def bucket_side(n: int, steps: int = BUCKET_STEPS) -> int:
  """The smallest ladder rung ``>= n`` (see the module docstring)."""
  k = 0
  while True:
    rung = -(-math.ceil(BUCKET_BASE * 2 ** (k / steps)) // BUCKET_ALIGN) * BUCKET_ALIGN
    if rung >= n:
      return rung
    k += 1


def bucket_shape(size: Tuple[int, int], steps: int = BUCKET_STEPS) -> Tuple[int, int]:
  return (bucket_side(size[0], steps), bucket_side(size[1], steps))


def compilations_per_bucket(config: ModelConfig, num_scales: int) -> int:
  """The most compilations one bucket costs (``buckets=True``).

  Per scale: the stem, per stage the first bottleneck and (if any) the shared
  later ones, the x2 and x3 branches and the fusion head; plus one query
  function for all scales. 10 per scale + 1 for RESNET50.
  """
  per_scale = 1 + sum(1 + (size > 1) for size in config.stage_sizes) + 2 + 1
  return num_scales * per_scale + 1


# ----------------------------------------------------------------------------
# Persistent compilation cache.
# ----------------------------------------------------------------------------

def enable_compilation_cache(path: Optional[str] = None) -> Optional[str]:
  """Points JAX's persistent compilation cache at ``path``; returns the dir.

  ``path`` None: ``$CRM_JAX_CACHE_DIR`` if set (empty: disable), else
  ``~/.cache/crm_jax/xla``. Every compilation over 0.1 s is cached (JAX's
  default threshold, 1 s, would skip most CPU compilations of the query loop).
  """
  if path is None:
    path = os.environ.get(CACHE_DIR_ENV, DEFAULT_CACHE_DIR)
  path = os.path.expanduser(path) if path else None
  if path:
    try:
      os.makedirs(path, exist_ok=True)
    except OSError as e:
      warnings.warn(f"compilation cache disabled: cannot create {path}: {e}")
      path = None
  if jax.config.jax_compilation_cache_dir != path:
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_SECS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    try:  # The cache reads its settings once; make a changed dir take effect.
      from jax._src import compilation_cache
      compilation_cache.reset_cache()
    except (ImportError, AttributeError):
      pass
  return path


# ----------------------------------------------------------------------------
# The plain per-shape loop (buckets=False): static shapes, no masking.
# ----------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("model", "size"))
def _scale_features(model: CRM, variables, image, seg, size):
  """Projected F of one scale and whether the resized seg is empty.

  Args:
    image: padded normalised image ``[H, W, 3]``; seg: current seg ``[H, W]``.
    size: the scale's input size ``(h_s, w_s)``.
  Returns:
    ``(project(F)[0] [h, w, D], empty: bool[])``.
  """
  img = resize_bilinear_align_corners(image[None], size)
  s = resize_bilinear_align_corners(seg[None, :, :, None], size)
  x = jnp.concatenate([img, s], axis=-1)
  feature_map = model.apply(variables, x, method=CRM.features)
  projected = model.apply(variables, feature_map, method=CRM.project)
  return projected[0], jnp.sum(s + 1) < EMPTY_SEG_SUM


@functools.partial(jax.jit, static_argnames=("model", "target_size", "rows_per_chunk"))
def _query_all(model: CRM, variables, projected, target_size, rows_per_chunk):
  """Probabilities at every pixel centre of ``target_size``: ``[H, W]``."""
  big_h, big_w = target_size
  n_chunks = -(-big_h // rows_per_chunk)
  rows = jnp.minimum(jnp.arange(n_chunks * rows_per_chunk, dtype=jnp.int32),
                     big_h - 1).reshape(n_chunks, rows_per_chunk)
  decode = lambda r: model.apply(variables, projected, r, target_size,
                                 method=CRM.decode_grid)
  logits = jax.lax.map(decode, rows).reshape(-1, big_w)[:big_h]
  return jax.nn.sigmoid(logits.astype(jnp.float32))


# ----------------------------------------------------------------------------
# The bucketed loop: static bucket shapes, traced true sizes, bands of rows.
# ----------------------------------------------------------------------------

def _sub(variables, *path):
  """``{'params': ..., 'batch_stats': ...}`` of one submodule."""
  out = {}
  for collection in ("params", "batch_stats"):
    node = variables.get(collection)
    for key in path:
      node = None if node is None else node.get(key)
    if node is not None:
      out[collection] = node
  return out


def _bn(variables, x):
  return batch_norm(None, None).apply(variables, x, use_running_average=True)


def _valid(row0, h, w):
  return jnp.stack([jnp.asarray(row0, jnp.int32), jnp.asarray(h, jnp.int32),
                    jnp.asarray(w, jnp.int32)])


def _device_zeros(shape, dtype):
  """A zero device array made without a compilation (host pages stay untouched)."""
  return jax.device_put(np.zeros(shape, dtype))


def _bands(rows: int, valid_rows: int, halo: int, band: int):
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


@functools.partial(jax.jit, static_argnames=("config", "in_shape"))
def _stem(config: ModelConfig, variables, image, seg, sizes, tables, in_shape):
  """Input resize, conv1/bn1/ReLU and the max-pool of one scale, bucketed.

  Args:
    variables: ``encoder/conv1`` and ``encoder/bn1`` in the compute dtype.
    image: ``[Hb, Wb, 3]`` float32, the padded normalised image at the
      top-left, zeros elsewhere; seg: ``[Hb, Wb]`` float32 (valid part the same).
    sizes: int32 ``[10]``: true ``(H, W)``, scale input ``(h_s, w_s)``, then
      ``(h, w)`` of x1, x2, x3.
    tables: ``(i0, i1, lam)`` of the input resize's rows and columns.
    in_shape: static ``(hb_s, wb_s)`` holding ``(h_s, w_s)``.
  Returns:
    ``(x1, pooled, empty)``: x1 ``[1, hb1, wb1, stem]`` and the max-pooled
    ``[1, hb2, wb2, stem]``, both zero outside their valid regions, and
    whether the resized seg is empty.
  """
  dtype = variables["conv1"]["params"]["kernel"].dtype
  x = jnp.concatenate([image, seg[:, :, None]], axis=-1)[None]
  x = mask_valid(resize_cols(resize_rows(x, tables[0]), tables[1]),
                 _valid(0, sizes[2], sizes[3]))
  inside = ((jnp.arange(in_shape[0]) < sizes[2])[:, None]
            & (jnp.arange(in_shape[1]) < sizes[3])[None, :])
  empty = jnp.sum(jnp.where(inside, x[0, :, :, 3] + 1, 0)) < EMPTY_SEG_SUM
  x = conv(config.stem_width, 7, None, stride=2, padding=3).apply(
      variables["conv1"], x.astype(dtype))
  x1 = mask_valid(jax.nn.relu(_bn(variables["bn1"], x)), _valid(0, sizes[4], sizes[5]))
  pooled = mask_valid(max_pool_3x3_s2(x1), _valid(0, sizes[6], sizes[7]))
  return x1, pooled, empty


@functools.partial(jax.jit, static_argnames=("spec", "slab", "band"), donate_argnames=("out",))
def _block_band(spec, block_vars, out, x, start, r0, h, w, slab, band):
  """One band of rows of a stride-1 bottleneck, written into ``out`` in place.

  ``spec``: the ``Bottleneck`` fields ``(width, stride, dilation, expansion,
  downsample)``; ``x`` ``[1, rows, cols, in]`` with valid size ``(h, w)``.
  """
  y = Bottleneck(*spec).apply(block_vars, jax.lax.dynamic_slice_in_dim(x, start, slab, axis=1),
                              valid=_valid(start, h, w))
  y = jax.lax.dynamic_slice_in_dim(y, r0 - start, band, axis=1)
  return jax.lax.dynamic_update_slice_in_dim(out, y, r0, axis=1)


@functools.partial(jax.jit, static_argnames=("spec",))
def _block_whole(spec, block_vars, x, h, w):
  """A (stride-2) bottleneck on the whole map, input masked to ``(h, w)``."""
  return Bottleneck(*spec).apply(block_vars, x, valid=_valid(0, h, w))


@functools.partial(jax.jit, static_argnames=("width",))
def _branch(width: int, branch_vars, x):
  """A fusion branch (pointwise) on the whole map."""
  return Branch(width).apply(branch_vars, x)


@functools.partial(jax.jit, static_argnames=("config", "slab", "band"),
                   donate_argnames=("out",))
def _head_band(config: ModelConfig, variables, out, x1, b, c, tables, start, r0, h1, w1,
               slab, band):
  """One band of ``project(F)`` rows, written into ``out`` in place.

  The three branches at x1's size (x2's and x3's resized, align_corners, from
  their own maps ``b`` and ``c``), concatenated, zeroed outside x1's valid
  region, 3x3 ``last_conv``, ``last_bn``, ReLU and the decoder's first-layer
  projection, for rows ``[r0, r0 + band)`` from the slab ``[start, start +
  slab)``. ``variables``: ``{"fusion": ..., "implicit_decoder": ...}``.
  """
  widths = dict(zip(FUSION_INPUTS, config.fusion_widths))
  fus = variables["fusion"]
  take = lambda t: jax.lax.dynamic_slice_in_dim(t, start, slab)
  a = Branch(widths["x1"]).apply(_sub(fus, "branch_x1"),
                                 jax.lax.dynamic_slice_in_dim(x1, start, slab, axis=1))
  parts = [a] + [resize_cols(resize_rows(t, [take(u) for u in rows]), cols)
                 for t, (rows, cols) in zip((b, c), tables)]
  cat = mask_valid(jnp.concatenate(parts, axis=-1), _valid(start, h1, w1))
  y = conv(config.feature_dim, 3, None).apply(_sub(fus, "last_conv"), cat)
  y = jax.nn.relu(_bn(_sub(fus, "last_bn"), jax.lax.dynamic_slice_in_dim(y, r0 - start, band, axis=1)))
  decoder = ImplicitDecoder(config.feature_dim, tuple(config.decoder_hidden))
  y = decoder.apply(variables["implicit_decoder"], y, method=ImplicitDecoder.project)
  return jax.lax.dynamic_update_slice(out, y, (0, r0, 0, 0))


def _bucket_features(config: ModelConfig, variables, image, seg, sizes, tables, in_shape,
                     query_shape, band_elements: int):
  """Projected F of one scale, bucketed and banded; and whether the seg is empty.

  Host-driven: each piece is a small compiled function over bucket shapes;
  the stride-1 bottlenecks and the fusion head run band by band into
  preallocated outputs (donated, updated in place), and every full-size
  intermediate is dropped as soon as it is used, so the peak memory is about
  three x1-sized maps (x1, a block's input and output).

  Args: as ``_stem``; ``tables`` also holds ``x2``/``x3`` row and column
  tables to x1's size; ``query_shape`` the static ``(hq, wq)`` of the result.
  Returns:
    ``(projected [hq, wq, D], empty)``.
  """
  enc = lambda *path: _sub(variables, "encoder", *path)
  x1, y, empty = _stem(config, {"conv1": enc("conv1"), "bn1": enc("bn1")}, image, seg,
                       sizes, tables["in"], in_shape=in_shape)
  dtype = x1.dtype
  h, w = sizes[6], sizes[7]
  widths = dict(zip(FUSION_INPUTS, config.fusion_widths))
  fus = lambda name: _sub(variables, "fusion", name)
  b = c = None
  for stage, (size, width) in enumerate(zip(config.stage_sizes, config.stage_widths)):
    stride, first_dilation, dilation = STAGE_LAYOUT[stage]
    out_dim = width * config.expansion
    for i in range(size):
      spec = (width, stride if i == 0 else 1, first_dilation if i == 0 else dilation,
              config.expansion, i == 0)
      block_vars = enc(f"layer{stage + 1}_{i}")
      if spec[1] != 1:
        y = jax.block_until_ready(_block_whole(spec, block_vars, y, h, w))
        h, w = sizes[8], sizes[9]
        continue
      rows, cols = y.shape[1:3]
      slab, band, spans = _bands(rows, int(h), spec[2],
                                 max(1, band_elements // (cols * out_dim)))
      out = _device_zeros((1, rows, cols, out_dim), dtype)
      for start, r0 in spans:
        out = _block_band(spec, block_vars, out, y, np.int32(start), np.int32(r0), h, w,
                          slab=slab, band=band)
      # Wait before the next block allocates its output: with asynchronous
      # dispatch, Python would otherwise allocate every stage's maps at once.
      y = jax.block_until_ready(out)
      del out
    if stage == 0:
      b = _branch(widths["x2"], fus("branch_x2"), y)
  c = jax.block_until_ready(_branch(widths["x3"], fus("branch_x3"), y))
  del y
  rows, cols = x1.shape[1:3]
  slab, band, spans = _bands(rows, int(sizes[4]), 1,
                             max(1, band_elements // (cols * config.feature_dim)))
  head_vars = {"fusion": _sub(variables, "fusion"),
               "implicit_decoder": _sub(variables, "implicit_decoder")}
  head_tables = ((tables["x2_rows"], tables["x2_cols"]), (tables["x3_rows"], tables["x3_cols"]))
  projected = _device_zeros((1, *query_shape, config.decoder_hidden[0]), dtype)
  for start, r0 in spans:
    projected = _head_band(config, head_vars, projected, x1, b, c, head_tables,
                           np.int32(start), np.int32(r0), sizes[4], sizes[5],
                           slab=slab, band=band)
  return projected, empty


def _resize_table(in_size: int, out_size: int, length: int):
  """``ops._align_corners_axis`` (the plain path's host table), padded to
  ``length`` with index 0 and weight 0."""
  i0, i1, lam = _align_corners_axis(in_size, out_size)
  pad = length - out_size
  return (np.pad(i0, (0, pad)), np.pad(i1, (0, pad)), np.pad(lam, (0, pad)))


def _axis_tables(n: int, m: int, length: int):
  """A query axis of ``n`` cells aligned to a feature axis of ``m`` cells.

  Computed on the host in numpy float32, one IEEE operation at a time, as
  ``make_coord_axis`` and ``implicit_decoder.align_axis`` define it (on the
  device, XLA may contract a multiply-add into an FMA when operands are not
  constants, which moves coordinates by an ulp and could flip a nearest index
  at a near-tie). Padded to ``length`` (the padded queries get clamped,
  meaningless entries).
  Returns ``(q [length], index int32 [2, length], rel [2, length])``, the
  second axis of ``index``/``rel`` for the shifts -1 and +1.
  """
  f32 = np.float32
  q = f32(-1.0 + 1.0 / n) + f32(2.0 / n) * np.arange(length, dtype=f32)
  p_axis = f32(-1.0 + 1.0 / m) + f32(2.0 / m) * np.arange(m, dtype=f32)
  lo, hi = f32(-1 + SHIFT_EPS), f32(1 - SHIFT_EPS)
  indices, rels = [], []
  for v in (-1, 1):
    shifted = np.clip(q + f32(v * (2 / m / 2) + SHIFT_EPS), lo, hi)
    src = ((shifted + f32(1)) * f32(m) - f32(1)) / f32(2)
    index = np.clip(np.rint(src).astype(np.int32), 0, m - 1)  # half to even
    indices.append(index)
    rels.append((q - p_axis[index]) * f32(m))
  return q, np.stack(indices), np.stack(rels)


@functools.partial(jax.jit, static_argnames=("config", "target_shape", "rows_per_chunk"))
def _bucket_query(config: ModelConfig, dec_vars, projected, y_axis, x_axis,
                  rel_cell, num_rows, target_shape, rows_per_chunk):
  """Probabilities at the pixel centres of the true target grid, bucketed.

  Args:
    projected: ``[1, hq, wq, D]`` with the true F at the top-left.
    y_axis, x_axis: ``_axis_tables`` of the rows (length Hb) and columns
      (length Wb).
    rel_cell: float32 ``[2]``, ``(f32(2/H) * f32(h), f32(2/W) * f32(w))``.
    num_rows: int32, the true ``H`` (rows past it are not queried).
    target_shape: static ``(Hb, Wb)``.
  Returns:
    ``(prob [Hb, Wb], next seg [Hb, Wb])`` float32, meaningful on the valid part.
  """
  big_hb, big_wb = target_shape
  projected = projected[0]
  qy, iy, rel_y = y_axis
  decoder = ImplicitDecoder(config.feature_dim, tuple(config.decoder_hidden))
  n_static = -(-big_hb // rows_per_chunk)
  out = jnp.zeros((n_static * rows_per_chunk, big_wb), jnp.float32)

  def body(i, out):
    rows = jnp.minimum(i * rows_per_chunk + jnp.arange(rows_per_chunk, dtype=jnp.int32),
                       num_rows - 1)
    logits = decoder.apply(dec_vars, projected, (qy[rows], iy[:, rows], rel_y[:, rows]),
                           x_axis, (rel_cell[0], rel_cell[1]),
                           method=ImplicitDecoder.decode_axes)
    return jax.lax.dynamic_update_slice(out, jax.nn.sigmoid(logits),
                                        (i * rows_per_chunk, 0))

  n_chunks = (num_rows + rows_per_chunk - 1) // rows_per_chunk
  prob = jax.lax.fori_loop(0, n_chunks, body, out)[:big_hb]
  return prob, prob_to_seg(prob)


def _cast(variables, dtype):
  """The variables as ``dtype`` (cast on the host: no compilation)."""
  return jax.tree_util.tree_map(
      lambda a: jax.device_put(np.asarray(a).astype(dtype)), variables)


class Refiner:
  """Refines a coarse mask with CRM, following the published test loop.

  Example::

      refiner = Refiner.from_checkpoint("checkpoints/crm_small")
      prob = refiner.refine(image, mask)   # [H, W] float32 in [0, 1]

  Args:
    config, variables: the model.
    query_chunk: queries per chunk of the decoder (whole rows).
    pad: reflect padding (32, as published).
    buckets: pad to bucket shapes (bounded compilations, banded memory; see
      the module docstring); False: the plain per-shape loop.
    bucket_steps: ladder rungs per octave.
    dtype: ``"float32"`` or ``"bfloat16"`` (bucketed path only).
    band_elements: elements of the widest per-band tensor.
    compilation_cache: enable the persistent compilation cache
      (``enable_compilation_cache``).
  """

  def __init__(self, config: ModelConfig, variables, *,
               query_chunk: int = QUERY_CHUNK, pad: int = REFLECT_PAD,
               buckets: bool = True, bucket_steps: int = BUCKET_STEPS,
               dtype="float32", band_elements: int = BAND_ELEMENTS,
               compilation_cache: bool = True):
    if compilation_cache:
      enable_compilation_cache()
    name = jnp.dtype(dtype).name
    if name not in DTYPES:
      raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
    if name != "float32" and not buckets:
      raise ValueError("dtype other than float32 needs buckets=True")
    self.config = config
    self.model = CRM(config)
    self.variables = jax.device_put(variables)
    self.compute_variables = (self.variables if name == "float32"
                              else _cast(variables, DTYPES[name]))
    self.dtype = name
    self.query_chunk = query_chunk
    self.pad = pad
    self.buckets = buckets
    self.bucket_steps = bucket_steps
    self.band_elements = band_elements

  @classmethod
  def from_checkpoint(cls, path: str, **kwargs) -> "Refiner":
    """Loads a model checkpoint directory (``crm_jax.checkpoint``)."""
    config, variables = ckpt.load_model(path)
    return cls(config, variables, **kwargs)

  def _check(self, image, mask) -> Tuple[np.ndarray, np.ndarray]:
    image = as_rgb(image, "image")
    mask = as_mask(mask, "mask")
    if image.shape[:2] != mask.shape:
      raise InputError(f"image is {image.shape[1]}x{image.shape[0]} but mask is "
                       f"{mask.shape[1]}x{mask.shape[0]} (width x height)")
    if min(mask.shape) <= self.pad:
      raise InputError(f"image is {mask.shape[1]}x{mask.shape[0]}; both sides must "
                       f"exceed {self.pad} pixels (the reflect padding)")
    return image, mask

  def refine_all_scales(self, image: np.ndarray, mask: np.ndarray,
                        scales: Sequence[float] = SCALES) -> Dict[float, np.ndarray]:
    """The probability map after each scale, ``{s: [H, W] float32}``.

    Args:
      image: RGB uint8 ``[H, W, 3]`` (grey is replicated, RGBA loses alpha).
      mask: the coarse mask, grey uint8 ``[H, W]`` (0-255, soft values allowed).
        An empty mask gives all-zero predictions, as published.
      scales: the input scales, coarse to fine.
    """
    image, mask = self._check(image, mask)
    p = self.pad
    image_p = np.pad(normalize_image(image), ((p, p), (p, p), (0, 0)), mode="reflect")
    seg_p = np.pad(normalize_seg(mask), ((p, p), (p, p)), mode="reflect")
    if self.buckets:
      return self._refine_bucketed(image_p, seg_p, scales)
    return self._refine_plain(image_p, seg_p, scales)

  def _refine_plain(self, image_p, seg_p, scales):
    p = self.pad
    seg = jnp.asarray(seg_p)
    image_p = jnp.asarray(image_p)
    target = image_p.shape[:2]
    rows_per_chunk = max(1, min(target[0], self.query_chunk // target[1]))
    out = {}
    for s in scales:
      projected, empty = _scale_features(self.model, self.variables, image_p, seg,
                                         scaled_size(target, s))
      if bool(empty):
        prob = jnp.zeros(target, jnp.float32)
      else:
        prob = _query_all(self.model, self.variables, projected, target, rows_per_chunk)
      out[s] = np.asarray(prob[p:-p, p:-p])
      seg = prob_to_seg(prob)
    return out

  def _refine_bucketed(self, image_p, seg_p, scales):
    p = self.pad
    big_h, big_w = image_p.shape[:2]
    big_hb, big_wb = bucket_shape((big_h, big_w), self.bucket_steps)
    image = np.zeros((big_hb, big_wb, 3), np.float32)
    image[:big_h, :big_w] = image_p
    seg = np.zeros((big_hb, big_wb), np.float32)
    seg[:big_h, :big_w] = seg_p
    image, seg = jax.device_put(image), jax.device_put(seg)
    in_max = scaled_size((big_hb, big_wb), max(scales))
    query_shape = (_down(in_max[0]), _down(in_max[1]))
    rows_per_chunk = max(1, min(big_hb, self.query_chunk // big_wb))
    dec_vars = _sub(self.compute_variables, "implicit_decoder")
    out = {}
    for s in scales:
      h_s, w_s = scaled_size((big_h, big_w), s)
      in_shape = scaled_size((big_hb, big_wb), s)
      sizes = [big_h, big_w, h_s, w_s]
      for _ in range(3):
        sizes += [_down(sizes[-2]), _down(sizes[-1])]
      h1, w1 = sizes[4], sizes[5]
      hb1, wb1 = _down(in_shape[0]), _down(in_shape[1])
      tables = {"in": (_resize_table(big_h, h_s, in_shape[0]),
                       _resize_table(big_w, w_s, in_shape[1])),
                "x2_rows": _resize_table(sizes[6], h1, hb1),
                "x2_cols": _resize_table(sizes[7], w1, wb1),
                "x3_rows": _resize_table(sizes[8], h1, hb1),
                "x3_cols": _resize_table(sizes[9], w1, wb1)}
      projected, empty = _bucket_features(
          self.config, self.compute_variables, image, seg, np.asarray(sizes, np.int32),
          tables, in_shape=in_shape, query_shape=query_shape,
          band_elements=self.band_elements)
      if bool(empty):
        prob = np.zeros((big_hb, big_wb), np.float32)
        seg = jax.device_put(prob_to_seg(prob))
      else:
        rel_cell = np.asarray([np.float32(2 / big_h) * np.float32(h1),
                               np.float32(2 / big_w) * np.float32(w1)], np.float32)
        prob, seg = _bucket_query(self.config, dec_vars, projected,
                                  _axis_tables(big_h, h1, big_hb),
                                  _axis_tables(big_w, w1, big_wb), rel_cell,
                                  np.int32(big_h), target_shape=(big_hb, big_wb),
                                  rows_per_chunk=rows_per_chunk)
      del projected
      prob = jax.block_until_ready(prob)
      out[s] = np.array(np.asarray(prob)[p:big_h - p, p:big_w - p])
    return out

  def refine(self, image: np.ndarray, mask: np.ndarray,
             scales: Sequence[float] = SCALES) -> np.ndarray:
    """The refined probability ``[H, W]`` float32 after the last scale."""
    return self.refine_all_scales(image, mask, scales)[scales[-1]]


def main(argv: Optional[Sequence[str]] = None) -> int:
  """``python -m crm_jax.refine``: one image. Bad arguments, files and checkpoints, and OS errors,
  end in one ``error:`` line naming the path (exit status 2); the output is checked before the
  checkpoint is loaded, and is never one of the inputs."""
  from crm_jax import io
  from crm_jax.bundled import default_checkpoint
  from crm_jax.scales import check_scales

  parser = argparse.ArgumentParser(prog="python -m crm_jax.refine",
                                   description="Refine one coarse mask with CRM.")
  parser.add_argument("--image", required=True)
  parser.add_argument("--mask", required=True,
                      help="the coarse mask (encodings: see the README's Input rules)")
  parser.add_argument("--output", required=True, help="PNG of the refined mask (0-255)")
  parser.add_argument("--checkpoint", default=None,
                      help="model checkpoint directory (default: the bundled small one, trained "
                           "on synthetic data)")
  parser.add_argument("--scales", type=float, nargs="+", default=list(SCALES))
  parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                      help="compute dtype of the network (default float32)")
  args = parser.parse_args(argv)
  io.show_warnings_as_lines()
  try:
    scales = check_scales(args.scales)
    io.check_output_file(args.output, inputs=(args.image, args.mask))
    io.remove_leftovers(os.path.dirname(os.path.abspath(args.output)))
    image = io.read_image(args.image)
    mask = io.read_mask(args.mask)
    if image.shape[:2] != mask.shape:
      raise InputError(f"{args.mask}: mask is {mask.shape[1]}x{mask.shape[0]} but "
                       f"{args.image} is {image.shape[1]}x{image.shape[0]}")
    check_scales(scales, image.shape[:2])
    path = args.checkpoint
    if path is None:
      path = default_checkpoint()
      print(f"note: no --checkpoint given: using the bundled small checkpoint ({path}), trained "
            "on synthetic data only; for real photographs convert the published weights (README: "
            "Convert the published checkpoint and evaluate on BIG)", file=sys.stderr)
    refiner = Refiner.from_checkpoint(path, dtype=args.dtype)
    prob = refiner.refine(image, mask, scales)
    io.write_image(args.output, prob_to_uint8(prob))
  except (InputError, ckpt.CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except OSError as e:
    print(f"error: {io.os_error_line(e)}", file=sys.stderr)
    return 2
  print(f"wrote {args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
